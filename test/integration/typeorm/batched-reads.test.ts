import { randomUUID } from 'node:crypto';
import { AfterLoad, Column, Entity, In, PrimaryGeneratedColumn } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Encrypted, IntegrityError } from '../../../src';
import { rawQuery } from '../../support/database';
import { Customer, Employee, Order } from '../../support/entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';
import { COMPACT_MIGRATIONS, CompactOrder, CompactPerson } from '../compact/compact-entities';
import { onPglite } from '../compact/compact-support';

/**
 * The values of a result set are decrypted together, one AES-GCM call per data key. What a user
 * does with result sets must read back as before: rows under many data keys and of every value
 * type, a tampered row among good ones, two queries read in the same turn, rows whose keys are
 * cached beside rows whose keys are not, entity listeners, relations, copies of loaded entities.
 */

/** Remembers, in an `@AfterLoad()` listener, what it saw of its encrypted property. */
@Entity('batched_badges')
class Badge {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted() holder!: string;
  @Column({ type: 'varchar' }) team!: string;
  seenByListener?: unknown;
  @AfterLoad() remember() {
    this.seenByListener = this.holder;
  }
}

let db: EncryptedTestDatabase;
const table = (name: string) => `"${db.schema.schema}".${name}`;

beforeAll(async () => {
  db = await encryptedDatabase([Customer, Order, Employee, Badge], { prefix: 'batched_reads' });
});
afterAll(() => db?.close());

function employee(n: number): Employee {
  return Object.assign(new Employee(), {
    id: randomUUID(),
    fullName: `Employee ${n} Æøå ✓`,
    salary: n % 5 === 0 ? null : n * 1000.5,
    birthDate: n % 7 === 0 ? null : new Date(Date.UTC(1980, 0, 1 + n)),
    active: n % 3 === 0 ? null : n % 2 === 0,
    badge: n % 4 === 0 ? null : BigInt(n) * 10n ** 15n,
    photo: n % 6 === 0 ? null : Buffer.from([n & 255, 0, 255, (n >> 8) & 255]),
    team: `batch-${n % 3}`,
  });
}

