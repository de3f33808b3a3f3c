import { randomUUID } from 'node:crypto';
import { hostname } from 'node:os';
import type { QueryRunner } from 'typeorm';
import { JOB_RANGES_TABLE } from '../../migrations/1764700000000-TypeormEnvelopeJobRanges';
import { ConfigError } from '../errors';
import { pgErrorCode } from './job';
import { libraryTablePath } from './rotation-target';

/**
 * Rows whose primary key is after `after` and up to `upTo` (both included only at the upper end),
 * each bound given as the text form of the key columns, in key order; an absent bound is open.
 */
export interface KeyRange {
  after?: readonly string[];
  upTo?: readonly string[];
}

/** A table a job splits into ranges: its entity name, quoted table and quoted key columns. */
export interface RangeTable {
  entity: string;
  table: string;
  primaryKey: readonly string[];
}

/** A range a worker holds the lease of. */
export interface LeasedRange {
  jobId: string;
  rangeNo: number;
  entity: string;
  range: KeyRange;
  /** How many times the range was handed out, this time included (more than 1: taken over). */
  attempts: number;
}

/** How far a job's ranges are. */
export interface RangeProgress {
  total: number;
  pending: number;
  running: number;
  done: number;
  failed: number;
}

/** The table of leases, quoted in the DataSource's schema. */
export function jobRangesTable(runner: QueryRunner): string {
  return libraryTablePath(runner, JOB_RANGES_TABLE);
}

/** A worker name that says where it runs, for the lease table and the audit log. */
export function workerName(): string {
  return `${hostname()}:${process.pid}:${randomUUID().slice(0, 8)}`;
}

/**
 * Splits each table into about `rangesPerTable` primary-key ranges of equal row counts and records
 * them for `jobId`, once: a job already planned (another worker or an earlier run got there first)
 * keeps its ranges, so every worker of a job works on the same split, and a run after a crash
 * resumes it. Failed ranges of an earlier run are handed out again. Refuses a job id already used
 * by a job of another kind.
 */
export async function planRanges(
  runner: QueryRunner,
  jobId: string,
  jobKind: string,
  tables: readonly RangeTable[],
  rangesPerTable: number,
): Promise<{ planned: boolean; progress: RangeProgress }> {
  const table = jobRangesTable(runner);
  const ownTransaction = !runner.isTransactionActive;
  if (ownTransaction) await runner.startTransaction();
  try {
    /* Two workers starting together: one plans, the other waits here and then finds the plan. */
    await runner.query('SELECT pg_advisory_xact_lock(hashtext($1))', [`typeorm-envelope:job:${jobId}`]);
    const existing = (await runner.query(`SELECT DISTINCT job_kind FROM ${table} WHERE job_id = $1`, [
      jobId,
    ])) as Array<{ job_kind: string }>;
    let planned = false;
    if (existing.length > 0) {
      if (existing.some((row) => row.job_kind !== jobKind)) {
        throw new ConfigError(
          `job id "${jobId}" belongs to a ${existing[0]?.job_kind} job, not a ${jobKind} job; choose another id`,
        );
      }
      await runner.query(
        `UPDATE ${table} SET state = 'pending', lease_owner = NULL, lease_expires_at = NULL, error = NULL
         WHERE job_id = $1 AND state = 'failed'`,
        [jobId],
      );
    } else {
      let rangeNo = 0;
      for (const target of tables) {
        for (const range of await splitTable(runner, target, rangesPerTable)) {
          await runner.query(
            `INSERT INTO ${table} (job_id, range_no, job_kind, entity, after_key, up_to_key)
             VALUES ($1, $2, $3, $4, $5, $6)`,
            [jobId, rangeNo++, jobKind, target.entity, range.after ?? null, range.upTo ?? null],
          );
        }
      }
      planned = true;
    }
    if (ownTransaction) await runner.commitTransaction();
    return { planned, progress: await rangeProgress(runner, jobId) };
  } catch (error) {
    if (ownTransaction) await runner.rollbackTransaction();
    throw isMissingTable(error)
      ? new ConfigError(
          `a job with workers needs the table ${JOB_RANGES_TABLE}: add the migration ` +
            'TypeormEnvelopeJobRanges1764700000000 to the DataSource and run it',
        )
      : error;
  }
}

/** PostgreSQL's "relation does not exist". */
function isMissingTable(error: unknown): boolean {
  return pgErrorCode(error) === '42P01';
}

/** Below this many rows per range, a table is split into fewer ranges: a range costs a few queries. */
const MIN_ROWS_PER_RANGE = 500;

/**
 * Up to `count` consecutive ranges covering the whole table (the first open below, the last open
 * above, so rows inserted meanwhile fall in one), cut at every n-th key in key order.
 */
