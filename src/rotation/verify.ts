import type { EnvelopeEncryption } from '../envelope-encryption';
import { TenantOffboardedError } from '../errors';
import { describeError } from './describe-error';
import {
  type EntitySelector,
  encryptedColumnsSql,
  type RotationTarget,
  withQueryRunner,
} from './rotation-target';
import { rowsWithoutCiphertextBatches, sealedRowBatches } from './sealed-rows';

/** Options of {@link verifyEncryptedColumns}. */
export interface VerifyOptions {
  entities?: ReadonlyArray<EntitySelector>;
  /** Rows per read. Default 1,000. */
  batchSize?: number;
  /** Stop listing failures after this many per property (they are still counted). Default 1,000. */
  maxListedFailures?: number;
  /** Only this tenant's rows (of entities with an `@EncryptionTenant()` column). */
  tenant?: string;
  onProgress?: (progress: { entity: string; property: string; rowsChecked: number }) => void;
}

/** A row that cannot be read as encrypted: where, and why (never the value). */
export interface VerifyFailure {
  primaryKey: string;
  /** The stored master-key version; `null` for a row with no ciphertext. */
  keyVersion: number | null;
  error: string;
  /** The row's tenant, for entities with a tenant column. */
  tenant?: string;
  /** The row belongs to an offboarded tenant: unreadable by design, not corrupt. */
  offboarded?: boolean;
}

/** What {@link verifyEncryptedColumns} found. It never throws midway: an unexpected error is in `error`. */
export interface VerifyResult {
  properties: Array<{
    entity: string;
    property: string;
    /** Values decrypted. */
    rowsChecked: number;
    /**
     * Rows that cannot be read as encrypted: values that do not decrypt, rows pending backfill and
     * NULLs in a non-nullable property. The plaintext column may be dropped only once this is 0.
     */
    failed: number;
    /**
     * Rows whose value is still only in the old plaintext column (`plaintextColumn`): counted in
     * `failed` too, and listed in `failures`.
     */
    pendingBackfill: number;
    /**
     * Rows of offboarded tenants (their keys were destroyed): unreadable by design, so not counted
     * in `failed`; listed in `failures` with `offboarded: true`.
     */
    offboarded: number;
    failures: VerifyFailure[];
  }>;
  rowsChecked: number;
  failed: number;
  pendingBackfill: number;
  offboarded: number;
  error?: unknown;
}

/** Why a row without ciphertext fails verification. */
const PENDING_BACKFILL =
  'pending backfill: the value is only in the old plaintext column (run typeorm-envelope backfill)';
const NULL_IN_NOT_NULLABLE = 'the value is NULL but the property is not nullable';

/**
 * Decrypts every stored value and reports those that fail, by primary key. Rows that hold no
 * ciphertext fail too when they should: a value still waiting in the old plaintext column for the
 * backfill (`pendingBackfill`), or a NULL in a non-nullable property. Plaintext is discarded as
 * soon as it is checked and never reported.
 */
export async function verifyEncryptedColumns(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  options: VerifyOptions = {},
): Promise<VerifyResult> {
  const result: VerifyResult = {
    properties: [],
    rowsChecked: 0,
    failed: 0,
    pendingBackfill: 0,
    offboarded: 0,
  };
  const maxListed = options.maxListedFailures ?? 1_000;
  try {
    await withQueryRunner(target, async (runner) => {
      for (const column of encryptedColumnsSql(target, encryption, options.entities)) {
        const outcome = {
          entity: column.entity,
          property: column.property,
          rowsChecked: 0,
          failed: 0,
          pendingBackfill: 0,
          offboarded: 0,
          failures: [] as VerifyFailure[],
        };
        result.properties.push(outcome);
        const fail = (failure: VerifyFailure) => {
          if (failure.offboarded) outcome.offboarded += 1;
          else outcome.failed += 1;
          if (outcome.failures.length < maxListed) outcome.failures.push(failure);
        };
        const batchSize = options.batchSize ?? 1_000;
        for await (const rows of sealedRowBatches(runner, column, batchSize, options.tenant)) {
          for (const row of rows) {
            outcome.rowsChecked += 1;
            try {
              await encryption.encryptor.open(row.sealed, row.binding);
            } catch (error) {
              fail({
                primaryKey: row.primaryKey,
                keyVersion: row.sealed.keyVersion,
                error: describeError(error),
                ...(row.tenant === null ? {} : { tenant: row.tenant }),
                ...(error instanceof TenantOffboardedError ? { offboarded: true } : {}),
              });
            }
          }
          options.onProgress?.({
            entity: column.entity,
            property: column.property,
            rowsChecked: outcome.rowsChecked,
          });
        }
        const missing =
          options.tenant === undefined ? rowsWithoutCiphertextBatches(runner, column, batchSize) : [];
        for await (const rows of missing) {
          for (const row of rows) {
            if (row.pending) outcome.pendingBackfill += 1;
            fail({
              primaryKey: row.primaryKey,
              keyVersion: null,
              error: row.pending ? PENDING_BACKFILL : NULL_IN_NOT_NULLABLE,
            });
          }
        }
        result.rowsChecked += outcome.rowsChecked;
        result.failed += outcome.failed;
        result.pendingBackfill += outcome.pendingBackfill;
        result.offboarded += outcome.offboarded;
      }
    });
  } catch (error) {
    result.error = error;
  }
  return result;
}
