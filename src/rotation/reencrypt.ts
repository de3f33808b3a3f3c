import type { EnvelopeEncryption } from '../envelope-encryption';
import type { SealedValue } from '../field-encryptor';
import { describeError } from './describe-error';
import { inBatchTransaction, recordJobEnd, writeSealed } from './job';
import { KeyRegistry } from './key-registry';
import {
  type EntitySelector,
  encryptedColumnsSql,
  type RotationTarget,
  withQueryRunner,
} from './rotation-target';
import { sealedRowBatches } from './sealed-rows';

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
          await inBatchTransaction(runner, async () => {
            for (const row of rows) {
              let fresh: SealedValue;
              try {
                const value = await encryption.encryptor.open(row.sealed, row.binding);
                const binding = bindKey ? row.binding : { ...row.binding, primaryKey: undefined };
                fresh = await encryption.encryptor.seal(value, binding, column.columns.definition.type);
              } catch (error) {
                outcome.failures.push({ primaryKey: row.primaryKey, error: describeError(error) });
                continue;
              }
              /* Only where the row still holds what was read: the application's writes win. */
              const written = await writeSealed(runner, column, row.key, fresh, (n) => ({
                sql: `${column.ciphertext} = $${n}`,
                params: [row.sealed.ciphertext],
              }));
              if (written) outcome.rowsReencrypted += 1;
              else outcome.rowsSkipped += 1;
            }
          });
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
  await recordJobEnd(audit, 'reencryption', result.toVersion, {
    error: result.error,
    failures: result.properties.reduce((n, p) => n + p.failures.length, 0),
    counts: { rowsReencrypted: result.properties.reduce((n, p) => n + p.rowsReencrypted, 0) },
  });
  return result;
}
