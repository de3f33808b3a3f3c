import type { QueryRunner } from 'typeorm';
import type { EnvelopeEncryption } from '../envelope-encryption';
import { IntegrityError, TenantOffboardedError } from '../errors';
import { FIRST_TENANT_KEY_VERSION } from '../keys/keyring';
import { describeError } from './describe-error';
import type { KeyRowFailure } from './rewrap-key-table';
import {
  dataKeyTablePath,
  type EntitySelector,
  encryptedColumnsSql,
  holdsCompact,
  keyTableExists,
  type RotationTarget,
  requireKeyTableFor,
  withQueryRunner,
} from './rotation-target';
import { rowsWithoutCiphertextBatches, sealedRowBatches } from './sealed-rows';
import { StoredValueOpener } from './stored-values';

/** Options of {@link verifyEncryptedColumns}. */
export interface VerifyOptions {
  entities?: ReadonlyArray<EntitySelector>;
  /** Rows per read. Default 1,000. */
  batchSize?: number;
  /** Stop listing failures after this many per property (they are still counted). Default 1,000. */
  maxListedFailures?: number;
  /** Only this tenant's rows (of entities with an `@EncryptionTenant()` column). */
  tenant?: string;
  /**
   * Called after each batch; a promise it returns is awaited before the next batch (a rejection
   * ends the check, in `error`).
   */
  onProgress?: (progress: { entity: string; property: string; rowsChecked: number }) => unknown;
}

/** A row that cannot be read as encrypted: where, and why (never the value). */
export interface VerifyFailure {
  primaryKey: string;
  /**
   * The stored master-key version (of a compact value, its key row's); `null` for a row with no
   * ciphertext, or a compact value whose key row is missing.
   */
  keyVersion: number | null;
  /** The data-key id a compact value names (decimal text), whether or not its key row exists. */
  dataKeyId?: string;
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
  /**
   * The data-key table (when a checked property is compact, or, without `entities`, whenever the
   * table exists): every key row of this keyring (with `tenant`, of that tenant) unwrapped. A key
   * row that does not unwrap is listed by its data-key id; the values that name it fail too.
   */
  keyTable?: {
    keyRowsChecked: number;
    /** Key rows that do not unwrap (altered, or under a key this instance cannot use). */
    failed: number;
    /** Key rows of offboarded tenants: unreadable by design. */
    offboarded: number;
    failures: KeyRowFailure[];
  };
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
      const columns = encryptedColumnsSql(target, encryption, options.entities);
      await requireKeyTableFor(runner, columns);
      for (const column of columns) {
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
        const opener = new StoredValueOpener(runner, encryption);
        const context = { entity: column.entity, column: column.property };
        for await (const rows of sealedRowBatches(runner, column, batchSize, options.tenant)) {
          await opener.load(rows);
          for (const row of rows) {
            outcome.rowsChecked += 1;
            try {
              await opener.open(row, context);
            } catch (error) {
              const id = row.value.format === 2 ? row.value.dataKeyId : undefined;
              fail({
                primaryKey: row.primaryKey,
                keyVersion:
                  row.value.format === 1
                    ? (row.value.sealed?.keyVersion ?? null)
                    : ((id === undefined ? undefined : opener.keyRow(id)?.keyVersion) ?? null),
                ...(id === undefined ? {} : { dataKeyId: id }),
                error: describeError(error),
                ...(row.tenant === null ? {} : { tenant: row.tenant }),
                ...(error instanceof TenantOffboardedError ? { offboarded: true } : {}),
              });
            }
          }
          await options.onProgress?.({
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
      const compact = options.entities ? columns.some(holdsCompact) : await keyTableExists(runner);
      if (compact) result.keyTable = await verifyKeyRows(runner, encryption, options);
    });
  } catch (error) {
    result.error = error;
  }
  return result;
}

/** Key rows read per query while verifying: memory holds one page, whatever the number of data keys. */
const KEY_ROW_PAGE = 500;

/**
 * Unwraps every key row of this keyring (with `tenant`, of that tenant) in its own scope (keyring
 * and tenant bound into the wrap): a row altered, copied from another tenant, or under a master key
 * this instance cannot use fails, and is listed by its data-key id.
 */
async function verifyKeyRows(
  runner: QueryRunner,
  encryption: EnvelopeEncryption,
  options: VerifyOptions,
): Promise<NonNullable<VerifyResult['keyTable']>> {
  const table = dataKeyTablePath(runner);
  const maxListed = options.maxListedFailures ?? 1_000;
  const checked = { keyRowsChecked: 0, failed: 0, offboarded: 0, failures: [] as KeyRowFailure[] };
  const tenantFilter = options.tenant === undefined ? '' : ' AND tenant_id = $3';
  let after = '0';
  for (;;) {
    const page = (await runner.query(
      `SELECT id::text AS id, tenant_id, key_version, wrapped_key FROM ${table}
       WHERE keyring = $1 AND id > $2::bigint${tenantFilter} ORDER BY id LIMIT ${KEY_ROW_PAGE}`,
      [encryption.keyring.keyringId, after, ...(options.tenant === undefined ? [] : [options.tenant])],
    )) as Array<{ id: string; tenant_id: string | null; key_version: number; wrapped_key: Buffer }>;
    for (const row of page) {
      after = row.id;
      checked.keyRowsChecked += 1;
      const tenant = row.tenant_id ?? undefined;
      try {
        /* A tenant's own key version in a row of no tenant names a key that cannot be this row's. */
        if (tenant === undefined && row.key_version >= FIRST_TENANT_KEY_VERSION) {
          throw new IntegrityError('a tenant key version in a key row that belongs to no tenant', {
            keyVersion: row.key_version,
          });
        }
        await encryption.cache.withDecryptionKey(
          row.key_version,
          row.wrapped_key,
          () => true,
          encryption.keyScope(tenant),
        );
      } catch (error) {
        const offboarded = error instanceof TenantOffboardedError;
        if (offboarded) checked.offboarded += 1;
        else checked.failed += 1;
        if (!offboarded && checked.failures.length < maxListed) {
          checked.failures.push({
            dataKeyId: row.id,
            keyVersion: row.key_version,
            ...(tenant === undefined ? {} : { tenant }),
            error: describeError(error),
          });
        }
      }
    }
    if (page.length < KEY_ROW_PAGE) break;
  }
  return checked;
}
