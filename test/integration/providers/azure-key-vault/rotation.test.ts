import 'reflect-metadata';
import { randomBytes } from 'node:crypto';
import { KeyClient } from '@azure/keyvault-keys';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TypeormEnvelopeKeyRegistry1764300000000 } from '../../../../migrations/1764300000000-TypeormEnvelopeKeyRegistry';
import {
  AzureKeyVaultKeyProvider,
  ConfigError,
  EnvelopeEncryption,
  KeyAccessDeniedError,
  KeyRegistry,
  type KeyringEntry,
  LocalKeyProvider,
  rewrapDataKeys,
} from '../../../../src';
import {
  type AzureKeyVaultEmulator,
  startAzureKeyVaultEmulator,
  testCredential,
} from '../../../support/azure-key-vault-emulator';
import { createTestSchema, rawQuery, type TestSchema } from '../../../support/database';
import { Customer, Order } from '../../../support/entities';

/**
 * Rotation with the data untouched: to the key's next version in Key Vault, from a
 * customer-provided key into Key Vault, and from one Key Vault key to another (in another vault of
 * another Entra tenant). Each instance is a fresh `EnvelopeEncryption`, as after a restart with a
 * new keyring configuration.
 */
const app = testCredential('app');
const officer = testCredential('officer');
let vault: AzureKeyVaultEmulator;
let otherVault: AzureKeyVaultEmulator;
const opened: DataSource[] = [];
const schemas: TestSchema[] = [];

beforeAll(async () => {
  vault = await startAzureKeyVaultEmulator();
  otherVault = await startAzureKeyVaultEmulator();
  for (const v of [vault, otherVault]) {
    v.grant('app');
    v.grant('officer', 'Key Vault Crypto Officer');
  }
});
afterAll(async () => {
  for (const dataSource of opened) if (dataSource.isInitialized) await dataSource.destroy();
  for (const schema of schemas) await schema.drop();
  await vault?.close();
  await otherVault?.close();
});

const azure = (keyId: string) =>
  new AzureKeyVaultKeyProvider({
    keyId,
    credential: app,
    clientOptions: { allowInsecureConnection: true, disableChallengeResourceVerification: true },
    retryOptions: { maxRetries: 2, retryDelayInMs: 5 },
  });

/** An application instance on `schema` with these keys, initialized (validated, registry read). */
async function instance(schema: TestSchema, keys: KeyringEntry[], activeVersion: number, registry = false) {
  const encryption = new EnvelopeEncryption({ keys, activeVersion, cache: { dataKeyMaxUses: 25 } });
  const dataSource = new DataSource({
    type: 'postgres',
    url: schema.url,
    schema: schema.schema,
    entities: [Customer, Order],
    synchronize: true,
    migrations: registry ? [TypeormEnvelopeKeyRegistry1764300000000] : [],
    migrationsRun: registry,
  });
  encryption.attach(dataSource);
  await dataSource.initialize();
  opened.push(dataSource);
  return { encryption, dataSource, repo: dataSource.getRepository(Customer) };
}

async function newSchema(label: string): Promise<TestSchema> {
  const schema = await createTestSchema(label);
  schemas.push(schema);
  return schema;
}

type Row = Record<string, Buffer | number | string | null>;
const snapshot = (schema: TestSchema) =>
  rawQuery<Row>(schema.url, `SELECT * FROM "${schema.schema}".customer ORDER BY id`);

/** Every column but the wrapped keys and key versions is byte for byte what it was; those changed. */
function expectDataUntouched(before: Row[], after: Row[], toVersion: number) {
  expect(after).toHaveLength(before.length);
  for (const [i, row] of before.entries()) {
    const now = after[i] as Row;
    for (const column of Object.keys(row)) {
      if (column.endsWith('_wrapped_key') || column.endsWith('_key_version')) continue;
      expect(now[column], column).toEqual(row[column]);
    }
    expect(now.email_key_version).toBe(toVersion);
    expect(now.email_wrapped_key).not.toEqual(row.email_wrapped_key);
  }
}

