/**
 * The workers section of `npm run bench`: two row-by-row jobs with 1, 2 and 4 workers over
 * primary-key ranges, on rows of the envelope entity (three encrypted properties), the table
 * restored from a copy before each run, one run per job and worker count:
 * - `rewrapDataKeys` of the sidecar rows (v1 → v2; batched UPDATEs) on BENCH_WORKER_ROWS (1,000,000);
 * - `reencryptColumns` (every value decrypted, sealed again and written with a guarded UPDATE per
 *   row, the heaviest job) on BENCH_WORKER_REENCRYPT_ROWS (100,000).
 */
import 'reflect-metadata';
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import { type BenchDatabase, withBenchSchema } from './database';
import { EnvelopePerson } from './entities';
import { reencryptColumns, rewrapDataKeys, TypeormEnvelopeJobRanges1764700000000 } from './library';
import { encryptedColumnsSql, fillSealedRows } from './rewrap';
import { collectGarbage, fmtInt, intEnv, round1, round2 } from './stats';

const REWRAP_ROWS = intEnv('BENCH_WORKER_ROWS', 1_000_000);
const REENCRYPT_ROWS = intEnv('BENCH_WORKER_REENCRYPT_ROWS', 100_000);
const WORKER_COUNTS = [1, 2, 4];

/** What the section adds to bench/results.json. */
export interface WorkersBenchResult {
  cores: number;
  jobs: Array<{
    job: 'rewrapDataKeys' | 'reencryptColumns';
    rows: number;
    runs: Array<{ workers: number; ranges: number; ms: number; rowsPerSecond: number; speedup: number }>;
  }>;
}

export async function runWorkersBench(
  db: BenchDatabase,
): Promise<{ lines: string[]; result: WorkersBenchResult }> {
  const schemaOptions = {
    prefix: 'bench_workers',
    entities: [EnvelopePerson],
    migrations: [TypeormEnvelopeJobRanges1764700000000],
    /* Up to 4 workers, each on a connection of its own, beside the job's other connections. */
    poolSize: 12,
  };
  return withBenchSchema(db, schemaOptions, async ({ schema, encryption, dataSource }) => {
    const columns = encryptedColumnsSql(dataSource, encryption);
    const table = columns[0]?.table as string;
    const copy = `"${schema}"."bench_envelope_copy"`;
    const jobs: WorkersBenchResult['jobs'] = [];
    for (const [job, rows] of [
      ['rewrapDataKeys', REWRAP_ROWS],
      ['reencryptColumns', REENCRYPT_ROWS],
    ] as const) {
      await dataSource.query(`DROP TABLE IF EXISTS ${copy}`);
      await dataSource.query(`TRUNCATE TABLE ${table}`);
      await encryption.activate(1);
      await fillSealedRows(dataSource, encryption, columns, rows);
      await dataSource.query(`CREATE TABLE ${copy} AS SELECT * FROM ${table}`);
      console.error(`bench: workers: ${job} on ${fmtInt(rows)} rows; workers ${WORKER_COUNTS.join(', ')}`);
      const runs: WorkersBenchResult['jobs'][number]['runs'] = [];
      for (const workers of WORKER_COUNTS) {
        await dataSource.query(`TRUNCATE TABLE ${table}`);
        await dataSource.query(`INSERT INTO ${table} SELECT * FROM ${copy}`);
        await dataSource.query(`VACUUM (ANALYZE) ${table}`);
        await encryption.activate(job === 'rewrapDataKeys' ? 2 : 1);
        encryption.purgeCache();
        collectGarbage();
        const options = { workers, jobId: `bench-${job}-${workers}-${randomBytes(4).toString('hex')}` };
        const started = performance.now();
        const result =
          job === 'rewrapDataKeys'
            ? await rewrapDataKeys(dataSource, encryption, { ...options, toVersion: 2 })
            : await reencryptColumns(dataSource, encryption, options);
        const ms = performance.now() - started;
        if (result.error !== undefined) throw result.error;
        for (const p of result.properties) {
          const done = 'rowsRewrapped' in p ? p.rowsRewrapped : p.rowsReencrypted;
          if (done !== rows || p.failures.length > 0) {
            throw new Error(`verification failed (workers, ${job}): ${p.property}: ${done} of ${rows} rows`);
          }
        }
        const rowsPerSecond = Math.round((rows * 1000) / ms);
        runs.push({
          workers,
          ranges: result.workers?.progress.total ?? 0,
          ms: round1(ms),
          rowsPerSecond,
          speedup: round2(rowsPerSecond / (runs[0]?.rowsPerSecond ?? rowsPerSecond)),
        });
        console.error(`  ${job}, workers ${workers}: ${Math.round(ms)} ms`);
      }
      jobs.push({ job, rows, runs });
    }
    const result: WorkersBenchResult = { cores: os.cpus().length, jobs };
    const lines = [
      `Workers over primary-key ranges leased through the job-ranges table, ${columns.length} encrypted properties; ` +
        `one run each; ${result.cores} cores, the database on the same machine`,
      '',
      '| job | rows | workers | ranges | ms | rows/s | × 1 worker |',
      '| --- | ---: | ---: | ---: | ---: | ---: | ---: |',
      ...jobs.flatMap((j) =>
        j.runs.map(
          (r) =>
            `| ${j.job} | ${fmtInt(j.rows)} | ${r.workers} | ${r.ranges} | ${r.ms.toFixed(0)} | ` +
            `${fmtInt(r.rowsPerSecond)} | ${r.speedup.toFixed(2)} |`,
        ),
      ),
    ];
    return { lines, result };
  });
}
