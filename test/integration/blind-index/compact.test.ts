import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { reencryptColumns, rotateIndexKey, UniqueViolationError } from '../../../src';
import { COMPACT_BLIND_INDEX_MIGRATIONS, CompactMember } from '../../support/blind-index-entities';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';
import { onPglite } from '../compact/compact-support';

/** The blind index beside the compact layout's single value column: the same answers, the same bytes. */
let db: EncryptedTestDatabase;
const members = () => db.dataSource.getRepository(CompactMember);
const row = async (id: number) =>
  (
    await rawQuery(db.schema.url, `SELECT * FROM "${db.schema.schema}".bidx_compact_members WHERE id = $1`, [
      id,
    ])
  )[0] as Record<string, unknown>;
const indexOf = async (email: string, tenant: string) =>
  (await db.encryption.blindIndex(CompactMember, 'email', email, { tenant }))[0];

beforeAll(async () => {
  if (onPglite) return;
  db = await encryptedDatabase([CompactMember], {
    prefix: 'bidx_compact',
    migrations: COMPACT_BLIND_INDEX_MIGRATIONS,
  });
});
afterAll(() => db?.close());

describe.skipIf(onPglite)('searchable compact properties', () => {
  it('finds, refuses duplicates, follows updates, and survives re-encryption and an index-key rotation', async () => {
    const saved = await members().save(
      members().create({ workspaceId: 'ws-c', email: 'c@example.com', note: null }),
    );
    const stored = await row(saved.id);
    expect(
      Object.keys(stored)
        .filter((k) => k.startsWith('email_'))
        .sort(),
    ).toEqual(['email_bidx', 'email_ciphertext']);
    expect((stored.email_ciphertext as Buffer)[0]).toBe(2); // format 2
    expect(stored.email_bidx).toEqual(await indexOf('c@example.com', 'ws-c'));
    expect((await members().findOneByOrFail({ workspaceId: 'ws-c', email: ' C@Example.com' })).id).toBe(
      saved.id,
    );
    await expect(
      members().save(members().create({ workspaceId: 'ws-c', email: 'C@example.com', note: null })),
    ).rejects.toBeInstanceOf(UniqueViolationError);

    await members()
      .createQueryBuilder()
      .update(CompactMember)
      .set({ workspaceId: 'ws-c', email: 'd@example.com' })
      .where('id = :id', { id: saved.id })
      .execute();
    expect((await row(saved.id)).email_bidx).toEqual(await indexOf('d@example.com', 'ws-c'));
    expect(await members().findOneBy({ workspaceId: 'ws-c', email: 'c@example.com' })).toBeNull();

    const before = await row(saved.id);
    const reencrypted = await reencryptColumns(db.dataSource, db.encryption, { tenant: 'ws-c' });
    expect(reencrypted.error).toBeUndefined();
    const after = await row(saved.id);
    expect((after.email_ciphertext as Buffer).equals(before.email_ciphertext as Buffer)).toBe(false);
    expect(after.email_bidx).toEqual(before.email_bidx);

    const rotated = await rotateIndexKey(db.dataSource, db.encryption, { tenant: 'ws-c', settleTime: 0 });
    expect(rotated).toMatchObject({ toVersion: 2, rowsLeft: 0, previousRetired: true });
    expect(((await row(saved.id)).email_bidx as Buffer).readUInt16BE(0)).toBe(2);
    db.encryption.purgeCache();
    expect((await members().findOneByOrFail({ workspaceId: 'ws-c', email: 'D@example.com' })).email).toBe(
      'd@example.com',
    );
  });
});
