import type { DataSource } from 'typeorm';
import type { EnvelopeEncryption } from '../envelope-encryption';
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
import {
  dataSourceOf,
  type EncryptedColumnSql,
  type EntitySelector,
  encryptedColumnsSql,
  type RotationTarget,
} from './rotation-target';

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

/** A job's options for one run without workers: `options` less the workers' own. */
export function singleRun<O extends WorkerOptions>(options: O): Omit<O, keyof WorkerOptions> {
  const { workers: _w, jobId: _j, ranges: _r, leaseMs: _l, ...single } = options;
  return single;
}

/**
 * Runs `runRange` over every primary-key range of `tables` with `workers` concurrent workers,
 * coordinated through the lease table: each range is worked on by one worker at a time, and a
 * range whose worker died is taken over once its lease runs out. `runRange` must be idempotent
 * (the jobs' writes are guarded, so running a range twice writes only what is still due) and
 * reports what it did. A range that throws, or whose result `errorOf` finds an error in, is
 * marked failed (handed out again by the next run) and the workers go on with the others.
 * Returns the per-range results of this process's workers in range order, and the errors.
 */
export async function runInRanges<R>(
  dataSource: DataSource,
  jobKind: string,
  tables: readonly RangeTable[],
  options: WorkerOptions,
  runRange: (leased: LeasedRange) => Promise<R>,
  errorOf: (result: R) => unknown = () => undefined,
): Promise<{ results: R[]; errors: unknown[]; report: WorkersReport }> {
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
  const errors: unknown[] = [];
  let resumed = 0;
  const worker = async () => {
    const runner = dataSource.createQueryRunner();
    const leases = new RangeLeases(runner, workerName(), leaseMs);
    try {
      for (;;) {
        const leased = await leases.claim(jobId);
        if (!leased) return;
        if (leased.attempts > 1) resumed++;
        const outcome = await holdingLease(leases, leased, () => runRange(leased));
        if (outcome.ok) results.push({ rangeNo: leased.rangeNo, result: outcome.value });
        const error = outcome.ok ? errorOf(outcome.value) : outcome.error;
        if (error === undefined) await leases.finish(leased, summaryOf(outcome.ok && outcome.value));
        else {
          errors.push(error);
          await leases.fail(leased, describeError(error));
        }
      }
    } finally {
      await runner.release();
    }
  };
  /* A worker stops only when no range is left, or its own connection fails. */
  const settled = await Promise.allSettled(Array.from({ length: workers }, worker));
  const reporter = dataSource.createQueryRunner();
  let progress: RangeProgress;
  try {
    progress = await rangeProgress(reporter, jobId);
  } finally {
    await reporter.release();
  }
  for (const s of settled) if (s.status === 'rejected') errors.push(s.reason);
  results.sort((a, b) => a.rangeNo - b.rangeNo);
  const report: WorkersReport = {
    jobId,
    workers,
    planned,
    rangesDone: results.length,
    rangesResumed: resumed,
    progress,
  };
  return { results: results.map((r) => r.result), errors, report };
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

/** The options every row-by-row job shares with its workers. */
export interface RangedJobOptions extends WorkerOptions {
  entities?: ReadonlyArray<EntitySelector>;
  /**
   * Only the rows whose primary key is in this range: one worker's share of a job (set by the
   * workers, or by a job queue handing one range to each process).
   */
  keyRange?: KeyRange;
  // biome-ignore lint/suspicious/noExplicitAny: each job's own progress type
  onProgress?: (progress: any) => unknown;
}

/** What every row-by-row job reports. */
export interface RangedJobResult {
  properties: Array<{ entity: string; property: string }>;
  durationMs: number;
  error?: unknown;
  /** How the job was shared between workers, when it ran through leases. */
  workers?: WorkersReport;
}

interface JobProgress {
  entity: string;
  property: string;
  rowsDone: number;
  rowsTotal?: number;
}

/**
 * Runs `job` as several workers over primary-key ranges (see {@link runInRanges}) and merges what
 * each range's run reported into one result of the job's own shape: per property, counts summed
 * (`distinctDataKeys` the largest) and failures put together; `sum` names the top-level counts to
 * add; `empty` is the result of a run that found every range done already. Progress is reported
 * per property, summed over the ranges.
 */
export async function inWorkers<O extends RangedJobOptions, R extends RangedJobResult>(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  jobKind: string,
  options: O,
  job: (target: RotationTarget, encryption: EnvelopeEncryption, options: O) => Promise<R>,
  merge: {
    empty: () => R;
    sum?: ReadonlyArray<keyof R & string>;
    /** The columns the job works on (default: all of the selected entities'). */
    columns?: (column: EncryptedColumnSql) => boolean;
  },
): Promise<R> {
  const started = performance.now();
  if (target !== dataSourceOf(target)) {
    throw new ConfigError(
      'a job with workers needs a DataSource (each worker works on a connection of its own), not a QueryRunner',
    );
  }
  if (options.keyRange) throw new ConfigError('keyRange and workers cannot be combined');
  /* One lease row per table; the entities of one table (single-table inheritance) run together. */
  const byTable = new Map<string, { table: RangeTable; entities: string[] }>();
  const columns = encryptedColumnsSql(target, encryption, options.entities).filter(
    merge.columns ?? (() => true),
  );
  for (const column of columns) {
    const known = byTable.get(column.table);
    if (known) {
      if (!known.entities.includes(column.entity)) known.entities.push(column.entity);
      continue;
    }
    byTable.set(column.table, {
      table: { entity: column.entity, table: column.table, primaryKey: column.primaryKey },
      entities: [column.entity],
    });
  }
  const entitiesOf = new Map([...byTable.values()].map((t) => [t.table.entity, t.entities]));
  const done = new Map<string, Map<number, JobProgress>>();
  const progressOf = (leased: LeasedRange) => (progress: JobProgress) => {
    const id = `${progress.entity}.${progress.property}`;
    const ranges = done.get(id) ?? new Map<number, JobProgress>();
    done.set(id, ranges);
    ranges.set(leased.rangeNo, progress);
    const all = [...ranges.values()];
    const total = all.every((p) => p.rowsTotal !== undefined)
      ? { rowsTotal: all.reduce((n, p) => n + (p.rowsTotal ?? 0), 0) }
      : {};
    /* Returned, so each worker waits for it before its next batch, as a job without workers does. */
    return options.onProgress?.({ ...progress, rowsDone: all.reduce((n, p) => n + p.rowsDone, 0), ...total });
  };
  const single = singleRun(options);
  const { results, errors, report } = await runInRanges(
    dataSourceOf(target),
    jobKind,
    [...byTable.values()].map((t) => t.table),
    options,
    (leased) =>
      job(target, encryption, {
        ...single,
        entities: entitiesOf.get(leased.entity) ?? [leased.entity],
        keyRange: leased.range,
        ...(options.onProgress ? { onProgress: progressOf(leased) } : {}),
      } as unknown as O),
    (result) => result.error,
  );
  const merged = mergeResults(results, merge.empty(), merge.sum ?? []);
  /* A range that threw (not one whose job reported an error, already in its result). */
  if (merged.error === undefined && errors.length > 0) merged.error = errors[0];
  merged.durationMs = performance.now() - started;
  merged.workers = report;
  return merged;
}

/**
 * Several runs' results of one job as one, the first's other fields kept: per property, counts
 * summed (`distinctDataKeys` the largest) and lists put together, in the order the properties first
 * appear; the first error; the top-level counts named in `sum` added up. `empty` stands for no run.
 */
export function mergeResults<R extends RangedJobResult>(
  results: R[],
  empty: R,
  sum: ReadonlyArray<keyof R & string>,
): R {
  const merged: R = { ...(results[0] ?? empty), properties: [] };
  const byProperty = new Map<string, Record<string, unknown>>();
  for (const result of results) {
    if (merged.error === undefined && result.error !== undefined) merged.error = result.error;
    for (const property of result.properties as Array<Record<string, unknown>>) {
      const id = `${property.entity}.${property.property}`;
      const into = byProperty.get(id);
      if (!into) {
        byProperty.set(id, { ...property });
        continue;
      }
      for (const [field, value] of Object.entries(property)) {
        const held = into[field];
        if (typeof value === 'number' && typeof held === 'number') {
          into[field] = field === 'distinctDataKeys' ? Math.max(held, value) : held + value;
        } else if (Array.isArray(value) && Array.isArray(held)) into[field] = [...held, ...value];
      }
    }
  }
  merged.properties = [...byProperty.values()] as R['properties'];
  for (const field of sum) {
    (merged as Record<string, unknown>)[field] = results.reduce(
      (n, r) => n + Number((r as Record<string, unknown>)[field] ?? 0),
      0,
    );
  }
  return merged;
}
