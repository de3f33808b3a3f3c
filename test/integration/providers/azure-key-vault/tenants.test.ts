import { KeyClient } from '@azure/keyvault-keys';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  AzureKeyVaultKeyProvider,
  ConfigError,
  IntegrityError,
  KeyAccessDeniedError,
  KeyProviderError,
  KeyRegistry,
  TenantOffboardedError,
} from '../../../../src';
import {
  type AzureKeyVaultEmulator,
  type EmulatedKey,
  startAzureKeyVaultEmulator,
  testCredential,
} from '../../../support/azure-key-vault-emulator';
import { rawQuery } from '../../../support/database';
import { TENANT_MIGRATIONS, TenantContact } from '../../../support/tenant-entities';
import { customerKey, expectNoneOf, rejection } from '../../../support/tenant-fixtures';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../../support/typeorm';

/**
 * Tenants whose keys are in their own Azure Key Vaults (each vault in its own Entra tenant), next
 * to a tenant with a customer-provided key and tenants on the application's key, itself in the
 * application's own Key Vault. One application identity reaches every vault; each customer grants
 * it `Key Vault Crypto Service Encryption User` on its key only.
 */
const ROLE = 'Key Vault Crypto Service Encryption User';
const app = testCredential('saas-app');
const officer = testCredential('customer-admin');
let vendorVault: AzureKeyVaultEmulator;
let acmeVault: AzureKeyVaultEmulator;
let globexVault: AzureKeyVaultEmulator;
let acmeKey: EmulatedKey;
let globexKey: EmulatedKey;
let db: EncryptedTestDatabase;

const clientOptions = { allowInsecureConnection: true, disableChallengeResourceVerification: true };
const retryOptions = { maxRetries: 2, retryDelayInMs: 5 };

beforeAll(async () => {
  [vendorVault, acmeVault, globexVault] = await Promise.all([
    startAzureKeyVaultEmulator(),
    startAzureKeyVaultEmulator(),
    startAzureKeyVaultEmulator(),
  ]);
  const vendorKey = await vendorVault.createKey('vendor');
  vendorVault.grant('saas-app', ROLE, { key: 'vendor' });
  acmeKey = await acmeVault.createKey('acme-data');
  acmeVault.grant('saas-app', ROLE, { key: 'acme-data' });
  acmeVault.grant('customer-admin', 'Key Vault Crypto Officer');
  globexKey = await globexVault.createKey('globex-data');
  globexVault.grant('saas-app', ROLE, { key: 'globex-data' });
  db = await encryptedDatabase([TenantContact], {
    prefix: 'akv_tenants',
    migrations: TENANT_MIGRATIONS,
    encryption: {
      keys: [
        {
          version: 1,
          provider: new AzureKeyVaultKeyProvider({
            keyId: vendorKey.kid,
            credential: app,
            clientOptions,
            retryOptions,
          }),
        },
      ],
      activeVersion: 1,
      tenantKeys: { azureKeyVault: { credential: app, clientOptions, retryOptions } },
    },
  });
});
afterAll(async () => {
  await db?.close();
  await Promise.all([vendorVault?.close(), acmeVault?.close(), globexVault?.close()]);
});

const contacts = () => db.dataSource.getRepository(TenantContact);
const table = (name: string) => `"${db.schema.schema}".${name}`;
const sql = <T = Record<string, unknown>>(text: string, params?: unknown[]) =>
  rawQuery<T>(db.schema.url, text, params);
const save = (tenantId: string, tag: string) =>
  contacts().save(
    contacts().create({ workspaceId: tenantId, email: `${tag}@${tenantId}.example`, profile: null }),
  );
const stored = async (id: number) =>
  (
    await sql<{
      email_ciphertext: Buffer;
      email_iv: Buffer;
      email_wrapped_key: Buffer;
      email_key_version: number;
    }>(
      `SELECT email_ciphertext, email_iv, email_wrapped_key, email_key_version FROM ${table('tenant_contacts')} WHERE id = $1`,
      [id],
    )
  )[0] as {
    email_ciphertext: Buffer;
    email_iv: Buffer;
    email_wrapped_key: Buffer;
    email_key_version: number;
  };
