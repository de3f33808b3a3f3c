import type { EnvelopeEncryption } from '../envelope-encryption';
import type { SealedValue } from '../field-encryptor';
import { primaryKeyOfRow } from '../typeorm/primary-key';
import { describeError } from './describe-error';
import { inBatchTransaction, recordJobEnd, writeSealed } from './job';
import { KeyRegistry } from './key-registry';
import {
  type EntitySelector,
  encryptedColumnsSql,
  primaryKeyBatches,
  type RotationTarget,
  withQueryRunner,
} from './rotation-target';

/** Options of {@link backfillEncryptedColumns}. */
export interface BackfillOptions {
  entities?: ReadonlyArray<EntitySelector>;
  /** Rows per batch (one transaction each). Default 500. */
  batchSize?: number;
  /**
   * Also set the plaintext column to NULL in the same update. Default `false`: the plaintext stays
   * until you drop the column (after `typeorm-envelope verify`), so nothing is lost if you stop.
   */
  clearPlaintext?: boolean;
  onProgress?: (progress: { entity: string; property: string; rowsDone: number }) => void;
}

/** What {@link backfillEncryptedColumns} did. It never throws midway: an unexpected error is in `error`. */
export interface BackfillResult {
  properties: Array<{
    entity: string;
    property: string;
    rowsEncrypted: number;
    failures: Array<{ primaryKey: string; error: string }>;
  }>;
  durationMs: number;
  error?: unknown;
}

/**
 * Encrypts the values of existing plaintext columns into their sidecar columns, for properties
 * declared with `@Encrypted({ plaintextColumn })`. Rows are taken in primary-key-ordered batches
 * and only where the ciphertext is still NULL, so the job can be stopped and run again at any time,
 * and never overwrites a value the application has written meanwhile.
 */
export async function backfillEncryptedColumns(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  options: BackfillOptions = {},
): Promise<BackfillResult> {
  const started = performance.now();
  const result: BackfillResult = { properties: [], durationMs: 0 };
  const audit = new KeyRegistry(target, encryption);
  try {
    await audit.record('backfill-started', encryption.keyring.activeVersion, {});
    await withQueryRunner(target, async (runner) => {
      const dataSource = runner.connection;
      for (const column of encryptedColumnsSql(target, encryption, options.entities)) {
        const { definition } = column.columns;
        if (!definition.plaintext) continue;
        const plaintext = dataSource.driver.escape(definition.plaintext.column);
        const outcome = {
          entity: column.entity,
          property: column.property,
          rowsEncrypted: 0,
          failures: [] as Array<{ primaryKey: string; error: string }>,
        };
        result.properties.push(outcome);
        const keyNames = column.metadata.primaryColumns.map((c) => c.databaseName);
        for await (const batch of primaryKeyBatches(runner, column, options.batchSize ?? 500)) {
          const rows = (await runner.query(
            `SELECT ${column.primaryKey.join(', ')}, ${plaintext} AS plaintext FROM ${column.table}
             WHERE ${batch.condition} AND ${column.ciphertext} IS NULL AND ${plaintext} IS NOT NULL`,
            batch.params,
          )) as Array<Record<string, unknown>>;
          await inBatchTransaction(runner, async () => {
            for (const row of rows) {
              const key = Object.fromEntries(keyNames.map((n) => [n, row[n]]));
              const primaryKey = primaryKeyOfRow(column.metadata, key) as string;
              let sealed: SealedValue;
              try {
                sealed = await encryption.encryptor.seal(
                  row.plaintext,
                  {
                    table: column.metadata.tableName,
                    column: column.property,
                    primaryKey: definition.bindPrimaryKey ? primaryKey : undefined,
                  },
                  definition.type,
                );
              } catch (error) {
                outcome.failures.push({ primaryKey, error: describeError(error) });
                continue;
              }
              /* Only rows still without ciphertext: a value the application wrote meanwhile wins. */
              const written = await writeSealed(
                runner,
                column,
                key,
                sealed,
                () => ({ sql: `${column.ciphertext} IS NULL`, params: [] }),
                options.clearPlaintext ? `, ${plaintext} = NULL` : '',
              );
              if (written) outcome.rowsEncrypted += 1;
            }
          });
          options.onProgress?.({
            entity: column.entity,
            property: column.property,
            rowsDone: outcome.rowsEncrypted,
          });
        }
      }
    });
  } catch (error) {
    result.error = error;
  }
  result.durationMs = performance.now() - started;
  await recordJobEnd(audit, 'backfill', encryption.keyring.activeVersion, {
    error: result.error,
    failures: result.properties.reduce((n, p) => n + p.failures.length, 0),
    counts: { rowsEncrypted: result.properties.reduce((n, p) => n + p.rowsEncrypted, 0) },
  });
  return result;
}
