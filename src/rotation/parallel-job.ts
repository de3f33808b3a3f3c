import type { DataSource } from 'typeorm';
import { ConfigError } from '../errors';
import { describeError } from './describe-error';
import {
  type KeyRange,
  type LeasedRange,
  planRanges,
  RangeLeases,
  type RangeProgress,
  type RangeTable,
  rangeProgress,
  workerName,
} from './range-leases';

/** Options that run a row-by-row job as several workers over primary-key ranges. */
export interface WorkerOptions {
  /**
   * Workers in this process, each on a connection of its own. Default 1. Other processes run the
   * same job by passing the same `jobId`.
   */
  workers?: number;
  /**
   * Names the job in the lease table (`TypeormEnvelopeJobRanges1764700000000`), so that workers in
   * several processes share its ranges and a run after a crash resumes it. Setting it (or
   * `workers` above 1) runs the job through leases.
   */
  jobId?: string;
  /** Ranges per table: more ranges balance better. Default 4 per worker, at least 8. */
  ranges?: number;
  /**
   * How long a worker's lease on a range lasts without renewal, in ms (renewed every third of
   * it while the range is worked on). A killed worker's range is taken over once it runs out.
   * Default 60,000.
   */
  leaseMs?: number;
}

/** What a run through leases did, beside the job's own results. */
export interface WorkersReport {
  jobId: string;
  workers: number;
  /** Whether this run split the tables (`false`: it joined or resumed a planned job). */
  planned: boolean;
  /** Ranges this process's workers completed. */
  rangesDone: number;
  /** Of those, ranges handed out before: a dead worker's taken over, or a failed one retried. */
  rangesResumed: number;
  /** The job's ranges by state when this run ended (ranges still running belong to other processes). */
  progress: RangeProgress;
}

const DEFAULT_LEASE_MS = 60_000;

/** Whether `options` ask for the job to run through leases. */
export function usesWorkers(options: WorkerOptions): boolean {
  return options.jobId !== undefined || (options.workers ?? 1) > 1;
}

/**
 * Runs `runRange` over every primary-key range of `tables` with `workers` concurrent workers,
 * coordinated through the lease table: each range is worked on by one worker at a time, and a
 * range whose worker died is taken over once its lease runs out. `runRange` must be idempotent
 * (the jobs' writes are guarded, so running a range twice writes only what is still due) and
 * reports what it did; a range that throws is marked failed and handed out again by the next run.
 * Returns the per-range results of this process's workers, in range order.
 */
export async function runInRanges<R>(
  dataSource: DataSource,
  jobKind: string,
  tables: readonly RangeTable[],
  options: WorkerOptions,
  runRange: (leased: LeasedRange) => Promise<R>,
): Promise<{ results: R[]; report: WorkersReport }> {
  const workers = options.workers ?? 1;
  if (!Number.isInteger(workers) || workers < 1) throw new ConfigError('workers must be a positive integer');
  const leaseMs = options.leaseMs ?? DEFAULT_LEASE_MS;
  const jobId = options.jobId ?? `${jobKind}:${new Date().toISOString()}`;
  const ranges = options.ranges ?? Math.max(8, 4 * workers);
  const planner = dataSource.createQueryRunner();
  let planned: boolean;
  try {
    planned = (await planRanges(planner, jobId, jobKind, tables, ranges)).planned;
  } finally {
    await planner.release();
  }
  const results: Array<{ rangeNo: number; result: R }> = [];
  let resumed = 0;
  const worker = async () => {
    const runner = dataSource.createQueryRunner();
    const leases = new RangeLeases(runner, workerName(), leaseMs);
    try {
      for (;;) {
        const leased = await leases.claim(jobId);
        if (!leased) return;
        if (leased.attempts > 1) resumed++;
        const result = await holdingLease(leases, leased, () => runRange(leased));
        if (result.ok) {
          results.push({ rangeNo: leased.rangeNo, result: result.value });
          await leases.finish(leased, summaryOf(result.value));
        } else {
          await leases.fail(leased, describeError(result.error));
          throw result.error;
        }
      }
    } finally {
      await runner.release();
    }
  };
  const settled = await Promise.allSettled(Array.from({ length: workers }, worker));
  const reporter = dataSource.createQueryRunner();
  let progress: RangeProgress;
  try {
    progress = await rangeProgress(reporter, jobId);
  } finally {
    await reporter.release();
  }
  const failure = settled.find((s): s is PromiseRejectedResult => s.status === 'rejected');
  results.sort((a, b) => a.rangeNo - b.rangeNo);
  const report: WorkersReport = {
    jobId,
    workers,
    planned,
    rangesDone: results.length,
    rangesResumed: resumed,
    progress,
  };
  if (failure) throw Object.assign(failure.reason as object, { workers: report });
  return { results: results.map((r) => r.result), report };
}

/** Runs `work` while renewing the lease every third of its length. */
async function holdingLease<R>(
  leases: RangeLeases,
  leased: LeasedRange,
  work: () => Promise<R>,
): Promise<{ ok: true; value: R } | { ok: false; error: unknown }> {
  let renewing = Promise.resolve(true);
  const timer = setInterval(
    () => {
      /* A lost lease is not fatal: the writes are guarded, the worker that took over repeats them. */
      renewing = renewing.then(() => leases.renew(leased).catch(() => false));
    },
    Math.floor(leases.leaseMs / 3),
  );
  try {
    return { ok: true, value: await work() };
  } catch (error) {
    return { ok: false, error };
  } finally {
    clearInterval(timer);
    await renewing;
  }
}

/**
 * What is kept of a range's result in the lease table: its numbers, summed by path (so no
 * primary key or error text is stored there).
 */
function summaryOf(result: unknown): Record<string, number> {
  const summary: Record<string, number> = {};
  const visit = (value: unknown, path: string) => {
    if (typeof value === 'number') summary[path] = (summary[path] ?? 0) + value;
    else if (Array.isArray(value)) for (const item of value) visit(item, path);
    else if (value && typeof value === 'object') {
      for (const [k, v] of Object.entries(value)) visit(v, path ? `${path}.${k}` : k);
    }
  };
  visit(result, '');
  return summary;
}

/** The key range a worker's job call is bounded to, as a job option. */
export function rangeOption(leased: LeasedRange): { keyRange: KeyRange } {
  return { keyRange: leased.range };
}