const versionIn = (wrapped: Buffer) => wrapped.subarray(3, 3 + (wrapped[2] as number)).toString('ascii');
const keyRecords = (tenantId: string) =>
  sql<{ version: number; provider_kind: string; key_reference: string; descriptor: unknown; state: string }>(
    `SELECT version, provider_kind, key_reference, descriptor, state FROM ${table('typeorm_envelope_tenant_keys')} WHERE tenant_id = $1 ORDER BY version`,
    [tenantId],
  );

describe('addKey with a key in the customer’s Key Vault', () => {
  it('a version-less key id: resolved and stored as the versioned id, without any secret; existing rows move under it; calls go to the customer’s vault, for its tenant', async () => {
    const early = await save('acme', 'before');
    expect((await stored(early.id)).email_key_version).toBe(1);
    acmeVault.resetCalls();
    const added = await db.encryption.tenants.addKey('acme', {
      kind: 'azure-key-vault',
      keyId: acmeVault.kid('acme-data'),
    });
    expect(added).toMatchObject({
      tenantId: 'acme',
      kind: 'azure-key-vault',
      keyReference: acmeKey.kid,
      state: 'active',
    });
    expect(added.version).toBeGreaterThanOrEqual(1_000_000);
    expect(await keyRecords('acme')).toEqual([
      {
        version: added.version,
        provider_kind: 'azure-key-vault',
        key_reference: acmeKey.kid,
        descriptor: { keyId: acmeKey.kid },
        state: 'active',
      },
    ]);
    expectNoneOf(app.tokens, JSON.stringify(await keyRecords('acme')));
    // One GET to resolve the version, then validation (GET, round trip) under the tenant's context.
    expect(acmeVault.callLog.map((c) => [c.operation, c.version])).toEqual([
      ['get', ''],
      ['get', acmeKey.version],
      ['get', acmeKey.version],
      ['wrapkey', acmeKey.version],
      ['unwrapkey', acmeKey.version],
    ]);

    const job = await db.encryption.tenants.runJob('acme');
    expect(job.state).toBe('completed');
    const moved = await stored(early.id);
    expect(moved.email_key_version).toBe(added.version);
    expect(versionIn(moved.email_wrapped_key)).toBe(acmeKey.version);
    const fresh = await save('acme', 'after');
    expect((await stored(fresh.id)).email_key_version).toBe(added.version);
    db.encryption.purgeCache('acme');
    expect((await contacts().findOneByOrFail({ id: early.id })).email).toBe('before@acme.example');

    expect(acmeVault.callLog.every((c) => c.principal === 'saas-app')).toBe(true);
    const acmeTokens = app.requests.filter((r) => r.tenantId === acmeVault.tenantId);
    expect(acmeTokens.length).toBeGreaterThan(0);
    expect((await db.encryption.tenants.status('acme')).activeKeyReference).toBe(acmeKey.kid);
  });

  it('a second tenant in another vault and Entra tenant', async () => {
    const added = await db.encryption.tenants.addKey('globex', {
      kind: 'azure-key-vault',
      keyId: globexKey.kid,
    });
    expect(added.keyReference).toBe(globexKey.kid);
    const row = await save('globex', 'g1');
    expect((await stored(row.id)).email_key_version).toBe(added.version);
    expect(app.requests.some((r) => r.tenantId === globexVault.tenantId)).toBe(true);
  });

  it('refuses what a customer should not be able to hand over, naming the failed check, and records nothing', async () => {
    const cases: Array<[string, () => Promise<string>, new (...a: never[]) => Error, RegExp]> = [
      [
        'an RSA key of 2048 bits',
        async () => {
          const small = await acmeVault.createKey('small', { size: 2048 });
          acmeVault.grant('saas-app', ROLE, { key: 'small' });
          return small.kid;
        },
        KeyProviderError,
        /key check "key type and size" failed: the key is RSA of 2048 bits/,
      ],
      [
        'a key on which the customer granted nothing',
        async () => (await globexVault.createKey('ungranted')).kid,
        KeyAccessDeniedError,
        /ForbiddenByRbac/,
      ],
      [
        'a disabled key',
        async () => {
          const off = await globexVault.createKey('off', { enabled: false });
          globexVault.grant('saas-app', ROLE, { key: 'off' });
          return off.kid;
        },
        KeyAccessDeniedError,
        /key check "enabled" failed/,
      ],
    ];
    for (const [label, make, Class, message] of cases) {
      const tenantId = `refused-${cases.findIndex((c) => c[0] === label)}`;
      const keyId = await make();
      const error = await rejection(
        db.encryption.tenants.addKey(tenantId, { kind: 'azure-key-vault', keyId }),
      );
      expect(error, label).toBeInstanceOf(Class);
      expect(error.message, label).toMatch(message);
      expect(error, label).toMatchObject({ tenant: tenantId });
      expect(await keyRecords(tenantId), label).toEqual([]);
      const audit = await new KeyRegistry(db.dataSource, db.encryption).auditLog({ tenant: tenantId });
      expect(audit.map((e) => e.event)).toContain('tenant-key-validation-failed');
    }
    const malformed = await rejection(
      db.encryption.tenants.addKey('refused-x', {
        kind: 'azure-key-vault',
        keyId: 'https://v.vault.azure.net/secrets/s',
      }),
    );
    expect(malformed).toBeInstanceOf(ConfigError);
    const withSecret = await rejection(
      db.encryption.tenants.addKey('refused-y', {
        kind: 'azure-key-vault',
        keyId: acmeKey.kid,
        clientSecret: 'x',
      }),
    );
    expect(withSecret).toBeInstanceOf(ConfigError);
    expect(withSecret.message).toContain('takes only keyId, not clientSecret');
  });

  it('another tenant’s key is refused before it wraps anything, versioned or not', async () => {
    for (const keyId of [acmeKey.kid, acmeVault.kid('acme-data')]) {
      acmeVault.resetCalls();
      const error = await rejection(
        db.encryption.tenants.addKey('mallory', { kind: 'azure-key-vault', keyId }),
      );
      expect(error).toBeInstanceOf(ConfigError);
      expect(error.message).toContain('already registered for another tenant');
      expect(acmeVault.calls.wrapkey + acmeVault.calls.unwrapkey).toBe(0);
    }
    expect(await keyRecords('mallory')).toEqual([]);
  });
});

