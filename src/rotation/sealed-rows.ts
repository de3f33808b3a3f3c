import type { QueryRunner } from 'typeorm';
import type { ValueBinding } from '../crypto/associated-data';
import { compactDataKeyId, FORMAT_V2 } from '../crypto/compact-value';
import type { SealedValue } from '../field-encryptor';
import { tenantParameter, tenantText } from '../typeorm/encryption-tenant';
import { primaryKeyOfRow } from '../typeorm/primary-key';
import { valueBinding } from '../typeorm/value-binding';
import { type EncryptedColumnSql, isCompactSql, primaryKeyBatches } from './rotation-target';

/** One stored encrypted value, read with SQL. */
export interface SealedRow {
  /** The row's primary-key column values, by database column name. */
  key: Record<string, unknown>;
  /** The primary key as the entity integration writes it into associated data. */
  primaryKey: string;
  /** The main column's bytes as stored: what a guarded write compares against. */
  stored: Buffer;
  /**
   * The value as stored: a sidecar value (format 1) with its four columns, or a compact value
   * (format 2) naming its data-key row. Any other first byte is format 1 to the reader, which
   * refuses it as an unknown format; `sealed` is undefined when a sidecar column is NULL or not
   * mapped (a value that cannot be read).
   */
  value:
    | { format: 1; sealed: SealedValue | undefined }
    | { format: 2; value: Buffer; dataKeyId: string | undefined };
  binding: ValueBinding;
  /** The row's tenant (`null`: none, or the entity has no tenant column). */
  tenant: string | null;
}

/**
 * Reads the stored values of one encrypted property in primary-key-ordered batches (nulls
 * skipped), `batchSize` rows at a time, so memory stays constant as the table grows. With
 * `tenant`, only that tenant's rows (none for an entity without a tenant column). With `format`,
 * only values of that format (the rows a layout migration still has to convert).
 */
export async function* sealedRowBatches(
  runner: QueryRunner,
  column: EncryptedColumnSql,
  batchSize: number,
  tenant?: string,
  format?: 1 | 2,
): AsyncGenerator<SealedRow[]> {
  if (tenant !== undefined && !column.tenant) return;
  const keyNames = column.metadata.primaryColumns.map((c) => c.databaseName);
  const tenantColumn = column.columns.tenant;
  const sidecars = column.sidecars;
  const formatFilter =
    format === undefined
      ? ''
      : format === 2
        ? ` AND ${isCompactSql(column.ciphertext)}`
        : ` AND NOT ${isCompactSql(column.ciphertext)}`;
  for await (const batch of primaryKeyBatches(runner, column, batchSize)) {
    const tenantFilter = tenant === undefined ? '' : ` AND ${column.tenant} = $${batch.params.length + 1}`;
    const rows = (await runner.query(
      `SELECT ${column.primaryKey.join(', ')}, ${column.ciphertext} AS ct${sidecars ? `, ${sidecars.iv} AS iv, ${sidecars.wrappedKey} AS wk, ${sidecars.keyVersion} AS kv` : ''}${column.tenant ? `, ${column.tenant} AS tenant` : ''}
       FROM ${column.table} WHERE ${batch.condition} AND ${column.ciphertext} IS NOT NULL${tenantFilter}${formatFilter}
       ORDER BY ${column.primaryKey.join(', ')}`,
      tenant === undefined || !tenantColumn
        ? batch.params
        : [...batch.params, tenantParameter(tenantColumn, tenant)],
    )) as Array<Record<string, unknown>>;
    if (rows.length === 0) continue;
    yield rows.map((row) => {
      const key = Object.fromEntries(keyNames.map((name) => [name, row[name]]));
      const primaryKey = primaryKeyOfRow(column.metadata, key) as string;
      const rowTenant = tenantColumn ? (tenantText(tenantColumn, row.tenant) ?? null) : null;
      const stored = row.ct as Buffer;
      const id = compactDataKeyId(stored);
      return {
        tenant: rowTenant,
        key,
        primaryKey,
        stored,
        value:
          stored[0] === FORMAT_V2
            ? { format: 2, value: stored, dataKeyId: id === undefined ? undefined : String(id) }
            : {
                format: 1,
                sealed:
                  row.iv == null || row.wk == null || row.kv == null
                    ? undefined
                    : {
                        ciphertext: stored,
                        iv: row.iv as Buffer,
                        wrappedKey: row.wk as Buffer,
                        keyVersion: row.kv as number,
                      },
              },
        binding: valueBinding(column.metadata, column.columns, primaryKey, rowTenant),
      };
    });
  }
}

/** A row that holds no ciphertext although it should hold a value. */
export interface RowWithoutCiphertext {
  key: Record<string, unknown>;
  primaryKey: string;
  /** The value is still in the old plaintext column (`plaintextColumn`), waiting for the backfill. */
  pending: boolean;
}

/**
 * Rows of one encrypted property with a NULL ciphertext that should have one: those whose value
 * is still in the old plaintext column, and, for a non-nullable property, every NULL. In
 * primary-key-ordered batches; a table without such rows costs one query.
 */
export async function* rowsWithoutCiphertextBatches(
  runner: QueryRunner,
  column: EncryptedColumnSql,
  batchSize: number,
): AsyncGenerator<RowWithoutCiphertext[]> {
  const { definition } = column.columns;
  const plaintext = definition.plaintext && runner.connection.driver.escape(definition.plaintext.column);
  if (!plaintext && definition.nullable) return;
  const pending = plaintext ? `${plaintext} IS NOT NULL` : 'FALSE';
  const wanted = `${column.ciphertext} IS NULL${definition.nullable ? ` AND ${pending}` : ''}`;
  const [any] = (await runner.query(
    `SELECT EXISTS (SELECT 1 FROM ${column.table} WHERE ${wanted}) AS found`,
  )) as Array<{
    found: boolean;
  }>;
  if (!any?.found) return;
  const keyNames = column.metadata.primaryColumns.map((c) => c.databaseName);
  for await (const batch of primaryKeyBatches(runner, column, batchSize)) {
    const rows = (await runner.query(
      `SELECT ${column.primaryKey.join(', ')}, ${pending} AS pending FROM ${column.table}
       WHERE ${batch.condition} AND ${wanted} ORDER BY ${column.primaryKey.join(', ')}`,
      batch.params,
    )) as Array<Record<string, unknown>>;
    if (rows.length === 0) continue;
    yield rows.map((row) => {
      const key = Object.fromEntries(keyNames.map((name) => [name, row[name]]));
      return {
        key,
        primaryKey: primaryKeyOfRow(column.metadata, key) as string,
        pending: row.pending === true,
      };
    });
  }
}
