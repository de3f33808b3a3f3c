import 'reflect-metadata';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  AzureKeyVaultKeyProvider,
  EnvelopeEncryption,
  IntegrityError,
  KeyAccessDeniedError,
  KeyProviderError,
} from '../../../../src';
import {
  type AzureKeyVaultEmulator,
  type EmulatedKey,
  startAzureKeyVaultEmulator,
  testCredential,
} from '../../../support/azure-key-vault-emulator';
import { createTestSchema, rawQuery, type TestSchema } from '../../../support/database';
import { Customer, Order } from '../../../support/entities';

/** A clock the test moves by hand: cache expiry without waiting. */
class FakeClock {
  time = 1_000;
  now() {
    return this.time;
  }
}

const MINUTE = 60_000;
const app = testCredential('app');
let emulator: AzureKeyVaultEmulator;
let key: EmulatedKey;
let schema: TestSchema;
let dataSource: DataSource;
let encryption: EnvelopeEncryption;
const clock = new FakeClock();
let startupCalls: Record<string, number>;

const azure = (keyId: string, credential = app) =>
  new AzureKeyVaultKeyProvider({
    keyId,
    credential,
    clientOptions: emulator.clientOptions(),
    retryOptions: { maxRetries: 3, retryDelayInMs: 5, maxRetryDelayInMs: 20 },
  });

