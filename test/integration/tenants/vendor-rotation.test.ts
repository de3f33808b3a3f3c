import { randomBytes } from 'node:crypto';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { EnvelopeEncryption, KeyRegistry, LocalKeyProvider, rewrapDataKeys } from '../../../src';
import { rawQuery } from '../../support/database';
import { TENANT_MIGRATIONS, TenantContact } from '../../support/tenant-entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

const key2 = randomBytes(32).toString('base64');
let db: EncryptedTestDatabase;
beforeAll(async () => {
  db = await encryptedDatabase([TenantContact], {
    prefix: 'tenant_vendor_rot',
    migrations: TENANT_MIGRATIONS,
    extraKeys: [{ version: 2, provider: new LocalKeyProvider({ key: key2 }) }],
  });
});
afterAll(() => db?.close());

it('rotating the application key re-wraps the customer-provided keys it wraps, so the old version can be retired', async () => {
  const repo = db.dataSource.getRepository(TenantContact);
  await db.encryption.tenants.addKey('ws-byok', {
    kind: 'customer-key',
    key: randomBytes(32).toString('base64'),
  });
  await repo.save(repo.create({ workspaceId: 'ws-byok', email: 'own@byok.example', profile: null }));
  const registry = new KeyRegistry(db.dataSource, db.encryption);
  await registry.activate(2);
  await repo.save(repo.create({ workspaceId: 'ws-plain', email: 'vendor@plain.example', profile: null }));
  // No row is under version 1, but the customer's key is still wrapped by it.
  await expect(registry.retire(1)).rejects.toThrow(/customer-provided tenant keys are still wrapped/);
  const result = await rewrapDataKeys(db.dataSource, db.encryption, { toVersion: 2 });
  expect(result.error).toBeUndefined();
  expect(result.storedTenantKeys).toEqual({ rewrapped: 1, failures: [] });
  const [stored] = await rawQuery(
    db.schema.url,
    `SELECT descriptor FROM "${db.schema.schema}".typeorm_envelope_tenant_keys WHERE tenant_id = 'ws-byok'`,
  );
  expect((stored?.descriptor as { wrappedBy: number } | undefined)?.wrappedBy).toBe(2);
  // the tenant's rows under its own key were not touched by the application key's rotation
  const versions = await rawQuery(
    db.schema.url,
    `SELECT "workspaceId" AS ws, email_key_version AS v FROM "${db.schema.schema}".tenant_contacts ORDER BY id`,
  );
  expect(versions).toEqual([
    { ws: 'ws-byok', v: expect.any(Number) },
    { ws: 'ws-plain', v: 2 },
  ]);
  expect((versions[0]?.v as number) >= 1_000_000).toBe(true);
  await registry.retire(1);

  // An instance configured with version 2 only reads both tenants, the customer key unwrapped under 2.
  const encryption = new EnvelopeEncryption({
    keys: [{ version: 2, provider: new LocalKeyProvider({ key: key2 }) }],
    activeVersion: 2,
  });
  const second = new DataSource({
    type: 'postgres',
    url: db.schema.url,
    schema: db.schema.schema,
    entities: [TenantContact],
  });
  encryption.attach(second);
  await second.initialize();
  try {
    const emails = (await second.getRepository(TenantContact).find({ order: { id: 'ASC' } })).map(
      (c) => c.email,
    );
    expect(emails).toEqual(['own@byok.example', 'vendor@plain.example']);
  } finally {
    await second.destroy();
  }
});

it('rows of an offboarded tenant are left alone by a rotation and counted apart, not as failures', async () => {
  const other = await encryptedDatabase([TenantContact], {
    prefix: 'tenant_vendor_rot_off',
    migrations: TENANT_MIGRATIONS,
    extraKeys: [{ version: 2, provider: new LocalKeyProvider({ key: randomBytes(32).toString('base64') }) }],
  });
  try {
    const repo = other.dataSource.getRepository(TenantContact);
    await repo.save(repo.create({ workspaceId: 'ws-leaving', email: 'gone@leaving.example', profile: null }));
    await repo.save(repo.create({ workspaceId: 'ws-staying', email: 'here@staying.example', profile: null }));
    await other.encryption.tenants.offboard('ws-leaving');
    await new KeyRegistry(other.dataSource, other.encryption).activate(2);
    const result = await rewrapDataKeys(other.dataSource, other.encryption, { toVersion: 2 });
    expect(result.error).toBeUndefined();
    expect(result.properties.flatMap((p) => p.failures)).toEqual([]);
    expect(result.properties.find((p) => p.property === 'email')?.offboardedRows).toBe(1);
    const versions = await rawQuery(
      other.schema.url,
      `SELECT "workspaceId" AS ws, email_key_version AS v FROM "${other.schema.schema}".tenant_contacts ORDER BY id`,
    );
    expect(versions).toEqual([
      { ws: 'ws-leaving', v: 1 },
      { ws: 'ws-staying', v: 2 },
    ]);
    const audit = await new KeyRegistry(other.dataSource, other.encryption).auditLog({
      event: 'rotation-started',
    });
    expect(audit.at(-1)?.details.keyReference).toBe(
      other.encryption.keyring.provider(2).describe().keyReference,
    );
  } finally {
    await other.close();
  }
});
