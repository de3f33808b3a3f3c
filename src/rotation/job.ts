import type { QueryRunner } from 'typeorm';
import type { SealedValue } from '../field-encryptor';
import { describeError } from './describe-error';
import type { AuditEvent, KeyRegistry } from './key-registry';
import type { EncryptedColumnSql } from './rotation-target';

/**
 * Runs one batch in a transaction of its own, so a job can stop between batches and be run
 * again; inside a caller's transaction (a migration's `up`) the batch joins it instead.
 */
export async function inBatchTransaction<T>(runner: QueryRunner, fn: () => Promise<T>): Promise<T> {
  if (runner.isTransactionActive) return fn();
  await runner.startTransaction();
  try {
    const result = await fn();
    await runner.commitTransaction();
    return result;
  } catch (error) {
    await runner.rollbackTransaction();
    throw error;
  }
}

/**
 * Writes a sealed value's four columns into the row with primary key `key` (database column
 * name → value), only where `guard` (a condition on the row, its parameters numbered after the
 * key's) still holds. Returns whether the row was written.
 */
export async function writeSealed(
  runner: QueryRunner,
  column: EncryptedColumnSql,
  key: Record<string, unknown>,
  sealed: SealedValue,
  guard: (nextParameter: number) => { sql: string; params: unknown[] },
  alsoSet = '',
): Promise<boolean> {
  const keyValues = Object.values(key);
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
  outcome: { error?: unknown; failures: number; counts: Record<string, number> },
): Promise<void> {
  const failed = outcome.error !== undefined || outcome.failures > 0;
  const event = `${job}-${failed ? 'failed' : 'finished'}` as AuditEvent;
  const details = {
    ...outcome.counts,
    failures: outcome.failures,
    ...(outcome.error !== undefined ? { error: describeError(outcome.error) } : {}),
  };
  await audit.record(event, keyVersion, details).catch(() => undefined);
}