async function saveCustomers(repo: ReturnType<DataSource['getRepository']>, n: number, tag: string) {
  await repo.save(
    Array.from({ length: n }, (_, i) =>
      repo.create({
        email: `${tag}${i}@example.com`,
        plan: tag,
        address: i % 2 ? { street: `${i} Rotation Way`, city: 'Keyville' } : null,
        contact: { phone: i % 3 ? '+1 555 0100' : null, preferredChannel: null },
      }),
    ),
  );
}
const versionIn = (wrapped: Buffer) => wrapped.subarray(3, 3 + (wrapped[2] as number)).toString('ascii');

describe('to the key’s next version in Key Vault', () => {
  it('a new key version, a new keyring version, rewrapDataKeys: data untouched, every wrapped key under the new version, the old version can be disabled', async () => {
    const schema = await newSchema('akv_rotate_version');
    const first = await vault.createKey('app-data');
    const versionLess = vault.kid('app-data');

    // Day 1: the key id without its version; the registry records the version it resolved to.
    const day1 = await instance(schema, [{ version: 1, provider: azure(versionLess) }], 1, true);
    const registry1 = new KeyRegistry(day1.dataSource, day1.encryption);
    expect((await registry1.sync()).map((r) => [r.version, r.keyReference])).toEqual([[1, first.kid]]);
    await saveCustomers(day1.repo, 60, 'rot');
    const before = await snapshot(schema);
    expect(new Set(before.map((r) => versionIn(r.email_wrapped_key as Buffer)))).toEqual(
      new Set([first.version]),
    );

    // The customer rotates the key in Key Vault (the real KeyClient, as a Crypto Officer).
    const officerClient = new KeyClient(vault.vaultUrl, officer, vault.clientOptions());
    const rotated = await officerClient.rotateKey('app-data');
    const second = rotated.properties.version as string;
    expect(second).not.toBe(first.version);

    // The next start-up: the same version-less id still means the recorded version for keyring
    // version 1; keyring version 2 takes the key's current version.
    const day2 = await instance(
      schema,
      [
        { version: 1, provider: azure(versionLess) },
        { version: 2, provider: azure(versionLess) },
      ],
      1,
      true,
    );
    const registry2 = new KeyRegistry(day2.dataSource, day2.encryption);
    await registry2.activate(2);
    expect((await registry2.list()).map((r) => [r.version, r.keyReference, r.state])).toEqual([
      [1, first.kid, 'decrypt-only'],
      [2, rotated.id, 'active'],
    ]);
    vault.resetCalls();
    const result = await rewrapDataKeys(day2.dataSource, day2.encryption, { entities: [Customer] });
    expect(result.error).toBeUndefined();
    expect(result.properties.find((p) => p.property === 'email')).toMatchObject({
      rowsTotal: 60,
      rowsRewrapped: 60,
    });
    const after = await snapshot(schema);
    expectDataUntouched(before, after, 2);
    expect(new Set(after.map((r) => versionIn(r.email_wrapped_key as Buffer)))).toEqual(new Set([second]));
    // Unwraps went to the first version, wraps to the second: no server-side re-wrap exists.
    const crypto = vault.callLog.filter((c) => c.operation === 'wrapkey' || c.operation === 'unwrapkey');
    expect(new Set(crypto.filter((c) => c.operation === 'unwrapkey').map((c) => c.version))).toContain(
      first.version,
    );
    expect(new Set(crypto.filter((c) => c.operation === 'wrapkey').map((c) => c.version))).toEqual(
      new Set([second]),
    );

    // The customer disables the old version; a fresh instance with only version 2 reads everything.
    vault.setEnabled(first.kid, false);
    vault.resetCalls();
    const day3 = await instance(schema, [{ version: 2, provider: azure(rotated.id as string) }], 2, true);
    const loaded = await day3.repo.find({ order: { id: 'ASC' } });
    expect(loaded.map((c) => c.email)).toEqual(before.map((_, i) => `rot${i}@example.com`));
    expect(vault.callLog.every((c) => c.version !== first.version)).toBe(true);
  });

  it('the wrong key version for a recorded keyring version is refused at start-up, naming both', async () => {
    const schema = await newSchema('akv_wrong_version');
    const first = await vault.createKey('pinned');
    const day1 = await instance(schema, [{ version: 1, provider: azure(first.kid) }], 1, true);
    await new KeyRegistry(day1.dataSource, day1.encryption).sync();
    await saveCustomers(day1.repo, 3, 'pin');
    const next = await vault.rotateKey('pinned');

    const error = await instance(schema, [{ version: 1, provider: azure(next.kid) }], 1, true).catch(
      (e: unknown) => e,
    );
    expect(error).toBeInstanceOf(ConfigError);
    expect(String(error)).toContain(
      `the master key configured for version 1 (${next.kid}) is not the one the key registry recorded for that version (${first.kid})`,
    );
  });
});

