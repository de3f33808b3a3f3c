import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ValueTypeError } from '../../../src';
import { rawQuery } from '../../support/database';
import { Customer, Order } from '../../support/entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';
import { COMPACT_MIGRATIONS, CompactOrder, CompactPerson } from '../compact/compact-entities';
import { dataKeyIdOf, keyRows, onPglite } from '../compact/compact-support';

/**
 * The values of one `save([...])` are sealed together, one AES-GCM call per data key. What a user
 * does with writes must store and read back as before: a data key used no more often than its
 * limit, a fresh IV per value, a bad value failing the whole save with nothing stored, saves
 * started in the same turn, and compact values naming a committed key row.
 */
const USES = 40;
let db: EncryptedTestDatabase;
const table = (name: string) => `"${db.schema.schema}".${name}`;

beforeAll(async () => {
  db = await encryptedDatabase([Customer, Order], {
    prefix: 'batched_writes',
    encryption: { cache: { dataKeyMaxUses: USES } },
  });
});
afterAll(() => db?.close());

const customer = (repo: ReturnType<typeof db.dataSource.getRepository<Customer>>, n: number, plan: string) =>
  repo.create({
    email: `w${n}@example.com`,
    address: n % 2 ? { street: `${n} Write Way`, city: 'Turku' } : null,
    plan,
    contact: { phone: `+358 ${n}`, preferredChannel: null },
  });

describe('a save([...]) is sealed together', () => {
  it('uses each data key no more than its limit, with a fresh IV per value, and every row reads back', async () => {
    const repo = db.dataSource.getRepository(Customer);
    /* An encrypting data key is cached first, as in an application that has written before. */
    await repo.save(customer(repo, 0, 'warm-up'));
    await repo.save(Array.from({ length: 150 }, (_, n) => customer(repo, n, 'limit')));
    const perKey = await rawQuery<{ uses: string }>(
      db.schema.url,
      `SELECT count(*)::text AS uses FROM (
         SELECT email_wrapped_key AS k FROM ${table('customer')} WHERE plan = 'limit'
         UNION ALL SELECT address_wrapped_key FROM ${table('customer')} WHERE plan = 'limit' AND address_wrapped_key IS NOT NULL
         UNION ALL SELECT "contactPhone_wrapped_key" FROM ${table('customer')} WHERE plan = 'limit'
       ) v GROUP BY k`,
    );
    /* 150 emails, 75 addresses, 150 phones: 375 values, at most USES under one key. */
    expect(perKey.reduce((n, r) => n + Number(r.uses), 0)).toBe(375);
    expect(Math.max(...perKey.map((r) => Number(r.uses)))).toBeLessThanOrEqual(USES);
    expect(perKey.length).toBeGreaterThanOrEqual(Math.ceil(375 / USES));
    const [ivs] = await rawQuery<{ all: string; distinct: string }>(
      db.schema.url,
      `SELECT count(*)::text AS all, count(DISTINCT email_iv)::text AS distinct FROM ${table('customer')} WHERE plan = 'limit'`,
    );
    expect(ivs?.distinct).toBe(ivs?.all);
    const plaintext = await rawQuery(
      db.schema.url,
      `SELECT id FROM ${table('customer')} WHERE position(convert_to('Write Way', 'UTF8') in address_ciphertext) > 0
         OR position(convert_to('@example.com', 'UTF8') in email_ciphertext) > 0`,
    );
    expect(plaintext).toEqual([]);
    const read = await repo.find({ where: { plan: 'limit' }, order: { id: 'ASC' } });
    expect(read.map((c) => [c.email, c.address?.street ?? null, c.contact.phone])).toEqual(
      Array.from({ length: 150 }, (_, n) => [
        `w${n}@example.com`,
        n % 2 ? `${n} Write Way` : null,
        `+358 ${n}`,
      ]),
    );
  });

  it('one value of the wrong type fails the whole save with a ValueTypeError naming it, and nothing is stored', async () => {
    const repo = db.dataSource.getRepository(Customer);
    const rows = Array.from({ length: 20 }, (_, n) => customer(repo, n, 'bad-one'));
    (rows[13] as { email: unknown }).email = 42;
    const error = await repo.save(rows).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(error).toBeInstanceOf(ValueTypeError);
    expect((error as ValueTypeError).context).toMatchObject({ entity: 'Customer', column: 'email' });
    const [count] = await rawQuery<{ n: string }>(
      db.schema.url,
      `SELECT count(*)::text AS n FROM ${table('customer')} WHERE plan = 'bad-one'`,
    );
    expect(count?.n).toBe('0');
  });

  it('saves started in the same turn, of two entities and through two repositories, each store their own values', async () => {
    const customers = db.dataSource.getRepository(Customer);
    const owner = await customers.save(customer(customers, 1, 'same-turn-owner'));
    const orders = db.dataSource.getRepository(Order);
    const [a, b, c] = await Promise.all([
      customers.save(Array.from({ length: 30 }, (_, n) => customer(customers, n, 'turn-a'))),
      customers.save(Array.from({ length: 30 }, (_, n) => customer(customers, n + 100, 'turn-b'))),
      orders.save(
        Array.from({ length: 30 }, (_, n) =>
          orders.create({ cardNumber: `5500 0000 0000 ${2000 + n}`, customer: owner }),
        ),
      ),
    ]);
    expect(a).toHaveLength(30);
    expect(b).toHaveLength(30);
    expect(c).toHaveLength(30);
    const readA = await customers.find({ where: { plan: 'turn-a' }, order: { id: 'ASC' } });
    const readB = await customers.find({ where: { plan: 'turn-b' }, order: { id: 'ASC' } });
    expect(readA.map((x) => x.email)).toEqual(Array.from({ length: 30 }, (_, n) => `w${n}@example.com`));
    expect(readB.map((x) => x.email)).toEqual(
      Array.from({ length: 30 }, (_, n) => `w${n + 100}@example.com`),
    );
    const readC = await orders.find({ where: { customer: { id: owner.id } }, order: { id: 'ASC' } });
    expect(readC.map((o) => o.cardNumber)).toEqual(
      Array.from({ length: 30 }, (_, n) => `5500 0000 0000 ${2000 + n}`),
    );
  });

  it('an update of many loaded rows re-seals only the changed values, each readable', async () => {
    const repo = db.dataSource.getRepository(Customer);
    await repo.save(Array.from({ length: 40 }, (_, n) => customer(repo, n, 'updates')));
    const loaded = await repo.find({ where: { plan: 'updates' }, order: { id: 'ASC' } });
    const before = await rawQuery<{
      id: number;
      email_ciphertext: Buffer;
      address_ciphertext: Buffer | null;
    }>(
      db.schema.url,
      `SELECT id, email_ciphertext, address_ciphertext FROM ${table('customer')} WHERE plan = 'updates' ORDER BY id`,
    );
    loaded.forEach((c, n) => {
      if (n % 3 === 0) c.email = `changed-${n}@example.com`;
    });
    await repo.save(loaded);
    const after = await rawQuery<{ id: number; email_ciphertext: Buffer; address_ciphertext: Buffer | null }>(
      db.schema.url,
      `SELECT id, email_ciphertext, address_ciphertext FROM ${table('customer')} WHERE plan = 'updates' ORDER BY id`,
    );
    after.forEach((row, n) => {
      const was = before[n] as (typeof before)[number];
      expect(row.email_ciphertext.equals(was.email_ciphertext)).toBe(n % 3 !== 0);
      expect(
        row.address_ciphertext === null
          ? null
          : row.address_ciphertext.equals(was.address_ciphertext as Buffer),
      ).toBe(was.address_ciphertext === null ? null : true);
    });
    const read = await repo.find({ where: { plan: 'updates' }, order: { id: 'ASC' } });
    expect(read.map((c) => c.email)).toEqual(
      Array.from({ length: 40 }, (_, n) => (n % 3 === 0 ? `changed-${n}@example.com` : `w${n}@example.com`)),
    );
  });
});

