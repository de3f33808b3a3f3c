import type { QueryRunner } from 'typeorm';
import type { SealedValue } from '../field-encryptor';
import { describeError } from './describe-error';
import type { AuditEvent, KeyRegistry } from './key-registry';
import type { EncryptedColumnSql } from './rotation-target';

/** Times a batch is tried again after PostgreSQL aborted it to break a deadlock with the application. */
const BATCH_ATTEMPTS = 5;

/**
 * Runs one batch in a transaction of its own, so a job can stop between batches and be run
 * again; inside a caller's transaction (a migration's `up`) the batch joins it instead.
 *
 * The batch's row locks can meet an application transaction that locks the same rows in another
 * order: PostgreSQL then aborts one of the two. An aborted batch of its own is run again (its
 * writes are guarded, so a second run writes only what is still due); `fn` must therefore return
 * what it did rather than count it as it goes.
 */
export async function inBatchTransaction<T>(runner: QueryRunner, fn: () => Promise<T>): Promise<T> {
  if (runner.isTransactionActive) return fn();
  for (let attempt = 1; ; attempt++) {
    await runner.startTransaction();
    try {
      const result = await fn();
      await runner.commitTransaction();
      return result;
    } catch (error) {
      await runner.rollbackTransaction();
      if (attempt >= BATCH_ATTEMPTS || !isRetryable(error)) throw error;
    }
  }
}

/** A deadlock or serialization failure: nothing was written, the same work can be tried again. */
function isRetryable(error: unknown): boolean {
  const code =
    (error as { code?: unknown } | null)?.code ??
    (error as { driverError?: { code?: unknown } } | null)?.driverError?.code;
  return code === '40P01' || code === '40001';
}

/**
 * Writes a sealed value's four columns into the row with primary key `key` (database column
 * name → value) in one UPDATE, only where `guard` (a condition on the row, its parameters
 * numbered after the key's) still holds. Returns whether the row was written.
 *
 * Under PostgreSQL's default READ COMMITTED isolation the guard is checked again against the
 * row as it is once any concurrent writer has committed, so a row the application changed after
 * the job read it is left as the application wrote it; and since all four columns are set by one
 * statement, a row never holds parts of two values.
 */
export async function writeSealed(
  runner: QueryRunner,
  column: EncryptedColumnSql,
  key: Record<string, unknown>,
  sealed: SealedValue,
  guard: (nextParameter: number) => { sql: string; params: unknown[] },
  alsoSet = '',
): Promise<boolean> {
  const keyValues = column.metadata.primaryColumns.map((c) => key[c.databaseName]);
  const keySql = column.primaryKey.map((quoted, i) => `${quoted} = $${5 + i}`).join(' AND ');
  const condition = guard(5 + keyValues.length);
  const result = (await runner.query(
    `UPDATE ${column.table} SET ${column.ciphertext} = $1, ${column.iv} = $2, ${column.wrappedKey} = $3,
            ${column.keyVersion} = $4${alsoSet} WHERE ${keySql} AND ${condition.sql}`,
    [sealed.ciphertext, sealed.iv, sealed.wrappedKey, sealed.keyVersion, ...keyValues, ...condition.params],
    true,
  )) as { affected?: number };
  return (result.affected ?? 0) > 0;
}

/**
 * Records a job's end in the audit log: `<job>-finished`, or `<job>-failed` when it stopped on an
 * error or left failures behind. A failure to record never hides the job's own result.
 */
export async function recordJobEnd(
  audit: KeyRegistry,
  job: 'rotation' | 'reencryption' | 'backfill',
  keyVersion: number,
  outcome: {
    error?: unknown;
    failures: number;
    counts: Record<string, number>;
    tenant?: string;
    /** The target master key's reference (ARN or fingerprint), when known. */
    keyReference?: string;
  },
): Promise<void> {
  const failed = outcome.error !== undefined || outcome.failures > 0;
  const event = `${job}-${failed ? 'failed' : 'finished'}` as AuditEvent;
  const details = {
    ...(outcome.keyReference === undefined ? {} : { keyReference: outcome.keyReference }),
    ...outcome.counts,
    failures: outcome.failures,
    ...(outcome.error !== undefined ? { error: describeError(outcome.error) } : {}),
  };
  const about = outcome.tenant === undefined ? {} : { tenant: outcome.tenant };
  await audit.record(event, keyVersion, details, about).catch(() => undefined);
}
