import { inspect } from 'node:util';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  ConfigError,
  EnvelopeEncryption,
  IntegrityError,
  KeyAccessDeniedError,
  KeyProviderError,
  KeyRegistry,
  TenantOffboardedError,
  type VaultAuth,
  type VaultTransitTenantTarget,
} from '../../../../src';
import { rawQuery } from '../../../support/database';
import { TENANT_MIGRATIONS, TenantContact } from '../../../support/tenant-entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../../support/typeorm';
import {
  type AppRoleCredentials,
  startVaultEmulator,
  transitPolicy,
  type VaultEmulator,
} from '../../../support/vault-emulator';

/**
 * Tenants whose keys live in their own Vault Transit (`kind: 'vault-transit'`): each customer
 * created a derived Transit key and an AppRole for the application; the application keeps each
 * tenant's AppRole credentials in its own secret store (here a map) and gives them through
 * `tenantKeys.vaultTransit.auth`. Nothing secret is stored in the tenant registry.
 */
const TENANT = 'typeorm-envelope:tenant';
let vault: VaultEmulator;
let db: EncryptedTestDatabase;
/** The application's secret store: each tenant's AppRole. */
const secretStore = new Map<string, AppRoleCredentials>();
const authCalls: VaultTransitTenantTarget[] = [];

beforeAll(async () => {
  vault = await startVaultEmulator();
  db = await encryptedDatabase([TenantContact], {
    prefix: 'vault_tenants',
    migrations: TENANT_MIGRATIONS,
    encryption: {
      tenantKeys: {
        vaultTransit: {
          auth: (target): VaultAuth => {
            authCalls.push(target);
            const appRole = secretStore.get(target.tenantId);
            if (!appRole) throw new ConfigError(`no Vault credentials for tenant ${target.tenantId}`);
            return { appRole };
          },
          retryDelay: 1,
          maxAttempts: 2,
        },
      },
      cache: { dataKeyMaxUses: 1_000 },
    },
  });
});
afterAll(async () => {
  await db?.close();
  await vault?.close();
});
beforeEach(() => {
  vault.resetCalls();
  vault.failAll(null);
});

const contacts = () => db.dataSource.getRepository(TenantContact);
const table = (name = 'tenant_contacts') => `"${db.schema.schema}".${name}`;
const sql = <T = Record<string, unknown>>(text: string, params?: unknown[]) =>
  rawQuery<T>(db.schema.url, text, params);
const row = async (id: number) =>
  (
    await sql<{
      email_ciphertext: Buffer;
      email_iv: Buffer;
      email_wrapped_key: Buffer;
      email_key_version: number;
    }>(
      `SELECT email_ciphertext, email_iv, email_wrapped_key, email_key_version FROM ${table()} WHERE id = $1`,
      [id],
    )
  )[0];
const save = (tenantId: string, tag: string) =>
  contacts().save(
    contacts().create({ workspaceId: tenantId, email: `${tag}@${tenantId}.example`, profile: null }),
  );

async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (error) {
    return error as Error;
  }
  throw new Error('expected the call to fail');
}

/** A customer's Vault side: a derived key, the least-privilege policy, an AppRole for the application. */
function onboardCustomer(tenantId: string, keyOptions: Parameters<VaultEmulator['createKey']>[1] = {}) {
  const keyName = `${tenantId}-data`;
  vault.createKey(keyName, keyOptions);
  vault.setPolicy(`${tenantId}-app`, transitPolicy(keyName));
  secretStore.set(tenantId, vault.createAppRole(tenantId, { policies: [`${tenantId}-app`] }));
  return { keyName, descriptor: { kind: 'vault-transit' as const, address: vault.address, keyName } };
}

