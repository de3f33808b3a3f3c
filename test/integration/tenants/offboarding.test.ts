import { randomBytes } from 'node:crypto';
import { In } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  ConfigError,
  KeyRegistry,
  LocalKeyProvider,
  TenantOffboardedError,
  verifyEncryptedColumns,
} from '../../../src';
import { rawQuery } from '../../support/database';
import { type KmsEmulator, startKmsEmulator } from '../../support/kms-emulator';
import { TENANT_MIGRATIONS, TenantContact } from '../../support/tenant-entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/**
 * Offboarding (crypto-shredding) a tenant: what the application held of its key is destroyed, its
 * rows are unreadable by design and reported as such, its writes are refused, and nothing changes
 * for any other tenant, in the same query and the same table.
 */

const newKey = () => randomBytes(32).toString('base64');
const masterKey = newKey();
let kms: KmsEmulator;
let db: EncryptedTestDatabase;

const tenantKeysOptions = () => ({
  keys: [{ version: 1, provider: new LocalKeyProvider({ key: masterKey }) }],
  tenantKeys: { awsKms: { clientConfig: kms.clientConfig(), maxAttempts: 1 } },
});

beforeAll(async () => {
  kms = await startKmsEmulator();
  db = await encryptedDatabase([TenantContact], {
    prefix: 'offboarding',
    migrations: TENANT_MIGRATIONS,
    encryption: tenantKeysOptions(),
  });
});
afterAll(async () => {
  await db?.close();
  await kms?.close();
});

const contacts = () => db.dataSource.getRepository(TenantContact);
const table = () => `"${db.schema.schema}".tenant_contacts`;
const registryTable = (name: string) => `"${db.schema.schema}".${name}`;

async function seed(tenant: string, count: number) {
  return contacts().save(
    Array.from({ length: count }, (_, i) =>
      contacts().create({
        workspaceId: tenant,
        email: `${tenant}-${i}@example.com`,
        profile: i % 2 === 0 ? { phone: `+${i}` } : null,
      }),
    ),
  );
}

/** Every table of the schema as text (bytea as hex), to look for a key in any spelling. */
async function everyTableAsText(): Promise<string> {
  const tables = await rawQuery<{ name: string }>(
    db.schema.url,
    `SELECT table_name AS name FROM information_schema.tables WHERE table_schema = $1`,
    [db.schema.schema],
  );
  expect(tables.map((t) => t.name)).toEqual(
    expect.arrayContaining(['tenant_contacts', 'typeorm_envelope_tenant_keys', 'typeorm_envelope_audit_log']),
  );
  let text = '';
  for (const { name } of tables) {
    const rows = await rawQuery<{ r: string }>(
      db.schema.url,
      `SELECT t::text AS r FROM "${db.schema.schema}"."${name}" t`,
    );
    text += rows.map((r) => r.r).join('\n');
  }
  return text;
}

function expectNoTraceOf(key: string, text: string): void {
  const bytes = Buffer.from(key, 'base64');
  for (const spelling of [
    key,
    bytes.toString('base64url'),
    bytes.toString('hex'),
    bytes.toString('hex').toUpperCase(),
  ]) {
    expect(text.includes(spelling), 'key material found in the database').toBe(false);
  }
}

async function keyRows(tenant: string) {
  return rawQuery<{
    version: number;
    state: string;
    descriptor: Record<string, unknown>;
    destroyed_at: Date | null;
    key_reference: string;
  }>(
    db.schema.url,
    `SELECT version, state, descriptor, destroyed_at, key_reference FROM ${registryTable('typeorm_envelope_tenant_keys')}
     WHERE tenant_id = $1 ORDER BY version`,
    [tenant],
  );
}

/** The error a promise rejects with. */
async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  throw new Error('expected a rejection');
}

function expectOffboarded(error: unknown, tenant: string): void {
  expect(error).toBeInstanceOf(TenantOffboardedError);
  expect((error as TenantOffboardedError).tenant).toBe(tenant);
  expect((error as Error).message).toContain(`tenant ${tenant}`);
  expect((error as Error).message).not.toMatch(/@example\.com/);
}

