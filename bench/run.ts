/**
 * The benchmark proper: plaintext vs typeorm-envelope vs typeorm-encrypted, in one process against
 * one PostgreSQL (see ./database.ts), then the re-wrap section (./rewrap.ts: rewrapDataKeys vs a
 * plain SQL UPDATE) and the tenant section (./tenants.ts: find() of rows spread over many tenants,
 * cold and warm cache). Prints markdown tables and writes bench/results.json.
 *
 * `npm run bench` runs this file inside a project the packed package is installed into (./main.ts),
 * so it measures the package as installed; `npm run bench -- --from-checkout` runs it from the
 * compiled checkout. Either way the library is imported through ./library.ts only.
 *
 * Environment: BENCH_ROWS (10000), BENCH_ROUNDS (5 measured, after 1 discarded warm-up round),
 * BENCH_LOOKUPS (1000), BENCH_REWRAP_ROWS (100000), BENCH_REWRAP_ROUNDS (3),
 * BENCH_REWRAP_MEMORY_ROWS (100000,1000000), BENCH_COMPACT_REWRAP_ROWS (1000000), BENCH_WORKER_ROWS (1000000), BENCH_WORKER_REENCRYPT_ROWS
 * (100000), BENCH_LOGIN_ROWS (100000), BENCH_LOGIN_LOOKUPS (1000), BENCH_LOGIN_ROUNDS (5),
 * BENCH_LOGIN_WRITES (10000), BENCH_TENANT_ROWS
 * (10000), BENCH_TENANTS (100), BENCH_TENANT_ROUNDS (5), BENCH_DB (force a database kind),
 * DATABASE_URL. Set by ./main.ts: BENCH_SOURCE (`installed` or `checkout`), BENCH_TARBALL,
 * BENCH_CHECKOUT (the repository, whose sources an installed run must not load) and
 * BENCH_RESULTS_FILE.
 */
import 'reflect-metadata';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { dirname, join, relative, sep } from 'node:path';
import { DataSource, type ObjectLiteral, type Repository } from 'typeorm';
import { runBlindIndexBench } from './blind-index';
import { type BenchDatabase, openDatabase } from './database';
import {
  CompactPerson,
  EnvelopePerson,
  type PersonData,
  PlainPerson,
  SIDECAR_FLOOR_COLUMNS,
  SidecarFloorPerson,
  TypeormEncryptedPerson,
} from './entities';
import {
  aesBackendInfo,
  DATA_KEYS_TABLE,
  EnvelopeEncryption,
  LocalKeyProvider,
  TypeormEnvelopeDataKeys1764500000000,
} from './library';
import { runRewrapBench } from './rewrap';
import { runCompactRewrapBench } from './rewrap-compact';
import { runRewrapMemoryBench } from './rewrap-memory';
import { collectGarbage, fmtInt, intEnv, median, round1, round2 } from './stats';
import { runKmsStorageBench } from './storage-kms';
import { runTenantBench } from './tenants';
import { runWorkersBench } from './workers';

const ROWS = intEnv('BENCH_ROWS', 10_000);
const ROUNDS = intEnv('BENCH_ROUNDS', 5);
const LOOKUPS = intEnv('BENCH_LOOKUPS', 1_000);
const CHUNK = 500;
const WARMUP_ROUNDS = 1;
const SAMPLE_CHECKS = 5;

const VARIANTS = ['plaintext', 'floor', 'envelope', 'compact', 'encrypted'] as const;
/** The variants that run through typeorm-envelope (and call its key provider). */
const ENVELOPE_VARIANTS: readonly VariantName[] = ['envelope', 'compact'];
type VariantName = (typeof VARIANTS)[number];
const OPERATIONS = ['save', 'find', 'findOneBy'] as const;
type Operation = (typeof OPERATIONS)[number];
type Person = PersonData & { id: number };

