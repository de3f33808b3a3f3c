import { expect, inject } from 'vitest';
import { rawQuery } from '../../support/database';
import type { EncryptedTestDatabase } from '../../support/typeorm';

/**
 * PGlite serves one session at a time, which the compact layout refuses (see the PGlite test):
 * these tests need a PostgreSQL server.
 */
export const onPglite = inject('databaseKind') === 'pglite';

/** A row of the data-key table, as stored. */
export interface KeyRow {
  id: string;
  keyring: string;
  tenant_id: string | null;
  key_version: number;
  wrapped_key: Buffer;
  fingerprint: Buffer;
  created_at: Date;
  rewrapped_at: Date | null;
}

export const keyTable = (db: EncryptedTestDatabase) => `"${db.schema.schema}".typeorm_envelope_data_keys`;

export async function keyRows(db: EncryptedTestDatabase): Promise<KeyRow[]> {
  return rawQuery<KeyRow>(db.schema.url, `SELECT * FROM ${keyTable(db)} ORDER BY id`);
}

/** The data-key id a format-2 value names (bytes 2-9, big-endian). */
export function dataKeyIdOf(value: Buffer): string {
  return value.readBigUInt64BE(2).toString();
}

export async function storedRow(
  db: EncryptedTestDatabase,
  table: string,
  id: number | string,
): Promise<Record<string, unknown>> {
  const [row] = await rawQuery(db.schema.url, `SELECT * FROM "${db.schema.schema}".${table} WHERE id = $1`, [
    id,
  ]);
  if (!row) throw new Error(`row ${id} of ${table} not found`);
  return row;
}

/**
 * Asserts a stored compact value: format byte 0x02, known flags, an id naming a key row, no
 * plaintext and no wrapped key of any key row in its bytes, and the size the format gives.
 */
export function expectCompactValue(
  value: unknown,
  plaintext: string | undefined,
  rows: readonly KeyRow[],
  flags?: number,
): KeyRow {
  expect(value).toBeInstanceOf(Buffer);
  const bytes = value as Buffer;
  expect(bytes[0]).toBe(0x02);
  if (flags !== undefined) expect(bytes[1]).toBe(flags);
  const id = dataKeyIdOf(bytes);
  const row = rows.find((r) => r.id === id);
  expect(row, `data key ${id} has a row`).toBeDefined();
  for (const r of rows) expect(bytes.includes(r.wrapped_key)).toBe(false);
  if (plaintext !== undefined) {
    expect(bytes.includes(Buffer.from(plaintext))).toBe(false);
    /* prefix 22 + type tag 1 + UTF-8 + tag 16 */
    expect(bytes.length).toBe(22 + 1 + Buffer.byteLength(plaintext) + 16);
  }
  return row as KeyRow;
}

/** Queries on the data-key table that TypeORM's logger recorded since `from`. */
export function keyTableQueries(db: EncryptedTestDatabase, from = 0, verb?: 'SELECT' | 'INSERT'): string[] {
  return db.logger.lines
    .slice(from)
    .filter((line) => line.includes('typeorm_envelope_data_keys'))
    .filter((line) => verb === undefined || line.trimStart().toUpperCase().startsWith(verb));
}