describe('offboarding a tenant with a customer-provided key', () => {
  const gone = 'ws-gone';
  const key = newKey();
  let goneIds: number[];
  let stayIds: number[];

  beforeAll(async () => {
    goneIds = (await seed(gone, 6)).map((c) => c.id);
    stayIds = [...(await seed('ws-stay', 4)), ...(await seed('ws-stay-byok', 4))].map((c) => c.id);
    await db.encryption.tenants.addKey('ws-stay-byok', { kind: 'customer-key', key: newKey() });
    await db.encryption.tenants.runJob('ws-stay-byok');
    await db.encryption.tenants.addKey(gone, { kind: 'customer-key', key });
    expect((await db.encryption.tenants.runJob(gone)).state).toBe('completed');
    // Before: stored wrapped, never as is
    const [before] = await keyRows(gone);
    expect(before?.state).toBe('active');
    expect(typeof before?.descriptor.wrappedKey).toBe('string');
    expectNoTraceOf(key, await everyTableAsText());
    // Read once, so keys are cached when it is offboarded
    expect((await contacts().findBy({ workspaceId: gone })).length).toBe(6);
  });

  it('destroys the wrapped key: descriptor {}, state destroyed, no trace of the key in any table', async () => {
    const fingerprint = new LocalKeyProvider({ key }).fingerprint;
    const result = await db.encryption.tenants.offboard(gone);
    expect(result).toEqual({
      tenantId: gone,
      keysDestroyed: 1,
      indexKeysErased: 0,
      valuesUnderApplicationKey: 0,
    });
    const rows = await keyRows(gone);
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({ state: 'destroyed', descriptor: {}, key_reference: fingerprint });
    expect(rows[0]?.destroyed_at).toBeInstanceOf(Date);
    const [tenant] = await rawQuery<Record<string, unknown>>(
      db.schema.url,
      `SELECT state, active_version, offboarded_at FROM ${registryTable('typeorm_envelope_tenants')} WHERE tenant_id = $1`,
      [gone],
    );
    expect(tenant).toMatchObject({ state: 'offboarded', active_version: null });
    expect(tenant?.offboarded_at).toBeInstanceOf(Date);
    expectNoTraceOf(key, await everyTableAsText());
    const status = await db.encryption.tenants.status(gone);
    expect(status).toMatchObject({ state: 'offboarded', activeVersion: null, job: null });
    expect(status.keys).toEqual([expect.objectContaining({ state: 'destroyed', keyReference: fingerprint })]);
    const [entry] = await new KeyRegistry(db.dataSource, db.encryption).auditLog({
      tenant: gone,
      event: 'tenant-offboarded',
    });
    expect(entry?.details).toMatchObject({ keysDestroyed: 1, keyReferences: [fingerprint] });
  });

  it("refuses the tenant's reads and writes, naming the tenant; the table's bytes stay as they were", async () => {
    const before = await rawQuery(db.schema.url, `SELECT * FROM ${table()} ORDER BY id`);
    db.encryption.purgeCache();
    expectOffboarded(await rejection(contacts().findOneByOrFail({ id: goneIds[0] as number })), gone);
    expectOffboarded(await rejection(contacts().findBy({ workspaceId: gone })), gone);
    expectOffboarded(
      await rejection(
        contacts().save(contacts().create({ workspaceId: gone, email: 'new@gone.example', profile: null })),
      ),
      gone,
    );
    expectOffboarded(
      await rejection(contacts().insert({ workspaceId: gone, email: 'insert@gone.example', profile: null })),
      gone,
    );
    expectOffboarded(
      await rejection(
        contacts().update(
          { id: goneIds[1] as number, workspaceId: gone },
          { workspaceId: gone, email: 'changed@gone.example' },
        ),
      ),
      gone,
    );
    expect(await rawQuery(db.schema.url, `SELECT * FROM ${table()} ORDER BY id`)).toEqual(before);
  });

  it('leaves other tenants readable and writable in the same query and table', async () => {
    db.encryption.purgeCache();
    // A find whose rows include the offboarded tenant's fails, naming it; filtered to others it reads
    expectOffboarded(await rejection(contacts().find({ order: { id: 'ASC' } })), gone);
    const others = await contacts().find({
      where: { workspaceId: In(['ws-stay', 'ws-stay-byok']) },
      order: { id: 'ASC' },
    });
    expect(others.map((c) => c.id)).toEqual(stayIds);
    expect(others.every((c) => c.email === `${c.workspaceId}-${stayIds.indexOf(c.id) % 4}@example.com`)).toBe(
      true,
    );
    const written = await contacts().save(
      contacts().create({
        workspaceId: 'ws-stay-byok',
        email: 'after@stay.example',
        profile: { phone: '1' },
      }),
    );
    db.encryption.purgeCache();
    expect((await contacts().findOneByOrFail({ id: written.id })).email).toBe('after@stay.example');
    await contacts().update(
      { id: stayIds[0] as number, workspaceId: 'ws-stay' },
      { workspaceId: 'ws-stay', email: 'updated@stay.example' },
    );
    expect((await contacts().findOneByOrFail({ id: stayIds[0] as number })).email).toBe(
      'updated@stay.example',
    );
  });

  it('verify reports its rows as offboarded, not failed', async () => {
    const result = await verifyEncryptedColumns(db.dataSource, db.encryption);
    expect(result.failed).toBe(0);
    expect(result.offboarded).toBe(6 + 3); // six emails, three profiles
    const listed = result.properties.flatMap((p) => p.failures);
    expect(listed).toHaveLength(9);
    for (const failure of listed) {
      expect(failure).toMatchObject({ tenant: gone, offboarded: true });
      expect(goneIds.map(String)).toContain(failure.primaryKey);
      expect(failure.error).toContain('TenantOffboardedError');
    }
    const own = await verifyEncryptedColumns(db.dataSource, db.encryption, { tenant: gone });
    expect(own).toMatchObject({ rowsChecked: 9, failed: 0, offboarded: 9 });
    const other = await verifyEncryptedColumns(db.dataSource, db.encryption, { tenant: 'ws-stay' });
    expect(other).toMatchObject({ failed: 0, offboarded: 0 });
    expect(other.rowsChecked).toBeGreaterThan(0);
  });

  it('refuses new keys, activation, revert and jobs for the offboarded tenant', async () => {
    const keysBefore = await keyRows(gone);
    const version = keysBefore[0]?.version as number;
    const attempts: Array<() => Promise<unknown>> = [
      () => db.encryption.tenants.addKey(gone, { kind: 'customer-key', key: newKey() }),
      () => db.encryption.tenants.addKey(gone, { kind: 'customer-key', key: newKey() }, { activate: false }),
      () => db.encryption.tenants.activate(gone, version),
      () => db.encryption.tenants.validate(gone, version),
      () => db.encryption.tenants.revert(gone),
      () => db.encryption.tenants.runJob(gone),
    ];
    for (const attempt of attempts) {
      const error = await rejection(attempt());
      expect(error).toBeInstanceOf(ConfigError);
      expect((error as ConfigError).tenant).toBe(gone);
    }
    expect(await keyRows(gone)).toEqual(keysBefore);
    expect((await db.encryption.tenants.status(gone)).state).toBe('offboarded');
  });
});

