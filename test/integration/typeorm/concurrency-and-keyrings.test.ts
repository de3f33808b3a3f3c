import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import 'reflect-metadata';
import { DataSource } from 'typeorm';
import { ConfigError, EnvelopeEncryption, IntegrityError } from '../../../src';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { rawQuery } from '../../support/database';
import { Customer, Order } from '../../support/entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

let one: EncryptedTestDatabase;
let two: EncryptedTestDatabase;

beforeAll(async () => {
  [one, two] = await Promise.all([
    encryptedDatabase([Customer, Order], { prefix: 'keyring_one' }),
    encryptedDatabase([Customer, Order], { prefix: 'keyring_two', encryption: { keyringId: 'second-app' } }),
  ]);
});
afterAll(async () => {
  await one?.close();
  await two?.close();
});

describe('data keys under concurrency', () => {
  it('200 concurrent saves then 200 concurrent finds on a cold cache: one generation, one unwrap', async () => {
    const repo = one.dataSource.getRepository(Customer);
    one.encryption.purgeCache();
    one.provider.reset();
    const saved = await Promise.all(
      Array.from({ length: 200 }, (_, i) =>
        repo.save(
          repo.create({ email: `c${i}@example.com`, plan: 'burst', address: { street: `${i}`, city: 'X' } }),
        ),
      ),
    );
    expect(one.provider.calls).toEqual({ generate: 1, wrap: 1, unwrap: 0 });
    const distinctKeys = await rawQuery<{ n: string }>(
      one.schema.url,
      `SELECT count(DISTINCT email_wrapped_key) AS n FROM "${one.schema.schema}".customer WHERE plan = 'burst'`,
    );
    expect(Number(distinctKeys[0]?.n)).toBe(1);

    one.encryption.purgeCache();
    one.provider.reset();
    const loaded = await Promise.all(saved.map((c) => repo.findOneByOrFail({ id: c.id })));
    expect(loaded.map((c) => c.email)).toEqual(saved.map((_, i) => `c${i}@example.com`));
    expect(one.provider.calls.unwrap).toBe(1);
    expect(one.provider.calls.generate).toBe(0);
  });
});

describe('two DataSources with different keyrings in one process', () => {
  it('each reads its own rows; neither can read the other', async () => {
    const a = await one.dataSource.getRepository(Customer).save({
      email: 'one@example.com',
      plan: 'k',
      address: null,
      contact: { phone: null, preferredChannel: null },
    });
    const b = await two.dataSource.getRepository(Customer).save({
      email: 'two@example.com',
      plan: 'k',
      address: null,
      contact: { phone: null, preferredChannel: null },
    });
    expect((await one.dataSource.getRepository(Customer).findOneByOrFail({ id: a.id })).email).toBe(
      'one@example.com',
    );
    expect((await two.dataSource.getRepository(Customer).findOneByOrFail({ id: b.id })).email).toBe(
      'two@example.com',
    );

    // Copy row a's stored bytes into keyring two's table: its wrapped key does not unwrap there.
    await rawQuery(
      one.schema.url,
      `INSERT INTO "${two.schema.schema}".customer (id, email_ciphertext, email_iv, email_wrapped_key, email_key_version, plan)
       SELECT 900000, email_ciphertext, email_iv, email_wrapped_key, email_key_version, plan FROM "${one.schema.schema}".customer WHERE id = $1`,
      [a.id],
    );
    await expect(
      two.dataSource.getRepository(Customer).findOneByOrFail({ id: 900000 }),
    ).rejects.toBeInstanceOf(IntegrityError);
  });

  it('an entity loaded from one DataSource and saved to the other is encrypted with the other keyring', async () => {
    const fromOne = await one.dataSource.getRepository(Customer).save({
      email: 'moving@example.com',
      plan: 'move',
      address: null,
      contact: { phone: null, preferredChannel: null },
    });
    const loaded = await one.dataSource.getRepository(Customer).findOneByOrFail({ id: fromOne.id });
    const copy = two.dataSource.getRepository(Customer).create({ ...loaded, id: undefined });
    await two.dataSource.getRepository(Customer).save(copy);
    expect((await two.dataSource.getRepository(Customer).findOneByOrFail({ id: copy.id })).email).toBe(
      'moving@example.com',
    );
  });
});

describe('attach() after initialize()', () => {
  it('is refused, and the DataSource it missed stores no plaintext', async () => {
    const late = new EnvelopeEncryption({
      keys: [{ version: 1, provider: new CountingKeyProvider() }],
      activeVersion: 1,
    });
    const dataSource = new DataSource({
      type: 'postgres',
      url: one.schema.url,
      schema: one.schema.schema,
      entities: [Customer, Order],
    });
    await dataSource.initialize();
    try {
      expect(() => late.attach(dataSource)).toThrow(ConfigError);
      const repo = dataSource.getRepository(Customer);
      const [before] = await rawQuery<{ n: number }>(
        one.schema.url,
        `SELECT count(*)::int AS n FROM "${one.schema.schema}".customer`,
      );
      await expect(
        repo.save(repo.create({ email: 'late@example.com', plan: 'late', address: null })),
      ).rejects.toBeInstanceOf(ConfigError);
      const [after] = await rawQuery<{ n: number }>(
        one.schema.url,
        `SELECT count(*)::int AS n FROM "${one.schema.schema}".customer`,
      );
      expect(after?.n).toBe(before?.n);
    } finally {
      await dataSource.destroy();
    }
  });
});
