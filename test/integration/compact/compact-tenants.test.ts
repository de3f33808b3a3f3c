import { randomBytes, randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { IntegrityError, TenantOffboardedError, UnsupportedOperationError } from '../../../src';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';
import { COMPACT_TENANT_MIGRATIONS, CompactTenantBadge, CompactTenantContact } from './compact-entities';
import { dataKeyIdOf, expectCompactValue, keyRows, keyTable, onPglite, storedRow } from './compact-support';

const customerKey = () => randomBytes(32).toString('base64');
let db: EncryptedTestDatabase;

beforeAll(async () => {
  if (onPglite) return;
  db = await encryptedDatabase([CompactTenantContact, CompactTenantBadge], {
    prefix: 'compact_tenants',
    migrations: COMPACT_TENANT_MIGRATIONS,
  });
});
afterAll(() => db?.close());

const contacts = () => db.dataSource.getRepository(CompactTenantContact);
const contact = (workspaceId: string, email: string) =>
  contacts().create({ workspaceId, email, profile: null });
const stored = (id: number) => storedRow(db, 'compact_tenant_contacts', id);

function rejectionOf(promise: Promise<unknown>): Promise<unknown> {
  return promise.then(
    () => undefined,
    (e: unknown) => e,
  );
}

describe.skipIf(onPglite)('compact layout with tenants', () => {
  it('a tenant without a key of its own: the key row names the tenant, the value is bound to it', async () => {
    const saved = await contacts().save(contact('ws-vendor', 'a@vendor.example'));
    const row = await stored(saved.id);
    const key = expectCompactValue(row.email_ciphertext, 'a@vendor.example', await keyRows(db), 0x06);
    expect([key.tenant_id, key.keyring, key.key_version]).toEqual(['ws-vendor', 'default', 1]);
    db.encryption.purgeCache();
    expect((await contacts().findOneByOrFail({ id: saved.id })).email).toBe('a@vendor.example');
  });

  it('each tenant has its own key rows; a tenant key version is recorded on its rows', async () => {
    const added = await db.encryption.tenants.addKey('ws-byok', { kind: 'customer-key', key: customerKey() });
    const byok = await contacts().save(contact('ws-byok', 'b@byok.example'));
    const other = await contacts().save(contact('ws-other', 'c@other.example'));
    const rows = await keyRows(db);
    const byokKey = expectCompactValue((await stored(byok.id)).email_ciphertext, 'b@byok.example', rows);
    const otherKey = expectCompactValue((await stored(other.id)).email_ciphertext, 'c@other.example', rows);
    expect([byokKey.tenant_id, byokKey.key_version]).toEqual(['ws-byok', added.version]);
    expect([otherKey.tenant_id, otherKey.key_version]).toEqual(['ws-other', 1]);
    expect(byokKey.id).not.toBe(otherKey.id);
    db.encryption.purgeCache();
    expect((await contacts().findOneByOrFail({ id: byok.id })).email).toBe('b@byok.example');
    expect((await contacts().findOneByOrFail({ id: other.id })).email).toBe('c@other.example');
  });

  it('a value copied into another tenant’s row is an IntegrityError', async () => {
    const a = await contacts().save(contact('ws-a', 'secret@a.example'));
    const b = await contacts().save(contact('ws-b', 'b@b.example'));
    await rawQuery(
      db.schema.url,
      `UPDATE "${db.schema.schema}".compact_tenant_contacts SET email_ciphertext = $1 WHERE id = $2`,
      [(await stored(a.id)).email_ciphertext, b.id],
    );
    db.encryption.purgeCache();
    const error = await rejectionOf(contacts().findOneByOrFail({ id: b.id }));
    expect(error).toBeInstanceOf(IntegrityError);
    expect((error as Error).message).not.toContain('secret');
  });

  it('a key row moved to another tenant is refused before any key is used', async () => {
    const saved = await contacts().save(contact('ws-moved', 'moved@x.example'));
    const id = dataKeyIdOf((await stored(saved.id)).email_ciphertext as Buffer);
    await rawQuery(db.schema.url, `UPDATE ${keyTable(db)} SET tenant_id = 'ws-thief' WHERE id = $1`, [id]);
    db.encryption.purgeCache();
    db.provider.reset();
    const error = await rejectionOf(contacts().findOneByOrFail({ id: saved.id }));
    expect(error).toBeInstanceOf(IntegrityError);
    expect((error as Error).message).toContain(`data key ${id}`);
    expect((error as IntegrityError).tenant).toBe('ws-moved');
    expect(db.provider.calls.unwrap).toBe(0);
    /* And a row whose keyring is not this one's. */
    await rawQuery(
      db.schema.url,
      `UPDATE ${keyTable(db)} SET tenant_id = 'ws-moved', keyring = 'elsewhere' WHERE id = $1`,
      [id],
    );
    db.encryption.purgeCache();
    await expect(contacts().findOneByOrFail({ id: saved.id })).rejects.toBeInstanceOf(IntegrityError);
    expect(db.provider.calls.unwrap).toBe(0);
    await rawQuery(db.schema.url, `UPDATE ${keyTable(db)} SET keyring = 'default' WHERE id = $1`, [id]);
    db.encryption.purgeCache();
    expect((await contacts().findOneByOrFail({ id: saved.id })).email).toBe('moved@x.example');
  });

  it('a row moved to another tenant by save() is sealed anew for it, under a key row of that tenant', async () => {
    const saved = await contacts().save(contact('ws-from', 'mover@x.example'));
    const loaded = await contacts().findOneByOrFail({ id: saved.id });
    loaded.workspaceId = 'ws-to';
    await contacts().save(loaded);
    const key = expectCompactValue(
      (await stored(saved.id)).email_ciphertext,
      'mover@x.example',
      await keyRows(db),
    );
    expect(key.tenant_id).toBe('ws-to');
    db.encryption.purgeCache();
    expect((await contacts().findOneByOrFail({ id: saved.id })).email).toBe('mover@x.example');
  });

  it('query-builder updates must name the tenant, and seal for it', async () => {
    const saved = await contacts().save(contact('ws-qb', 'qb@x.example'));
    await expect(
      contacts()
        .createQueryBuilder()
        .update()
        .set({ email: 'no-tenant@x.example' })
        .where('id = :id', { id: saved.id })
        .execute(),
    ).rejects.toBeInstanceOf(UnsupportedOperationError);
    await contacts()
      .createQueryBuilder()
      .update()
      .set({ workspaceId: 'ws-qb', email: 'qb2@x.example' })
      .where('id = :id', { id: saved.id })
      .execute();
    const key = expectCompactValue(
      (await stored(saved.id)).email_ciphertext,
      'qb2@x.example',
      await keyRows(db),
    );
    expect(key.tenant_id).toBe('ws-qb');
    expect((await contacts().findOneByOrFail({ id: saved.id })).email).toBe('qb2@x.example');
  });

  it('an upsert seals for the row’s tenant and keeps the values it does not name', async () => {
    const badges = db.dataSource.getRepository(CompactTenantBadge);
    const id = randomUUID();
    await badges.upsert({ id, workspaceId: 'ws-up', holder: 'First', note: 'kept' }, ['id']);
    await badges.upsert({ id, workspaceId: 'ws-up', holder: 'Second' }, ['id']);
    const row = await storedRow(db, 'compact_tenant_badges', id);
    const key = expectCompactValue(row.holder_ciphertext, 'Second', await keyRows(db), 0x07);
    expect(key.tenant_id).toBe('ws-up');
    db.encryption.purgeCache();
    const back = await badges.findOneByOrFail({ id });
    expect([back.holder, back.note]).toEqual(['Second', 'kept']);
  });

  it('a partial select reads the tenant it needs and decrypts', async () => {
    const saved = await contacts().save(contact('ws-partial', 'partial@x.example'));
    db.encryption.purgeCache();
    const rows = await contacts().find({ select: { id: true, email: true }, where: { id: saved.id } });
    expect(rows.map((r) => [r.email, r.label])).toEqual([['partial@x.example', undefined]]);
  });

  it('offboarding makes the tenant’s compact rows unreadable; other tenants unaffected', async () => {
    await db.encryption.tenants.addKey('ws-gone', { kind: 'customer-key', key: customerKey() });
    const gone = await contacts().save(contact('ws-gone', 'x@gone.example'));
    const stay = await contacts().save(contact('ws-stay', 'y@stay.example'));
    await db.encryption.tenants.offboard('ws-gone');
    await expect(contacts().findOneByOrFail({ id: gone.id })).rejects.toBeInstanceOf(TenantOffboardedError);
    await expect(contacts().save(contact('ws-gone', 'z@gone.example'))).rejects.toBeInstanceOf(
      TenantOffboardedError,
    );
    expect((await contacts().findOneByOrFail({ id: stay.id })).email).toBe('y@stay.example');
  });
});