describe('offboarding a tenant that rotated its key', () => {
  it('destroys every key it had, the older ones too; a second offboard destroys nothing more', async () => {
    const tenant = 'ws-rotated-gone';
    const keys = [newKey(), newKey(), newKey()];
    await seed(tenant, 3);
    for (const key of keys) {
      await db.encryption.tenants.addKey(tenant, { kind: 'customer-key', key });
      expect((await db.encryption.tenants.runJob(tenant)).state).toBe('completed');
    }
    await db.encryption.tenants.addKey(tenant, { kind: 'customer-key', key: newKey() }, { activate: false });
    expect((await keyRows(tenant)).map((k) => k.state)).toEqual([
      'decrypt-only',
      'decrypt-only',
      'active',
      'decrypt-only',
    ]);
    const result = await db.encryption.tenants.offboard(tenant);
    expect(result).toMatchObject({ keysDestroyed: 4, valuesUnderApplicationKey: 0 });
    const rows = await keyRows(tenant);
    expect(rows.map((k) => [k.state, k.descriptor])).toEqual(
      Array.from({ length: 4 }, () => ['destroyed', {}]),
    );
    const text = await everyTableAsText();
    for (const key of keys) expectNoTraceOf(key, text);
    expect(await db.encryption.tenants.offboard(tenant)).toMatchObject({ keysDestroyed: 0 });
    expect(await keyRows(tenant)).toEqual(rows);
    db.encryption.purgeCache();
    expectOffboarded(await rejection(contacts().findBy({ workspaceId: tenant })), tenant);
  });
});

