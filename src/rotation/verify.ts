import type { EnvelopeEncryption } from '../envelope-encryption';
import { describeError } from './describe-error';
import {
  type EntitySelector,
  encryptedColumnsSql,
  type RotationTarget,
  withQueryRunner,
} from './rotation-target';
import { sealedRowBatches } from './sealed-rows';

/** Options of {@link verifyEncryptedColumns}. */
export interface VerifyOptions {
  entities?: ReadonlyArray<EntitySelector>;
  /** Rows per read. Default 1,000. */
  batchSize?: number;
  /** Stop listing failures after this many per property (they are still counted). Default 1,000. */
  maxListedFailures?: number;
  onProgress?: (progress: { entity: string; property: string; rowsChecked: number }) => void;
}

/** A value that did not decrypt: where, and why (never the value). */
export interface VerifyFailure {
  primaryKey: string;
  keyVersion: number;
  error: string;
}

/** What {@link verifyEncryptedColumns} found. It never throws midway: an unexpected error is in `error`. */
export interface VerifyResult {
  properties: Array<{
    entity: string;
    property: string;
    rowsChecked: number;
    failed: number;
    failures: VerifyFailure[];
  }>;
  rowsChecked: number;
  failed: number;
  error?: unknown;
}

/**
 * Decrypts every stored value and reports those that fail, by primary key. Plaintext is
 * discarded as soon as it is checked and never reported.
 */
export async function verifyEncryptedColumns(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  options: VerifyOptions = {},
): Promise<VerifyResult> {
  const result: VerifyResult = { properties: [], rowsChecked: 0, failed: 0 };
  const maxListed = options.maxListedFailures ?? 1_000;
  try {
    await withQueryRunner(target, async (runner) => {
      for (const column of encryptedColumnsSql(target, encryption, options.entities)) {
        const outcome = {
          entity: column.entity,
          property: column.property,
          rowsChecked: 0,
          failed: 0,
          failures: [] as VerifyFailure[],
        };
        result.properties.push(outcome);
        for await (const rows of sealedRowBatches(runner, column, options.batchSize ?? 1_000)) {
          for (const row of rows) {
            outcome.rowsChecked += 1;
            try {
              await encryption.encryptor.open(row.sealed, row.binding);
            } catch (error) {
              outcome.failed += 1;
              if (outcome.failures.length < maxListed) {
                outcome.failures.push({
                  primaryKey: row.primaryKey,
                  keyVersion: row.sealed.keyVersion,
                  error: describeError(error),
                });
              }
            }
          }
          options.onProgress?.({
            entity: column.entity,
            property: column.property,
            rowsChecked: outcome.rowsChecked,
          });
        }
        result.rowsChecked += outcome.rowsChecked;
        result.failed += outcome.failed;
      }
    });
  } catch (error) {
    result.error = error;
  }
  return result;
}