describe('from a customer-provided key into Key Vault', () => {
  it('rewrapDataKeys moves every data key under the Key Vault key; data untouched; the customer key is no longer needed', async () => {
    const schema = await newSchema('akv_from_local');
    const customerKey = new LocalKeyProvider({ key: randomBytes(32).toString('base64') });
    const target = await vault.createKey('from-local');
    const start = await instance(
      schema,
      [
        { version: 1, provider: customerKey },
        { version: 2, provider: azure(target.kid) },
      ],
      1,
    );
    await saveCustomers(start.repo, 60, 'loc');
    const before = await snapshot(schema);
    expect(before.every((r) => r.email_key_version === 1)).toBe(true);
    await start.encryption.activate(2);
    vault.resetCalls();
    const result = await rewrapDataKeys(start.dataSource, start.encryption, { entities: [Customer] });
    expect(result.error).toBeUndefined();
    const after = await snapshot(schema);
    expectDataUntouched(before, after, 2);
    expect(after.every((r) => versionIn(r.email_wrapped_key as Buffer) === target.version)).toBe(true);
    expect(vault.calls.unwrapkey).toBeGreaterThan(0); // each new wrap checked before it is written

    const azureOnly = await instance(schema, [{ version: 2, provider: azure(target.kid) }], 2);
    const loaded = await azureOnly.repo.find({ order: { id: 'ASC' } });
    expect(loaded.map((c) => c.email)).toEqual(before.map((_, i) => `loc${i}@example.com`));

    // Now the Key Vault key alone decides: without its role assignment nothing opens.
    vault.removeRoleAssignment('app');
    try {
      azureOnly.encryption.purgeCache();
      await expect(azureOnly.repo.find()).rejects.toBeInstanceOf(KeyAccessDeniedError);
    } finally {
      vault.grant('app');
    }
  });
});

describe('from one Key Vault key to another', () => {
  it('into a key in another vault (another Entra tenant): data untouched; the old key can be revoked', async () => {
    const schema = await newSchema('akv_to_other');
    const source = await vault.createKey('source');
    const destination = await otherVault.createKey('destination');
    const start = await instance(
      schema,
      [
        { version: 1, provider: azure(source.kid) },
        { version: 2, provider: azure(destination.kid) },
      ],
      1,
    );
    await saveCustomers(start.repo, 60, 'mv');
    const before = await snapshot(schema);
    await start.encryption.activate(2);
    const result = await rewrapDataKeys(start.dataSource, start.encryption, { entities: [Customer] });
    expect(result.error).toBeUndefined();
    const after = await snapshot(schema);
    expectDataUntouched(before, after, 2);
    expect(after.every((r) => versionIn(r.email_wrapped_key as Buffer) === destination.version)).toBe(true);
    // Tokens for each vault were asked for that vault's tenant.
    const tenants = new Set(app.requests.map((r) => r.tenantId));
    expect([...tenants]).toEqual(expect.arrayContaining([vault.tenantId, otherVault.tenantId]));

    // The old key's role is removed: a fresh instance reads everything without calling it.
    vault.removeRoleAssignment('app');
    try {
      vault.resetCalls();
      const later = await instance(
        schema,
        [
          { version: 1, provider: azure(source.kid) },
          { version: 2, provider: azure(destination.kid) },
        ],
        2,
      ).catch((e: unknown) => e);
      // Version 1 no longer validates (its role is gone), so the operator drops it from the keyring.
      expect(later).toBeInstanceOf(KeyAccessDeniedError);
      const only = await instance(schema, [{ version: 2, provider: azure(destination.kid) }], 2);
      const loaded = await only.repo.find({ order: { id: 'ASC' } });
      expect(loaded.map((c) => c.email)).toEqual(before.map((_, i) => `mv${i}@example.com`));
      expect(vault.callLog.filter((c) => c.operation === 'unwrapkey')).toEqual([]);
    } finally {
      vault.grant('app');
    }
  });
});
