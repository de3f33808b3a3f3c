import { inject } from 'vitest';
import { rawQuery } from '../../support/database';
import type { EncryptedTestDatabase } from '../../support/typeorm';

/** PGlite serves one session at a time: the compact layout is refused there, and these tests skip. */
export const onPglite = inject('databaseKind') === 'pglite';

/** A row of the data-key table, as stored. */
export interface StoredKeyRow {
  id: string;
  keyring: string;
  tenant_id: string | null;
  key_version: number;
  wrapped_key: Buffer;
  fingerprint: Buffer;
  rewrapped_at: Date | null;
}

export const keyTable = (db: EncryptedTestDatabase) => `"${db.schema.schema}".typeorm_envelope_data_keys`;
export const tableOf = (db: EncryptedTestDatabase, name: string) => `"${db.schema.schema}".${name}`;

/** Every row of the data-key table, by id. */
export async function keyRows(db: EncryptedTestDatabase): Promise<StoredKeyRow[]> {
  return rawQuery<StoredKeyRow>(
    db.schema.url,
    `SELECT id::text AS id, keyring, tenant_id, key_version, wrapped_key, fingerprint, rewrapped_at
     FROM ${keyTable(db)} ORDER BY id`,
  );
}

/** The data-key id a compact value names (bytes 2-9, big-endian), as text. */
export function dataKeyIdOf(value: Buffer): string {
  return value.readBigUInt64BE(2).toString();
}

/**
 * A checksum of every byte of a table, and the newest row version: if any row were written
 * (even with the same bytes), the newest `xmin` would change.
 */
export async function tableChecksum(
  db: EncryptedTestDatabase,
  table: string,
): Promise<{ rows: number; digest: string; newestXmin: string }> {
  const [row] = await rawQuery<{ rows: number; digest: string; newest_xmin: string }>(
    db.schema.url,
    `SELECT count(*)::int AS rows, md5(string_agg(md5(t::text), '' ORDER BY t.id)) AS digest,
            max(t.xmin::text::bigint)::text AS newest_xmin
     FROM ${tableOf(db, table)} t`,
  );
  return { rows: row?.rows ?? 0, digest: row?.digest ?? '', newestXmin: row?.newest_xmin ?? '' };
}

/** Flips one bit of a key row's wrapped key (the row is then corrupt). */
export async function corruptKeyRow(db: EncryptedTestDatabase, id: string): Promise<void> {
  await rawQuery(
    db.schema.url,
    `UPDATE ${keyTable(db)} SET wrapped_key = set_byte(wrapped_key, 20, get_byte(wrapped_key, 20) # 1) WHERE id = $1`,
    [id],
  );
}

/** The stored main column of every row of a table, by id. */
export async function storedValues(
  db: EncryptedTestDatabase,
  table: string,
  column: string,
): Promise<Map<number, Buffer | null>> {
  const rows = await rawQuery<{ id: number; value: Buffer | null }>(
    db.schema.url,
    `SELECT id, ${column} AS value FROM ${tableOf(db, table)} ORDER BY id`,
  );
  return new Map(rows.map((r) => [r.id, r.value]));
}

/**
 * Waits until a statement of another session is blocked on a row lock while updating `table`: the
 * job has read the row and is about to write it. Fails after 60 s.
 */
export async function waitForBlockedUpdate(db: EncryptedTestDatabase, table: string): Promise<void> {
  for (let i = 0; i < 3_000; i++) {
    const [row] = await rawQuery<{ n: number }>(
      db.schema.url,
      `SELECT count(*)::int AS n FROM pg_stat_activity
       WHERE wait_event_type = 'Lock' AND query ILIKE 'UPDATE%' AND query LIKE $1`,
      [`%${db.schema.schema}%${table}%`],
    );
    if ((row?.n ?? 0) > 0) return;
    await new Promise((done) => setTimeout(done, 20));
  }
  throw new Error(`no UPDATE of ${table} became blocked`);
}

/**
 * Changes one row through TypeORM while holding its lock from before `job` starts: the job reads
 * the row's old value, blocks on the lock when it writes, and sees the new value once this commits.
 */
export async function writeWhileJobWaits<E extends { id: number }, R>(
  db: EncryptedTestDatabase,
  entity: new () => E,
  table: string,
  id: number,
  change: (row: E) => void,
  job: () => Promise<R>,
): Promise<R> {
  const runner = db.dataSource.createQueryRunner();
  await runner.startTransaction();
  try {
    const row = await runner.manager.findOneOrFail(entity, {
      where: { id } as never,
      lock: { mode: 'pessimistic_write' },
    });
    const running = job();
    await waitForBlockedUpdate(db, table);
    change(row);
    await runner.manager.save(row);
    await runner.commitTransaction();
    return await running;
  } catch (error) {
    if (runner.isTransactionActive) await runner.rollbackTransaction();
    throw error;
  } finally {
    await runner.release();
  }
}
