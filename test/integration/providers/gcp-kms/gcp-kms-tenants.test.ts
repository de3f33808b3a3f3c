import { inspect } from 'node:util';
import { Not } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  ConfigError,
  GcpKmsKeyProvider,
  IntegrityError,
  KeyAccessDeniedError,
  KeyProviderError,
  KeyRegistry,
  TenantOffboardedError,
} from '../../../../src';
import { rawQuery } from '../../../support/database';
import {
  APP_MEMBER,
  ENCRYPTER_DECRYPTER,
  type GcpKmsEmulator,
  startGcpKmsEmulator,
  VIEWER,
} from '../../../support/gcp-kms-emulator';
import { TENANT_MIGRATIONS, TenantContact } from '../../../support/tenant-entities';
import { customerKey, expectNoneOf, rejection, scanSchema } from '../../../support/tenant-fixtures';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../../support/typeorm';

/**
 * Tenants whose keys live in their own Google Cloud projects: each customer grants the
 * application's service account `roles/cloudkms.cryptoKeyEncrypterDecrypter` (and
 * `roles/cloudkms.viewer`) on one crypto key, and the application adds `{ kind: 'gcp-kms', keyName }`
 * for the tenant. Beside them, a tenant with a customer-provided key and one on the application key.
 */
let gcp: GcpKmsEmulator;
let db: EncryptedTestDatabase;

/** A customer's key in its own project, granted to the application as its onboarding guide says. */
const customerGcpKey = (tenant: string, bindings?: Record<string, string[]>) =>
  gcp.createKey({
    project: `customer-${tenant}`,
    keyRing: 'saas',
    id: 'workspace-data',
    ...(bindings ? { bindings } : {}),
  });

const contacts = () => db.dataSource.getRepository(TenantContact);
const sql = <T = Record<string, unknown>>(text: string, params?: unknown[]) =>
  rawQuery<T>(db.schema.url, text, params);
const table = (name: string) => `"${db.schema.schema}".${name}`;
const save = (tenant: string, tags: string[]) =>
  contacts().save(
    tags.map((tag) =>
      contacts().create({
        workspaceId: tenant,
        email: `${tag}@${tenant}.example`,
        profile: { phone: `+1-${tag}` },
      }),
    ),
  );
type Stored = {
  id: number;
  email_ciphertext: Buffer;
  email_iv: Buffer;
  email_wrapped_key: Buffer;
  email_key_version: number;
};
const stored = (tenant: string) =>
  sql<Stored>(
    `SELECT id, email_ciphertext, email_iv, email_wrapped_key, email_key_version FROM ${table('tenant_contacts')} WHERE "workspaceId" = $1 ORDER BY id`,
    [tenant],
  );
const keysRecorded = async (tenant: string) =>
  (
    await sql<{ n: number }>(
      `SELECT count(*)::int AS n FROM ${table('typeorm_envelope_tenant_keys')} WHERE tenant_id = $1`,
      [tenant],
    )
  )[0]?.n;
const aadOf = (tenant: string) =>
  `[["typeorm-envelope:keyring","default"],["typeorm-envelope:tenant","${tenant}"]]`;

beforeAll(async () => {
  gcp = await startGcpKmsEmulator();
  db = await encryptedDatabase([TenantContact], {
    prefix: 'gcp_tenants',
    migrations: TENANT_MIGRATIONS,
    encryption: { tenantKeys: { gcpKms: { ...gcp.connection(), retryDelay: 2, maxRetryDelay: 5 } } },
  });
});
afterAll(async () => {
  await db?.close();
  await gcp?.close();
});

