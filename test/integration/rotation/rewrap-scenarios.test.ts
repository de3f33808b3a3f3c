import 'reflect-metadata';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AwsKmsKeyProvider, EnvelopeEncryption, type KeyringEntry } from '../../../src';
import { rewrapDataKeys } from '../../../src/rotation/rewrap';
import { encryptionStatus } from '../../../src/rotation/status';
import { verifyEncryptedColumns } from '../../../src/rotation/verify';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';
import { Customer, Order } from '../../support/entities';
import { type KmsEmulator, startKmsEmulator } from '../../support/kms-emulator';

let emulator: KmsEmulator;
const opened: Array<{ dataSource: DataSource; schema: TestSchema }> = [];

beforeAll(async () => {
  emulator = await startKmsEmulator();
});
afterAll(async () => {
  for (const { dataSource, schema } of opened) {
    if (dataSource.isInitialized) await dataSource.destroy();
    await schema.drop();
  }
  await emulator?.close();
});

async function setUp(keys: KeyringEntry[], options: { maxUses?: number } = {}) {
  const schema = await createTestSchema('scenario');
  const encryption = new EnvelopeEncryption({
    keys,
    activeVersion: 1,
    cache: { dataKeyMaxUses: options.maxUses ?? 1_000_000 },
  });
  const dataSource = new DataSource({
    type: 'postgres',
    url: schema.url,
    schema: schema.schema,
    entities: [Customer, Order],
    synchronize: true,
  });
  encryption.attach(dataSource);
  await dataSource.initialize();
  opened.push({ dataSource, schema });
  return { schema, encryption, dataSource, repo: dataSource.getRepository(Customer) };
}

const kms = (description: string) =>
  new AwsKmsKeyProvider({
    keyId: emulator.createKey({ description }).Arn,
    clientConfig: emulator.clientConfig(),
  });

describe('re-wrap while the application writes', () => {
  it('loses nothing: rows written or updated during the rotation stay as the application wrote them', async () => {
    const { encryption, dataSource, repo } = await setUp(
      [
        { version: 1, provider: new CountingKeyProvider() },
        { version: 2, provider: new CountingKeyProvider() },
      ],
      { maxUses: 50 },
    );
    const saved = await repo.save(
      Array.from({ length: 400 }, (_, i) =>
        repo.create({ email: `w${i}@example.com`, plan: 'w', address: null }),
      ),
    );
    await encryption.activate(2);

    const expected = new Map(saved.map((c) => [c.id, c.email]));
    let writing = true;
    const application = (async () => {
      let n = 0;
      while (writing) {
        const target = saved[(n * 37) % saved.length] as Customer;
        target.email = `updated${n}@example.com`;
        await repo.save(target);
        expected.set(target.id, target.email);
        const fresh = await repo.save(
          repo.create({ email: `during${n}@example.com`, plan: 'w', address: null }),
        );
        expected.set(fresh.id, fresh.email);
        n += 1;
      }
      return n;
    })();
    const result = await rewrapDataKeys(dataSource, encryption, { batchSize: 5 });
    writing = false;
    const writes = await application;

    expect(result.error).toBeUndefined();
    expect(writes).toBeGreaterThan(0);
    encryption.purgeCache();
    const loaded = await repo.find({ where: { plan: 'w' } });
    expect(new Map(loaded.map((c) => [c.id, c.email]))).toEqual(expected);
    const verified = await verifyEncryptedColumns(dataSource, encryption);
    expect(verified).toMatchObject({ failed: 0 });
    expect(verified.rowsChecked).toBe(expected.size);
    const remaining = (await encryptionStatus(dataSource, encryption)).find((p) => p.property === 'email');
    expect(remaining?.rowsByVersion).toEqual({ '2': expected.size });
  });
});