describe.skipIf(onPglite)('a compact save([...]) is sealed together', () => {
  let compact: EncryptedTestDatabase;
  beforeAll(async () => {
    compact = await encryptedDatabase([CompactPerson, CompactOrder], {
      prefix: 'batched_compact_writes',
      migrations: COMPACT_MIGRATIONS,
    });
  });
  afterAll(() => compact?.close());

  it("a new data key's row is committed once for the whole save, before any value naming it; a rolled-back save leaves the row and no value", async () => {
    const people = compact.dataSource.getRepository(CompactPerson);
    compact.encryption.cache.renewEncryptionKey();
    const rowsBefore = (await keyRows(compact)).length;
    const failed = await compact.dataSource.manager
      .transaction(async (m) => {
        await m.save(
          Array.from({ length: 50 }, (_, n) =>
            m.create(CompactPerson, {
              email: `rb${n}@example.com`,
              address: null,
              plan: 'rolled-back',
              contact: { phone: null, channel: null },
            }),
          ),
        );
        throw new Error('the application changed its mind');
      })
      .then(
        () => undefined,
        (e: unknown) => e,
      );
    expect((failed as Error).message).toBe('the application changed its mind');
    const rows = await keyRows(compact);
    expect(rows).toHaveLength(rowsBefore + 1);
    const [count] = await rawQuery<{ n: string }>(
      compact.schema.url,
      `SELECT count(*)::text AS n FROM "${compact.schema.schema}".compact_people WHERE plan = 'rolled-back'`,
    );
    expect(count?.n).toBe('0');

    const saved = await people.save(
      Array.from({ length: 50 }, (_, n) =>
        people.create({
          email: `ok${n}@example.com`,
          address: { street: `${n} Frame St`, city: 'Lund' },
          plan: 'committed',
          contact: { phone: `${n}`, channel: null },
        }),
      ),
    );
    expect(saved).toHaveLength(50);
    const stored = await rawQuery<{ email_ciphertext: Buffer; address_ciphertext: Buffer }>(
      compact.schema.url,
      `SELECT email_ciphertext, address_ciphertext FROM "${compact.schema.schema}".compact_people WHERE plan = 'committed' ORDER BY id`,
    );
    const ids = new Set(
      stored.flatMap((r) => [dataKeyIdOf(r.email_ciphertext), dataKeyIdOf(r.address_ciphertext)]),
    );
    const known = new Set((await keyRows(compact)).map((r) => r.id));
    for (const id of ids) expect(known.has(id)).toBe(true);
    expect((await keyRows(compact)).length).toBe(rowsBefore + 1);
    const read = await people.find({ where: { plan: 'committed' }, order: { id: 'ASC' } });
    expect(read.map((p) => [p.email, p.address?.street])).toEqual(
      Array.from({ length: 50 }, (_, n) => [`ok${n}@example.com`, `${n} Frame St`]),
    );
  });
});
