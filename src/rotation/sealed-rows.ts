import type { QueryRunner } from 'typeorm';
import type { ValueBinding } from '../crypto/associated-data';
import type { SealedValue } from '../field-encryptor';
import { primaryKeyOfRow } from '../typeorm/primary-key';
import { type EncryptedColumnSql, primaryKeyBatches } from './rotation-target';

/** One stored encrypted value, read with SQL. */
export interface SealedRow {
  /** The row's primary-key column values, by database column name. */
  key: Record<string, unknown>;
  /** The primary key as the entity integration writes it into associated data. */
  primaryKey: string;
  sealed: SealedValue;
  binding: ValueBinding;
}

/**
 * Reads the stored values of one encrypted property in primary-key-ordered batches (nulls
 * skipped), `batchSize` rows at a time, so memory stays constant as the table grows.
 */
export async function* sealedRowBatches(
  runner: QueryRunner,
  column: EncryptedColumnSql,
  batchSize: number,
): AsyncGenerator<SealedRow[]> {
  const keyNames = column.metadata.primaryColumns.map((c) => c.databaseName);
  for await (const batch of primaryKeyBatches(runner, column, batchSize)) {
    const rows = (await runner.query(
      `SELECT ${column.primaryKey.join(', ')}, ${column.ciphertext} AS ct, ${column.iv} AS iv,
              ${column.wrappedKey} AS wk, ${column.keyVersion} AS kv
       FROM ${column.table} WHERE ${batch.condition} AND ${column.ciphertext} IS NOT NULL
       ORDER BY ${column.primaryKey.join(', ')}`,
      batch.params,
    )) as Array<Record<string, unknown>>;
    yield rows.map((row) => {
      const key = Object.fromEntries(keyNames.map((name) => [name, row[name]]));
      const primaryKey = primaryKeyOfRow(column.metadata, key) as string;
      return {
        key,
        primaryKey,
        sealed: {
          ciphertext: row.ct as Buffer,
          iv: row.iv as Buffer,
          wrappedKey: row.wk as Buffer,
          keyVersion: row.kv as number,
        },
        binding: { table: column.metadata.tableName, column: column.property, primaryKey },
      };
    });
  }
}
