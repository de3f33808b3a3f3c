import type { EnvelopeEncryption } from '../envelope-encryption';
import { describeError } from './describe-error';
import { KeyRegistry } from './key-registry';
import {
  type EntitySelector,
  encryptedColumnsSql,
  type RotationTarget,
  withQueryRunner,
} from './rotation-target';
import { keyCondition, sealedRowBatches } from './sealed-rows';

/** Options of {@link reencryptColumns}. */
export interface ReencryptOptions {
  entities?: ReadonlyArray<EntitySelector>;
  /** Rows per batch (one transaction each). Default 500. */
  batchSize?: number;
  onProgress?: (progress: { entity: string; property: string; rowsDone: number }) => void;
}

/** What {@link reencryptColumns} did. It never throws midway: an unexpected error is in `error`. */
export interface ReencryptResult {
  toVersion: number;
  properties: Array<{
    entity: string;
    property: string;
    rowsReencrypted: number;
    /** Rows the application changed meanwhile: left as the application wrote them. */
    rowsSkipped: number;
    failures: Array<{ primaryKey: string; error: string }>;
  }>;
  durationMs: number;
  error?: unknown;
}

/**
 * Re-encrypts every stored value under fresh data keys and the active master-key version: for
 * use after a suspected data-key compromise (a plain rotation only re-wraps the data keys).
 * Values are decrypted and sealed again, bound to their row's primary key; each row is updated
 * only if it still holds the ciphertext that was read, so the application's writes are never
 * overwritten. Batches commit one by one: after a crash, run it again (rows done already are
 * simply sealed once more).
 */
export async function reencryptColumns(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  options: ReencryptOptions = {},
): Promise<ReencryptResult> {
  const started = performance.now();
  const result: ReencryptResult = {
    toVersion: encryption.keyring.activeVersion,
    properties: [],
    durationMs: 0,
  };
  const audit = new KeyRegistry(target, encryption);
  try {
    await audit.record('reencryption-started', result.toVersion, {});
    /* Never seal under the data key that may be compromised. */
    encryption.cache.renewEncryptionKey();
    await withQueryRunner(target, async (runner) => {
      for (const column of encryptedColumnsSql(target, encryption, options.entities)) {
        const outcome = {
          entity: column.entity,
          property: column.property,
          rowsReencrypted: 0,
          rowsSkipped: 0,
          failures: [] as Array<{ primaryKey: string; error: string }>,
        };
        result.properties.push(outcome);
        const bindKey = column.columns.definition.bindPrimaryKey;
        for await (const rows of sealedRowBatches(runner, column, options.batchSize ?? 500)) {
          const ownTransaction = !runner.isTransactionActive;
          if (ownTransaction) await runner.startTransaction();
          try {
            for (const row of rows) {
              let fresh: Awaited<ReturnType<typeof encryption.encryptor.seal>>;
              try {
                const value = await encryption.encryptor.open(row.sealed, row.binding);
                const binding = bindKey ? row.binding : { ...row.binding, primaryKey: undefined };
                fresh = await encryption.encryptor.seal(value, binding, column.columns.definition.type);
              } catch (error) {
                outcome.failures.push({ primaryKey: row.primaryKey, error: describeError(error) });
                continue;
              }
              const where = keyCondition(column, row, 4);
              const updated = (await runner.query(
                `UPDATE ${column.table} SET ${column.ciphertext} = $1, ${column.iv} = $2, ${column.wrappedKey} = $3, ${column.keyVersion} = $4
                 WHERE ${where.sql} AND ${column.ciphertext} = $${4 + where.params.length + 1}`,
                [
                  fresh.ciphertext,
                  fresh.iv,
                  fresh.wrappedKey,
                  fresh.keyVersion,
                  ...where.params,
                  row.sealed.ciphertext,
                ],
                true,
              )) as { affected?: number };
              if (updated.affected) outcome.rowsReencrypted += 1;
              else outcome.rowsSkipped += 1;
            }
            if (ownTransaction) await runner.commitTransaction();
          } catch (error) {
            if (ownTransaction) await runner.rollbackTransaction();
            throw error;
          }
          options.onProgress?.({
            entity: column.entity,
            property: column.property,
            rowsDone: outcome.rowsReencrypted,
          });
        }
      }
    });
  } catch (error) {
    result.error = error;
  }
  result.durationMs = performance.now() - started;
  const failures = result.properties.reduce((n, p) => n + p.failures.length, 0);
  await audit
    .record(result.error || failures ? 'reencryption-failed' : 'reencryption-finished', result.toVersion, {
      rowsReencrypted: result.properties.reduce((n, p) => n + p.rowsReencrypted, 0),
      failures,
      ...(result.error ? { error: describeError(result.error) } : {}),
    })
    .catch(() => undefined);
  return result;
}