const LABELS: Record<VariantName, string> = {
  plaintext: 'plaintext',
  floor: 'sidecar floor (same 13 columns, no encryption)',
  compact: 'typeorm-envelope, compact layout',
  envelope: 'typeorm-envelope, four sidecars',
  encrypted: 'typeorm-encrypted 0.8.0',
};
const OPERATION_LABELS: Record<Operation, string> = {
  save: `save ${fmtInt(ROWS)} (chunks of ${CHUNK})`,
  find: `find() ${fmtInt(ROWS)}`,
  findOneBy: `${fmtInt(LOOKUPS)} × findOneBy({ id })`,
};

interface OperationResult extends Record<VariantName, number> {
  /** Median time over plaintext's, per variant. */
  ratios: Record<Exclude<VariantName, 'plaintext'>, number>;
  rowsPerSecond: Record<VariantName, number>;
  samples: Record<VariantName, number[]>;
}

type Row = ObjectLiteral & { id: number };

interface Variant {
  name: VariantName;
  table: string;
  dataSource: DataSource;
  repository: Repository<Row>;
  /** Ids of the rows of the latest save, in the order of `people`. */
  ids: number[];
  /** A new entity holding person `i`, as this variant stores it. */
  make(i: number): Row;
  /** Whether a loaded (or just saved) row holds person `i`. */
  holds(row: Row | null, i: number): boolean;
  /** Reads every stored value of a row, so that no lazy path escapes the measurement; returns their size. */
  read(row: Row): number;
  /** `read` summed over every person. */
  total: number;
}

/** Deterministic PRNG (mulberry32), so every variant saves and looks up the same data. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const FIRST = [
  'alexandra',
  'benjamin',
  'charlotte',
  'dominic',
  'eleanor',
  'frederick',
  'gabriella',
  'harrison',
  'isabella',
  'jonathan',
  'katherine',
  'leonardo',
  'madeleine',
  'nathaniel',
  'olivia',
  'patrick',
];
const LAST = [
  'montgomery',
  'fitzgerald',
  'harrington',
  'blackwood',
  'whitfield',
  'castellano',
  'rosenberg',
  'vandermeer',
  'okonkwo',
  'lindqvist',
  'nakamura',
  'delacroix',
];
const COUNTRIES = ['Germany', 'United States', 'France', 'Japan', 'Brazil', 'Kenya', 'Sweden', 'Canada'];

/** email 22–29 chars, fullName 21–30, phone 23; country is the plain column. */
function makePeople(count: number): PersonData[] {
  const rand = prng(0x5eed);
  const pick = <T>(list: readonly T[]): T => list[Math.floor(rand() * list.length)] as T;
  const cap = (s: string) => s[0]?.toUpperCase() + s.slice(1);
  const digits = (n: number) => String(Math.floor(rand() * 10 ** n)).padStart(n, '0');
  return Array.from({ length: count }, (_, i) => {
    const [first, middle, last] = [pick(FIRST), pick(FIRST), pick(LAST)];
    return {
      email: `${first[0]}.${last}${i}@example.com`,
      fullName: `${cap(first)} ${cap(middle)} ${cap(last)}`,
      phone: `+1 (${digits(3)}) ${digits(3)}-${digits(4)} x${digits(4)}`,
      country: pick(COUNTRIES),
    };
  });
}

/**
 * The sidecar floor's rows: for each encrypted property, random bytes of the sizes the library
 * stores (ciphertext: format header 2 + type tag 1 + the UTF-8 value + GCM tag 16; IV 12; one
 * 61-byte wrapped key, as a customer-provided key makes, shared as one data key's is; version 1).
 */
function makeSidecarFloor(people: readonly PersonData[]): Array<Record<string, unknown>> {
  const wrappedKey = randomBytes(61);
  return people.map((person) => {
    const row: Record<string, unknown> = { country: person.country };
    for (const property of ['email', 'fullName', 'phone'] as const) {
      row[`${property}Ciphertext`] = randomBytes(3 + Buffer.byteLength(person[property]) + 16);
      row[`${property}Iv`] = randomBytes(12);
      row[`${property}WrappedKey`] = wrappedKey;
      row[`${property}KeyVersion`] = 1;
    }
    return row;
  });
}

