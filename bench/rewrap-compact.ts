/**
 * The compact re-wrap section of `npm run bench`: `rewrapDataKeys` (master-key version 1 → 2) on
 * BENCH_COMPACT_REWRAP_ROWS (1,000,000) rows of the compact entity (three encrypted properties)
 * under 10 data keys. The rows are 100 saved through TypeORM, copied on the server; the job
 * re-wraps the 10 rows of the data-key table and writes no data row, which the section checks
 * (a checksum of the data table before and after) along with a sample read with a cold cache.
 */
import 'reflect-metadata';
import { In } from 'typeorm';
import { type BenchDatabase, withBenchSchema } from './database';
import { CompactPerson } from './entities';
import { rewrapDataKeys, TypeormEnvelopeDataKeys1764500000000 } from './library';
import { fmtInt, intEnv, round1 } from './stats';

const ROWS = intEnv('BENCH_COMPACT_REWRAP_ROWS', 1_000_000);
const DATA_KEYS = 10;
const PER_KEY = 10;

/** What the section adds to bench/results.json. */
export interface CompactRewrapBenchResult {
  rows: number;
  dataKeys: number;
  ms: number;
  keyRowsRewrapped: number;
  dataRowsTouched: number;
  rewrapCalls: number;
  verified: string;
}

function check(condition: unknown, message: string): asserts condition {
  if (!condition) throw new Error(`verification failed (compact re-wrap): ${message}`);
}

export async function runCompactRewrapBench(
  db: BenchDatabase,
): Promise<{ lines: string[]; result: CompactRewrapBenchResult }> {
  const schemaOptions = {
    prefix: 'bench_compact_rewrap',
    entities: [CompactPerson],
    migrations: [TypeormEnvelopeDataKeys1764500000000],
  };
  return withBenchSchema(db, schemaOptions, async ({ schema, encryption, dataSource }) => {
    const repository = dataSource.getRepository(CompactPerson);
    const person = (n: number) =>
      Object.assign(new CompactPerson(), {
        email: `compact${n}@example.com`,
        fullName: `Compact Person ${n}`,
        phone: `+1 (555) 010-${String(n).padStart(4, '0')}`,
        country: `country-${n}`,
      });
    for (let key = 0; key < DATA_KEYS; key++) {
      encryption.cache.renewEncryptionKey();
      await repository.save(Array.from({ length: PER_KEY }, (_, i) => person(key * PER_KEY + i)));
    }
    const columns = encryption.encryptedEntities(dataSource).flatMap((e) => e.columns);
    const quote = (name: string) => dataSource.driver.escape(name);
    const stored = columns.map((c) => quote(c.main.databaseName));
    const table = `"${schema}"."bench_compact"`;
    const seeds = PER_KEY * DATA_KEYS;
    /* The saved rows, copied on the server (their values are bound to table and column, not to a row). */
    await dataSource.query(
      `INSERT INTO ${table} (${stored.join(', ')}, country)
       SELECT ${stored.map((c) => `s.${c}`).join(', ')}, s.country
       FROM ${table} s CROSS JOIN generate_series(1, $1::int) AS g ORDER BY g, s.id`,
      [Math.ceil(ROWS / seeds) - 1],
    );
    await dataSource.query(`VACUUM (ANALYZE) ${table}`);
    const [{ count } = { count: 0 }] = (await dataSource.query(
      `SELECT count(*)::int AS count FROM ${table}`,
    )) as Array<{
      count: number;
    }>;
    const checksum = async () => {
      const [row] = (await dataSource.query(
        `SELECT sum(('x' || substr(md5(${stored.join(" || '|' || ")}), 1, 8))::bit(32)::int::bigint)::text AS sum,
                max(xmin::text::bigint)::text AS newest FROM ${table}`,
      )) as Array<{ sum: string; newest: string }>;
      return `${row?.sum}/${row?.newest}`;
    };
    const before = await checksum();
    console.error(`bench: compact re-wrap: ${fmtInt(count)} rows under ${DATA_KEYS} data keys`);
    await encryption.activate(2);
    encryption.purgeCache();
    const started = performance.now();
    const job = await rewrapDataKeys(dataSource, encryption, { toVersion: 2, entities: [CompactPerson] });
    const ms = performance.now() - started;
    check(job.error === undefined, `rewrapDataKeys failed: ${String(job.error)}`);
    const keyTable = job.keyTable;
    check(keyTable && keyTable.failures.length === 0, 'the key table was re-wrapped without failures');
    check(keyTable.keyRowsRewrapped >= DATA_KEYS, `${keyTable.keyRowsRewrapped} key rows re-wrapped`);
    check((await checksum()) === before, 'no data row was written');
    encryption.purgeCache();
    const sample = await repository.findBy({ id: In(Array.from({ length: 100 }, (_, i) => 1 + i * 997)) });
    const good = sample.filter((p) => {
      const n = Number(p.email.slice('compact'.length, p.email.indexOf('@')));
      return p.fullName === `Compact Person ${n}` && p.country === `country-${n}`;
    }).length;
    check(good === sample.length && good > 0, `${good} of ${sample.length} sampled rows read back`);
    const result: CompactRewrapBenchResult = {
      rows: count,
      dataKeys: DATA_KEYS,
      ms: round1(ms),
      keyRowsRewrapped: keyTable.keyRowsRewrapped,
      dataRowsTouched: keyTable.dataRowsTouched,
      rewrapCalls: job.rewrapCalls,
      verified: `data table checksum unchanged, ${good} sampled rows read back with a cold cache`,
    };
    const lines = [
      `Compact re-wrap (master key v1 → v2): ${fmtInt(count)} rows × ${stored.length} properties under ${DATA_KEYS} data keys: ` +
        `${result.ms.toFixed(0)} ms, ${result.keyRowsRewrapped} key rows re-wrapped, ${result.dataRowsTouched} data rows written, ` +
        `${result.rewrapCalls} re-wrap calls; ${result.verified}`,
    ];
    return { lines, result };
  });
}
