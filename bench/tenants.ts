/**
 * The tenant section of `npm run bench`: `find()` of BENCH_TENANT_ROWS (10,000) rows spread over
 * BENCH_TENANTS (100) tenants, a quarter of them on customer-provided keys and the rest on the
 * application's key, with a warm cache and a cold one (`purgeCache()` first, as in a fresh
 * process), beside the same rows in a table without tenants and in a plaintext table. The five are
 * measured in the same BENCH_TENANT_ROUNDS (5) rounds after a warm-up, in an order rotated every
 * round; the ratios are to the plaintext median of the same rounds.
 *
 * Also runs alone: `npx tsc -p bench/tsconfig.json && node .bench-build/bench/tenants.js`.
 */
import 'reflect-metadata';
import { randomBytes } from 'node:crypto';
import { DataSource, type Repository } from 'typeorm';
import { type BenchDatabase, openDatabase } from './database';
import { EnvelopePerson, type PersonData, PlainPerson, TenantEnvelopePerson } from './entities';
import {
  type EncryptionContext,
  EnvelopeEncryption,
  LocalKeyProvider,
  TypeormEnvelopeKeyRegistry1764300000000,
  TypeormEnvelopeTenantKeys1764400000000,
} from './library';
import { collectGarbage, fmtInt, intEnv, median, round1, round2 } from './stats';

const ROWS = intEnv('BENCH_TENANT_ROWS', 10_000);
const TENANTS = intEnv('BENCH_TENANTS', 100);
const ROUNDS = intEnv('BENCH_TENANT_ROUNDS', 5);
const WARMUP_ROUNDS = 1;
const CHUNK = 500;
/** Every CUSTOMER_KEY_EVERY-th tenant brings its own key; the others use the application's. */
const CUSTOMER_KEY_EVERY = 4;

const VARIANTS = ['plaintext', 'singleWarm', 'singleCold', 'tenantsWarm', 'tenantsCold'] as const;
type VariantName = (typeof VARIANTS)[number];

/** Key-provider calls of one `find()`. */
interface FindCalls {
  /** Data keys unwrapped (`encryption.providerCalls`). */
  unwrapped: number;
  /** Customer-provided keys opened with the application's key (a cold cache rebuilds them). */
  customerKeysOpened: number;
}

/** What the tenant section adds to bench/results.json. */
export interface TenantBenchResult {
  rows: number;
  tenants: number;
  customerKeyTenants: number;
  applicationKeyTenants: number;
  rounds: number;
  warmupRounds: number;
  distinctDataKeys: { single: number; tenants: number };
  unit: string;
  find: Record<
    VariantName,
    { medianMs: number; ratio: number; rowsPerSecond: number; samples: number[]; calls: FindCalls | null }
  >;
}

function check(condition: unknown, message: string): asserts condition {
  if (!condition) throw new Error(`verification failed (tenants): ${message}`);
}

/** The application's key, counting how often it opens a customer-provided key (never the key itself). */
class CountingVendorKey extends LocalKeyProvider {
  customerKeysOpened = 0;

  protected override _unwrapDataKey(wrappedKey: Buffer, context: EncryptionContext): Promise<Buffer> {
    if (context['typeorm-envelope:purpose'] === 'tenant-key') this.customerKeysOpened++;
    return super._unwrapDataKey(wrappedKey, context);
  }
}

/** Deterministic people (three strings of 21–30 characters and a plain column), as in the main section. */
function makePeople(count: number): PersonData[] {
  const first = ['alexandra', 'benjamin', 'charlotte', 'dominic', 'eleanor', 'frederick', 'gabriella'];
  const last = ['montgomery', 'fitzgerald', 'harrington', 'blackwood', 'castellano', 'vandermeer'];
  const countries = ['Germany', 'United States', 'France', 'Japan', 'Brazil', 'Kenya', 'Sweden'];
  const cap = (s: string) => s[0]?.toUpperCase() + s.slice(1);
  return Array.from({ length: count }, (_, i) => {
    const f = first[i % first.length] as string;
    const m = first[(i * 3 + 1) % first.length] as string;
    const l = last[(i * 5 + 2) % last.length] as string;
    return {
      email: `${f[0]}.${l}${i}@example.com`,
      fullName: `${cap(f)} ${cap(m)} ${cap(l)}`,
      phone: `+1 (555) ${String(i % 1000).padStart(3, '0')}-${String(i % 10_000).padStart(4, '0')} x${i % 7919}`,
      country: countries[i % countries.length] as string,
    };
  });
}