describe('a tenant on its own Cloud KMS key', () => {
  it('addKey validates with the tenant bound in, stores only the key name, and the job moves the tenant’s rows under it with data untouched', async () => {
    const before = await save('acme', ['a0', 'a1', 'a2']); // written under the application key
    const onVendorKey = await stored('acme');
    expect(onVendorKey.every((r) => r.email_key_version === 1)).toBe(true);
    const key = customerGcpKey('acme');
    gcp.resetCalls();
    const added = await db.encryption.tenants.addKey('acme', { kind: 'gcp-kms', keyName: key.name });
    expect(added).toMatchObject({
      tenantId: 'acme',
      kind: 'gcp-kms',
      keyReference: key.name,
      state: 'active',
    });
    expect(added.version).toBeGreaterThanOrEqual(1_000_000);
    expect(gcp.callLog.map((c) => c.operation)).toEqual(['GetCryptoKey', 'Encrypt', 'Decrypt']);
    expect(gcp.callLog.filter((c) => c.aad !== undefined).every((c) => c.aad === aadOf('acme'))).toBe(true);
    const [record] = await sql<{ descriptor: unknown; key_reference: string }>(
      `SELECT descriptor, key_reference FROM ${table('typeorm_envelope_tenant_keys')} WHERE tenant_id = 'acme'`,
    );
    expect(record).toEqual({ descriptor: { keyName: key.name }, key_reference: key.name });

    const job = await db.encryption.tenants.runJob('acme');
    expect(job.state).toBe('completed');
    const moved = await stored('acme');
    for (const [i, row] of onVendorKey.entries()) {
      const now = moved[i] as Stored;
      expect(now.email_ciphertext.equals(row.email_ciphertext)).toBe(true);
      expect(now.email_iv.equals(row.email_iv)).toBe(true);
      expect(now.email_wrapped_key.equals(row.email_wrapped_key)).toBe(false);
      expect(now.email_key_version).toBe(added.version);
      expect(GcpKmsKeyProvider.keyVersionOf(now.email_wrapped_key)).toBe(key.primary);
    }
    db.encryption.purgeCache('acme');
    const loaded = await contacts().findBy({ workspaceId: 'acme' });
    expect(loaded.map((c) => c.email).sort()).toEqual(before.map((c) => c.email).sort());
    const crypto = gcp.callLog.filter((c) => c.operation === 'Encrypt' || c.operation === 'Decrypt');
    expect(
      crypto.every((c) => c.name === key.name && c.aad === aadOf('acme') && c.principal === APP_MEMBER),
    ).toBe(true);
    // Nothing secret anywhere in the database: no token, no plaintext.
    expect(
      await scanSchema(db.schema.url, db.schema.schema, [...gcp.issuedTokens(), 'a0@acme.example'], []),
    ).toEqual([]);
  });

  it('refuses, before any call, a key already registered for another tenant, any version of it, and a descriptor without keyName', async () => {
    const victim = customerGcpKey('victim-co');
    await db.encryption.tenants.addKey('victim-co', { kind: 'gcp-kms', keyName: victim.name });
    gcp.resetCalls();
    const shared = await rejection(
      db.encryption.tenants.addKey('mallory-co', { kind: 'gcp-kms', keyName: victim.name }),
    );
    expect(shared).toBeInstanceOf(ConfigError);
    expect(shared.message).toContain('already registered for another tenant');
    expect(shared).toMatchObject({ tenant: 'mallory-co', keyId: victim.name });
    // Any version of that key is the same customer's key: refused too, before its version is used.
    const version = await rejection(
      db.encryption.tenants.addKey('mallory-co', {
        kind: 'gcp-kms',
        keyName: `${victim.name}/cryptoKeyVersions/1`,
      }),
    );
    expect(version).toBeInstanceOf(ConfigError);
    expect(version.message).toContain('already registered for another tenant');
    const empty = await rejection(db.encryption.tenants.addKey('mallory-co', { kind: 'gcp-kms' } as never));
    expect(empty).toBeInstanceOf(ConfigError);
    expect(gcp.callLog).toEqual([]);
    expect(await keysRecorded('mallory-co')).toBe(0);
  });

  it('a key the customer did not grant fully fails validation naming the tenant and the missing permission; nothing is recorded', async () => {
    const noViewer = customerGcpKey('half-granted', { [ENCRYPTER_DECRYPTER]: [APP_MEMBER] });
    const error = await rejection(
      db.encryption.tenants.addKey('half-granted', { kind: 'gcp-kms', keyName: noViewer.name }),
    );
    expect(error).toBeInstanceOf(KeyAccessDeniedError);
    expect(error).toMatchObject({ tenant: 'half-granted', keyId: noViewer.name });
    expect(error.message).toContain("Permission 'cloudkms.cryptoKeys.get' denied");
    expect(await keysRecorded('half-granted')).toBe(0);
    const audit = await new KeyRegistry(db.dataSource, db.encryption).auditLog({ tenant: 'half-granted' });
    expect(audit.find((e) => e.event === 'tenant-key-validation-failed')).toBeDefined();
    expectNoneOf(
      gcp.issuedTokens(),
      error,
      inspect(error, { showHidden: true, depth: 10 }),
      JSON.stringify(audit),
    );

    const wrongPurpose = gcp.createKey({
      project: 'customer-signer',
      keyRing: 'saas',
      id: 'sign',
      purpose: 'ASYMMETRIC_SIGN',
    });
    const purpose = await rejection(
      db.encryption.tenants.addKey('signer', { kind: 'gcp-kms', keyName: wrongPurpose.name }),
    );
    expect(purpose).toBeInstanceOf(KeyProviderError);
    expect(purpose.message).toContain(
      'key purpose is ASYMMETRIC_SIGN; a symmetric ENCRYPT_DECRYPT key is required',
    );
    expect(await keysRecorded('signer')).toBe(0);
    expect(
      await contacts().save(
        contacts().create({ workspaceId: 'signer', email: 'x@signer.example', profile: null }),
      ),
    ).toBeDefined();
    expect((await stored('signer'))[0]?.email_key_version).toBe(1); // still on the application key
  });
});

