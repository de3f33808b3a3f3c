import type { QueryRunner } from 'typeorm';
import { ConfigError } from '../errors';
import type { SealedValue } from '../field-encryptor';
import { describeError } from './describe-error';
import type { AuditEvent, KeyRegistry } from './key-registry';
import { type EncryptedColumnSql, hasSidecars } from './rotation-target';

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
  const code = pgErrorCode(error);
  return code === '40P01' || code === '40001';
}

/** The PostgreSQL error code (SQLSTATE) of a driver error, or of the TypeORM error wrapping it. */
export function pgErrorCode(error: unknown): unknown {
  return (
    (error as { code?: unknown } | null)?.code ??
    (error as { driverError?: { code?: unknown } } | null)?.driverError?.code
  );
}

/** A value as a job writes it: a sidecar value (format 1, four columns) or a compact one (format 2). */
export type StoredValue = { format: 1; sealed: SealedValue } | { format: 2; value: Buffer };

/**
 * Writes a value into the row with primary key `key` (database column name → value) in one
 * UPDATE, only where `guard` (a condition on the row, its parameters numbered after the key's)
 * still holds. Returns whether the row was written. A sidecar value sets all four columns; a
 * compact value sets the main column, and the sidecar columns to NULL where they are mapped (a
 * property migrating from the sidecar layout), so a row never holds parts of two values.
 *
 * Under PostgreSQL's default READ COMMITTED isolation the guard is checked again against the
 * row as it is once any concurrent writer has committed, so a row the application changed after
 * the job read it is left as the application wrote it.
 */
export async function writeValue(
  runner: QueryRunner,
  column: EncryptedColumnSql,
  key: Record<string, unknown>,
  stored: StoredValue,
  guard: (nextParameter: number) => { sql: string; params: unknown[] },
  alsoSet = '',
): Promise<boolean> {
  const keyValues = column.metadata.primaryColumns.map((c) => key[c.databaseName]);
  let set: string;
  let values: unknown[];
  if (stored.format === 1) {
    if (!hasSidecars(column)) {
      throw new ConfigError('a sidecar value cannot be written: the property maps no sidecar columns', {
        entity: column.entity,
        column: column.property,
      });
    }
    const { iv, wrappedKey, keyVersion } = column.sidecars;
    set = `${column.ciphertext} = $1, ${iv} = $2, ${wrappedKey} = $3, ${keyVersion} = $4`;
    const { sealed } = stored;
    values = [sealed.ciphertext, sealed.iv, sealed.wrappedKey, sealed.keyVersion];
  } else {
    const sidecars = column.sidecars;
    set = `${column.ciphertext} = $1${sidecars ? `, ${sidecars.iv} = NULL, ${sidecars.wrappedKey} = NULL, ${sidecars.keyVersion} = NULL` : ''}`;
    values = [stored.value];
  }
  const first = values.length + 1;
  const keySql = column.primaryKey.map((quoted, i) => `${quoted} = $${first + i}`).join(' AND ');
  const condition = guard(first + keyValues.length);
  const result = (await runner.query(
    `UPDATE ${column.table} SET ${set}${alsoSet} WHERE ${keySql} AND ${condition.sql}`,
    [...values, ...keyValues, ...condition.params],
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
  job: 'rotation' | 'reencryption' | 'backfill' | 'layout-migration',
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
