import 'reflect-metadata';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  EnvelopeEncryption,
  IntegrityError,
  KeyAccessDeniedError,
  KeyProviderError,
  VaultTransitKeyProvider,
} from '../../../../src';
import { createTestSchema, rawQuery, type TestSchema } from '../../../support/database';
import { Customer, Order } from '../../../support/entities';
import { startVaultEmulator, transitPolicy, type VaultEmulator } from '../../../support/vault-emulator';

/** A clock the test moves by hand: cache expiry without waiting. */
class FakeClock {
  time = 1_000;
  now() {
    return this.time;
  }
}

const MINUTE = 60_000;
const KEY = 'app-data';
const POLICY = 'app-data-encryption';
let vault: VaultEmulator;
let schema: TestSchema;
let dataSource: DataSource;
let encryption: EnvelopeEncryption;
let provider: VaultTransitKeyProvider;
const clock = new FakeClock();
let startupCalls: Record<string, number>;

beforeAll(async () => {
  vault = await startVaultEmulator();
  vault.createKey(KEY);
  vault.setPolicy(POLICY, transitPolicy(KEY));
  const role = vault.createAppRole('app', { policies: [POLICY] });
  schema = await createTestSchema('vault');
  provider = new VaultTransitKeyProvider({
    address: vault.address,
    keyName: KEY,
    auth: { appRole: role },
    maxAttempts: 4,
    retryDelay: 1,
  });
  encryption = new EnvelopeEncryption({
    keys: [{ version: 1, provider }],
    activeVersion: 1,
    cache: { dataKeyMaxAge: 30 * MINUTE, unwrappedKeyTtl: 30 * MINUTE, refreshAhead: 0, clock },
  });
  dataSource = new DataSource({
    type: 'postgres',
    url: schema.url,
    schema: schema.schema,
    entities: [Customer, Order],
    synchronize: true,
  });
  encryption.attach(dataSource);
  await dataSource.initialize();
  startupCalls = { ...vault.calls };
});
afterAll(async () => {
  await dataSource?.destroy();
  await schema?.drop();
  await vault?.close();
});
beforeEach(() => {
  vault.failAll(null);
  vault.setPolicy(POLICY, transitPolicy(KEY));
  encryption.purgeCache();
  vault.resetCalls();
});

const customers = () => dataSource.getRepository(Customer);
const newCustomer = (i: number) =>
  customers().create({
    email: `v${i}@example.com`,
    address: { street: `${i} Vault St`, city: 'Transit' },
    plan: 'vault',
    contact: { phone: '+1 555 0101', preferredChannel: null },
  });
const table = () => `"${schema.schema}".customer`;
const rowCount = async () =>
  Number((await rawQuery<{ n: string }>(schema.url, `SELECT count(*) AS n FROM ${table()}`))[0]?.n);
const storedRow = async (id: number) =>
  (
    await rawQuery<{ email_wrapped_key: Buffer; email_ciphertext: Buffer; email_key_version: number }>(
      schema.url,
      `SELECT email_wrapped_key, email_ciphertext, email_key_version FROM ${table()} WHERE id = $1`,
      [id],
    )
  )[0];

