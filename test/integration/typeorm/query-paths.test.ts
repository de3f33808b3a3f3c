import { In, IsNull, Not } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UnsupportedOperationError } from '../../../src';
import { rawQuery } from '../../support/database';
import { Customer, Order } from '../../support/entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

let db: EncryptedTestDatabase;
let alice: Customer;
let bob: Customer;

beforeAll(async () => {
  db = await encryptedDatabase([Customer, Order], { prefix: 'query_paths' });
  const customers = db.dataSource.getRepository(Customer);
  [alice, bob] = await customers.save([
    customers.create({ email: 'alice@example.com', address: { street: 'A', city: 'Arlen' }, plan: 'pro' }),
    customers.create({ email: 'bob@example.com', address: null, plan: 'free' }),
  ]);
  await db.dataSource.getRepository(Order).save([
    { cardNumber: '4111111111111111', customer: alice },
    { cardNumber: '5500000000000004', customer: alice },
  ]);
});
afterAll(() => db?.close());

const customers = () => db.dataSource.getRepository(Customer);

describe('reads', () => {
  it('find, findOne, findBy, findAndCount decrypt every row', async () => {
    const all = await customers().find({ order: { id: 'ASC' } });
    expect(all.map((c) => c.email)).toEqual(['alice@example.com', 'bob@example.com']);
    expect((await customers().findOne({ where: { id: bob.id } }))?.email).toBe('bob@example.com');
    expect((await customers().findBy({ plan: 'pro' })).map((c) => c.email)).toEqual(['alice@example.com']);
    const [page, count] = await customers().findAndCount({ take: 1, order: { id: 'ASC' } });
    expect([page[0]?.email, count]).toEqual(['alice@example.com', 2]);
  });

  it('query builder getMany and getOne decrypt', async () => {
    const many = await customers().createQueryBuilder('c').orderBy('c.id').getMany();
    expect(many.map((c) => c.address)).toEqual([{ street: 'A', city: 'Arlen' }, null]);
    const one = await customers().createQueryBuilder('c').where('c.id = :id', { id: alice.id }).getOne();
    expect(one?.email).toBe('alice@example.com');
  });

  it('decrypts relations: eager, relations option and leftJoinAndSelect', async () => {
    const orders = await db.dataSource.getRepository(Order).find({ order: { id: 'ASC' } });
    expect(orders.map((o) => [o.cardNumber, o.customer.email])).toEqual([
      ['4111111111111111', 'alice@example.com'],
      ['5500000000000004', 'alice@example.com'],
    ]);
    const withOrders = await customers().findOne({ where: { id: alice.id }, relations: { orders: true } });
    expect(withOrders?.orders.map((o) => o.cardNumber).sort()).toEqual([
      '4111111111111111',
      '5500000000000004',
    ]);
    const joined = await customers()
      .createQueryBuilder('c')
      .leftJoinAndSelect('c.orders', 'o')
      .where('c.id = :id', { id: alice.id })
      .getOne();
    expect(joined?.orders.map((o) => o.cardNumber).sort()).toEqual(['4111111111111111', '5500000000000004']);
  });

  it('a select naming the encrypted property loads its sidecars and decrypts it', async () => {
    const rows = await customers().find({ select: { id: true, email: true }, order: { id: 'ASC' } });
    expect(rows.map((c) => c.email)).toEqual(['alice@example.com', 'bob@example.com']);
    expect(rows[0]?.plan).toBeUndefined();
    const noId = await customers().find({ select: { email: true }, order: { id: 'ASC' } });
    expect(noId.map((c) => c.email)).toEqual(['alice@example.com', 'bob@example.com']);
  });

  it('a select without the encrypted property leaves it undefined and decrypts nothing', async () => {
    db.encryption.purgeCache();
    db.provider.reset();
    const rows = await customers().find({ select: { id: true, plan: true } });
    expect(rows.every((c) => c.email === undefined && c.address === undefined)).toBe(true);
    expect(db.provider.calls.unwrap).toBe(0);
  });

  it('IsNull and Not(IsNull) work on an encrypted property (null-ness is not encrypted)', async () => {
    expect((await customers().findBy({ address: IsNull() })).map((c) => c.email)).toEqual([
      'bob@example.com',
    ]);
    expect((await customers().findBy({ address: Not(IsNull()) })).map((c) => c.email)).toEqual([
      'alice@example.com',
    ]);
  });
});

describe('where on an encrypted property is refused, not silently empty', () => {
  it.each([
    ['findOneBy', () => customers().findOneBy({ email: 'alice@example.com' })],
    ['find In', () => customers().find({ where: { email: In(['alice@example.com']) } })],
    ['count', () => customers().count({ where: { email: 'alice@example.com' } })],
    ['exists', () => customers().exists({ where: { email: 'alice@example.com' } })],
    ['delete', () => customers().delete({ email: 'alice@example.com' })],
    ['update criteria', () => customers().update({ email: 'alice@example.com' }, { plan: 'x' })],
  ])('%s', async (_name, run) => {
    const error = await run().then(
      () => undefined,
      (e: unknown) => e,
    );
    const cause =
      error instanceof UnsupportedOperationError ? error : (error as { driverError?: unknown })?.driverError;
    expect(cause ?? error).toBeInstanceOf(UnsupportedOperationError);
    expect(String((cause ?? error) as Error)).toContain('where condition');
    expect(String((cause ?? error) as Error)).not.toContain('alice@example.com');
    expect(await customers().count()).toBe(2);
  });
});

describe('ordering by an encrypted property is refused, not sorted by ciphertext', () => {
  it.each([
    ['its own', () => customers().find({ order: { email: 'ASC' } })],
    [
      'of a relation (find options)',
      () =>
        db.dataSource
          .getRepository(Order)
          .find({ relations: { customer: true }, order: { customer: { email: 'ASC' } } }),
    ],
    [
      'of an inverse relation (find options)',
      () => customers().find({ relations: { orders: true }, order: { orders: { cardNumber: 'DESC' } } }),
    ],
    [
      'of a joined alias (query builder)',
      () =>
        db.dataSource
          .getRepository(Order)
          .createQueryBuilder('o')
          .leftJoinAndSelect('o.customer', 'c')
          .orderBy('c.email')
          .getMany(),
    ],
  ])('%s', async (_name, run) => {
    const error = await Promise.resolve()
      .then(run as () => Promise<unknown>)
      .then(
        () => undefined,
        (e: unknown) => e,
      );
    expect(error).toBeInstanceOf(UnsupportedOperationError);
    expect(['email', 'cardNumber']).toContain((error as UnsupportedOperationError).column);
  });
});

describe('bytes at rest', () => {
  it('no table holds plaintext', async () => {
    const dump = await rawQuery<Record<string, unknown>>(
      db.schema.url,
      `SELECT row_to_json(c)::text AS c FROM "${db.schema.schema}".customer c UNION ALL SELECT row_to_json(o)::text FROM "${db.schema.schema}"."order" o`,
    );
    const text = dump.map((r) => String(r.c)).join('\n');
    const bytes = await rawQuery<{ b: Buffer }>(
      db.schema.url,
      `SELECT email_ciphertext AS b FROM "${db.schema.schema}".customer UNION ALL SELECT "cardNumber_ciphertext" FROM "${db.schema.schema}"."order"`,
    );
    for (const secret of ['alice@example.com', 'Arlen', '4111111111111111']) {
      expect(text).not.toContain(secret);
      expect(bytes.some((r) => r.b.includes(Buffer.from(secret)))).toBe(false);
    }
  });
});
