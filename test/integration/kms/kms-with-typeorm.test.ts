import { ConfiguredRetryStrategy } from '@smithy/core/retry';
import 'reflect-metadata';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { AwsKmsKeyProvider, EnvelopeEncryption, KeyAccessDeniedError, KeyProviderError } from '../../../src';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';
import { Customer, Order } from '../../support/entities';
import { type KmsEmulator, startKmsEmulator } from '../../support/kms-emulator';

/** A clock the test moves by hand: cache expiry without waiting. */
class FakeClock {
  time = 1_000;
  now() {
    return this.time;
  }
}

const MINUTE = 60_000;
let emulator: KmsEmulator;
let schema: TestSchema;
let dataSource: DataSource;
let encryption: EnvelopeEncryption;
let keyId: string;
const clock = new FakeClock();
let startupCalls: Record<string, number>;

beforeAll(async () => {
  emulator = await startKmsEmulator();
  keyId = emulator.createKey({ description: 'customer master key' }).Arn;
  schema = await createTestSchema('kms');
  encryption = new EnvelopeEncryption({
    keys: [
      {
        version: 1,
        provider: new AwsKmsKeyProvider({
          keyId,
          clientConfig: {
            ...emulator.clientConfig(),
            retryStrategy: new ConfiguredRetryStrategy(4, () => 5),
          },
        }),
      },
    ],
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
  emulator.enableKey(keyId);
  encryption.purgeCache();
  emulator.resetCalls();
});

const customers = () => dataSource.getRepository(Customer);
const newCustomer = (i: number) =>
  customers().create({
    email: `k${i}@example.com`,
    address: { street: `${i} Key St`, city: 'Kms' },
    plan: 'kms',
    contact: { phone: '+1 555 0101', preferredChannel: null },
  });
const rowCount = async () =>
  Number(
    (await rawQuery<{ n: string }>(schema.url, `SELECT count(*) AS n FROM "${schema.schema}".customer`))[0]
      ?.n,
  );

describe('KMS call budget', () => {
  it('initialize() validated the key: DescribeKey, and a GenerateDataKey → Decrypt round trip', () => {
    expect(startupCalls).toMatchObject({ DescribeKey: 1, GenerateDataKey: 1, Decrypt: 1 });
  });

  it('10,000 saves then 10,000 loads on a cold cache: one GenerateDataKey, at most one Decrypt', async () => {
    await customers().save(
      Array.from({ length: 10_000 }, (_, i) => newCustomer(i)),
      { chunk: 500 },
    );
    const loaded = await customers().find({ where: { plan: 'kms' } });
    expect(loaded).toHaveLength(10_000);
    expect(loaded.every((c) => c.email.startsWith('k') && c.address?.city === 'Kms')).toBe(true);
    expect(emulator.calls.GenerateDataKey).toBe(1);
    expect(emulator.calls.Decrypt).toBeLessThanOrEqual(1);
    expect(
      emulator.callLog.every((c) => c.encryptionContext?.['typeorm-envelope:keyring'] === 'default'),
    ).toBe(true);
  });

  it('100 concurrent loads of rows sharing a data key, cold cache: one Decrypt', async () => {
    const ids = (await customers().find({ select: { id: true }, take: 100 })).map((c) => c.id);
    encryption.purgeCache();
    emulator.resetCalls();
    const loaded = await Promise.all(ids.map((id) => customers().findOneByOrFail({ id })));
    expect(loaded.every((c) => c.email.endsWith('@example.com'))).toBe(true);
    expect(emulator.calls.Decrypt).toBe(1);
  });

  it('after the TTL passes, one refresh per key in use', async () => {
    const id = (await customers().save(newCustomer(-1))).id;
    await customers().findOneByOrFail({ id });
    emulator.resetCalls();
    clock.time += 31 * MINUTE;
    await Promise.all(Array.from({ length: 20 }, () => customers().findOneByOrFail({ id })));
    expect(emulator.calls.Decrypt).toBe(1);
    await Promise.all(Array.from({ length: 20 }, (_, i) => customers().save(newCustomer(20_000 + i))));
    expect(emulator.calls.GenerateDataKey).toBe(1);
  });
});

describe('revocation and faults', () => {
  it('a revoked key keeps decrypting from the cache until purge, then fails closed with a typed error', async () => {
    const id = (await customers().save(newCustomer(30_001))).id;
    encryption.purgeCache();
    await customers().findOneByOrFail({ id }); // cached now
    emulator.disableKey(keyId);
    expect((await customers().findOneByOrFail({ id })).email).toBe('k30001@example.com');

    encryption.purgeCache();
    const error = await customers()
      .findOneByOrFail({ id })
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(KeyAccessDeniedError);
    expect(error).toMatchObject({ keyVersion: 1, keyId, entity: 'Customer', primaryKey: String(id) });
    expect(String(error)).toContain('DisabledException');
    expect(String(error)).not.toContain('k30001');

    const before = await rowCount();
    await expect(customers().save(newCustomer(30_002))).rejects.toBeInstanceOf(KeyAccessDeniedError);
    expect(await rowCount()).toBe(before);
  });

  it('a key scheduled for deletion or with access denied is a KeyAccessDeniedError', async () => {
    const other = emulator.createKey({ description: 'to be deleted' }).Arn;
    const pending = new AwsKmsKeyProvider({
      keyId: other,
      clientConfig: emulator.clientConfig(),
      maxAttempts: 1,
    });
    emulator.scheduleDeletion(other);
    await expect(pending.generateDataKey({ a: 'b' })).rejects.toBeInstanceOf(KeyAccessDeniedError);
    emulator.denyAccess(keyId, true);
    try {
      await expect(customers().save(newCustomer(30_003))).rejects.toMatchObject({
        name: 'KeyAccessDeniedError',
        keyId,
      });
    } finally {
      emulator.denyAccess(keyId, false);
    }
  });

  it('throttling is retried by the SDK; the write succeeds', async () => {
    emulator.injectFaults({ operation: 'GenerateDataKey', error: 'ThrottlingException', times: 2 });
    const saved = await customers().save(newCustomer(30_004));
    expect(emulator.calls.GenerateDataKey).toBe(3);
    expect((await customers().findOneByOrFail({ id: saved.id })).email).toBe('k30004@example.com');
  });

  it('while KMS is down: cached keys keep serving; a write needing a new key fails and stores nothing', async () => {
    const id = (await customers().save(newCustomer(30_005))).id;
    emulator.failAll('KMSInternalException');
    expect((await customers().findOneByOrFail({ id })).email).toBe('k30005@example.com');
    await customers().save(newCustomer(30_006)); // the data key is cached: no KMS call needed

    encryption.purgeCache();
    emulator.resetCalls();
    const before = await rowCount();
    const error = await customers()
      .save(newCustomer(30_007))
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(KeyProviderError);
    expect(error).not.toBeInstanceOf(KeyAccessDeniedError);
    expect(await rowCount()).toBe(before);
    expect(emulator.calls.GenerateDataKey).toBe(4); // the SDK's attempts, then it gave up
  });
});

describe('validation at start-up', () => {
  it('refuses to initialize with an asymmetric key, naming the version, the key and the check', async () => {
    const rsa = emulator.createKey({ keySpec: 'RSA_2048' }).Arn;
    const bad = new EnvelopeEncryption({
      keys: [
        {
          version: 3,
          provider: new AwsKmsKeyProvider({ keyId: rsa, clientConfig: emulator.clientConfig() }),
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
    expect(String(error)).toContain(
      'key is asymmetric (RSA_2048); a symmetric ENCRYPT_DECRYPT key is required',
    );
    expect(error).toMatchObject({ keyVersion: 3, keyId: rsa });
    if (other.isInitialized) await other.destroy();
  });
});
