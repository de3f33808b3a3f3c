/**
 * Where the time of one typeorm-envelope `find()` of 10,000 rows goes. Not part of `npm run bench`:
 *
 *   npx tsc -p bench/tsconfig.json && node .bench-build/bench/profile-find.js
 *
 * `PROFILE_LAYOUT=compact` profiles the compact layout's table instead of the sidecar layout's.
 *
 * 1. Timers (median of 7 after 3 warm-ups) that peel the layers apart: the raw driver query of each
 *    table (the extra bytea columns), `find()` of the plaintext table, `find()` of the envelope table
 *    through a DataSource *without* encryption attached (TypeORM hydration of all 13 columns, no
 *    decryption), the full `find()`, and the 30,000 decryptions alone, value by value
 *    (`FieldEncryptor.tryOpen`) and as one batch (`tryOpenMany`, the path `afterLoad` takes for a
 *    result set while its data keys are cached), next to bare AES-256-GCM; and 1,000 `findOneBy`
 *    of single rows on each DataSource (what a batch of one costs beside its round trip).
 * 2. An in-process CPU profile (node:inspector) of 5 full `find()`s, self time bucketed by source;
 *    native frames count towards the JavaScript that called them. Written to
 *    .bench-build/envelope-find.cpuprofile (open it in Chrome DevTools).
 */
import 'reflect-metadata';
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { Session } from 'node:inspector';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { DataSource } from 'typeorm';
import { EnvelopeEncryption, LocalKeyProvider, TypeormEnvelopeDataKeys1764500000000 } from '../src';
import { COMPACT_BODY_OFFSET, COMPACT_IV_OFFSET, compactDataKeyId } from '../src/crypto/compact-value';
import { FieldEncryptor, type SealedValue } from '../src/field-encryptor';
import { openDatabase } from './database';
import { CompactPerson, EnvelopePerson, type PersonData, PlainPerson } from './entities';

const ROWS = 10_000;
const COMPACT = process.env.PROFILE_LAYOUT === 'compact';
const Envelope = COMPACT ? CompactPerson : EnvelopePerson;
const TABLE = COMPACT ? 'bench_compact' : 'bench_envelope';
const SHAPE = COMPACT ? '5 columns, 3 bytea' : '14 columns, 9 bytea';
const PROPERTIES = ['email', 'fullName', 'phone'] as const;
setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

function person(i: number): PersonData {
  return {
    email: `a.montgomery${i}@example.com`,
    fullName: 'Gabriella Eleanor Harrington',
    phone: `+1 (555) 010-${String(i % 10_000).padStart(4, '0')} x1234`,
    country: 'Sweden',
  };
}

async function timed(label: string, fn: () => Promise<unknown> | unknown, report: Map<string, number>) {
  const runs: number[] = [];
  for (let i = 0; i < 10; i++) {
    gc();
    const started = performance.now();
    await fn();
    if (i >= 3) runs.push(performance.now() - started);
  }
  runs.sort((a, b) => a - b);
  const ms = runs[runs.length >> 1] as number;
  report.set(label, ms);
  console.log(`${label.padEnd(64)} ${ms.toFixed(1).padStart(8)} ms`);
}

/**
 * The bucket a frame's self time belongs to, or `undefined` to charge it to the caller: native frames
 * and Node's own JavaScript (Buffer, streams) count towards the code that called them, except for
 * the cipher itself.
 */
function bucketOf(url: string, functionName: string): string | undefined {
  if (functionName === '(garbage collector)') return 'garbage collector';
  if (functionName === '(program)' || functionName === '(idle)') return 'idle / program';
  if (url.startsWith('node:internal/crypto')) return 'node AES-GCM (createDecipheriv, setAAD, final)';
  if (!url || url.startsWith('node:')) return undefined;
  if (
    url.includes('/src/crypto/') ||
    url.includes('/src/field-encryptor') ||
    url.includes('/src/keys/') ||
    url.includes('/node_modules/lru-cache/')
  )
    return 'typeorm-envelope decrypt path (key cache, AAD, codec, Buffers)';
  if (url.includes('/src/typeorm/')) return 'typeorm-envelope TypeORM glue (state store, afterLoad)';
  if (url.includes('/node_modules/typeorm/')) return 'TypeORM (query, hydration, subscriber dispatch)';
  if (/\/node_modules\/(pg|pg-protocol|pg-types|postgres-bytea|pg-pool)\//.test(url))
    return 'pg driver (protocol, row parsing incl. bytea)';
  if (url.includes('/bench/')) return 'benchmark (reading every value)';
  return `other (${url.split('/').slice(-2).join('/')})`;
}

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string };
  children?: number[];
}