describe('a result set is decrypted together', () => {
  it('rows under many data keys, with nulls and every value type, read back exactly', async () => {
    const repo = db.dataSource.getRepository(Employee);
    const written: Employee[] = [];
    for (let chunk = 0; chunk < 6; chunk++) {
      db.encryption.cache.renewEncryptionKey(); // each chunk under a data key of its own
      const rows = Array.from({ length: 50 }, (_, i) => employee(chunk * 50 + i));
      await repo.save(rows);
      written.push(...rows.map((r) => ({ ...r })));
    }
    const stored = await rawQuery<{ keys: string }>(
      db.schema.url,
      `SELECT count(DISTINCT "fullName_wrapped_key")::text AS keys FROM ${table('employee')}`,
    );
    expect(Number(stored[0]?.keys)).toBe(6);
    const plaintextHits = await rawQuery(
      db.schema.url,
      `SELECT id FROM ${table('employee')} WHERE position(convert_to('Employee', 'UTF8') in "fullName_ciphertext") > 0`,
    );
    expect(plaintextHits).toEqual([]);

    const read = await repo.find({ where: { team: In(['batch-0', 'batch-1', 'batch-2']) } });
    expect(read).toHaveLength(written.length);
    const byId = new Map(read.map((r) => [r.id, r]));
    for (const w of written) {
      const r = byId.get(w.id);
      expect(r).toBeDefined();
      expect({ ...r, createdAt: undefined }).toEqual({ ...w, createdAt: undefined });
    }
  });

  it('a tampered row fails its own query with an IntegrityError naming it; the good rows of another query read in the same turn are returned', async () => {
    const repo = db.dataSource.getRepository(Customer);
    const saved = await repo.save(
      Array.from({ length: 40 }, (_, i) =>
        repo.create({
          email: `c${i}@example.com`,
          address: { street: `${i} Batch Road`, city: 'Oslo' },
          plan: 'tamper',
          contact: { phone: `+47 ${i}`, preferredChannel: null },
        }),
      ),
    );
    const victim = saved[17] as Customer;
    await rawQuery(
      db.schema.url,
      `UPDATE ${table('customer')} SET email_ciphertext = set_byte(email_ciphertext, 5, get_byte(email_ciphertext, 5) # 1) WHERE id = $1`,
      [victim.id],
    );
    const good = saved.filter((c) => c !== victim).map((c) => c.id);

    /* One result set holding it: the query fails, naming the row. */
    const error = await repo.find({ where: { plan: 'tamper' } }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(error).toBeInstanceOf(IntegrityError);
    expect((error as IntegrityError).context).toMatchObject({
      entity: 'Customer',
      column: 'email',
      primaryKey: String(victim.id),
    });

    /* Two queries at once, on one connection (read back to back) and on two. */
    for (const concurrent of [
      () =>
        db.dataSource.manager.transaction((m) =>
          Promise.allSettled([
            m.find(Customer, { where: { id: In([victim.id]) } }),
            m.find(Customer, { where: { id: In(good) }, order: { id: 'ASC' } }),
          ]),
        ),
      () =>
        Promise.allSettled([
          repo.find({ where: { id: In([victim.id]) } }),
          repo.find({ where: { id: In(good) }, order: { id: 'ASC' } }),
        ]),
    ]) {
      const [bad, fine] = await concurrent();
      expect(bad.status).toBe('rejected');
      expect((bad as PromiseRejectedResult).reason).toBeInstanceOf(IntegrityError);
      expect(fine.status).toBe('fulfilled');
      const rows = (fine as PromiseFulfilledResult<Customer[]>).value;
      expect(rows.map((c) => c.email)).toEqual(saved.filter((c) => c !== victim).map((c) => c.email));
      expect(rows.every((c) => c.address?.city === 'Oslo')).toBe(true);
    }
  });

  it('two result sets decrypted in the same turn: the tampered row rejects alone, every other entity opens', async () => {
    const repo = db.dataSource.getRepository(Customer);
    const saved = await repo.save(
      Array.from({ length: 12 }, (_, i) =>
        repo.create({
          email: `turn${i}@example.com`,
          address: null,
          plan: 'same-turn',
          contact: { phone: null, preferredChannel: null },
        }),
      ),
    );
    const victim = saved[5] as Customer;
    await rawQuery(
      db.schema.url,
      `UPDATE ${table('customer')} SET email_ciphertext = set_byte(email_ciphertext, 9, get_byte(email_ciphertext, 9) # 2) WHERE id = $1`,
      [victim.id],
    );
    /* Hydrated without listeners, then given to the subscriber exactly as TypeORM's broadcast does,
       both result sets in one synchronous pass: they share one batch. */
    const hydrate = (ids: number[]) =>
      repo
        .createQueryBuilder('c')
        .where('c.id IN (:...ids)', { ids })
        .orderBy('c.id')
        .callListeners(false)
        .getMany();
    const first = await hydrate(saved.slice(0, 6).map((c) => c.id));
    const second = await hydrate(saved.slice(6).map((c) => c.id));
    const subscriber = db.dataSource.subscribers.find((s) => typeof s.afterLoad === 'function');
    const metadata = db.dataSource.getMetadata(Customer);
    const load = (entity: Customer) =>
      subscriber?.afterLoad?.(entity, { metadata, entity, queryRunner: undefined } as never) as Promise<void>;
    const firstLoads = first.map(load);
    const secondLoads = second.map(load);
    const settled = await Promise.allSettled([...firstLoads, ...secondLoads]);
    const rejected = settled.flatMap((r, i) => (r.status === 'rejected' ? [i] : []));
    expect(rejected).toEqual([5]);
    expect((settled[5] as PromiseRejectedResult).reason).toBeInstanceOf(IntegrityError);
    expect([...first, ...second].filter((c) => c !== first[5]).map((c) => c.email)).toEqual(
      saved.filter((c) => c !== victim).map((c) => c.email),
    );
  });

  it('rows whose data keys are cached and rows whose keys another instance made read back together, one unwrap per new key', async () => {
    const other = await encryptedDatabase([Customer, Order, Employee, Badge], {
      schema: db.schema,
      encryption: { keys: [{ version: 1, provider: db.provider }] },
    });
    try {
      const mine = db.dataSource.getRepository(Customer);
      const theirs = other.dataSource.getRepository(Customer);
      const make = (repo: typeof mine, n: number, who: string) =>
        repo.create({
          email: `${who}-${n}@example.com`,
          address: null,
          plan: 'mixed',
          contact: { phone: null, preferredChannel: 'sms' },
        });
      await mine.save(Array.from({ length: 30 }, (_, n) => make(mine, n, 'mine')));
      other.encryption.cache.renewEncryptionKey();
      await theirs.save(Array.from({ length: 30 }, (_, n) => make(theirs, n, 'theirs')));
      other.encryption.cache.renewEncryptionKey();
      await theirs.save(Array.from({ length: 30 }, (_, n) => make(theirs, n + 30, 'theirs')));
      const unwrapsBefore = db.provider.calls.unwrap;
      const read = await mine.find({ where: { plan: 'mixed' }, order: { id: 'ASC' } });
      expect(read.map((c) => c.email)).toEqual([
        ...Array.from({ length: 30 }, (_, n) => `mine-${n}@example.com`),
        ...Array.from({ length: 60 }, (_, n) => `theirs-${n}@example.com`),
      ]);
      expect(read.every((c) => c.address === null && c.contact.phone === null)).toBe(true);
      /* The other instance's two data keys (email; address and phone are NULL), once each. */
      expect(db.provider.calls.unwrap - unwrapsBefore).toBe(2);
    } finally {
      await other.close();
    }
  });

  it('an @AfterLoad() listener sees plaintext, and eager relations decrypt with their owners', async () => {
    await db.dataSource
      .getRepository(Badge)
      .save(
        Array.from({ length: 20 }, (_, i) =>
          Object.assign(new Badge(), { holder: `holder ${i}`, team: 'listeners' }),
        ),
      );
    const badges = await db.dataSource.getRepository(Badge).find({ order: { id: 'ASC' } });
    expect(badges.map((b) => b.seenByListener)).toEqual(Array.from({ length: 20 }, (_, i) => `holder ${i}`));

    const customers = db.dataSource.getRepository(Customer);
    const owner = await customers.save(
      customers.create({
        email: 'owner@example.com',
        address: null,
        plan: 'orders',
        contact: { phone: '+1', preferredChannel: null },
      }),
    );
    const orders = db.dataSource.getRepository(Order);
    await orders.save(
      Array.from({ length: 25 }, (_, i) =>
        orders.create({ cardNumber: `4111 0000 0000 ${1000 + i}`, customer: owner }),
      ),
    );
    const read = await orders.find({ where: { customer: { id: owner.id } }, order: { id: 'ASC' } });
    expect(read.map((o) => o.cardNumber)).toEqual(
      Array.from({ length: 25 }, (_, i) => `4111 0000 0000 ${1000 + i}`),
    );
    expect(
      read.every((o) => o.customer.email === 'owner@example.com' && o.customer.contact.phone === '+1'),
    ).toBe(true);
  });

  it('loaded entities saved unchanged write nothing; a copy made with merge() is a new row that reads back, sealed anew', async () => {
    const repo = db.dataSource.getRepository(Customer);
    await repo.save(
      Array.from({ length: 10 }, (_, i) =>
        repo.create({
          email: `copy-${i}@example.com`,
          address: { street: 'Copy Lane', city: 'Bergen' },
          plan: 'copies',
          contact: { phone: null, preferredChannel: null },
        }),
      ),
    );
    const loaded = await repo.find({ where: { plan: 'copies' }, order: { id: 'ASC' } });
    const from = db.logger.lines.length;
    await repo.save(loaded);
    expect(db.logger.lines.slice(from).filter((line) => /\bUPDATE\b|\bINSERT\b/.test(line))).toEqual([]);

    const original = loaded[3] as Customer;
    const copy = repo.merge(repo.create(), original);
    (copy as { id?: number }).id = undefined;
    const saved = await repo.save(copy);
    expect(saved.id).not.toBe(original.id);
    const again = await repo.findOneByOrFail({ id: saved.id });
    expect(again.email).toBe('copy-3@example.com');
    expect(again.address).toEqual({ street: 'Copy Lane', city: 'Bergen' });
    const [a, b] = await rawQuery<{ email_ciphertext: Buffer }>(
      db.schema.url,
      `SELECT email_ciphertext FROM ${table('customer')} WHERE id IN ($1, $2) ORDER BY id`,
      [original.id, saved.id],
    );
    expect(a?.email_ciphertext.equals(b?.email_ciphertext as Buffer)).toBe(false);
  });
});

describe.skipIf(onPglite)('a compact result set is decrypted together', () => {
  let compact: EncryptedTestDatabase;
  beforeAll(async () => {
    compact = await encryptedDatabase([CompactPerson, CompactOrder], {
      prefix: 'batched_compact',
      migrations: COMPACT_MIGRATIONS,
    });
  });
  afterAll(() => compact?.close());

  it('a tampered compact value fails its own row only; under several data keys the rest read back', async () => {
    const people = compact.dataSource.getRepository(CompactPerson);
    const saved: CompactPerson[] = [];
    for (let k = 0; k < 3; k++) {
      compact.encryption.cache.renewEncryptionKey();
      saved.push(
        ...(await people.save(
          Array.from({ length: 30 }, (_, i) =>
            people.create({
              email: `p${k * 30 + i}@example.com`,
              address: null,
              plan: 'compact',
              contact: { phone: `${i}`, channel: null },
            }),
          ),
        )),
      );
    }
    const victim = saved[44] as CompactPerson;
    await rawQuery(
      compact.schema.url,
      `UPDATE "${compact.schema.schema}".compact_people SET email_ciphertext = set_byte(email_ciphertext, 30, get_byte(email_ciphertext, 30) # 4) WHERE id = $1`,
      [victim.id],
    );
    const error = await people.find({ where: { plan: 'compact' } }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(error).toBeInstanceOf(IntegrityError);
    expect((error as IntegrityError).context).toMatchObject({
      column: 'email',
      primaryKey: String(victim.id),
    });
    const rest = await people.find({
      where: { id: In(saved.filter((p) => p !== victim).map((p) => p.id)) },
      order: { id: 'ASC' },
    });
    expect(rest.map((p) => p.email)).toEqual(saved.filter((p) => p !== victim).map((p) => p.email));
  });
});