describe('Vault call budget', () => {
  it('initialize() validated the key: AppRole login, read key, and a datakey → decrypt round trip', () => {
    expect(startupCalls).toMatchObject({ login: 1, readKey: 1, datakey: 1, decrypt: 1, encrypt: 0 });
  });

  it('10,000 saves then 10,000 loads on a cold cache: one datakey, at most one decrypt', async () => {
    await customers().save(
      Array.from({ length: 10_000 }, (_, i) => newCustomer(i)),
      { chunk: 500 },
    );
    const loaded = await customers().find({ where: { plan: 'vault' } });
    expect(loaded).toHaveLength(10_000);
    expect(loaded.every((c) => c.email.startsWith('v') && c.address?.city === 'Transit')).toBe(true);
    expect(vault.calls.datakey).toBe(1);
    expect(vault.calls.decrypt).toBeLessThanOrEqual(1);
    expect(vault.calls.encrypt).toBe(0);
    expect(vault.callLog.every((c) => c.context?.['typeorm-envelope:keyring'] === 'default')).toBe(true);
    // What the database holds: ciphertext, and the data key as Transit wrapped it, version prefix kept.
    const rows = await rawQuery<{ wrapped: string; n: number; plain: number }>(
      schema.url,
      `SELECT convert_from(email_wrapped_key, 'UTF8') AS wrapped, count(*)::int AS n,
              count(*) FILTER (WHERE position(convert_to('@example.com', 'UTF8') in email_ciphertext) > 0)::int AS plain
       FROM ${table()} GROUP BY 1`,
    );
    expect(rows).toHaveLength(1);
    expect(rows[0]?.wrapped).toMatch(/^vault:v1:[A-Za-z0-9+/]+=*$/);
    expect(rows[0]).toMatchObject({ n: 10_000, plain: 0 });
  });

  it('100 concurrent loads of rows sharing a data key, cold cache: one decrypt', async () => {
    const ids = (await customers().find({ select: { id: true }, take: 100 })).map((c) => c.id);
    encryption.purgeCache();
    vault.resetCalls();
    const loaded = await Promise.all(ids.map((id) => customers().findOneByOrFail({ id })));
    expect(loaded.every((c) => c.email.endsWith('@example.com'))).toBe(true);
    expect(vault.calls.decrypt).toBe(1);
  });

  it('after the TTL passes, one refresh per key in use', async () => {
    const id = (await customers().save(newCustomer(-1))).id;
    await customers().findOneByOrFail({ id });
    vault.resetCalls();
    clock.time += 31 * MINUTE;
    await Promise.all(Array.from({ length: 20 }, () => customers().findOneByOrFail({ id })));
    expect(vault.calls.decrypt).toBe(1);
    await Promise.all(Array.from({ length: 20 }, (_, i) => customers().save(newCustomer(20_000 + i))));
    expect(vault.calls.datakey).toBe(1);
  });
});