describe('a tenant on its own Vault Transit key', () => {
  it('addKey validates under the tenant context, stores no secret; the job moves old rows under it, data untouched', async () => {
    const old = await save('acme', 'old');
    const oldRow = await row(old.id);
    expect(oldRow?.email_key_version).toBe(1);
    const { keyName, descriptor } = onboardCustomer('acme');
    const added = await db.encryption.tenants.addKey('acme', descriptor);
    expect(added).toMatchObject({
      tenantId: 'acme',
      kind: 'vault-transit',
      state: 'active',
      keyReference: `${vault.address}/v1/transit/keys/${keyName}`,
    });
    expect(authCalls.at(-1)).toEqual({ tenantId: 'acme', address: vault.address, mount: 'transit', keyName });
    // Validation: AppRole login, key checks, a round trip, all under the tenant's context.
    expect(vault.callLog.map((c) => c.operation)).toEqual(['login', 'readKey', 'datakey', 'decrypt']);
    for (const call of vault.callLog.filter((c) => c.context)) expect(call.context?.[TENANT]).toBe('acme');
    expect(vault.callLog.every((c) => c.operation === 'login' || c.displayName === 'approle-acme')).toBe(
      true,
    );

    // The registry holds where the key is, never a credential.
    const [recorded] = await sql<{ descriptor: Record<string, unknown>; key_reference: string }>(
      `SELECT descriptor, key_reference FROM ${table('typeorm_envelope_tenant_keys')} WHERE tenant_id = 'acme'`,
    );
    expect(recorded?.descriptor).toEqual({ address: vault.address, mount: 'transit', keyName });
    const stored = JSON.stringify(await sql(`SELECT * FROM ${table('typeorm_envelope_tenant_keys')}`));
    const credentials = secretStore.get('acme') as AppRoleCredentials;
    for (const secret of [credentials.secretId, credentials.roleId, ...vault.issuedTokens()]) {
      expect(stored).not.toContain(secret);
    }

    const fresh = await save('acme', 'new');
    expect((await row(fresh.id))?.email_key_version).toBe(added.version);
    expect((await row(fresh.id))?.email_wrapped_key.toString()).toMatch(/^vault:v1:/);

    vault.resetCalls();
    const job = await db.encryption.tenants.runJob('acme');
    expect(job.state).toBe('completed');
    // The old row's data key moved from the application key into the tenant's Vault: an encrypt.
    expect(vault.calls.encrypt).toBe(1);
    expect(vault.callLog.find((c) => c.operation === 'encrypt')?.context).toEqual({
      'typeorm-envelope:keyring': 'default',
      [TENANT]: 'acme',
    });
    const moved = await row(old.id);
    expect(moved?.email_ciphertext).toEqual(oldRow?.email_ciphertext);
    expect(moved?.email_iv).toEqual(oldRow?.email_iv);
    expect(moved?.email_key_version).toBe(added.version);
    expect(moved?.email_wrapped_key.toString()).toMatch(/^vault:v1:/);

    db.encryption.purgeCache('acme');
    const all = await contacts().find({ where: { workspaceId: 'acme' }, order: { id: 'ASC' } });
    expect(all.map((c) => c.email)).toEqual(['old@acme.example', 'new@acme.example']);
    expect((await db.encryption.tenants.status('acme')).activeKeyReference).toBe(added.keyReference);
  });

  it('refuses another tenant’s key before calling Vault, and a key that is not derived by its check', async () => {
    const victim = onboardCustomer('victim');
    await db.encryption.tenants.addKey('victim', victim.descriptor);
    secretStore.set('mallory', secretStore.get('victim') as AppRoleCredentials);
    vault.resetCalls();
    const shared = await rejection(db.encryption.tenants.addKey('mallory', victim.descriptor));
    expect(shared).toBeInstanceOf(ConfigError);
    expect(shared.message).toContain('already registered for another tenant');
    expect(vault.callLog).toEqual([]);

    const plain = onboardCustomer('plainco', { derived: false });
    const error = await rejection(db.encryption.tenants.addKey('plainco', plain.descriptor));
    expect(error).toBeInstanceOf(KeyProviderError);
    expect((error as KeyProviderError).detail).toMatch(
      /^key is not derived; a key created with derived=true is required/,
    );
    expect(error).toMatchObject({
      tenant: 'plainco',
      keyId: `${vault.address}/v1/transit/keys/${plain.keyName}`,
    });
    expect((await db.encryption.tenants.status('plainco')).keys).toEqual([]);
    const entries = await new KeyRegistry(db.dataSource, db.encryption).auditLog({ tenant: 'plainco' });
    const failed = entries.find((e) => e.event === 'tenant-key-validation-failed');
    expect(JSON.stringify(failed)).toContain('key is not derived');
    for (const secret of [
      ...vault.issuedTokens(),
      (secretStore.get('plainco') as AppRoleCredentials).secretId,
    ]) {
      expect(JSON.stringify(entries)).not.toContain(secret);
      expect(inspect(error, { showHidden: true, depth: 5 })).not.toContain(secret);
    }
    // Nothing changed for the tenant: its writes stay under the application key.
    expect((await row((await save('plainco', 'x')).id))?.email_key_version).toBe(1);
  });

  it('a value copied into another Vault tenant’s row does not decrypt there', async () => {
    const a = onboardCustomer('iso-a');
    const b = onboardCustomer('iso-b');
    await db.encryption.tenants.addKey('iso-a', a.descriptor);
    await db.encryption.tenants.addKey('iso-b', b.descriptor);
    const ofA = await save('iso-a', 'secret');
    const ofB = await save('iso-b', 'mine');
    const stolen = await row(ofA.id);
    await sql(
      `UPDATE ${table()} SET email_ciphertext = $1, email_iv = $2, email_wrapped_key = $3, email_key_version = $4 WHERE id = $5`,
      [
        stolen?.email_ciphertext,
        stolen?.email_iv,
        stolen?.email_wrapped_key,
        stolen?.email_key_version,
        ofB.id,
      ],
    );
    db.encryption.purgeCache();
    const error = await rejection(contacts().findOneByOrFail({ id: ofB.id }));
    expect(error).toBeInstanceOf(IntegrityError);
    expect(error).toMatchObject({ tenant: 'iso-b', entity: 'TenantContact' });
    expect(error.message).not.toContain('secret@iso-a');
    // The same wrapped key under B's own key version: Transit refuses it under B's key and context.
    const [bVersion] = await sql<{ v: number }>(
      `SELECT version AS v FROM ${table('typeorm_envelope_tenant_keys')} WHERE tenant_id = 'iso-b'`,
    );
    await sql(`UPDATE ${table()} SET email_key_version = $1 WHERE id = $2`, [bVersion?.v, ofB.id]);
    db.encryption.purgeCache();
    vault.resetCalls();
    const underB = await rejection(contacts().findOneByOrFail({ id: ofB.id }));
    expect(underB).toBeInstanceOf(IntegrityError);
    expect(underB.message).toContain('message authentication failed');
    expect(vault.callLog.find((c) => c.operation === 'decrypt')).toMatchObject({
      keyName: b.keyName,
      context: { [TENANT]: 'iso-b' },
      status: 400,
    });
  });

  it('a customer revoking the application’s policy: cached reads go on, then that tenant fails closed and the others do not', async () => {
    const r = onboardCustomer('revoker');
    const k = onboardCustomer('keeper');
    await db.encryption.tenants.addKey('revoker', r.descriptor);
    await db.encryption.tenants.addKey('keeper', k.descriptor);
    const mine = await save('revoker', 'r');
    const theirs = await save('keeper', 'k');
    await contacts().findOneByOrFail({ id: mine.id }); // cached
    vault.deletePolicy('revoker-app');
    expect((await contacts().findOneByOrFail({ id: mine.id })).email).toBe('r@revoker.example');
    db.encryption.purgeCache('revoker');
    const error = await rejection(contacts().findOneByOrFail({ id: mine.id }));
    expect(error).toBeInstanceOf(KeyAccessDeniedError);
    expect(error).toMatchObject({ tenant: 'revoker' });
    expect(error.message).toContain('Vault denied decrypt');
    const before = (await sql<{ n: number }>(`SELECT count(*)::int AS n FROM ${table()}`))[0]?.n;
    expect(await rejection(save('revoker', 'r2'))).toBeInstanceOf(KeyAccessDeniedError);
    expect((await sql<{ n: number }>(`SELECT count(*)::int AS n FROM ${table()}`))[0]?.n).toBe(before);
    db.encryption.purgeCache();
    expect((await contacts().findOneByOrFail({ id: theirs.id })).email).toBe('k@keeper.example');
  });

  it('an offboarded Vault tenant’s rows fail with TenantOffboardedError without asking Vault', async () => {
    const g = onboardCustomer('goneco');
    await db.encryption.tenants.addKey('goneco', g.descriptor);
    const saved = await save('goneco', 'bye');
    await db.encryption.tenants.offboard('goneco');
    db.encryption.purgeCache();
    vault.resetCalls();
    const error = await rejection(contacts().findOneByOrFail({ id: saved.id }));
    expect(error).toBeInstanceOf(TenantOffboardedError);
    expect(vault.callLog).toEqual([]);
  });
});