async function splitTable(runner: QueryRunner, target: RangeTable, count: number): Promise<KeyRange[]> {
  const keys = target.primaryKey.join(', ');
  const [{ rows } = { rows: 0 }] = (await runner.query(
    `SELECT count(*)::bigint AS rows FROM ${target.table}`,
  )) as Array<{ rows: string | number }>;
  const total = Number(rows);
  const ranges = Math.min(count, Math.floor(total / MIN_ROWS_PER_RANGE));
  if (ranges <= 1) return [{}];
  const step = Math.ceil(total / ranges);
  const cuts = (await runner.query(
    `SELECT ${target.primaryKey.map((k, i) => `${k}::text AS k${i}`).join(', ')}
     FROM (SELECT ${keys}, row_number() OVER (ORDER BY ${keys}) AS n FROM ${target.table}) AS numbered
     WHERE n % $1 = 0 AND n < $2 ORDER BY n`,
    [step, total],
  )) as Array<Record<string, string>>;
  const bounds = cuts.map((cut) => target.primaryKey.map((_, i) => cut[`k${i}`] as string));
  return [...bounds, undefined].map((upTo, i) => ({
    ...(i > 0 ? { after: bounds[i - 1] } : {}),
    ...(upTo ? { upTo } : {}),
  }));
}

/** Counts of a job's ranges by state. */
export async function rangeProgress(runner: QueryRunner, jobId: string): Promise<RangeProgress> {
  const rows = (await runner.query(
    `SELECT state, count(*)::int AS n FROM ${jobRangesTable(runner)} WHERE job_id = $1 GROUP BY state`,
    [jobId],
  )) as Array<{ state: keyof Omit<RangeProgress, 'total'>; n: number }>;
  const progress: RangeProgress = { total: 0, pending: 0, running: 0, done: 0, failed: 0 };
  for (const row of rows) {
    progress[row.state] = row.n;
    progress.total += row.n;
  }
  return progress;
}

/**
 * One worker's hold on the ranges of a job, through its own connection. `claim()` takes the first
 * range no one holds: pending, or running under a lease that ran out. The lease is renewed while
 * the range is worked on; only the holder of a range's lease can finish it.
 */
export class RangeLeases {
  readonly #table: string;

  constructor(
    private readonly runner: QueryRunner,
    readonly owner: string,
    readonly leaseMs: number,
  ) {
    if (!Number.isInteger(leaseMs) || leaseMs < 1_000) {
      throw new ConfigError('a job lease must last at least 1,000 ms');
    }
    this.#table = jobRangesTable(runner);
  }

  /** Takes the lease of the next free range of `jobId`, or `undefined` when none is free. */
  async claim(jobId: string): Promise<LeasedRange | undefined> {
    const { records } = (await this.runner.query(
      `UPDATE ${this.#table} AS r SET state = 'running', lease_owner = $2,
              lease_expires_at = now() + $3 * interval '1 millisecond', attempts = r.attempts + 1
       WHERE (r.job_id, r.range_no) = (
         SELECT job_id, range_no FROM ${this.#table}
         WHERE job_id = $1 AND (state = 'pending' OR (state = 'running' AND lease_expires_at < now()))
         ORDER BY range_no LIMIT 1 FOR UPDATE SKIP LOCKED)
       RETURNING r.range_no, r.entity, r.after_key, r.up_to_key, r.attempts`,
      [jobId, this.owner, this.leaseMs],
      true,
    )) as {
      records: Array<{
        range_no: number;
        entity: string;
        after_key: string[] | null;
        up_to_key: string[] | null;
        attempts: number;
      }>;
    };
    const [row] = records;
    if (!row) return undefined;
    return {
      jobId,
      rangeNo: row.range_no,
      entity: row.entity,
      range: {
        ...(row.after_key ? { after: row.after_key } : {}),
        ...(row.up_to_key ? { upTo: row.up_to_key } : {}),
      },
      attempts: row.attempts,
    };
  }

  /** Extends the lease; `false` when this worker no longer holds it (it ran out and was taken over). */
  async renew(leased: LeasedRange): Promise<boolean> {
    return this.#update(
      leased,
      `lease_expires_at = now() + $4 * interval '1 millisecond'`,
      [this.leaseMs],
      `state = 'running'`,
    );
  }

  /** Marks the range done with what the job reported for it; `false` when the lease was lost. */
  async finish(leased: LeasedRange, result: unknown): Promise<boolean> {
    return this.#update(
      leased,
      `state = 'done', result = $4::jsonb, lease_expires_at = NULL, finished_at = now()`,
      [JSON.stringify(result ?? null)],
      `state = 'running'`,
    );
  }

  /** Marks the range failed (handed out again by the next run of the job); `false` when the lease was lost. */
  async fail(leased: LeasedRange, error: string): Promise<boolean> {
    return this.#update(
      leased,
      `state = 'failed', error = $4, lease_expires_at = NULL, finished_at = now()`,
      [error],
      `state = 'running'`,
    );
  }

  async #update(leased: LeasedRange, set: string, params: unknown[], condition: string): Promise<boolean> {
    const result = (await this.runner.query(
      `UPDATE ${this.#table} SET ${set}
       WHERE job_id = $1 AND range_no = $2 AND lease_owner = $3 AND ${condition}`,
      [leased.jobId, leased.rangeNo, this.owner, ...params],
      true,
    )) as { affected?: number };
    return (result.affected ?? 0) > 0;
  }
}