describe('re-wrap of 100,000 rows under a few data keys', () => {
  it('makes one re-wrap call per distinct data key', async () => {
    const v1 = new CountingKeyProvider();
    const v2 = new CountingKeyProvider();
    const { schema, encryption, dataSource } = await setUp([
      { version: 1, provider: v1 },
      { version: 2, provider: v2 },
    ]);
    const table = `"${schema.schema}".customer`;
    // Five data keys, twenty sealed values each, spread over 100,000 rows (values bound to table
    // and column only, as rows with database-generated keys are, so every copy decrypts).
    for (let key = 0; key < 5; key++) {
      encryption.cache.renewEncryptionKey();
      for (let value = 0; value < 20; value++) {
        const sealed = await encryption.encryptValue(`bulk${key}-${value}@example.com`, {
          table: 'customer',
          column: 'email',
        });
        await rawQuery(
          schema.url,
          `INSERT INTO ${table} (email_ciphertext, email_iv, email_wrapped_key, email_key_version, plan)
           SELECT $1, $2, $3, $4, 'bulk' FROM generate_series(1, 1000)`,
          [sealed.ciphertext, sealed.iv, sealed.wrappedKey, sealed.keyVersion],
        );
      }
    }
    await encryption.activate(2);
    v1.reset();
    v2.reset();
    const result = await rewrapDataKeys(dataSource, encryption, { batchSize: 5_000 });
    expect(result.error).toBeUndefined();
    const email = result.properties.find((p) => p.property === 'email');
    expect(email).toMatchObject({ rowsTotal: 100_000, rowsRewrapped: 100_000, distinctDataKeys: 5 });
    expect(result.rewrapCalls).toBe(5);
    expect(v1.calls.unwrap).toBeLessThanOrEqual(5); // the re-wrap's own unwrap of each old key
    expect(v2.calls.wrap).toBe(5);
    const [counts] = await rawQuery<{ v2: number }>(
      schema.url,
      `SELECT count(*) FILTER (WHERE email_key_version = 2)::int AS v2 FROM ${table}`,
    );
    expect(counts?.v2).toBe(100_000);
    encryption.purgeCache();
    const sample = await dataSource
      .getRepository(Customer)
      .find({ where: { plan: 'bulk' }, take: 50, order: { id: 'DESC' } });
    expect(sample.every((c) => /^bulk\d-\d+@example\.com$/.test(c.email))).toBe(true);
  });
});

describe('re-wrap through the KMS emulator', () => {
  it('from a customer-provided key to a KMS key (KMS Encrypt)', async () => {
    const { encryption, dataSource, repo } = await setUp([
      { version: 1, provider: new CountingKeyProvider() },
      { version: 2, provider: kms('target') },
    ]);
    await repo.save(
      Array.from({ length: 30 }, (_, i) =>
        repo.create({ email: `l${i}@example.com`, plan: 'l', address: null }),
      ),
    );
    await encryption.activate(2);
    emulator.resetCalls();
    const result = await rewrapDataKeys(dataSource, encryption);
    expect(result.error).toBeUndefined();
    expect(emulator.calls.Encrypt).toBe(1);
    expect(emulator.calls.ReEncrypt).toBe(0);
    encryption.purgeCache();
    expect((await repo.find({ where: { plan: 'l' } })).map((c) => c.email).sort()).toHaveLength(30);
    expect((await verifyEncryptedColumns(dataSource, encryption)).failed).toBe(0);
  });

  it('from one KMS key to another (KMS ReEncrypt: the data key never leaves KMS)', async () => {
    const { schema, encryption, dataSource, repo } = await setUp([
      { version: 1, provider: kms('old') },
      { version: 2, provider: kms('new') },
    ]);
    await repo.save(
      Array.from({ length: 30 }, (_, i) =>
        repo.create({ email: `k${i}@example.com`, plan: 'k', address: null }),
      ),
    );
    await encryption.activate(2);
    emulator.resetCalls();
    const result = await rewrapDataKeys(dataSource, encryption);
    expect(result.error).toBeUndefined();
    expect(emulator.calls.ReEncrypt).toBe(1);
    expect(emulator.calls.Encrypt).toBe(0);
    const [row] = await rawQuery<{ v: number }>(
      schema.url,
      `SELECT DISTINCT email_key_version AS v FROM "${schema.schema}".customer`,
    );
    expect(row?.v).toBe(2);
    encryption.purgeCache();
    emulator.disableKey((encryption.keyring.provider(1) as AwsKmsKeyProvider).keyId);
    // Version 1's key is disabled: everything still reads, through version 2.
    expect((await repo.find({ where: { plan: 'k' } })).every((c) => c.email.startsWith('k'))).toBe(true);
  });
});