describe('isolation', () => {
  it('a row’s wrapped key copied into another tenant’s row on the same (application) key does not open there', async () => {
    const initech = await save('initech', 'i1');
    const hooli = await save('hooli', 'h1');
    const from = await stored(initech.id);
    expect((await stored(hooli.id)).email_key_version).toBe(1);
    await sql(`UPDATE ${table('tenant_contacts')} SET email_wrapped_key = $1 WHERE id = $2`, [
      from.email_wrapped_key,
      hooli.id,
    ]);
    db.encryption.purgeCache();
    vendorVault.resetCalls();
    const error = await rejection(contacts().findOneByOrFail({ id: hooli.id }));
    expect(error).toBeInstanceOf(IntegrityError);
    expect(error).toMatchObject({ tenant: 'hooli', entity: 'TenantContact' });
    expect(error.message).toContain('the data key was wrapped for another keyring or tenant');
    expect(vendorVault.calls.unwrapkey).toBe(1); // Key Vault unwrapped it; the digest of the context refused it
    expect((await contacts().findOneByOrFail({ id: initech.id })).email).toBe('i1@initech.example');
  });

  it('a customer removing the role assignment: its rows fail once purged (at once, by purgeCache), the others do not notice', async () => {
    await db.encryption.tenants.addKey('umbrella', { kind: 'customer-key', key: customerKey() });
    const rows = {
      acme: await save('acme', 'a2'),
      globex: await save('globex', 'g2'),
      umbrella: await save('umbrella', 'u1'),
      initech: await save('initech', 'i2'),
    };
    acmeVault.removeRoleAssignment('saas-app', { key: 'acme-data' });
    try {
      // Within the cache's TTL the cached key still serves: Key Vault is not asked.
      expect((await contacts().findOneByOrFail({ id: rows.acme.id })).email).toBe('a2@acme.example');
      db.encryption.purgeCache('acme');
      const error = await rejection(contacts().findOneByOrFail({ id: rows.acme.id }));
      expect(error).toBeInstanceOf(KeyAccessDeniedError);
      expect(error).toMatchObject({ tenant: 'acme', keyId: acmeKey.kid });
      expect(error.message).toContain('ForbiddenByRbac');
      await expect(save('acme', 'a3')).rejects.toBeInstanceOf(KeyAccessDeniedError);
      for (const [tenantId, row] of Object.entries(rows).filter(([t]) => t !== 'acme')) {
        db.encryption.purgeCache(tenantId);
        expect((await contacts().findOneByOrFail({ id: row.id })).email).toBe(`${row.email}`);
      }
    } finally {
      acmeVault.grant('saas-app', ROLE, { key: 'acme-data' });
    }
    db.encryption.purgeCache('acme');
    expect((await contacts().findOneByOrFail({ id: rows.acme.id })).email).toBe('a2@acme.example');
  });
});

