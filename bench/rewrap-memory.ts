/**
 * The re-wrap memory section of `npm run bench`: `rewrapDataKeys` (master-key version 1 → 2) on
 * BENCH_REWRAP_MEMORY_ROWS (100,000 and 1,000,000) rows of the envelope entity, each size in a
 * process of its own, so that the peak resident set size it reports (`process.resourceUsage()
 * .maxRSS`) is that of one job on one table size. The table is filled on the server (one
 * INSERT … SELECT), so the client's memory before the job does not depend on the row count; a
 * job whose memory is constant in the row count shows the same peak for both sizes.
 */
import 'reflect-metadata';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { DataSource } from 'typeorm';
import type { BenchDatabase } from './database';
import { EnvelopePerson } from './entities';
import { EnvelopeEncryption, LocalKeyProvider, rewrapDataKeys } from './library';
import { encryptedColumnsSql, fillSealedRows } from './rewrap';
import { fmtInt, round1 } from './stats';

const CHILD_ROWS = 'BENCH_REWRAP_MEMORY_CHILD_ROWS';
const BATCH_SIZE = 1_000;

/** What one child measured. */
export interface RewrapMemorySample {
  rows: number;
  values: number;
  durationMs: number;
  rowsPerSecond: number;
  /** Resident set size when the job started, MiB. */
  rssAtStartMiB: number;
  /** Peak resident set size of the process, MiB (it includes the start). */
  peakRssMiB: number;
  rewrapCalls: number;
}

function sizes(): number[] {
  const given = process.env.BENCH_REWRAP_MEMORY_ROWS;
  const list = given ? given.split(',').map(Number) : [100_000, 1_000_000];
  if (list.some((n) => !Number.isInteger(n) || n <= 0)) {
    throw new Error('BENCH_REWRAP_MEMORY_ROWS must be a comma-separated list of positive integers');
  }
  return list;
}

const mib = (bytes: number) => round1(bytes / 2 ** 20);

/** Runs one child per size against `db`; returns the markdown lines and the samples. */
export function runRewrapMemoryBench(db: BenchDatabase): { lines: string[]; result: RewrapMemorySample[] } {
  const result: RewrapMemorySample[] = [];
  for (const rows of sizes()) {
    console.error(`bench: re-wrap memory: ${fmtInt(rows)} rows in a process of its own`);
    const out = execFileSync(process.execPath, [__filename], {
      env: { ...process.env, [CHILD_ROWS]: String(rows), BENCH_DATABASE_URL: db.url },
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'inherit'],
      maxBuffer: 1 << 20,
    });
    result.push(JSON.parse(out.trim().split('\n').at(-1) as string) as RewrapMemorySample);
  }
  const lines = [
    `Re-wrap memory: rewrapDataKeys (v1 → v2, batches of ${fmtInt(BATCH_SIZE)}), one process per table size`,
    '',
    '| rows | values | ms (one run) | rows/s | RSS at start MiB | peak RSS MiB |',
    '| ---: | ---: | ---: | ---: | ---: | ---: |',
    ...result.map(
      (r) =>
        `| ${fmtInt(r.rows)} | ${fmtInt(r.values)} | ${r.durationMs.toFixed(0)} | ${fmtInt(r.rowsPerSecond)} | ` +
        `${r.rssAtStartMiB.toFixed(1)} | ${r.peakRssMiB.toFixed(1)} |`,
    ),
  ];
  return { lines, result };
}

/** The child: fills a table of its own with `rows` rows, re-wraps it, prints one JSON line. */
async function child(rows: number): Promise<void> {
  const url = process.env.BENCH_DATABASE_URL as string;
  const schema = `bench_rewrap_memory_${randomBytes(4).toString('hex')}`;
  const admin = new DataSource({ type: 'postgres', url, logging: false });
  await admin.initialize();
  await admin.query(`CREATE SCHEMA "${schema}"`);
  const encryption = new EnvelopeEncryption({
    keys: [
      { version: 1, provider: new LocalKeyProvider({ key: randomBytes(32).toString('base64') }) },
      { version: 2, provider: new LocalKeyProvider({ key: randomBytes(32).toString('base64') }) },
    ],
    activeVersion: 1,
  });
  const dataSource = new DataSource({
    type: 'postgres',
    url,
    schema,
    entities: [EnvelopePerson],
    synchronize: true,
    logging: false,
  });
  encryption.attach(dataSource);
  try {
    await dataSource.initialize();
    const columns = encryptedColumnsSql(dataSource, encryption);
    await fillSealedRows(dataSource, encryption, columns, rows);
    await encryption.activate(2);
    encryption.purgeCache();
    const rssAtStart = process.memoryUsage().rss;
    const started = performance.now();
    const job = await rewrapDataKeys(dataSource, encryption, { toVersion: 2, batchSize: BATCH_SIZE });
    const durationMs = performance.now() - started;
    if (job.error !== undefined) throw job.error;
    const done = job.properties.reduce((n, p) => n + p.rowsRewrapped, 0);
    if (done !== rows * columns.length)
      throw new Error(`${done} of ${rows * columns.length} values re-wrapped`);
    const sample: RewrapMemorySample = {
      rows,
      values: done,
      durationMs: round1(durationMs),
      rowsPerSecond: Math.round((rows * 1000) / durationMs),
      rssAtStartMiB: mib(rssAtStart),
      /* maxRSS is in KiB. */
      peakRssMiB: mib(process.resourceUsage().maxRSS * 1024),
      rewrapCalls: job.rewrapCalls,
    };
    console.log(JSON.stringify(sample));
  } finally {
    if (dataSource.isInitialized) await dataSource.destroy().catch(() => undefined);
    await admin.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`).catch(() => undefined);
    await admin.destroy().catch(() => undefined);
  }
}

if (require.main === module && process.env[CHILD_ROWS]) {
  child(Number(process.env[CHILD_ROWS])).catch((error: unknown) => {
    console.error(error);
    process.exitCode = 1;
  });
}