describe('offboarding a tenant that only used the application key', () => {
  it('reports the values left under the application key and still refuses its reads and writes', async () => {
    const tenant = 'ws-vendor-only';
    const rows = await seed(tenant, 5);
    const result = await db.encryption.tenants.offboard(tenant);
    expect(result).toEqual({
      tenantId: tenant,
      keysDestroyed: 0,
      indexKeysErased: 0,
      valuesUnderApplicationKey: 5 + 3,
    });
    const [count] = await rawQuery<{ n: number }>(
      db.schema.url,
      `SELECT (count(*) + count(profile_key_version))::int AS n FROM ${table()} WHERE "workspaceId" = $1 AND email_key_version = 1`,
      [tenant],
    );
    expect(count?.n).toBe(result.valuesUnderApplicationKey);
    db.encryption.purgeCache();
    expectOffboarded(await rejection(contacts().findOneByOrFail({ id: rows[0]?.id as number })), tenant);
    expectOffboarded(
      await rejection(
        contacts().save(contacts().create({ workspaceId: tenant, email: 'x@v.example', profile: null })),
      ),
      tenant,
    );
    expect(await contacts().countBy({ workspaceId: tenant })).toBe(5);
    expect((await db.encryption.tenants.status(tenant)).state).toBe('offboarded');
    const verified = await verifyEncryptedColumns(db.dataSource, db.encryption, { tenant });
    expect(verified).toMatchObject({ failed: 0, offboarded: 8 });
  });
});

describe('offboarding a tenant on a KMS key', () => {
  it('drops its cached keys here and, at refresh, in another instance: the next read makes no KMS call and fails', async () => {
    const tenant = 'ws-kms-gone';
    const keyId = kms.createKey({ description: 'customer key in its own account' }).Arn;
    const added = await db.encryption.tenants.addKey(tenant, { kind: 'aws-kms', keyId });
    const rows = await seed(tenant, 4);
    const stay = await seed('ws-kms-stay', 2);
    const [row] = await rawQuery<{ v: number }>(
      db.schema.url,
      `SELECT email_key_version AS v FROM ${table()} WHERE id = $1`,
      [rows[0]?.id],
    );
    expect(row?.v).toBe(added.version);

    // A second instance of the application, following the same registry, reads the tenant too
    const other = await encryptedDatabase([TenantContact], {
      schema: db.schema,
      migrations: TENANT_MIGRATIONS,
      encryption: tenantKeysOptions(),
    });
    try {
      const otherContacts = other.dataSource.getRepository(TenantContact);
      expect((await otherContacts.findBy({ workspaceId: tenant })).length).toBe(4);
      expect((await contacts().findBy({ workspaceId: tenant })).length).toBe(4);
      kms.resetCalls();
      expect((await contacts().findBy({ workspaceId: tenant })).length).toBe(4); // warm: no KMS call
      expect(Object.values(kms.calls).reduce((a, b) => a + b, 0)).toBe(0);

      const result = await db.encryption.tenants.offboard(tenant);
      expect(result).toMatchObject({ keysDestroyed: 1, valuesUnderApplicationKey: 0 });
      const [record] = await keyRows(tenant);
      expect(record).toMatchObject({ state: 'destroyed', descriptor: {}, key_reference: keyId });

      kms.resetCalls();
      expectOffboarded(await rejection(contacts().findBy({ workspaceId: tenant })), tenant);
      expectOffboarded(await rejection(contacts().findOneByOrFail({ id: rows[1]?.id as number })), tenant);
      expectOffboarded(
        await rejection(
          contacts().save(contacts().create({ workspaceId: tenant, email: 'k@k.example', profile: null })),
        ),
        tenant,
      );
      await other.encryption.tenants.refresh();
      expectOffboarded(await rejection(otherContacts.findBy({ workspaceId: tenant })), tenant);
      expectOffboarded(
        await rejection(
          otherContacts.save(
            otherContacts.create({ workspaceId: tenant, email: 'k@k.example', profile: null }),
          ),
        ),
        tenant,
      );
      expect(kms.calls).toEqual(Object.fromEntries(Object.keys(kms.calls).map((op) => [op, 0])));
      // The other tenant of that table reads and writes as before, in both instances
      expect((await otherContacts.findBy({ workspaceId: 'ws-kms-stay' })).map((c) => c.id)).toEqual(
        stay.map((c) => c.id),
      );
      await otherContacts.save(
        otherContacts.create({ workspaceId: 'ws-kms-stay', email: 's@s.example', profile: null }),
      );
      expect(await contacts().countBy({ workspaceId: 'ws-kms-stay' })).toBe(3);
    } finally {
      await other.close();
    }
  });
});