async function main(): Promise<void> {
  const db = await openDatabase();
  const schema = `profile_${randomBytes(4).toString('hex')}`;
  const sources: DataSource[] = [];
  try {
    console.log(`database: ${db.kind}, ${db.version}; Node ${process.version}\n`);
    const provider = new LocalKeyProvider({ key: randomBytes(32).toString('base64') });
    const encryption = new EnvelopeEncryption({ keys: [{ version: 1, provider }], activeVersion: 1 });
    const common = { type: 'postgres' as const, url: db.url, schema, logging: false };
    const admin = new DataSource(common);
    await admin.initialize();
    await admin.query(`CREATE SCHEMA "${schema}"`);
    await admin.destroy();
    const plain = new DataSource({ ...common, entities: [PlainPerson], synchronize: true });
    const envelope = new DataSource({
      ...common,
      entities: [Envelope],
      synchronize: true,
      migrations: [TypeormEnvelopeDataKeys1764500000000],
      migrationsRun: COMPACT,
    });
    encryption.attach(envelope);
    /* The same entity with no encryption attached: TypeORM hydrates the raw ciphertext and sidecars. */
    const unattached = new DataSource({ ...common, entities: [Envelope] });
    for (const ds of [plain, envelope, unattached]) {
      sources.push(ds);
      await ds.initialize();
    }
    const people = Array.from({ length: ROWS }, (_, i) => person(i));
    await plain.getRepository(PlainPerson).save(
      people.map((p) => Object.assign(new PlainPerson(), p)),
      { chunk: 500 },
    );
    await envelope.getRepository(Envelope).save(
      people.map((p) => Object.assign(new Envelope(), p)),
      { chunk: 500 },
    );

    const t = new Map<string, number>();
    const sumChars = (rows: PersonData[]) =>
      rows.reduce((n, r) => n + r.email.length + r.fullName.length + r.phone.length + r.country.length, 0);
    await timed(
      'raw SELECT * plaintext (pg, 5 columns)',
      () => plain.query(`SELECT * FROM "${schema}".bench_plaintext`),
      t,
    );
    await timed(
      `raw SELECT * envelope (pg, ${SHAPE})`,
      () => envelope.query(`SELECT * FROM "${schema}".${TABLE}`),
      t,
    );
    await timed('find() plaintext', async () => sumChars(await plain.getRepository(PlainPerson).find()), t);
    await timed(
      'find() envelope, encryption NOT attached (hydration only)',
      () => unattached.getRepository(Envelope).find(),
      t,
    );
    await timed(
      'find() envelope, full',
      async () => sumChars(await envelope.getRepository(Envelope).find()),
      t,
    );

    /* Single-row reads: what a batch of one costs beside the round trip. */
    const LOOKUPS = 1_000;
    const lookups = async (ds: DataSource, entity: typeof PlainPerson | typeof Envelope) => {
      const repo = ds.getRepository<PersonData & { id: number }>(entity);
      for (let id = 1; id <= LOOKUPS; id++) await repo.findOneBy({ id });
    };
    await timed(`findOneBy ×${LOOKUPS} plaintext`, () => lookups(plain, PlainPerson), t);
    await timed(`findOneBy ×${LOOKUPS} envelope, NOT attached`, () => lookups(unattached, Envelope), t);
    await timed(`findOneBy ×${LOOKUPS} envelope, full`, () => lookups(envelope, Envelope), t);

    const raw = (await envelope.query(`SELECT * FROM "${schema}".${TABLE}`)) as Array<
      Record<string, unknown>
    >;
    const keyRows = COMPACT
      ? ((await envelope.query(
          `SELECT "id"::text AS "id", "key_version", "wrapped_key" FROM "${schema}".typeorm_envelope_data_keys`,
        )) as Array<{ id: string; key_version: number; wrapped_key: Buffer }>)
      : [];
    const keyRow = new Map(keyRows.map((k) => [BigInt(k.id), k]));
    const sealed: Array<{ value: SealedValue; column: string }> = raw.flatMap((r) =>
      PROPERTIES.map((p) => {
        if (!COMPACT) {
          return {
            column: p,
            value: {
              ciphertext: r[`${p}_ciphertext`] as Buffer,
              iv: r[`${p}_iv`] as Buffer,
              wrappedKey: r[`${p}_wrapped_key`] as Buffer,
              keyVersion: r[`${p}_key_version`] as number,
            },
          };
        }
        const ciphertext = r[`${p}_ciphertext`] as Buffer;
        const row = keyRow.get(compactDataKeyId(ciphertext) as bigint);
        if (!row) throw new Error('a compact value names no key row');
        return {
          column: p,
          value: {
            ciphertext,
            iv: ciphertext.subarray(COMPACT_IV_OFFSET, COMPACT_BODY_OFFSET),
            wrappedKey: row.wrapped_key,
            keyVersion: row.key_version,
          },
        };
      }),
    );
    const encryptor = new FieldEncryptor(encryption.cache);
    await timed(
      `${sealed.length} × FieldEncryptor.tryOpen (decrypt only)`,
      () => {
        for (const s of sealed) encryptor.tryOpen(s.value, { schema, table: TABLE, column: s.column });
      },
      t,
    );
    /* The same values as afterLoad now opens a result set: one batch, one native call per data key. */
    const bindings = new Map(PROPERTIES.map((p) => [p, Object.freeze({ schema, table: TABLE, column: p })]));
    const batchBindings = sealed.map((s) => bindings.get(s.column as (typeof PROPERTIES)[number]) as never);
    await timed(
      `${sealed.length} × FieldEncryptor.tryOpenMany (one batch)`,
      () =>
        encryptor.tryOpenMany(
          sealed.map((s) => s.value),
          batchBindings,
        ),
      t,
    );
    const key = randomBytes(32);
    const iv = randomBytes(12);
    const aad = randomBytes(40);
    const boxes = Array.from({ length: sealed.length }, () => {
      const c = createCipheriv('aes-256-gcm', key, iv, { authTagLength: 16 });
      c.setAAD(aad);
      return Buffer.concat([c.update(randomBytes(25)), c.final(), c.getAuthTag()]);
    });
    await timed(
      `${sealed.length} × bare AES-256-GCM open (Node crypto floor)`,
      () => {
        for (const box of boxes) {
          const d = createDecipheriv('aes-256-gcm', key, iv, { authTagLength: 16 });
          d.setAAD(aad);
          d.setAuthTag(box.subarray(box.length - 16));
          Buffer.concat([d.update(box.subarray(0, box.length - 16)), d.final()]);
        }
      },
      t,
    );

    const get = (k: string) => t.get(k) ?? Number.NaN;
    const full = get('find() envelope, full');
    const plainFind = get('find() plaintext');
    const hydration = get('find() envelope, encryption NOT attached (hydration only)');
    const extraBytes =
      get(`raw SELECT * envelope (pg, ${SHAPE})`) - get('raw SELECT * plaintext (pg, 5 columns)');
    const decrypt = get(`${sealed.length} × FieldEncryptor.tryOpenMany (one batch)`);
    console.log('\nBreakdown of the full envelope find() by timers (approximate, layers overlap):');
    const share = (label: string, ms: number) =>
      console.log(
        `  ${label.padEnd(62)} ${ms.toFixed(0).padStart(5)} ms  ${((100 * ms) / full).toFixed(0).padStart(3)} %`,
      );
    share('plaintext find() baseline', plainFind);
    share('extra columns through TypeORM (unattached − plaintext find)', hydration - plainFind);
    share('  of which: bytea/extra columns in the driver (raw query delta)', extraBytes);
    share('decryption (tryOpenMany of 30,000)', decrypt);
    share(
      '  of which: bare AES-256-GCM in Node',
      get(`${sealed.length} × bare AES-256-GCM open (Node crypto floor)`),
    );
    share('rest: glue (state store, afterLoad, subscriber dispatch)', full - hydration - decrypt);

    /* CPU profile of 5 full find()s. */
    const session = new Session();
    session.connect();
    const post = <T>(method: string, params?: object) =>
      new Promise<T>((resolve, reject) =>
        session.post(method, params ?? {}, (error, result) => (error ? reject(error) : resolve(result as T))),
      );
    await post('Profiler.enable');
    await post('Profiler.setSamplingInterval', { interval: 100 });
    gc();
    await post('Profiler.start');
    for (let i = 0; i < 5; i++) sumChars(await envelope.getRepository(Envelope).find());
    const { profile } = await post<{
      profile: { nodes: ProfileNode[]; samples: number[]; timeDeltas: number[] };
    }>('Profiler.stop');
    session.disconnect();
    writeFileSync(join(__dirname, '..', 'envelope-find.cpuprofile'), JSON.stringify(profile));

    const nodes = new Map(profile.nodes.map((n) => [n.id, n]));
    const parent = new Map<number, number>();
    for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
    const bucketFor = (id: number): string => {
      for (let cur: number | undefined = id; cur !== undefined; cur = parent.get(cur)) {
        const frame = nodes.get(cur)?.callFrame;
        const bucket = frame && bucketOf(frame.url, frame.functionName);
        if (bucket) return bucket;
      }
      return 'node I/O, no library caller (net, streams)';
    };
    const totals = new Map<string, number>();
    let all = 0;
    profile.samples.forEach((id, i) => {
      const dt = profile.timeDeltas[i] ?? 0;
      all += dt;
      const b = bucketFor(id);
      totals.set(b, (totals.get(b) ?? 0) + dt);
    });
    console.log(
      '\nCPU profile of 5 full envelope find()s (sampling inflates absolute times), self time by source:',
    );
    for (const [b, us] of [...totals].sort((a, b) => b[1] - a[1])) {
      console.log(
        `  ${b.padEnd(62)} ${(us / 5000).toFixed(0).padStart(5)} ms/find  ${((100 * us) / all).toFixed(0).padStart(3)} %`,
      );
    }
  } finally {
    for (const ds of sources) if (ds.isInitialized) await ds.destroy().catch(() => undefined);
    await db.stop();
  }
}

main().catch((error: unknown) => {
  console.error(error);
  process.exitCode = 1;
});
