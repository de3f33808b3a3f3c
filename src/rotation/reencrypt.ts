import type { EnvelopeEncryption } from '../envelope-encryption';
import { describeError } from './describe-error';
import { inBatchTransaction, recordJobEnd, type StoredValue, writeValue } from './job';
import { KeyRegistry } from './key-registry';
import { inWorkers, usesWorkers, type WorkerOptions, type WorkersReport } from './parallel-job';
import type { KeyRange } from './range-leases';
import { blindIndexSet } from './rotate-index-key';
import {
  type EntitySelector,
  encryptedColumnsSql,
  type RotationTarget,
  requireKeyTableFor,
  withQueryRunner,
} from './rotation-target';
import { type SealedRow, sealedRowBatches } from './sealed-rows';
import { StoredValueOpener, sealStored } from './stored-values';

/** Options of {@link reencryptColumns}. */
export interface ReencryptOptions extends WorkerOptions {
  /**
   * Only the rows whose primary key is in this range: one worker's share of the job (set by the
   * workers; or give each process of a job queue one range).
   */
  keyRange?: KeyRange;

  entities?: ReadonlyArray<EntitySelector>;
  /** Rows per batch (one transaction each). Default 500. */
  batchSize?: number;
  /** Only this tenant's rows (of entities with an `@EncryptionTenant()` column). */
  tenant?: string;
  /**
   * Called after each batch, once its rows are written; a promise it returns is awaited before the
   * next batch, so what it records never runs ahead of the database (a rejection ends the job, in `error`).
   */
  onProgress?: (progress: { entity: string; property: string; rowsDone: number }) => unknown;
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
  /** How the job was shared between workers, when it ran with `workers` or `jobId`. */
  workers?: WorkersReport;
}

/**
 * Re-encrypts every stored value under fresh data keys and the active master-key version: for
 * use after a suspected data-key compromise (a plain rotation only re-wraps the data keys).
 * Values are written in their property's layout: a compact property's values under a fresh data
 * key whose row is committed in the data-key table before any value names it.
 * Values are decrypted and sealed again, bound to their row's primary key; each row is updated
 * (all four columns in one statement) only if it still holds the ciphertext that was read, so a
 * value the application writes meanwhile is never overwritten (the row counts as skipped).
 * Batches commit one by one: after a crash, run it again (rows done already are simply sealed
 * once more). Other application instances keep sealing new values under their own current data
 * keys until those expire; purge their caches (or restart them) first when a data key is suspected.
 */
export async function reencryptColumns(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  options: ReencryptOptions = {},
): Promise<ReencryptResult> {
  if (usesWorkers(options)) {
    return inWorkers(target, encryption, 'reencryption', options, reencryptColumns, {
      empty: () => ({ toVersion: encryption.keyring.activeVersion, properties: [], durationMs: 0 }),
    });
  }
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
      const columns = encryptedColumnsSql(target, encryption, options.entities, options.keyRange);
      await requireKeyTableFor(runner, columns);
      for (const column of columns) {
        const outcome = {
          entity: column.entity,
          property: column.property,
          rowsReencrypted: 0,
          rowsSkipped: 0,
          failures: [] as Array<{ primaryKey: string; error: string }>,
        };
        result.properties.push(outcome);
        const bindKey = column.columns.definition.bindPrimaryKey;
        const opener = new StoredValueOpener(runner, encryption);
        const context = { entity: column.entity, column: column.property };
        for await (const rows of sealedRowBatches(runner, column, options.batchSize ?? 500, options.tenant)) {
          /* Decrypt and seal first, outside the transaction: no row is locked during key-provider calls. */
          await opener.load(rows);
          const prepared: Array<{ row: SealedRow; fresh: StoredValue; index: string }> = [];
          for (const row of rows) {
            try {
              const value = await opener.open(row, context);
              const binding = bindKey ? row.binding : { ...row.binding, primaryKey: undefined };
              /* In the property's layout: a compact property's sidecar values become compact ones. */
              const fresh = await sealStored(runner, encryption, column, value, binding);
              /* A searchable property's blind index is written with it (computed anew: a row may have none yet). */
              const index = await blindIndexSet(runner, encryption, column.columns, value, row.tenant);
              prepared.push({ row, fresh, index });
            } catch (error) {
              outcome.failures.push({ primaryKey: row.primaryKey, error: describeError(error) });
            }
          }
          const written = await inBatchTransaction(runner, async () => {
            let n = 0;
            for (const { row, fresh, index } of prepared) {
              /*
               * Only where the row still holds the ciphertext that was read: any value the
               * application wrote meanwhile has another ciphertext (a fresh IV), and wins. A
               * concurrent re-wrap changes only the wrapped key and version of the same value (or
               * only its key row), so replacing it with a fresh sealing of that value loses nothing.
               */
              const done = await writeValue(
                runner,
                column,
                row.key,
                fresh,
                (p) => ({ sql: `${column.ciphertext} = $${p}`, params: [row.stored] }),
                index,
              );
              if (done) n += 1;
            }
            return n;
          });
          outcome.rowsReencrypted += written;
          outcome.rowsSkipped += prepared.length - written;
          await options.onProgress?.({
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