describe('tenantKeys.vaultTransit options', () => {
  it('one auth for every tenant needs the addresses tenants may name; an address outside them is refused before any call', async () => {
    expect(
      () =>
        new EnvelopeEncryption({
          keys: db.encryption.keyring.versions.map((version) => ({
            version,
            provider: db.encryption.keyring.provider(version),
          })),
          activeVersion: 1,
          tenantKeys: { vaultTransit: { auth: { token: vault.rootToken } } },
        }),
    ).toThrow(/addresses is required when auth is one value for every tenant/);

    const other = await encryptedDatabase([TenantContact], {
      prefix: 'vault_tenants_allow',
      migrations: TENANT_MIGRATIONS,
      encryption: {
        tenantKeys: {
          vaultTransit: { auth: { token: vault.rootToken }, addresses: ['https://vault.internal:8200'] },
        },
      },
    });
    try {
      vault.resetCalls();
      const error = await rejection(
        other.encryption.tenants.addKey('outsider', {
          kind: 'vault-transit',
          address: vault.address,
          keyName: 'any',
        }),
      );
      expect(error).toBeInstanceOf(ConfigError);
      expect(error.message).toContain(
        `the Vault address ${vault.address} is not in tenantKeys.vaultTransit.addresses`,
      );
      expect(vault.callLog).toEqual([]);
    } finally {
      await other.close();
    }
  });

  it('without the option, a vault-transit key is refused saying which option to set', async () => {
    const plain = await encryptedDatabase([TenantContact], {
      prefix: 'vault_tenants_none',
      migrations: TENANT_MIGRATIONS,
    });
    try {
      const error = await rejection(
        plain.encryption.tenants.addKey('t', { kind: 'vault-transit', address: vault.address, keyName: 'k' }),
      );
      expect(error).toBeInstanceOf(ConfigError);
      expect(error.message).toContain('vault-transit tenant keys need the tenantKeys.vaultTransit option');
    } finally {
      await plain.close();
    }
  });

  it('refuses a malformed descriptor by its field', async () => {
    for (const [descriptor, message] of [
      [{ address: 'not a url', keyName: 'k' }, /address is not a URL/],
      [{ address: vault.address, keyName: 'a/b' }, /needs keyName/],
      [{ address: vault.address, keyName: 'k', mount: '../sys' }, /mount must be a path/],
      [{ address: `${vault.address}/v1`, keyName: 'k' }, /origin only/],
    ] as const) {
      const error = await rejection(
        db.encryption.tenants.addKey('malformed', { kind: 'vault-transit', ...descriptor }),
      );
      expect(error).toBeInstanceOf(ConfigError);
      expect(error.message).toMatch(message);
    }
  });
});