describe('rotation of a tenant’s key in its Key Vault', () => {
  it('the customer rotates; the new version is added as the tenant’s next key and its rows re-wrapped, data untouched; the old version can then be disabled', async () => {
    const acmeIds = (await contacts().find({ where: { workspaceId: 'acme' }, order: { id: 'ASC' } })).map(
      (c) => c.id,
    );
    const before = await Promise.all(acmeIds.map(stored));
    const rotated = await new KeyClient(acmeVault.vaultUrl, officer, clientOptions).rotateKey('acme-data');
    const added = await db.encryption.tenants.addKey('acme', {
      kind: 'azure-key-vault',
      keyId: acmeVault.kid('acme-data'),
    });
    expect(added.keyReference).toBe(rotated.id);
    expect(added.job?.kind).toBe('rotation');
    expect((await db.encryption.tenants.runJob('acme')).state).toBe('completed');
    const after = await Promise.all(acmeIds.map(stored));
    for (const [i, row] of before.entries()) {
      const now = after[i] as typeof row;
      expect(now.email_ciphertext).toEqual(row.email_ciphertext);
      expect(now.email_iv).toEqual(row.email_iv);
      expect(now.email_wrapped_key).not.toEqual(row.email_wrapped_key);
      expect(now.email_key_version).toBe(added.version);
      expect(versionIn(now.email_wrapped_key)).toBe(rotated.properties.version);
    }
    acmeVault.setEnabled(acmeKey.kid, false);
    db.encryption.purgeCache('acme');
    const loaded = await contacts().find({ where: { workspaceId: 'acme' }, order: { id: 'ASC' } });
    expect(loaded.map((c) => c.id)).toEqual(acmeIds);
    expect(loaded.every((c) => c.email.endsWith('@acme.example'))).toBe(true);
  });

  it('a version of another tenant’s key that no tenant registered yet is still that tenant’s key: refused', async () => {
    const next = await new KeyClient(acmeVault.vaultUrl, officer, clientOptions).rotateKey('acme-data');
    acmeVault.resetCalls();
    const error = await rejection(
      db.encryption.tenants.addKey('mallory', { kind: 'azure-key-vault', keyId: next.id as string }),
    );
    expect(error).toBeInstanceOf(ConfigError);
    expect(error.message).toContain('already registered for another tenant');
    expect(acmeVault.calls.wrapkey + acmeVault.calls.unwrapkey).toBe(0);
    expect(await keyRecords('mallory')).toEqual([]);
  });
});

describe('offboarding', () => {
  it('erases the descriptor; the tenant’s rows are refused with TenantOffboardedError', async () => {
    const row = await save('globex', 'g3');
    const result = await db.encryption.tenants.offboard('globex');
    expect(result.keysDestroyed).toBeGreaterThan(0);
    const records = await keyRecords('globex');
    expect(records.every((r) => r.state === 'destroyed')).toBe(true);
    expect(JSON.stringify(records.map((r) => r.descriptor))).not.toContain(globexKey.kid);
    await expect(contacts().findOneByOrFail({ id: row.id })).rejects.toBeInstanceOf(TenantOffboardedError);
  });
});