describe('revocation and faults', () => {
  it('a revoked policy keeps decrypting from the cache until purge, then fails closed with a typed error', async () => {
    const saved = await customers().save(newCustomer(30_001));
    const before = await storedRow(saved.id);
    encryption.purgeCache();
    await customers().findOneByOrFail({ id: saved.id }); // cached now
    vault.deletePolicy(POLICY);
    expect((await customers().findOneByOrFail({ id: saved.id })).email).toBe('v30001@example.com');

    encryption.purgeCache();
    const error = await customers()
      .findOneByOrFail({ id: saved.id })
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(KeyAccessDeniedError);
    expect(error).toMatchObject({
      keyVersion: 1,
      keyId: provider.describe().keyReference,
      entity: 'Customer',
      primaryKey: String(saved.id),
    });
    expect(String(error)).toContain(
      `Vault denied decrypt on transit/decrypt/${KEY} (HTTP 403: permission denied)`,
    );
    expect(String(error)).not.toContain('v30001');
    for (const issued of vault.issuedTokens()) expect(String(error)).not.toContain(issued);

    const count = await rowCount();
    await expect(customers().save(newCustomer(30_002))).rejects.toBeInstanceOf(KeyAccessDeniedError);
    expect(await rowCount()).toBe(count);
    // The refused read changed nothing stored.
    expect(await storedRow(saved.id)).toEqual(before);
  });

  it('min_decryption_version raised past a row’s key version is a KeyAccessDeniedError for that row', async () => {
    const saved = await customers().save(newCustomer(30_010));
    vault.rotateKey(KEY);
    vault.setMinDecryptionVersion(KEY, 2);
    try {
      encryption.purgeCache();
      const error = await customers()
        .findOneByOrFail({ id: saved.id })
        .catch((e: unknown) => e);
      expect(error).toBeInstanceOf(KeyAccessDeniedError);
      expect(String(error)).toContain('below the key');
      expect(String(error)).toContain('(Transit key version 1)');
    } finally {
      vault.setMinDecryptionVersion(KEY, 1);
    }
  });

  it('a wrapped key copied from another row of another keyring is an IntegrityError naming the row', async () => {
    const saved = await customers().save(newCustomer(30_020));
    // A data key wrapped for another keyring id, on the same Transit key, written into the row.
    const foreign = await provider.generateDataKey({ 'typeorm-envelope:keyring': 'another-app' });
    foreign.plaintextKey.fill(0);
    await rawQuery(schema.url, `UPDATE ${table()} SET email_wrapped_key = $1 WHERE id = $2`, [
      foreign.wrappedKey,
      saved.id,
    ]);
    encryption.purgeCache();
    const error = await customers()
      .findOneByOrFail({ id: saved.id })
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(IntegrityError);
    expect(error).toMatchObject({ entity: 'Customer', primaryKey: String(saved.id) });
    await rawQuery(schema.url, `DELETE FROM ${table()} WHERE id = $1`, [saved.id]);
  });

  it('throttling is retried; the write succeeds', async () => {
    vault.injectFaults({ operation: 'datakey', fault: 'throttled', times: 2 });
    const saved = await customers().save(newCustomer(30_004));
    expect(vault.calls.datakey).toBe(3);
    expect((await customers().findOneByOrFail({ id: saved.id })).email).toBe('v30004@example.com');
  });

  it('while Vault is sealed: cached keys keep serving; a write needing a new key fails and stores nothing', async () => {
    const id = (await customers().save(newCustomer(30_005))).id;
    vault.failAll('sealed');
    expect((await customers().findOneByOrFail({ id })).email).toBe('v30005@example.com');
    await customers().save(newCustomer(30_006)); // the data key is cached: no Vault call needed

    encryption.purgeCache();
    vault.resetCalls();
    const before = await rowCount();
    const error = await customers()
      .save(newCustomer(30_007))
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(KeyProviderError);
    expect(error).not.toBeInstanceOf(KeyAccessDeniedError);
    expect(String(error)).toContain('after 4 attempts (HTTP 503: Vault is sealed)');
    expect(await rowCount()).toBe(before);
    expect(vault.calls.datakey).toBe(4);
  });
});

describe('validation at start-up', () => {
  it.each([
    [
      'a key that is not derived',
      { derived: false },
      'key is not derived; a key created with derived=true is required',
    ],
    ['an exportable key', { exportable: true }, 'key is exportable; a key with exportable off is required'],
    ['an RSA key', { type: 'rsa-4096' as const, derived: false }, 'key type is rsa-4096; an aes256-gcm96'],
  ])(
    'refuses to initialize with %s, naming the version, the key and the check',
    async (_what, options, check) => {
      const name = `bad-${Math.random().toString(36).slice(2, 8)}`;
      vault.createKey(name, options);
      const bad = new EnvelopeEncryption({
        keys: [
          {
            version: 3,
            provider: new VaultTransitKeyProvider({
              address: vault.address,
              keyName: name,
              auth: { token: vault.rootToken },
            }),
          },
        ],
        activeVersion: 3,
      });
      const other = new DataSource({
        type: 'postgres',
        url: schema.url,
        schema: schema.schema,
        entities: [Customer, Order],
      });
      bad.attach(other);
      const error = await other.initialize().catch((e: unknown) => e);
      expect(error).toBeInstanceOf(KeyProviderError);
      expect(String(error)).toContain(check);
      expect(error).toMatchObject({ keyVersion: 3, keyId: `${vault.address}/v1/transit/keys/${name}` });
      expect(vault.calls.datakey).toBe(0); // refused before any data key was made
      if (other.isInitialized) await other.destroy();
    },
  );
});