const charsOf = (p: PersonData) => p.email.length + p.fullName.length + p.phone.length + p.country.length;

function samePerson(a: PersonData | null | undefined, b: PersonData | undefined): boolean {
  return (
    !!a &&
    !!b &&
    a.email === b.email &&
    a.fullName === b.fullName &&
    a.phone === b.phone &&
    a.country === b.country
  );
}

function check(condition: unknown, message: string): asserts condition {
  if (!condition) throw new Error(`verification failed: ${message}`);
}

/** What the benchmark measures: the installed package or the checkout, and its AES backend. */
interface LibraryUnderTest {
  source: 'installed' | 'checkout';
  name: string;
  version: string;
  /** The packed tarball the installed run was installed from. */
  tarball?: string;
  /** Where the package was loaded from, relative to the benchmark's project. */
  loadedFrom: string;
  aesBackend: ReturnType<typeof aesBackendInfo>['backend'];
  /** Why the native backend is not in use, when it is not. */
  aesBackendReason?: string;
  /** The native binary in use, relative to the package. */
  aesBackendFile?: string;
  openssl?: string;
}

function libraryUnderTest(): LibraryUnderTest {
  const project = join(__dirname, '..', '..');
  const info = aesBackendInfo();
  const backend = (root: string) => ({
    aesBackend: info.backend,
    ...(info.reason ? { aesBackendReason: info.reason } : {}),
    ...(info.file ? { aesBackendFile: relative(root, info.file).split(sep).join('/') } : {}),
    ...(info.openssl ? { openssl: info.openssl } : {}),
  });
  if (process.env.BENCH_SOURCE !== 'installed') {
    const pkg = JSON.parse(readFileSync(join(project, 'package.json'), 'utf8')) as {
      name: string;
      version: string;
    };
    return {
      source: 'checkout',
      name: pkg.name,
      version: pkg.version,
      loadedFrom: 'src (compiled checkout)',
      ...backend(project),
    };
  }
  /* The package resolved by name from this project, and nothing of the checkout's own code loaded. */
  const entry = require.resolve('typeorm-envelope');
  const root = dirname(require.resolve('typeorm-envelope/package.json'));
  check(require.cache[entry] !== undefined, `the installed package (${entry}) is the one loaded`);
  const checkout = process.env.BENCH_CHECKOUT;
  if (checkout) {
    const own = [
      join(checkout, 'src') + sep,
      join(checkout, 'dist') + sep,
      join(checkout, '.bench-build') + sep,
    ];
    const stray = Object.keys(require.cache).find((file) => own.some((dir) => file.startsWith(dir)));
    check(stray === undefined, `an installed run loaded ${stray} from the checkout`);
  }
  check(
    info.backend === 'node:crypto' || info.file?.startsWith(root + sep),
    `native binary ${info.file} is not the installed package's`,
  );
  const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as {
    name: string;
    version: string;
  };
  return {
    source: 'installed',
    name: pkg.name,
    version: pkg.version,
    ...(process.env.BENCH_TARBALL ? { tarball: process.env.BENCH_TARBALL } : {}),
    loadedFrom: relative(project, entry).split(sep).join('/'),
    ...backend(root),
  };
}

