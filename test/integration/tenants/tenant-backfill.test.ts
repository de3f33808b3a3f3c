import 'reflect-metadata';
import { Client } from 'pg';
import { Column, Entity, PrimaryGeneratedColumn } from 'typeorm';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { backfillEncryptedColumns, Encrypted, EncryptionTenant } from '../../../src';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/** A table whose phone numbers are being moved from a plaintext column into encrypted ones. */
@Entity('tenant_legacy_people')
class TenantLegacyPerson {
  @PrimaryGeneratedColumn() id!: number;
  @EncryptionTenant() @Column() workspaceId!: string;
  @Encrypted({ nullable: true, plaintextColumn: { name: 'phone_plain', type: 'varchar' } }) phone!:
    | string
    | null;
}

let db: EncryptedTestDatabase;
beforeAll(async () => {
  db = await encryptedDatabase([TenantLegacyPerson], { prefix: 'tenant_backfill' });
});
afterAll(() => db?.close());

const table = () => `"${db.schema.schema}".tenant_legacy_people`;
const insertPlain = async (workspaceId: string, phone: string) =>
  (
    await rawQuery<{ id: number }>(
      db.schema.url,
      `INSERT INTO ${table()} ("workspaceId", phone_plain) VALUES ($1, $2) RETURNING id`,
      [workspaceId, phone],
    )
  )[0]?.id as number;

it('backfills one tenant only, each value bound to its tenant', async () => {
  const a = await insertPlain('ws-a', '+1 555 0100');
  const b = await insertPlain('ws-b', '+1 555 0200');
  const result = await backfillEncryptedColumns(db.dataSource, db.encryption, { tenant: 'ws-a' });
  expect(result.error).toBeUndefined();
  expect(result.properties[0]?.rowsEncrypted).toBe(1);
  const rows = await rawQuery(
    db.schema.url,
    `SELECT id, phone_ciphertext FROM ${table()} WHERE id = ANY($1) ORDER BY id`,
    [[a, b]],
  );
  expect(((rows[0]?.phone_ciphertext as Buffer | undefined)?.[1] ?? 0) & 0x04).toBe(0x04);
  expect(rows[1]?.phone_ciphertext).toBeNull();
  expect((await db.dataSource.getRepository(TenantLegacyPerson).findOneByOrFail({ id: a })).phone).toBe(
    '+1 555 0100',
  );
});

it('a row moved to another tenant while the backfill sealed its value is left for the next run, never sealed for the old tenant', async () => {
  const id = await insertPlain('ws-a', '+1 555 0300');
  const mover = new Client({ connectionString: db.schema.url });
  const watcher = new Client({ connectionString: db.schema.url });
  await mover.connect();
  await watcher.connect();
  try {
    await mover.query('BEGIN');
    await mover.query(`UPDATE ${table()} SET "workspaceId" = 'ws-b' WHERE id = $1`, [id]);
    const running = backfillEncryptedColumns(db.dataSource, db.encryption, {});
    /*
     * Wait until the backfill's write of that row waits on the mover's lock (a statement on this
     * schema's table: other test files update their own phone columns on the same server).
     */
    for (let i = 0; ; i++) {
      const waiting = await watcher.query(
        `SELECT count(*)::int AS n FROM pg_stat_activity
         WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE%phone_ciphertext%' AND query LIKE $1`,
        [`%${db.schema.schema}%tenant_legacy_people%`],
      );
      if (waiting.rows[0].n > 0) break;
      if (i === 1_500) throw new Error("the backfill's UPDATE of the moved row never waited on its lock");
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    await mover.query('COMMIT');
    const result = await running;
    expect(result.error).toBeUndefined();
    const [row] = await rawQuery(
      db.schema.url,
      `SELECT "workspaceId" AS ws, phone_ciphertext FROM ${table()} WHERE id = $1`,
      [id],
    );
    expect(row).toEqual({ ws: 'ws-b', phone_ciphertext: null });
    await backfillEncryptedColumns(db.dataSource, db.encryption, {});
    db.encryption.purgeCache();
    expect((await db.dataSource.getRepository(TenantLegacyPerson).findOneByOrFail({ id })).phone).toBe(
      '+1 555 0300',
    );
  } finally {
    await mover.end();
    await watcher.end();
  }
});