const tenantOf = (i: number) => `ws-${String(i % TENANTS).padStart(3, '0')}`;
const hasCustomerKey = (tenant: number) => tenant % CUSTOMER_KEY_EVERY === 0;
const charsOf = (p: PersonData) => p.email.length + p.fullName.length + p.phone.length + p.country.length;

/** Runs the section on `db` in a schema of its own; returns the markdown lines and the results. */
export async function runTenantBench(
  db: BenchDatabase,
): Promise<{ lines: string[]; result: TenantBenchResult }> {
  const schema = `bench_tenants_${randomBytes(4).toString('hex')}`;
  const admin = new DataSource({ type: 'postgres', url: db.url, logging: false });
  await admin.initialize();
  await admin.query(`CREATE SCHEMA "${schema}"`);
  const common = { type: 'postgres' as const, url: db.url, schema, synchronize: true, logging: false };
  const single = new EnvelopeEncryption({
    keys: [{ version: 1, provider: new LocalKeyProvider({ key: randomBytes(32).toString('base64') }) }],
    activeVersion: 1,
  });
  const vendorKey = new CountingVendorKey({ key: randomBytes(32).toString('base64') });
  const tenants = new EnvelopeEncryption({ keys: [{ version: 1, provider: vendorKey }], activeVersion: 1 });
  const plainSource = new DataSource({ ...common, entities: [PlainPerson] });
  const singleSource = new DataSource({ ...common, entities: [EnvelopePerson] });
  const tenantSource = new DataSource({
    ...common,
    entities: [TenantEnvelopePerson],
    migrations: [TypeormEnvelopeKeyRegistry1764300000000, TypeormEnvelopeTenantKeys1764400000000],
    migrationsRun: true,
  });
  single.attach(singleSource);
  tenants.attach(tenantSource);
  const sources = [plainSource, singleSource, tenantSource];
  try {
    for (const ds of sources) await ds.initialize();
    const sectionStarted = performance.now();
    const people = makePeople(ROWS);
    const totalChars = people.reduce((sum, p) => sum + charsOf(p), 0);

    /* Tenants with their own key are onboarded before any row is written. */
    const customerKeyTenants = Array.from({ length: TENANTS }, (_, t) => t).filter(hasCustomerKey);
    for (const t of customerKeyTenants) {
      const id = tenantOf(t);
      await tenants.tenants.addKey(id, { kind: 'customer-key', key: randomBytes(32).toString('base64') });
      const job = await tenants.tenants.runJob(id);
      check(job.state === 'completed', `${id}: onboarding ${job.state}`);
    }
    const plain = plainSource.getRepository(PlainPerson);
    const enveloped = singleSource.getRepository(EnvelopePerson);
    const tenanted = tenantSource.getRepository(TenantEnvelopePerson);
    await plain.save(
      people.map((p) => Object.assign(new PlainPerson(), p)),
      { chunk: CHUNK },
    );
    await enveloped.save(
      people.map((p) => Object.assign(new EnvelopePerson(), p)),
      { chunk: CHUNK },
    );
    /* Row i belongs to tenant i mod TENANTS: every page of the table mixes tenants. */
    await tenanted.save(
      people.map((p, i) => Object.assign(new TenantEnvelopePerson(), p, { workspaceId: tenantOf(i) })),
      { chunk: CHUNK },
    );
    const distinct = async (ds: DataSource, table: string, tenantColumn: string) => {
      const [row] = (await ds.query(
        `SELECT count(*)::int AS n FROM (SELECT DISTINCT ${tenantColumn}, k FROM "${schema}"."${table}",
           LATERAL (VALUES (email_wrapped_key), ("fullName_wrapped_key"), (phone_wrapped_key)) AS v(k)) AS d`,
      )) as Array<{ n: number }>;
      return row?.n ?? 0;
    };
    const distinctDataKeys = {
      single: await distinct(singleSource, 'bench_envelope', "''"),
      tenants: await distinct(tenantSource, 'bench_tenant_envelope', '"workspaceId"'),
    };
    const [versions] = (await tenantSource.query(
      `SELECT count(*) FILTER (WHERE email_key_version >= 1000000)::int AS own,
              count(DISTINCT email_key_version)::int AS versions FROM "${schema}"."bench_tenant_envelope"`,
    )) as Array<{ own: number; versions: number }>;
    const ownRows = people.filter((_, i) => hasCustomerKey(i % TENANTS)).length;
    check(versions?.own === ownRows, `${versions?.own} rows under customer-provided keys, not ${ownRows}`);
    check(
      versions?.versions === customerKeyTenants.length + 1,
      `${versions?.versions} stored key versions (one per customer key and the application key's)`,
    );
    console.error(
      `bench: tenants: ${fmtInt(ROWS)} rows over ${TENANTS} tenants (${customerKeyTenants.length} customer-provided ` +
        `keys), ${distinctDataKeys.tenants} (tenant, data key) pairs; ${WARMUP_ROUNDS} warm-up + ${ROUNDS} rounds`,
    );

    /** Runs `find()`, reads every value and checks it; returns ms. */
    const timedFind = async <T extends PersonData & { id: number }>(
      name: VariantName,
      repository: Repository<T>,
      tenantOfRow?: (row: T) => string,
    ): Promise<number> => {
      collectGarbage();
      const started = performance.now();
      const rows = await repository.find();
      let chars = 0;
      for (const r of rows) chars += charsOf(r);
      const ms = performance.now() - started;
      check(rows.length === ROWS && chars === totalChars, `${name}: find() returned ${chars} chars`);
      /* Ids are 1..ROWS in insert order in each table (fresh schema, one save each). */
      for (const r of rows) {
        const p = people[r.id - 1];
        check(
          p && r.email === p.email && r.fullName === p.fullName && r.phone === p.phone,
          `${name}: row ${r.id} reads back as saved`,
        );
        if (tenantOfRow) check(tenantOfRow(r) === tenantOf(r.id - 1), `${name}: row ${r.id}'s tenant`);
      }
      return ms;
    };
    const workspaceOf = (r: TenantEnvelopePerson) => r.workspaceId;

    const samples = Object.fromEntries(VARIANTS.map((v) => [v, [] as number[]])) as Record<
      VariantName,
      number[]
    >;
    const calls = Object.fromEntries(VARIANTS.map((v) => [v, [] as FindCalls[]])) as Record<
      VariantName,
      FindCalls[]
    >;
    const measure = async (encryption: EnvelopeEncryption, run: () => Promise<number>) => {
      const unwrapped = encryption.providerCalls.unwrapped;
      const opened = vendorKey.customerKeysOpened;
      const ms = await run();
      return {
        ms,
        calls: {
          unwrapped: encryption.providerCalls.unwrapped - unwrapped,
          customerKeysOpened: vendorKey.customerKeysOpened - opened,
        },
      };
    };
    const runners: Record<VariantName, () => Promise<{ ms: number; calls: FindCalls | null }>> = {
      plaintext: async () => ({ ms: await timedFind('plaintext', plain), calls: null }),
      singleWarm: async () => {
        await enveloped.find(); // another variant may have purged the cache: fill it, untimed
        return measure(single, () => timedFind('singleWarm', enveloped));
      },
      singleCold: async () => {
        single.purgeCache();
        return measure(single, () => timedFind('singleCold', enveloped));
      },
      tenantsWarm: async () => {
        await tenanted.find();
        return measure(tenants, () => timedFind('tenantsWarm', tenanted, workspaceOf));
      },
      tenantsCold: async () => {
        tenants.purgeCache();
        return measure(tenants, () => timedFind('tenantsCold', tenanted, workspaceOf));
      },
    };

    for (let round = 0; round < WARMUP_ROUNDS + ROUNDS; round++) {
      const measured = round >= WARMUP_ROUNDS;
      const order = VARIANTS.map((_, i) => VARIANTS[(i + round) % VARIANTS.length] as VariantName);
      for (const v of order) {
        const { ms, calls: made } = await runners[v]();
        if (!measured) continue;
        samples[v].push(ms);
        if (made) calls[v].push(made);
      }
      console.error(
        `  tenants ${measured ? `round ${round}/${ROUNDS}` : 'warm-up'} [${order.join(', ')}]` +
          (measured
            ? `: ${order.map((v) => `${v} ${Math.round(samples[v].at(-1) ?? 0)}`).join(' ')} ms`
            : ''),
      );
    }

    /* Provider calls are the same in every round; a difference would mean the cache misbehaved. */
    const callsOf = (v: VariantName): FindCalls | null => {
      const seen = calls[v];
      if (seen.length === 0) return null;
      const first = seen[0] as FindCalls;
      check(
        seen.every(
          (c) => c.unwrapped === first.unwrapped && c.customerKeysOpened === first.customerKeysOpened,
        ),
        `${v}: provider calls differ between rounds: ${JSON.stringify(seen)}`,
      );
      return first;
    };
    const plainMedian = median(samples.plaintext);
    const find = Object.fromEntries(
      VARIANTS.map((v) => {
        const med = median(samples[v]);
        return [
          v,
          {
            medianMs: round1(med),
            ratio: round2(med / plainMedian),
            rowsPerSecond: Math.round((ROWS * 1000) / med),
            samples: samples[v].map(round1),
            calls: callsOf(v),
          },
        ];
      }),
    ) as TenantBenchResult['find'];
    check(find.singleWarm.calls?.unwrapped === 0, 'one tenant, warm: no unwrap');
    check(find.tenantsWarm.calls?.unwrapped === 0, 'tenants, warm: no unwrap');
    check(
      find.singleCold.calls?.unwrapped === distinctDataKeys.single,
      `one tenant, cold: ${find.singleCold.calls?.unwrapped} unwraps for ${distinctDataKeys.single} data keys`,
    );
    check(
      find.tenantsCold.calls?.unwrapped === distinctDataKeys.tenants,
      `tenants, cold: ${find.tenantsCold.calls?.unwrapped} unwraps for ${distinctDataKeys.tenants} (tenant, data key) pairs`,
    );
    check(
      find.tenantsCold.calls?.customerKeysOpened === customerKeyTenants.length,
      `tenants, cold: ${find.tenantsCold.calls?.customerKeysOpened} customer-provided keys opened`,
    );

    const result: TenantBenchResult = {
      rows: ROWS,
      tenants: TENANTS,
      customerKeyTenants: customerKeyTenants.length,
      applicationKeyTenants: TENANTS - customerKeyTenants.length,
      rounds: ROUNDS,
      warmupRounds: WARMUP_ROUNDS,
      distinctDataKeys,
      unit: 'ms (median of measured rounds)',
      find,
    };
    const describeCalls = (c: FindCalls | null) =>
      c
        ? `${c.unwrapped} unwrapped` +
          (c.customerKeysOpened ? ` + ${c.customerKeysOpened} customer-provided keys opened` : '')
        : '';
    const label: Record<VariantName, [string, string]> = {
      plaintext: ['plaintext', '-'],
      singleWarm: ['typeorm-envelope, no tenants (one application key)', 'warm'],
      singleCold: ['typeorm-envelope, no tenants (one application key)', 'cold'],
      tenantsWarm: [
        `typeorm-envelope, ${TENANTS} tenants (${customerKeyTenants.length} customer keys, ${TENANTS - customerKeyTenants.length} application key)`,
        'warm',
      ],
      tenantsCold: [
        `typeorm-envelope, ${TENANTS} tenants (${customerKeyTenants.length} customer keys, ${TENANTS - customerKeyTenants.length} application key)`,
        'cold',
      ],
    };
    const lines = [
      `Tenants: find() of ${fmtInt(ROWS)} rows spread over ${TENANTS} tenants, next to the same rows without ` +
        `tenants and in plaintext; cold = purgeCache() before the find(); ${ROUNDS} rounds (order rotated) after ` +
        `${WARMUP_ROUNDS} warm-up; median; section wall time ${((performance.now() - sectionStarted) / 1000).toFixed(0)} s`,
      '',
      `| find() ${fmtInt(ROWS)} rows | cache | median ms | × plaintext | rows/s | key-provider calls per find() |`,
      '| --- | --- | ---: | ---: | ---: | --- |',
      ...VARIANTS.map(
        (v) =>
          `| ${label[v][0]} | ${label[v][1]} | ${find[v].medianMs.toFixed(1)} | ${find[v].ratio.toFixed(2)} | ` +
          `${fmtInt(find[v].rowsPerSecond)} | ${describeCalls(find[v].calls)} |`,
      ),
    ];
    return { lines, result };
  } finally {
    for (const ds of sources) if (ds.isInitialized) await ds.destroy().catch(() => undefined);
    await admin.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`).catch(() => undefined);
    await admin.destroy().catch(() => undefined);
  }
}

if (require.main === module) {
  /* Ctrl-C: exit through process.exit so that the throwaway cluster's exit handler stops it. */
  process.once('SIGINT', () => process.exit(130));
  (async () => {
    const db = await openDatabase();
    try {
      const { lines } = await runTenantBench(db);
      console.log(lines.join('\n'));
    } finally {
      await db.stop();
    }
  })().catch((error: unknown) => {
    console.error(error);
    process.exitCode = 1;
  });
}