async function main(): Promise<void> {
  const people = makePeople(ROWS);
  const totalChars = people.reduce((sum, p) => sum + charsOf(p), 0);
  const db = await openDatabase();
  const schema = `bench_${randomBytes(4).toString('hex')}`;
  const dataSources: DataSource[] = [];
  try {
    const provider = new LocalKeyProvider({ key: randomBytes(32).toString('base64') });
    const encryption = new EnvelopeEncryption({ keys: [{ version: 1, provider }], activeVersion: 1 });
    const common = { type: 'postgres' as const, url: db.url, schema, synchronize: true, logging: false };
    const shared = new DataSource({
      ...common,
      entities: [PlainPerson, TypeormEncryptedPerson, SidecarFloorPerson],
    });
    const envelope = new DataSource({
      ...common,
      entities: [EnvelopePerson, CompactPerson],
      migrations: [TypeormEnvelopeDataKeys1764500000000],
      migrationsRun: true,
    });
    encryption.attach(envelope);
    /* The schema must exist before synchronize; create it through a plain connection. */
    const admin = new DataSource({ type: 'postgres', url: db.url, logging: false });
    await admin.initialize();
    await admin.query(`CREATE SCHEMA "${schema}"`);
    await admin.destroy();
    for (const ds of [shared, envelope]) {
      dataSources.push(ds);
      await ds.initialize();
    }
    /* A variant storing people as they are (plaintext or through a library). */
    const variant = (
      name: VariantName,
      table: string,
      entity: new () => Person,
      ds: DataSource,
    ): Variant => ({
      name,
      table,
      dataSource: ds,
      repository: ds.getRepository<Row>(entity),
      ids: [],
      make: (i) => Object.assign(new entity(), people[i]),
      holds: (row, i) => samePerson(row as Person | null, people[i]),
      read: (row) => charsOf(row as Person),
      total: totalChars,
    });
    const floorRows = makeSidecarFloor(people);
    const floorBytes = (row: Row) => {
      let n = (row.country as string).length;
      for (const c of SIDECAR_FLOOR_COLUMNS) {
        const value = row[c.property];
        n += Buffer.isBuffer(value) ? value.length : Number(value);
      }
      return n;
    };
    const floor: Variant = {
      name: 'floor',
      table: 'bench_sidecar_floor',
      dataSource: shared,
      repository: shared.getRepository<Row>(SidecarFloorPerson),
      ids: [],
      make: (i) => Object.assign(new SidecarFloorPerson(), floorRows[i]) as Row,
      holds: (row, i) => {
        const expected = floorRows[i] as Record<string, unknown>;
        return (
          !!row &&
          row.country === expected.country &&
          SIDECAR_FLOOR_COLUMNS.every((c) => {
            const [a, b] = [row[c.property], expected[c.property]];
            return Buffer.isBuffer(a) && Buffer.isBuffer(b) ? a.equals(b) : a === b;
          })
        );
      },
      read: floorBytes,
      total: floorRows.reduce((sum: number, row) => sum + floorBytes(row as Row), 0),
    };
    const variants: Variant[] = [
      variant('plaintext', 'bench_plaintext', PlainPerson, shared),
      floor,
      variant('envelope', 'bench_envelope', EnvelopePerson, envelope),
      variant('compact', 'bench_compact', CompactPerson, envelope),
      variant('encrypted', 'bench_typeorm_encrypted', TypeormEncryptedPerson, shared),
    ];
    const qualified = (v: Variant) => `"${schema}"."${v.table}"`;

    const machine = {
      cpu: os.cpus()[0]?.model ?? 'unknown',
      cores: os.cpus().length,
      memoryGiB: round1(os.totalmem() / 2 ** 30),
      platform: `${os.platform()} ${os.release()} ${os.arch()}`,
      node: process.version,
      postgres: db.version,
      /** 1, 5 and 15 minutes, when the run started: the figures are only as quiet as the machine. */
      loadAverage: os.loadavg().map(round2),
    };
    const library = libraryUnderTest();
    const database = { kind: db.kind, detail: db.detail, version: db.version };
    console.error(
      `bench: ${ROWS} rows, ${LOOKUPS} lookups, ${WARMUP_ROUNDS} warm-up + ${ROUNDS} rounds on ${db.kind}`,
    );

    const samples = Object.fromEntries(
      OPERATIONS.map((op) => [op, Object.fromEntries(VARIANTS.map((v) => [v, [] as number[]]))]),
    ) as Record<Operation, Record<VariantName, number[]>>;
    const callsPerOperation = Object.fromEntries(
      OPERATIONS.map((op) => [
        op,
        Object.fromEntries(ENVELOPE_VARIANTS.map((v) => [v, { generated: 0, unwrapped: 0 }])),
      ]),
    ) as Record<Operation, Record<string, { generated: number; unwrapped: number }>>;

    /** Runs one operation on one variant, verifies what it returned, and returns its time in ms. */
    const runners: Record<Operation, (v: Variant, round: number) => Promise<number>> = {
      async save(v) {
        await v.dataSource.query(`TRUNCATE TABLE ${qualified(v)} RESTART IDENTITY`);
        const entities = people.map((_, i) => v.make(i));
        collectGarbage();
        const started = performance.now();
        await v.repository.save(entities, { chunk: CHUNK });
        const ms = performance.now() - started;
        v.ids = entities.map((e) => e.id);
        check(v.ids.every((id) => Number.isInteger(id)) && new Set(v.ids).size === ROWS, `${v.name}: ids`);
        check(
          entities.every((e, i) => v.holds(e, i)),
          `${v.name}: save changed the caller's values`,
        );
        /* A few rows read back (decrypted) equal what was saved, and are not stored as plaintext. */
        const rand = prng(v.ids.length);
        for (let k = 0; k < SAMPLE_CHECKS; k++) {
          const i = Math.floor(rand() * ROWS);
          const id = v.ids[i] as number;
          const loaded = await v.repository.findOneBy({ id });
          check(v.holds(loaded, i), `${v.name}: row ${id} reads back as saved`);
          const [raw] = (await v.dataSource.query(`SELECT * FROM ${qualified(v)} WHERE id = $1`, [
            id,
          ])) as Array<Record<string, unknown>>;
          const stored = Buffer.concat(
            Object.values(raw ?? {}).map((x) => (Buffer.isBuffer(x) ? x : Buffer.from(String(x)))),
          );
          const secret = people[i] as PersonData;
          const exposed = [secret.email, secret.fullName, secret.phone].some((s) => stored.includes(s));
          check(exposed === (v.name === 'plaintext'), `${v.name}: plaintext at rest is ${exposed}`);
        }
        return ms;
      },

      async find(v) {
        collectGarbage();
        const started = performance.now();
        const rows = await v.repository.find();
        /* Read every value, so that no lazy path escapes the measurement. */
        let chars = 0;
        for (const r of rows) chars += v.read(r);
        const ms = performance.now() - started;
        check(rows.length === ROWS && chars === v.total, `${v.name}: find() returned ${chars} chars`);
        const byId = new Map(v.ids.map((id, i) => [id, i]));
        check(
          rows.every((r) => v.holds(r, byId.get(r.id) ?? -1)),
          `${v.name}: every value of find() equals what was saved`,
        );
        return ms;
      },

      async findOneBy(v, round) {
        const rand = prng(1000 + round);
        const picks = Array.from({ length: LOOKUPS }, () => Math.floor(rand() * ROWS));
        const ids = picks.map((i) => v.ids[i] as number);
        let chars = 0;
        let mismatches = 0;
        collectGarbage();
        const started = performance.now();
        for (let k = 0; k < ids.length; k++) {
          const row = await v.repository.findOneBy({ id: ids[k] as number });
          if (!row || !v.holds(row, picks[k] as number)) mismatches++;
          else chars += v.read(row);
        }
        const ms = performance.now() - started;
        check(mismatches === 0 && chars > 0, `${v.name}: ${mismatches} lookups differ from what was saved`);
        return ms;
      },
    };

    const runStarted = performance.now();
    for (let round = 0; round < WARMUP_ROUNDS + ROUNDS; round++) {
      const measured = round >= WARMUP_ROUNDS;
      const order = variants.map((_, i) => variants[(i + round) % variants.length] as Variant);
      const line: string[] = [];
      for (const op of OPERATIONS) {
        for (const v of order) {
          const before = encryption.providerCalls;
          const ms = await runners[op](v, round);
          const after = encryption.providerCalls;
          if (!measured) continue;
          samples[op][v.name].push(ms);
          const calls = callsPerOperation[op][v.name];
          if (calls) {
            calls.generated += after.generated - before.generated;
            calls.unwrapped += after.unwrapped - before.unwrapped;
          }
        }
        line.push(
          `${op} ${order.map((v) => `${v.name} ${Math.round(samples[op][v.name].at(-1) ?? 0)}`).join(' ')}`,
        );
      }
      console.error(
        `  ${measured ? `round ${round}/${ROUNDS}` : 'warm-up'} [${order.map((v) => v.name).join(', ')}]` +
          (measured ? `: ${line.join(' | ')} ms` : ''),
      );
    }
    const benchSeconds = (performance.now() - runStarted) / 1000;

    /* Storage after a full insert: every table holds the rows of its latest save. VACUUM first, so
       that every table has the same forks whether or not autovacuum already visited it. */
    const storage = {} as Record<VariantName, { bytesPerRow: number; totalBytes: number; rows: number }>;
    for (const v of variants) {
      await v.dataSource.query(`VACUUM (ANALYZE) ${qualified(v)}`);
      const [row] = (await v.dataSource.query(
        `SELECT pg_total_relation_size('${qualified(v)}'::regclass)::bigint AS total, (SELECT count(*) FROM ${qualified(v)})::bigint AS rows`,
      )) as Array<{ total: string; rows: string }>;
      /* A compact table's wrapped keys are in the data-key table: its whole size is counted with it. */
      const keyTable =
        v.name === 'compact' ? await relationSize(v.dataSource, `"${schema}"."${DATA_KEYS_TABLE}"`) : 0;
      const total = Number(row?.total) + keyTable;
      const rows = Number(row?.rows);
      check(rows === ROWS, `${v.name}: ${rows} rows stored`);
      storage[v.name] = { bytesPerRow: round1(total / rows), totalBytes: total, rows };
    }

    const providerCalls = {
      total: encryption.providerCalls,
      measuredRounds: callsPerOperation,
      note: 'typeorm-envelope key-provider calls: data keys generated and unwrapped (cached data keys cost none)',
    };

    const summarize = (op: Operation): OperationResult => {
      const med = (v: VariantName) => median(samples[op][v]);
      const count = op === 'findOneBy' ? LOOKUPS : ROWS;
      const perVariant = <T>(fn: (v: VariantName) => T) =>
        Object.fromEntries(VARIANTS.map((v) => [v, fn(v)])) as Record<VariantName, T>;
      const others = VARIANTS.filter((v) => v !== 'plaintext');
      return {
        ...perVariant((v) => round1(med(v))),
        ratios: Object.fromEntries(
          others.map((v) => [v, round2(med(v) / med('plaintext'))]),
        ) as OperationResult['ratios'],
        rowsPerSecond: perVariant((v) => Math.round((count * 1000) / med(v))),
        samples: perVariant((v) => samples[op][v].map(round1)),
      };
    };
    const operations = {
      save: summarize('save'),
      find: summarize('find'),
      findOneBy: summarize('findOneBy'),
    };
    /* The sidecar layout against its own floor: what the library adds to the twelve columns' cost. */
    /* The compact layout against typeorm-encrypted, the simplest peer, in the same rounds. */
    const compactOverPeer = Object.fromEntries(
      OPERATIONS.map((op) => [op, round2(operations[op].compact / operations[op].encrypted)]),
    ) as Record<Operation, number>;
    const overFloor = Object.fromEntries(
      OPERATIONS.map((op) => [op, round2(operations[op].envelope / operations[op].floor)]),
    ) as Record<Operation, number>;

    /* Report. */
    const out: string[] = [];
    out.push(
      library.source === 'installed'
        ? `Library: ${library.name} ${library.version} as installed from ${library.tarball ?? 'its tarball'} (loaded from ${library.loadedFrom})`
        : `Library: ${library.name} ${library.version} from the checkout (${library.loadedFrom}), not as installed`,
    );
    out.push(
      `AES-256-GCM backend: ${library.aesBackend}` +
        (library.aesBackendFile ? ` (${library.aesBackendFile}, ${library.openssl ?? 'OpenSSL'})` : '') +
        (library.aesBackendReason ? ` (${library.aesBackendReason})` : ''),
    );
    out.push(
      `Machine: ${machine.cpu}, ${machine.cores} cores, ${machine.memoryGiB} GiB, Node ${machine.node}; ` +
        `load average at start ${machine.loadAverage.join(', ')}`,
    );
    out.push(`PostgreSQL: ${db.version}; database: ${db.kind} (${db.detail})`);
    out.push(
      `Rows: ${fmtInt(ROWS)}; rounds: ${ROUNDS} measured (variant order rotated) after ${WARMUP_ROUNDS} warm-up; ` +
        `median per operation; wall time ${benchSeconds.toFixed(0)} s`,
    );
    out.push('');
    out.push('| operation | variant | median ms | × plaintext | rows/s | key-provider calls |');
    out.push('| --- | --- | ---: | ---: | ---: | --- |');
    for (const op of OPERATIONS) {
      for (const v of VARIANTS) {
        const o = operations[op];
        const calls = callsPerOperation[op][v];
        out.push(
          `| ${OPERATION_LABELS[op]} | ${LABELS[v]} | ${o[v].toFixed(1)} | ${(o[v] / o.plaintext).toFixed(2)} | ` +
            `${fmtInt(o.rowsPerSecond[v])} | ` +
            `${calls ? `${calls.generated} generated, ${calls.unwrapped} unwrapped (${ROUNDS} rounds)` : ''} |`,
        );
      }
    }
    out.push('');
    out.push(
      `Four-sidecar layout over its floor (the same table through TypeORM without encryption): ` +
        OPERATIONS.map((op) => `${op} ${overFloor[op].toFixed(2)}×`).join(', ') +
        ' (goal ≤ 1.25×)',
    );
    out.push(
      `Compact layout over typeorm-encrypted in the same rounds: ` +
        OPERATIONS.map((op) => `${op} ${compactOverPeer[op].toFixed(2)}×`).join(', ') +
        ' (goal < 1)',
    );
    out.push('');
    out.push('| storage after a full insert | bytes/row (pg_total_relation_size / count) | × plaintext |');
    out.push('| --- | ---: | ---: |');
    for (const v of VARIANTS) {
      out.push(
        `| ${LABELS[v]} | ${storage[v].bytesPerRow.toFixed(1)} | ${(storage[v].bytesPerRow / storage.plaintext.bytesPerRow).toFixed(2)} |`,
      );
    }
    const kmsStorage = await runKmsStorageBench(db, people);
    const ratio = (bytes: number) => (bytes / storage.plaintext.bytesPerRow).toFixed(2);
    out.push(
      `| typeorm-envelope, four sidecars, ${kmsStorage.wrappedKeyBytes}-byte KMS wrapped keys | ` +
        `${kmsStorage.sidecarsBytesPerRow.toFixed(1)} | ${ratio(kmsStorage.sidecarsBytesPerRow)} |`,
    );
    out.push(
      `| typeorm-envelope, compact layout, ${kmsStorage.wrappedKeyBytes}-byte KMS wrapped keys (key table included) | ` +
        `${kmsStorage.compactBytesPerRow.toFixed(1)} | ${ratio(kmsStorage.compactBytesPerRow)} |`,
    );
    out.push('');
    out.push(
      `typeorm-envelope key-provider calls, whole run (incl. warm-up): ${providerCalls.total.generated} generated, ` +
        `${providerCalls.total.unwrapped} unwrapped`,
    );
    console.log(out.join('\n'));

    /* Re-wrap section (./rewrap.ts): rewrapDataKeys against a plain SQL UPDATE, in a schema of its own. */
    const rewrap = await runRewrapBench(db);
    console.log(['', ...rewrap.lines].join('\n'));

    /* Compact re-wrap section (./rewrap-compact.ts): the data-key table's rows, on 1,000,000 rows. */
    const compactRewrap = await runCompactRewrapBench(db);
    console.log(['', ...compactRewrap.lines].join('\n'));

    /* Re-wrap memory section (./rewrap-memory.ts): peak RSS of one job per table size. */
    const rewrapMemory = runRewrapMemoryBench(db);
    console.log(['', ...rewrapMemory.lines].join('\n'));

    /* Blind-index section (./blind-index.ts): login by email against a plaintext B-tree. */
    const blindIndex = await runBlindIndexBench(db);
    console.log(['', ...blindIndex.lines].join('\n'));

    /* Workers section (./workers.ts): re-encryption with 1, 2 and 4 workers. */
    const workers = await runWorkersBench(db);
    console.log(['', ...workers.lines].join('\n'));

    /* Tenant section (./tenants.ts): rows of many tenants, cold and warm cache, in a schema of its own. */
    const tenants = await runTenantBench(db);
    console.log(['', ...tenants.lines].join('\n'));

    const results = {
      library,
      machine: { ...machine, loadAverageAtEnd: os.loadavg().map(round2) },
      database,
      rounds: ROUNDS,
      warmupRounds: WARMUP_ROUNDS,
      rows: ROWS,
      lookups: LOOKUPS,
      chunk: CHUNK,
      unit: 'ms (median of measured rounds)',
      operations,
      sidecarOverFloor: overFloor,
      compactOverTypeormEncrypted: compactOverPeer,
      storage: {
        ...storage,
        ratios: Object.fromEntries(
          VARIANTS.filter((v) => v !== 'plaintext').map((v) => [
            v,
            round2(storage[v].bytesPerRow / storage.plaintext.bytesPerRow),
          ]),
        ),
      },
      kmsStorage,
      providerCalls,
      rewrap: rewrap.result,
      rewrapMemory: rewrapMemory.result,
      compactRewrap: compactRewrap.result,
      workers: workers.result,
      blindIndex: blindIndex.result,
      tenants: tenants.result,
      generatedAt: new Date().toISOString(),
    };
    const file = process.env.BENCH_RESULTS_FILE ?? join(__dirname, '..', '..', 'bench', 'results.json');
    writeFileSync(file, `${JSON.stringify(results, null, 2)}\n`);
    console.error(`bench: wrote ${file}`);
  } finally {
    for (const ds of dataSources) {
      if (ds.isInitialized) await ds.destroy().catch(() => undefined);
    }
    await dropSchema(db, schema).catch(() => undefined);
    await db.stop();
  }
}

/** pg_total_relation_size of a table, after VACUUM. */
async function relationSize(dataSource: DataSource, table: string): Promise<number> {
  await dataSource.query(`VACUUM (ANALYZE) ${table}`);
  const [row] = (await dataSource.query(
    `SELECT pg_total_relation_size('${table}'::regclass)::bigint AS total`,
  )) as Array<{
    total: string;
  }>;
  return Number(row?.total);
}

async function dropSchema(db: BenchDatabase, schema: string): Promise<void> {
  if (db.kind !== 'DATABASE_URL') return; // the throwaway servers go away with everything in them
  const admin = new DataSource({ type: 'postgres', url: db.url, logging: false });
  await admin.initialize();
  try {
    await admin.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
  } finally {
    await admin.destroy();
  }
}

/* Ctrl-C: exit through process.exit so that the throwaway cluster's exit handler stops it. */
process.once('SIGINT', () => process.exit(130));

main().catch((error: unknown) => {
  console.error(error);
  process.exitCode = 1;
});
