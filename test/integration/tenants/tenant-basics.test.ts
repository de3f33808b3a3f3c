import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encryptionStatus, IntegrityError, TenantOffboardedError } from '../../../src';
import { rawQuery } from '../../support/database';
import { TENANT_MIGRATIONS, TenantContact } from '../../support/tenant-entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

const customerKey = () => randomBytes(32).toString('base64');
let db: EncryptedTestDatabase;

beforeAll(async () => {
  db = await encryptedDatabase([TenantContact], { prefix: 'tenant_basics', migrations: TENANT_MIGRATIONS });
});
afterAll(() => db?.close());

const contacts = () => db.dataSource.getRepository(TenantContact);
const table = () => `"${db.schema.schema}".tenant_contacts`;
const stored = async (id: number) =>
  (await rawQuery(db.schema.url, `SELECT * FROM ${table()} WHERE id = $1`, [id]))[0] as Record<
    string,
    unknown
  >;

describe('tenant keys', () => {
  it('seals a tenant without a key under the application key, bound to the tenant', async () => {
    const saved = await contacts().save(
      contacts().create({ workspaceId: 'ws-vendor', email: 'a@vendor.example', profile: null }),
    );
    const row = await stored(saved.id);
    expect(row.email_key_version).toBe(1);
    expect(((row.email_ciphertext as Buffer)[1] ?? 0) & 0x04).toBe(0x04);
    expect((await contacts().findOneByOrFail({ id: saved.id })).email).toBe('a@vendor.example');
  });

  it('onboards a customer-provided key: new rows use it, old rows move with the job', async () => {
    const before = await contacts().save(
      contacts().create({ workspaceId: 'ws-byok', email: 'old@byok.example', profile: { phone: '1' } }),
    );
    const added = await db.encryption.tenants.addKey('ws-byok', { kind: 'customer-key', key: customerKey() });
    expect(added.version).toBeGreaterThanOrEqual(1_000_000);
    expect(added.keyReference).toMatch(/^sha256:/);
    expect(added.job?.state).toBe('pending');
    const after = await contacts().save(
      contacts().create({ workspaceId: 'ws-byok', email: 'new@byok.example', profile: null }),
    );
    expect((await stored(after.id)).email_key_version).toBe(added.version);
    expect((await stored(before.id)).email_key_version).toBe(1);
    const ciphertext = (await stored(before.id)).email_ciphertext;
    const job = await db.encryption.tenants.runJob('ws-byok');
    expect(job.state).toBe('completed');
    expect(job.rowsDone).toBe(2); // email and profile of the old row
    const moved = await stored(before.id);
    expect(moved.email_key_version).toBe(added.version);
    expect(moved.email_ciphertext).toEqual(ciphertext);
    db.encryption.purgeCache();
    const all = await contacts().findBy({ workspaceId: 'ws-byok' });
    expect(all.map((c) => c.email).sort()).toEqual(['new@byok.example', 'old@byok.example']);
    expect((await db.encryption.tenants.status('ws-byok')).job?.state).toBe('completed');
    const status = await encryptionStatus(db.dataSource, db.encryption, { tenant: 'ws-byok' });
    expect(status.find((p) => p.property === 'email')?.rowsByVersion).toEqual({ [String(added.version)]: 2 });
  });

  it('a value copied into another tenant row does not decrypt there', async () => {
    const a = await contacts().save(
      contacts().create({ workspaceId: 'ws-a', email: 'secret@a.example', profile: null }),
    );
    const b = await contacts().save(
      contacts().create({ workspaceId: 'ws-b', email: 'b@b.example', profile: null }),
    );
    const row = await stored(a.id);
    await rawQuery(
      db.schema.url,
      `UPDATE ${table()} SET email_ciphertext = $1, email_iv = $2, email_wrapped_key = $3, email_key_version = $4 WHERE id = $5`,
      [row.email_ciphertext, row.email_iv, row.email_wrapped_key, row.email_key_version, b.id],
    );
    db.encryption.purgeCache();
    await expect(contacts().findOneByOrFail({ id: b.id })).rejects.toBeInstanceOf(IntegrityError);
    // With the primary key unbound too: moving the tenant column of A's own row
    await rawQuery(db.schema.url, `UPDATE ${table()} SET "workspaceId" = 'ws-b' WHERE id = $1`, [a.id]);
    await expect(contacts().findOneByOrFail({ id: a.id })).rejects.toBeInstanceOf(IntegrityError);
  });

  it('offboarding makes the tenant unreadable and refuses its writes, others unaffected', async () => {
    const key = customerKey();
    const saved = await contacts().save(
      contacts().create({ workspaceId: 'ws-gone', email: 'x@gone.example', profile: null }),
    );
    await db.encryption.tenants.addKey('ws-gone', { kind: 'customer-key', key });
    await db.encryption.tenants.runJob('ws-gone');
    const other = await contacts().save(
      contacts().create({ workspaceId: 'ws-stay', email: 'y@stay.example', profile: null }),
    );
    const result = await db.encryption.tenants.offboard('ws-gone');
    expect(result.keysDestroyed).toBe(1);
    await expect(contacts().findOneByOrFail({ id: saved.id })).rejects.toBeInstanceOf(TenantOffboardedError);
    await expect(
      contacts().save(contacts().create({ workspaceId: 'ws-gone', email: 'z@gone.example', profile: null })),
    ).rejects.toBeInstanceOf(TenantOffboardedError);
    expect((await contacts().findOneByOrFail({ id: other.id })).email).toBe('y@stay.example');
    // nothing of the key anywhere in the registry
    const dump = JSON.stringify(
      await rawQuery(db.schema.url, `SELECT * FROM "${db.schema.schema}".typeorm_envelope_tenant_keys`),
    );
    expect(dump).not.toContain(key);
    expect(dump).not.toContain(Buffer.from(key, 'base64').toString('hex'));
  });
});

describe('an entity kept across its tenant’s onboarding', () => {
  it('saved after the job moved its row, changed or not, it reads back as last written', async () => {
    const kept = await contacts().save(
      contacts().create({ workspaceId: 'ws-kept', email: 'kept@before.example', profile: { phone: '1' } }),
    );
    const loaded = await contacts().findOneByOrFail({ id: kept.id });
    expect((await stored(kept.id)).email_key_version).toBe(1);
    const added = await db.encryption.tenants.addKey('ws-kept', { kind: 'customer-key', key: customerKey() });
    expect((await db.encryption.tenants.runJob('ws-kept')).state).toBe('completed');
    const moved = await stored(kept.id);
    expect(moved.profile_key_version).toBe(added.version);
    // one property changed, one kept as loaded before the job
    loaded.email = 'kept@after.example';
    await contacts().save(loaded);
    const row = await stored(kept.id);
    expect(row.email_key_version).toBe(added.version);
    expect(row.profile_wrapped_key).toEqual(moved.profile_wrapped_key);
    expect(row.profile_key_version).toBe(added.version);
    db.encryption.purgeCache();
    const back = await contacts().findOneByOrFail({ id: kept.id });
    expect([back.email, back.profile]).toEqual(['kept@after.example', { phone: '1' }]);
  });
});