describe('isolation between tenants on Cloud KMS keys', () => {
  let initech: { name: string; primary?: string };
  let hooli: { name: string };
  let umbrella: { name: string; primary?: string };

  beforeAll(async () => {
    initech = customerGcpKey('initech');
    hooli = customerGcpKey('hooli');
    await db.encryption.tenants.addKey('initech', { kind: 'gcp-kms', keyName: initech.name });
    await db.encryption.tenants.addKey('hooli', { kind: 'gcp-kms', keyName: hooli.name });
    await db.encryption.tenants.addKey('umbrella', { kind: 'customer-key', key: customerKey() });
    umbrella = customerGcpKey('umbrella-gcp');
    await db.encryption.tenants.addKey('umbrella-gcp', { kind: 'gcp-kms', keyName: umbrella.name });
    await save('initech', ['i0', 'i1']);
    await save('hooli', ['h0', 'h1']);
    await save('umbrella', ['u0']);
    await save('vendor-only', ['v0']);
    await save('umbrella-gcp', ['g0', 'g1']);
  });

  it('a wrapped key copied from another tenant’s row is refused without asking Cloud KMS; the whole value copied, by its version', async () => {
    const [from] = await stored('initech');
    const [to] = await stored('hooli');
    if (!from || !to) throw new Error('rows missing');
    await sql(`UPDATE ${table('tenant_contacts')} SET email_wrapped_key = $1 WHERE id = $2`, [
      from.email_wrapped_key,
      to.id,
    ]);
    try {
      db.encryption.purgeCache();
      gcp.resetCalls();
      const error = await rejection(contacts().findOneByOrFail({ id: to.id }));
      expect(error).toBeInstanceOf(IntegrityError);
      expect(error).toMatchObject({ tenant: 'hooli', primaryKey: String(to.id) });
      expect(error.message).toContain(`a version of another key than ${hooli.name}`);
      expect(gcp.callLog.filter((c) => c.operation === 'Decrypt' && c.name === initech.name)).toEqual([]);
    } finally {
      await sql(`UPDATE ${table('tenant_contacts')} SET email_wrapped_key = $1 WHERE id = $2`, [
        to.email_wrapped_key,
        to.id,
      ]);
    }
    await sql(
      `UPDATE ${table('tenant_contacts')} SET email_ciphertext = $1, email_iv = $2, email_wrapped_key = $3, email_key_version = $4 WHERE id = $5`,
      [from.email_ciphertext, from.email_iv, from.email_wrapped_key, from.email_key_version, to.id],
    );
    try {
      db.encryption.purgeCache();
      const error = await rejection(contacts().findOneByOrFail({ id: to.id }));
      expect(error).toBeInstanceOf(IntegrityError);
      expect(error.message).toContain('belongs to another tenant');
    } finally {
      await sql(
        `UPDATE ${table('tenant_contacts')} SET email_ciphertext = $1, email_iv = $2, email_wrapped_key = $3, email_key_version = $4 WHERE id = $5`,
        [to.email_ciphertext, to.email_iv, to.email_wrapped_key, to.email_key_version, to.id],
      );
    }
    db.encryption.purgeCache();
    expect((await contacts().findOneByOrFail({ id: to.id })).email).toBe('h0@hooli.example');
  });

  it('revoked by one customer (IAM binding removed): within the cache its rows still read, after purgeCache(tenant) they fail naming it, and no other tenant notices', async () => {
    db.encryption.purgeCache();
    const everyone = await contacts().find();
    gcp.revoke(initech.name, APP_MEMBER);
    // Cached data keys keep serving for at most unwrappedKeyTtl…
    expect((await contacts().findBy({ workspaceId: 'initech' })).map((c) => c.email).sort()).toEqual([
      'i0@initech.example',
      'i1@initech.example',
    ]);
    // …and stop at once when the application learns of the revocation.
    db.encryption.purgeCache('initech');
    const error = await rejection(contacts().findBy({ workspaceId: 'initech' }));
    expect(error).toBeInstanceOf(KeyAccessDeniedError);
    expect(error).toMatchObject({ tenant: 'initech', keyId: initech.name });
    expect(error.message).toContain('PERMISSION_DENIED');
    expect(error.message).not.toContain('i0@initech');
    const writing = await rejection(save('initech', ['i9']));
    expect(writing).toBeInstanceOf(KeyAccessDeniedError);
    expect((await stored('initech')).length).toBe(2);
    // Every other tenant, cold cache included, reads and writes as before.
    db.encryption.purgeCache('hooli');
    db.encryption.purgeCache('umbrella');
    const others = await contacts().findBy({ workspaceId: Not('initech') });
    expect(others.length).toBe(everyone.filter((c) => c.workspaceId !== 'initech').length);
    await save('hooli', ['h2']);
    await save('umbrella', ['u1']);
    await save('vendor-only', ['v1']);
    gcp.grant(initech.name, APP_MEMBER, ENCRYPTER_DECRYPTER);
    gcp.grant(initech.name, APP_MEMBER, VIEWER);
  });

  it('the customer rotates its key in Cloud KMS: its next key is the new version, the job moves every data key onto it, the old version can be disabled', async () => {
    const before = await stored('umbrella-gcp');
    expect(before.length).toBeGreaterThan(0);
    expect(new Set(before.map((r) => GcpKmsKeyProvider.keyVersionOf(r.email_wrapped_key)))).toEqual(
      new Set([umbrella.primary]),
    );
    const v2 = gcp.rotate(umbrella.name); // a new primary version, by the customer
    const added = await db.encryption.tenants.addKey('umbrella-gcp', { kind: 'gcp-kms', keyName: v2 });
    expect(added.keyReference).toBe(v2);
    expect((await db.encryption.tenants.runJob('umbrella-gcp')).state).toBe('completed');
    const after = await stored('umbrella-gcp');
    for (const [i, row] of before.entries()) {
      expect(after[i]?.email_ciphertext.equals(row.email_ciphertext)).toBe(true);
      expect(after[i]?.email_iv.equals(row.email_iv)).toBe(true);
      expect(after[i]?.email_key_version).toBe(added.version);
      expect(GcpKmsKeyProvider.keyVersionOf(after[i]?.email_wrapped_key as Buffer)).toBe(v2);
    }
    gcp.setVersionState(umbrella.primary as string, 'DISABLED');
    db.encryption.purgeCache('umbrella-gcp');
    expect((await contacts().findBy({ workspaceId: 'umbrella-gcp' })).map((c) => c.email).sort()).toEqual([
      'g0@umbrella-gcp.example',
      'g1@umbrella-gcp.example',
    ]);
    const status = await db.encryption.tenants.status('umbrella-gcp');
    expect(status.activeKeyReference).toBe(v2);
  });

  it('the customer moves to a new key: the job re-wraps its rows under it, and the old key can be disabled', async () => {
    const replacement = gcp.createKey({
      project: 'customer-initech',
      keyRing: 'saas',
      id: 'workspace-data-2025',
    });
    const before = await stored('initech');
    const added = await db.encryption.tenants.addKey('initech', {
      kind: 'gcp-kms',
      keyName: replacement.name,
    });
    expect((await db.encryption.tenants.runJob('initech')).state).toBe('completed');
    const after = await stored('initech');
    for (const [i, row] of before.entries()) {
      expect(after[i]?.email_ciphertext.equals(row.email_ciphertext)).toBe(true);
      expect(after[i]?.email_key_version).toBe(added.version);
      expect(GcpKmsKeyProvider.keyVersionOf(after[i]?.email_wrapped_key as Buffer)).toBe(replacement.primary);
    }
    gcp.setVersionState(initech.primary as string, 'DISABLED');
    db.encryption.purgeCache('initech');
    expect((await contacts().findBy({ workspaceId: 'initech' })).length).toBe(before.length);
  });

  it('offboarding a tenant makes its rows unreadable without any Cloud KMS call; the others read on', async () => {
    await db.encryption.tenants.offboard('hooli');
    gcp.resetCalls();
    const error = await rejection(contacts().findBy({ workspaceId: 'hooli' }));
    expect(error).toBeInstanceOf(TenantOffboardedError);
    expect(gcp.callLog.filter((c) => c.name === hooli.name)).toEqual([]);
    db.encryption.purgeCache();
    expect((await contacts().findBy({ workspaceId: 'umbrella' })).length).toBe(2);
    expect((await contacts().findBy({ workspaceId: 'initech' })).length).toBe(2);
  });
});
