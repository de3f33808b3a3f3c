import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { backfillEncryptedColumns, reencryptColumns } from '../../../src';
import { BLIND_INDEX_MIGRATIONS, LegacyCustomer, Member } from '../../support/blind-index-entities';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/** The jobs that write values below TypeORM write their blind index with them. */
let db: EncryptedTestDatabase;
const schema = () => `"${db.schema.schema}"`;

beforeAll(async () => {
  db = await encryptedDatabase([Member, LegacyCustomer], {
    prefix: 'bidx_jobs',
    migrations: BLIND_INDEX_MIGRATIONS,
  });
});
afterAll(() => db?.close());

describe('jobs keep blind indexes in step', () => {
  it('the backfill of a plaintext column writes each value’s index', async () => {
    await rawQuery(
      db.schema.url,
      `INSERT INTO ${schema()}.bidx_legacy_customers (id, email) SELECT i, 'legacy' || i || '@example.com' FROM generate_series(1, 40) i`,
    );
    const customers = db.dataSource.getRepository(LegacyCustomer);
    expect(await customers.findOneBy({ email: 'legacy7@example.com' })).toBeNull(); // no index before the backfill
    const result = await backfillEncryptedColumns(db.dataSource, db.encryption, {
      batchSize: 15,
      clearPlaintext: true,
    });
    expect(result.error).toBeUndefined();
    expect(result.properties[0]?.rowsEncrypted).toBe(40);
    const found = await customers.findOneByOrFail({ email: ' LEGACY7@example.com' });
    expect(found).toMatchObject({ id: 7, email: 'legacy7@example.com' });
    const [row] = await rawQuery<{ email: string | null; email_bidx: Buffer }>(
      db.schema.url,
      `SELECT email, email_bidx FROM ${schema()}.bidx_legacy_customers WHERE id = 7`,
    );
    expect(row?.email).toBeNull();
    expect(row?.email_bidx).toEqual(
      (await db.encryption.blindIndex(LegacyCustomer, 'email', 'legacy7@example.com'))[0],
    );
  });

  it('re-encryption keeps each index (and gives one to a row that had none)', async () => {
    const members = db.dataSource.getRepository(Member);
    const saved = await members.save(
      ['a', 'b', 'c'].map((n) =>
        members.create({ workspaceId: 'ws-re', email: `${n}@example.com`, phone: null, note: null }),
      ),
    );
    const before = await rawQuery<{ id: number; email_ciphertext: Buffer; email_bidx: Buffer }>(
      db.schema.url,
      `SELECT id, email_ciphertext, email_bidx FROM ${schema()}.bidx_members WHERE "workspaceId" = 'ws-re' ORDER BY id`,
    );
    await rawQuery(db.schema.url, `UPDATE ${schema()}.bidx_members SET email_bidx = NULL WHERE id = $1`, [
      saved[0]?.id,
    ]);
    const result = await reencryptColumns(db.dataSource, db.encryption, {
      tenant: 'ws-re',
      entities: [Member],
    });
    expect(result.error).toBeUndefined();
    const after = await rawQuery<{ id: number; email_ciphertext: Buffer; email_bidx: Buffer }>(
      db.schema.url,
      `SELECT id, email_ciphertext, email_bidx FROM ${schema()}.bidx_members WHERE "workspaceId" = 'ws-re' ORDER BY id`,
    );
    for (const [i, row] of after.entries()) {
      expect(row.email_ciphertext.equals(before[i]?.email_ciphertext as Buffer)).toBe(false); // re-encrypted
      expect(row.email_bidx).toEqual(before[i]?.email_bidx); // same value, same index
    }
    expect((await members.findOneByOrFail({ workspaceId: 'ws-re', email: 'A@example.com' })).id).toBe(
      saved[0]?.id,
    );
  });
});