beforeAll(async () => {
  emulator = await startAzureKeyVaultEmulator();
  emulator.grant('app', 'Key Vault Crypto Service Encryption User', { key: 'customer-key' });
  key = await emulator.createKey('customer-key');
  schema = await createTestSchema('azure_kv');
  encryption = new EnvelopeEncryption({
    keys: [{ version: 1, provider: azure(key.kid) }],
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
  startupCalls = { ...emulator.calls };
});
afterAll(async () => {
  await dataSource?.destroy();
  await schema?.drop();
  await emulator?.close();
});
beforeEach(() => {
  emulator.failAll(null);
  emulator.setEnabled(key.kid, true);
  encryption.purgeCache();
  emulator.resetCalls();
});

const customers = () => dataSource.getRepository(Customer);
const newCustomer = (i: number) =>
  customers().create({
    email: `z${i}@example.com`,
    address: { street: `${i} Vault Rd`, city: 'Azure' },
    plan: 'akv',
    contact: { phone: '+1 555 0199', preferredChannel: null },
  });
const table = () => `"${schema.schema}".customer`;
const rowCount = async () =>
  Number((await rawQuery<{ n: string }>(schema.url, `SELECT count(*) AS n FROM ${table()}`))[0]?.n);
const storedRow = async (id: number) =>
  (
    await rawQuery<{ email_ciphertext: Buffer; email_wrapped_key: Buffer; email_key_version: number }>(
      schema.url,
      `SELECT email_ciphertext, email_wrapped_key, email_key_version FROM ${table()} WHERE id = $1`,
      [id],
    )
  )[0];

describe('Key Vault call budget', () => {
  it('initialize() validated the key: a GET, then a wrapkey → unwrapkey round trip', () => {
    expect(startupCalls).toMatchObject({ get: 2, wrapkey: 1, unwrapkey: 1 }); // the SDK's own GET once
  });

  it('10,000 saves then 10,000 loads on a cold cache: one wrapkey, at most one unwrapkey; the rows hold only the wrapped key', async () => {
    await customers().save(
      Array.from({ length: 10_000 }, (_, i) => newCustomer(i)),
      { chunk: 500 },
    );
    expect(emulator.calls.wrapkey).toBe(1);
    encryption.purgeCache();
    const loaded = await customers().find({ where: { plan: 'akv' } });
    expect(loaded).toHaveLength(10_000);
    expect(loaded.every((c) => c.email.startsWith('z') && c.address?.city === 'Azure')).toBe(true);
    expect(emulator.calls.wrapkey).toBe(1);
    expect(emulator.calls.unwrapkey).toBeLessThanOrEqual(1);
    expect(emulator.callLog.every((c) => c.principal === 'app' && c.version === key.version)).toBe(true);

    const rows = await rawQuery<{ wrapped: Buffer; n: number }>(
      schema.url,
      `SELECT email_wrapped_key AS wrapped, count(*)::int AS n FROM ${table()} GROUP BY 1`,
    );
    expect(rows).toHaveLength(1);
    const wrapped = rows[0]?.wrapped as Buffer;
    expect(wrapped.subarray(3, 3 + key.version.length).toString('ascii')).toBe(key.version);
    const emails = await rawQuery<{ c: Buffer }>(
      schema.url,
      `SELECT email_ciphertext AS c FROM ${table()} LIMIT 50`,
    );
    for (const { c } of emails) expect(c.includes(Buffer.from('@example.com'))).toBe(false);
  });

  it('100 concurrent loads of rows sharing a data key, cold cache: one unwrapkey', async () => {
    const ids = (await customers().find({ select: { id: true }, take: 100 })).map((c) => c.id);
    encryption.purgeCache();
    emulator.resetCalls();
    const loaded = await Promise.all(ids.map((id) => customers().findOneByOrFail({ id })));
    expect(loaded.every((c) => c.email.endsWith('@example.com'))).toBe(true);
    expect(emulator.calls.unwrapkey).toBe(1);
  });

  it('after the TTL passes, one refresh per key in use', async () => {
    const id = (await customers().save(newCustomer(-1))).id;
    await customers().findOneByOrFail({ id });
    emulator.resetCalls();
    clock.time += 31 * MINUTE;
    await Promise.all(Array.from({ length: 20 }, () => customers().findOneByOrFail({ id })));
    expect(emulator.calls.unwrapkey).toBe(1);
    await Promise.all(Array.from({ length: 20 }, (_, i) => customers().save(newCustomer(20_000 + i))));
    expect(emulator.calls.wrapkey).toBe(1);
  });
});

describe('revocation and faults', () => {
  it('removing the role assignment: cached keys keep working within the TTL, fail at once after purgeCache(), writes store nothing', async () => {
    const id = (await customers().save(newCustomer(30_001))).id;
    encryption.purgeCache();
    await customers().findOneByOrFail({ id }); // cached now
    emulator.removeRoleAssignment('app');
    try {
      clock.time += 29 * MINUTE; // within unwrappedKeyTtl
      expect((await customers().findOneByOrFail({ id })).email).toBe('z30001@example.com');

      encryption.purgeCache();
      const error = await customers()
        .findOneByOrFail({ id })
        .catch((e: unknown) => e);
      expect(error).toBeInstanceOf(KeyAccessDeniedError);
      expect(error).toMatchObject({
        keyVersion: 1,
        keyId: key.kid,
        entity: 'Customer',
        primaryKey: String(id),
      });
      expect(String(error)).toContain('ForbiddenByRbac');
      expect(String(error)).not.toContain('z30001');

      const before = await rowCount();
      await expect(customers().save(newCustomer(30_002))).rejects.toBeInstanceOf(KeyAccessDeniedError);
      expect(await rowCount()).toBe(before);
    } finally {
      emulator.grant('app', 'Key Vault Crypto Service Encryption User', { key: 'customer-key' });
    }
    encryption.purgeCache();
    expect((await customers().findOneByOrFail({ id })).email).toBe('z30001@example.com');
  });

  it('disabling the key version: the same, with KeyDisabled', async () => {
    const id = (await customers().save(newCustomer(30_003))).id;
    encryption.purgeCache();
    await customers().findOneByOrFail({ id });
    emulator.setEnabled(key.kid, false);
    expect((await customers().findOneByOrFail({ id })).email).toBe('z30003@example.com');
    encryption.purgeCache();
    const error = await customers()
      .findOneByOrFail({ id })
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(KeyAccessDeniedError);
    expect(String(error)).toContain('the key version is disabled (403 Forbidden/KeyDisabled)');
  });

  it('throttling and a 500 are retried by the SDK; the write succeeds', async () => {
    emulator.injectFaults({ operation: 'wrapkey', status: 429, times: 1, retryAfter: 0 });
    emulator.injectFaults({ operation: 'wrapkey', status: 500, times: 1 });
    const saved = await customers().save(newCustomer(30_004));
    expect(emulator.callLog.filter((c) => c.operation === 'wrapkey').map((c) => c.status)).toEqual([
      429, 500, 200,
    ]);
    expect((await customers().findOneByOrFail({ id: saved.id })).email).toBe('z30004@example.com');
  });

  it('while Key Vault is down: cached keys keep serving; a write needing a new key fails and stores nothing', async () => {
    const id = (await customers().save(newCustomer(30_005))).id;
    emulator.failAll(503);
    expect((await customers().findOneByOrFail({ id })).email).toBe('z30005@example.com');
    await customers().save(newCustomer(30_006)); // the data key is cached: no call needed

    encryption.purgeCache();
    emulator.resetCalls();
    const before = await rowCount();
    const error = await customers()
      .save(newCustomer(30_007))
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(KeyProviderError);
    expect(error).not.toBeInstanceOf(KeyAccessDeniedError);
    expect(String(error)).toContain('Key Vault wrapKey failed after 4 attempts (503 ServiceUnavailable)');
    expect(await rowCount()).toBe(before);
    expect(emulator.calls.wrapkey).toBe(4); // the SDK's attempts, then it gave up
  });

  it('rows read by an application with another keyring id: the wrapped key does not open there (IntegrityError), the bytes are unchanged', async () => {
    const saved = await customers().save(newCustomer(30_008));
    const before = await storedRow(saved.id);
    const other = new EnvelopeEncryption({
      keys: [{ version: 1, provider: azure(key.kid) }],
      activeVersion: 1,
      keyringId: 'another-application',
    });
    const second = new DataSource({
      type: 'postgres',
      url: schema.url,
      schema: schema.schema,
      entities: [Customer, Order],
    });
    other.attach(second);
    await second.initialize();
    try {
      emulator.resetCalls();
      const error = await second
        .getRepository(Customer)
        .findOneByOrFail({ id: saved.id })
        .catch((e: unknown) => e);
      expect(error).toBeInstanceOf(IntegrityError);
      expect(String(error)).toContain('the data key was wrapped for another keyring or tenant');
      expect(error).toMatchObject({ entity: 'Customer', keyVersion: 1, primaryKey: String(saved.id) });
      expect(emulator.calls.unwrapkey).toBe(1); // Key Vault unwrapped; the digest refused it
    } finally {
      await second.destroy();
    }
    expect(await storedRow(saved.id)).toEqual(before);
  });
});

describe('validation at start-up', () => {
  const initializeWith = async (provider: AzureKeyVaultKeyProvider) => {
    const bad = new EnvelopeEncryption({ keys: [{ version: 3, provider }], activeVersion: 3 });
    const other = new DataSource({
      type: 'postgres',
      url: schema.url,
      schema: schema.schema,
      entities: [Customer, Order],
    });
    bad.attach(other);
    const error = await other.initialize().catch((e: unknown) => e);
    if (other.isInitialized) await other.destroy();
    return error;
  };

  it('refuses an RSA key under 3072 bits, naming the version, the key and the check', async () => {
    const small = await emulator.createKey('small', { size: 2048 });
    emulator.grant('app', 'Key Vault Crypto Service Encryption User', { key: 'small' });
    const error = await initializeWith(azure(small.kid));
    expect(error).toBeInstanceOf(KeyProviderError);
    expect(String(error)).toContain('key check "key type and size" failed: the key is RSA of 2048 bits');
    expect(error).toMatchObject({ keyVersion: 3, keyId: small.kid });
    expect(emulator.calls.wrapkey).toBe(0);
  });

  it('refuses a key the application has no role on, naming the check "exists"', async () => {
    const error = await initializeWith(azure(key.kid, testCredential('someone-else')));
    expect(error).toBeInstanceOf(KeyAccessDeniedError);
    expect(String(error)).toContain('key check "exists" failed');
    expect(error).toMatchObject({ keyVersion: 3, keyId: key.kid });
  });
});
