import 'reflect-metadata';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  EnvelopeEncryption,
  GcpKmsKeyProvider,
  KeyAccessDeniedError,
  KeyProviderError,
} from '../../../../src';
import { createTestSchema, rawQuery, type TestSchema } from '../../../support/database';
import { Customer, Order } from '../../../support/entities';
import {
  APP_MEMBER,
  ENCRYPTER_DECRYPTER,
  type GcpKmsEmulator,
  startGcpKmsEmulator,
} from '../../../support/gcp-kms-emulator';

/** A clock the test moves by hand: cache expiry without waiting. */
class FakeClock {
  time = 1_000;
  now() {
    return this.time;
  }
}

const MINUTE = 60_000;
const AAD = '[["typeorm-envelope:keyring","default"]]';
let emulator: GcpKmsEmulator;
let schema: TestSchema;
let dataSource: DataSource;
let encryption: EnvelopeEncryption;
let keyName: string;
let primary: string;
const clock = new FakeClock();
let startupCalls: Record<string, number>;

beforeAll(async () => {
  emulator = await startGcpKmsEmulator();
  const key = emulator.createKey({ id: 'customer-data' });
  keyName = key.name;
  primary = key.primary as string;
  schema = await createTestSchema('gcp_kms');
  encryption = new EnvelopeEncryption({
    keys: [
      {
        version: 1,
        provider: new GcpKmsKeyProvider({
          keyName,
          ...emulator.connection(),
          retryDelay: 2,
          maxRetryDelay: 5,
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
  emulator.grant(keyName, APP_MEMBER, ENCRYPTER_DECRYPTER);
  emulator.setVersionState(primary, 'ENABLED');
  encryption.purgeCache();
  emulator.resetCalls();
});

const customers = () => dataSource.getRepository(Customer);
const newCustomer = (i: number) =>
  customers().create({
    email: `g${i}@example.com`,
    address: { street: `${i} Key St`, city: 'Gcp' },
    plan: 'gcp',
    contact: { phone: '+1 555 0101', preferredChannel: null },
  });
const rowCount = async () =>
  Number(
    (await rawQuery<{ n: string }>(schema.url, `SELECT count(*) AS n FROM "${schema.schema}".customer`))[0]
      ?.n,
  );
const storedRow = async (id: number) =>
  (
    await rawQuery<{ email_ciphertext: Buffer; email_wrapped_key: Buffer; email_key_version: number }>(
      schema.url,
      `SELECT email_ciphertext, email_wrapped_key, email_key_version FROM "${schema.schema}".customer WHERE id = $1`,
      [id],
    )
  )[0];

describe('Cloud KMS call budget', () => {
  it('initialize() validated the key: GetCryptoKey, and an Encrypt → Decrypt round trip', () => {
    expect(startupCalls).toMatchObject({ GetCryptoKey: 1, Encrypt: 1, Decrypt: 1 });
  });

  it('10,000 saves then 10,000 loads on a cold cache: one Encrypt, at most one Decrypt', async () => {
    await customers().save(
      Array.from({ length: 10_000 }, (_, i) => newCustomer(i)),
      { chunk: 500 },
    );
    encryption.purgeCache();
    const loaded = await customers().find({ where: { plan: 'gcp' } });
    expect(loaded).toHaveLength(10_000);
    expect(loaded.every((c) => c.email.startsWith('g') && c.address?.city === 'Gcp')).toBe(true);
    expect(emulator.calls.Encrypt).toBe(1);
    expect(emulator.calls.Decrypt).toBeLessThanOrEqual(1);
    expect(emulator.callLog.every((c) => c.aad === AAD && c.principal === APP_MEMBER)).toBe(true);
    // In the database: one wrapped data key for all rows, naming the version that wrapped it.
    const keys = await rawQuery<{ k: Buffer; n: number; plain: number }>(
      schema.url,
      `SELECT email_wrapped_key AS k, count(*)::int AS n,
              count(*) FILTER (WHERE position('@example.com'::bytea IN email_ciphertext) > 0)::int AS plain
         FROM "${schema.schema}".customer WHERE plan = 'gcp' GROUP BY email_wrapped_key`,
    );
    expect(keys).toHaveLength(1);
    expect(keys[0]).toMatchObject({ n: 10_000, plain: 0 });
    expect(GcpKmsKeyProvider.keyVersionOf(keys[0]?.k as Buffer)).toBe(primary);
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
    expect(emulator.calls.Encrypt).toBe(1);
  });
});

describe('revocation and faults', () => {
  it('a removed IAM binding: cached keys keep decrypting until purgeCache(), then reads and writes fail closed', async () => {
    const id = (await customers().save(newCustomer(30_001))).id;
    encryption.purgeCache();
    await customers().findOneByOrFail({ id }); // cached now
    emulator.revoke(keyName, APP_MEMBER, ENCRYPTER_DECRYPTER);
    expect((await customers().findOneByOrFail({ id })).email).toBe('g30001@example.com');

    encryption.purgeCache();
    const error = await customers()
      .findOneByOrFail({ id })
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(KeyAccessDeniedError);
    expect(error).toMatchObject({
      keyVersion: 1,
      keyId: keyName,
      entity: 'Customer',
      primaryKey: String(id),
    });
    expect(String(error)).toContain('PERMISSION_DENIED');
    expect(String(error)).toContain('cloudkms.cryptoKeyVersions.useToDecrypt');
    expect(String(error)).not.toContain('g30001');

    const before = await rowCount();
    await expect(customers().save(newCustomer(30_002))).rejects.toBeInstanceOf(KeyAccessDeniedError);
    expect(await rowCount()).toBe(before);
  });

  it('a disabled key version: cached reads go on, after purgeCache() its data keys fail with KeyAccessDeniedError', async () => {
    const saved = await customers().save(newCustomer(30_003));
    expect(GcpKmsKeyProvider.keyVersionOf((await storedRow(saved.id))?.email_wrapped_key as Buffer)).toBe(
      primary,
    );
    emulator.setVersionState(primary, 'DISABLED');
    expect((await customers().findOneByOrFail({ id: saved.id })).email).toBe('g30003@example.com');
    encryption.purgeCache();
    const error = await customers()
      .findOneByOrFail({ id: saved.id })
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(KeyAccessDeniedError);
    expect(String(error)).toContain('FAILED_PRECONDITION');
    expect(String(error)).toContain(`${primary} has value DISABLED`);
  });

  it('throttling and 5xx are retried by the provider; the write succeeds', async () => {
    emulator.injectFaults({ operation: 'Encrypt', fault: 'RESOURCE_EXHAUSTED', times: 1 });
    emulator.injectFaults({ operation: 'Encrypt', fault: 'INTERNAL', times: 1 });
    const saved = await customers().save(newCustomer(30_004));
    expect(emulator.callLog.map((c) => c.status)).toEqual([429, 500, 200]);
    encryption.purgeCache();
    expect((await customers().findOneByOrFail({ id: saved.id })).email).toBe('g30004@example.com');
  });

  it('while Cloud KMS is down: cached keys keep serving; a write needing a new key fails and stores nothing', async () => {
    const id = (await customers().save(newCustomer(30_005))).id;
    emulator.failAll('UNAVAILABLE');
    expect((await customers().findOneByOrFail({ id })).email).toBe('g30005@example.com');
    await customers().save(newCustomer(30_006)); // the data key is cached: no call needed

    encryption.purgeCache();
    emulator.resetCalls();
    const before = await rowCount();
    const error = await customers()
      .save(newCustomer(30_007))
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(KeyProviderError);
    expect(error).not.toBeInstanceOf(KeyAccessDeniedError);
    expect(String(error)).toContain('GCP KMS Encrypt failed after 5 attempts (UNAVAILABLE)');
    expect(await rowCount()).toBe(before);
    expect(emulator.calls.Encrypt).toBe(5); // the provider's attempts, then it gave up
    const reads = await customers()
      .findOneByOrFail({ id })
      .catch((e: unknown) => e);
    expect(reads).toBeInstanceOf(KeyProviderError); // cache purged: reads need Cloud KMS too
  });
});

describe('validation at start-up', () => {
  it('refuses to initialize with a key of the wrong purpose, naming the version, the key and the check', async () => {
    const asymmetric = emulator.createKey({ purpose: 'ASYMMETRIC_DECRYPT' }).name;
    const bad = new EnvelopeEncryption({
      keys: [
        { version: 3, provider: new GcpKmsKeyProvider({ keyName: asymmetric, ...emulator.connection() }) },
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
      'key purpose is ASYMMETRIC_DECRYPT; a symmetric ENCRYPT_DECRYPT key is required',
    );
    expect(error).toMatchObject({ keyVersion: 3, keyId: asymmetric });
    expect(emulator.calls.Encrypt).toBe(0);
    if (other.isInitialized) await other.destroy();
  });
});
