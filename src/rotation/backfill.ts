import type { EnvelopeEncryption } from '../envelope-encryption';
import { tenantParameter, tenantText } from '../typeorm/encryption-tenant';
import { legacyValue } from '../typeorm/legacy-value';
import { primaryKeyOfRow } from '../typeorm/primary-key';
import { valueBinding } from '../typeorm/value-binding';
import { describeError } from './describe-error';
import { inBatchTransaction, recordJobEnd, type StoredValue, writeValue } from './job';
import { KeyRegistry } from './key-registry';
import { inWorkers, usesWorkers, type WorkerOptions, type WorkersReport } from './parallel-job';
import type { KeyRange } from './range-leases';
import { blindIndexSet } from './rotate-index-key';
import {
  type EntitySelector,
  encryptedColumnsSql,
  primaryKeyBatches,
  type RotationTarget,
  requireKeyTableFor,
  withQueryRunner,
} from './rotation-target';
import { sealStored } from './stored-values';

/** Options of {@link backfillEncryptedColumns}. */
export interface BackfillOptions extends WorkerOptions {
  /**
   * Only the rows whose primary key is in this range: one worker's share of the job (set by the
   * workers; or give each process of a job queue one range).
   */
  keyRange?: KeyRange;

  entities?: ReadonlyArray<EntitySelector>;
  /** Rows per batch (one transaction each). Default 500. */
  batchSize?: number;
  /**
   * Also set the plaintext column to NULL in the same update. Default `false`: the plaintext stays
   * until you drop the column (after `typeorm-envelope verify`), so nothing is lost if you stop.
   */
  clearPlaintext?: boolean;
  /** Only this tenant's rows (of entities with an `@EncryptionTenant()` column; others are left out). */
  tenant?: string;
  /**
   * Called after each batch, once its rows are written; a promise it returns is awaited before the
   * next batch, so what it records never runs ahead of the database (a rejection ends the job, in `error`).
   */
  onProgress?: (progress: { entity: string; property: string; rowsDone: number }) => unknown;
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
  /** How the job was shared between workers, when it ran with `workers` or `jobId`. */
  workers?: WorkersReport;
}

/**
 * Encrypts the values of existing plaintext columns into their encrypted columns (the four
 * sidecars, or the one compact column), for properties declared with
 * `@Encrypted({ plaintextColumn })`. Rows are taken in primary-key-ordered batches
 * and only where the ciphertext is still NULL, so the job can be stopped and run again at any time.
 * Each row is written (all four columns in one statement) only if it still has no ciphertext and
 * its old column still holds the value that was read, so a value the application writes meanwhile
 * is never overwritten. Run it once every instance of the application declares the property
 * encrypted: a write to the old column made after the row was backfilled is not seen.
 */
export async function backfillEncryptedColumns(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  options: BackfillOptions = {},
): Promise<BackfillResult> {
  if (usesWorkers(options)) {
    return inWorkers(target, encryption, 'backfill', options, backfillEncryptedColumns, {
      empty: () => ({ properties: [], durationMs: 0 }),
    });
  }
  const started = performance.now();
  const result: BackfillResult = { properties: [], durationMs: 0 };
  const audit = new KeyRegistry(target, encryption);
  try {
    await audit.record('backfill-started', encryption.keyring.activeVersion, {});
    await withQueryRunner(target, async (runner) => {
      const dataSource = runner.connection;
      const columns = encryptedColumnsSql(target, encryption, options.entities, options.keyRange);
      await requireKeyTableFor(
        runner,
        columns.filter((c) => c.columns.definition.plaintext),
      );
      for (const column of columns) {
        const { definition } = column.columns;
        if (!definition.plaintext) continue;
        if (options.tenant !== undefined && !column.tenant) continue;
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
          /* The old column's text form too: the write below checks that it is still what was read. */
          const rows = (await runner.query(
            `SELECT ${column.primaryKey.join(', ')}, ${plaintext} AS plaintext, ${plaintext}::text AS plaintext_text${column.tenant ? `, ${column.tenant} AS tenant, ${column.tenant}::text AS tenant_text` : ''}
             FROM ${column.table}
             WHERE ${batch.condition} AND ${column.ciphertext} IS NULL AND ${plaintext} IS NOT NULL${options.tenant === undefined ? '' : ` AND ${column.tenant} = $${batch.params.length + 1}`}`,
            options.tenant === undefined || !column.columns.tenant
              ? batch.params
              : [...batch.params, tenantParameter(column.columns.tenant, options.tenant)],
          )) as Array<Record<string, unknown>>;
          /* Seal first, outside the transaction: no row is locked during key-provider calls. */
          const prepared: Array<{
            key: Record<string, unknown>;
            text: unknown;
            tenant: unknown;
            sealed: StoredValue;
            index: string;
          }> = [];
          for (const row of rows) {
            const key = Object.fromEntries(keyNames.map((n) => [n, row[n]]));
            const primaryKey = primaryKeyOfRow(column.metadata, key) as string;
            try {
              /* In the property's layout (compact: its data key's row committed first). */
              const sealed = await sealStored(
                runner,
                encryption,
                column,
                legacyValue(row.plaintext, definition.type),
                valueBinding(
                  column.metadata,
                  column.columns,
                  definition.bindPrimaryKey ? primaryKey : undefined,
                  column.columns.tenant ? tenantText(column.columns.tenant, row.tenant) : undefined,
                ),
              );
              /* A searchable property's blind index is written with its value. */
              const index = await blindIndexSet(
                runner,
                encryption,
                column.columns,
                legacyValue(row.plaintext, definition.type),
                column.columns.tenant ? (tenantText(column.columns.tenant, row.tenant) ?? null) : null,
              );
              prepared.push({
                key,
                text: row.plaintext_text,
                tenant: row.tenant_text ?? null,
                sealed,
                index,
              });
            } catch (error) {
              outcome.failures.push({ primaryKey, error: describeError(error) });
            }
          }
          outcome.rowsEncrypted += await inBatchTransaction(runner, async () => {
            let n = 0;
            for (const { key, text, tenant, sealed, index } of prepared) {
              /*
               * Only rows still without ciphertext and still holding the plaintext that was read:
               * a value the application wrote meanwhile wins, whether through this library (which
               * sets the ciphertext) or through the old column (a release that predates the
               * encryption, still running during a rolling deploy; the next run encrypts it).
               */
              const done = await writeValue(
                runner,
                column,
                key,
                sealed,
                (p) =>
                  /* …and still of the tenant its value was sealed for: a row moved meanwhile is left for the next run. */
                  column.tenant
                    ? {
                        sql: `${column.ciphertext} IS NULL AND ${plaintext}::text = $${p} AND ${column.tenant}::text IS NOT DISTINCT FROM $${p + 1}`,
                        params: [text, tenant],
                      }
                    : { sql: `${column.ciphertext} IS NULL AND ${plaintext}::text = $${p}`, params: [text] },
                (options.clearPlaintext ? `, ${plaintext} = NULL` : '') + index,
              );
              if (done) n += 1;
            }
            return n;
          });
          await options.onProgress?.({
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
