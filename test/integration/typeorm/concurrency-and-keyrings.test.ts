import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import 'reflect-metadata';
import { DataSource, In } from 'typeorm';
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

  it('loaded entities saved as they are into the other DataSource, in the same turn as saves to their own, read back in both', async () => {
    const repoOne = one.dataSource.getRepository(Customer);
    const repoTwo = two.dataSource.getRepository(Customer);
    /* Both keyrings have written before: their encrypting data keys are warm, the batched path. */
    const warm = { plan: 'copy-warm', address: null, contact: { phone: null, preferredChannel: null } };
    await Promise.all([
      repoOne.save({ ...warm, email: 'w1@example.com' }),
      repoTwo.save({ ...warm, email: 'w2@example.com' }),
    ]);
    const saved = await repoOne.save(
      Array.from({ length: 6 }, (_, n) => ({
        email: `copied${n}@example.com`,
        plan: 'copy',
        address: { street: `${n} Copy Lane`, city: 'Oulu' },
        contact: { phone: `+358 40 ${n}`, preferredChannel: null },
      })),
    );
    const ids = saved.map((c) => c.id);
    const loaded = await repoOne.findBy({ id: In(ids) });
    /* Ids that the other table does not have yet: the copies are inserts there. */
    const [{ top }] = (await rawQuery(
      two.schema.url,
      `SELECT COALESCE(MAX(id), 0) + 1000 AS top FROM "${two.schema.schema}".customer`,
    )) as [{ top: number }];
    const copies = loaded.map((c, n) => Object.assign(c, { id: top + n }));
    /* Half also changed: one save to its own DataSource and one to the other, started together. */
    copies.forEach((c, n) => {
      if (n % 2 === 0) c.email = `changed${n}@example.com`;
    });
    await Promise.all([
      repoTwo.save(copies),
      repoOne.save(saved.map((s, n) => ({ ...s, plan: `copy-${n}` }))),
    ]);
    const keyOfOne = await rawQuery<{ k: Buffer }>(
      one.schema.url,
      `SELECT DISTINCT email_wrapped_key AS k FROM "${one.schema.schema}".customer WHERE id = ANY($1)`,
      [ids],
    );
    const inTwo = await rawQuery<Record<string, unknown>>(
      two.schema.url,
      `SELECT * FROM "${two.schema.schema}".customer WHERE id = ANY($1) ORDER BY id`,
      [copies.map((c) => c.id)],
    );
    expect(inTwo.length).toBe(copies.length);
    for (const row of inTwo) {
      for (const k of keyOfOne) expect((row.email_wrapped_key as Buffer).equals(k.k)).toBe(false);
      expect((row.email_ciphertext as Buffer).includes(Buffer.from('@example.com'))).toBe(false);
      expect((row.address_ciphertext as Buffer).includes(Buffer.from('Copy Lane'))).toBe(false);
    }
    one.encryption.purgeCache();
    two.encryption.purgeCache();
    const backTwo = await repoTwo.findBy({ id: In(copies.map((c) => c.id)) });
    expect(backTwo.map((c) => [c.email, c.address?.street, c.contact.phone]).sort()).toEqual(
      copies
        .map((_, n) => [
          n % 2 === 0 ? `changed${n}@example.com` : `copied${n}@example.com`,
          `${n} Copy Lane`,
          `+358 40 ${n}`,
        ])
        .sort(),
    );
    const backOne = await repoOne.findBy({ id: In(ids) });
    expect(backOne.map((c) => [c.email, c.plan]).sort()).toEqual(
      saved.map((_, n) => [`copied${n}@example.com`, `copy-${n}`]).sort(),
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
