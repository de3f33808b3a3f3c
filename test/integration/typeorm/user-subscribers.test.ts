import { type EntitySubscriberInterface, EventSubscriber, In, type LoadEvent } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rawQuery } from '../../support/database';
import { Customer, Order } from '../../support/entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';
import { COMPACT_MIGRATIONS, CompactOrder, CompactPerson } from '../compact/compact-entities';
import { onPglite } from '../compact/compact-support';

/**
 * An application's own entity subscribers see loaded entities with their encrypted properties
 * decrypted, as entity `@AfterLoad()` listeners do: whether the subscriber is given in the
 * DataSource options (TypeORM calls it before the library's) or added after initialize() (after
 * it), synchronous or not, with the data key cached or not, for the entity itself or loaded
 * through a relation. What it changes in `afterLoad` stays, and is saved as a change.
 */
type Seen = { subscriber: string; entity: string; email: unknown; phone: unknown };
const seen: Seen[] = [];

function record(subscriber: string, entity: object): void {
  const e = entity as { email?: unknown; contact?: { phone?: unknown } };
  seen.push({ subscriber, entity: entity.constructor.name, email: e.email, phone: e.contact?.phone });
}

/** Given in the DataSource options: TypeORM builds it, and calls it before the library's. */
@EventSubscriber()
class AuditBefore implements EntitySubscriberInterface {
  afterLoad(entity: object): void {
    if (entity instanceof Customer || entity instanceof CompactPerson) record('options', entity);
  }
}

/** Listening to one entity, changing what the application sees (a display form). */
@EventSubscriber()
class DisplayForm implements EntitySubscriberInterface<Customer> {
  listenTo() {
    return Customer;
  }
  afterLoad(entity: Customer, event?: LoadEvent<Customer>): void {
    if (event?.entity !== entity) throw new Error('the load event names another entity');
    if (typeof entity.email === 'string' && entity.email.startsWith('display-')) {
      entity.email = entity.email.toUpperCase();
    }
  }
}

const late: EntitySubscriberInterface = {
  afterLoad(entity: object) {
    if (entity instanceof Customer || entity instanceof CompactPerson) record('late', entity);
  },
};
const lateAsync: EntitySubscriberInterface = {
  async afterLoad(entity: object) {
    if (entity instanceof Customer || entity instanceof CompactPerson) record('late-async', entity);
  },
};

let db: EncryptedTestDatabase;
beforeAll(async () => {
  db = await encryptedDatabase([Customer, Order, ...(onPglite ? [] : [CompactPerson, CompactOrder])], {
    prefix: 'user_subscribers',
    migrations: COMPACT_MIGRATIONS,
    subscribers: [AuditBefore, DisplayForm],
  });
  db.dataSource.subscribers.push(late, lateAsync);
});
afterAll(() => db?.close());

const SUBSCRIBERS = ['options', 'late', 'late-async'];
const people = (n: number, tag: string) =>
  Array.from({ length: n }, (_, i) => ({
    email: `${tag}${i}@example.com`,
    plan: tag,
    address: { street: `${i} Listener Road`, city: 'Tampere' },
    contact: { phone: `+358 50 ${i}`, preferredChannel: null },
  }));

describe.each([
  ['sidecars', Customer, Order, 'customer'],
  ['compact', CompactPerson, CompactOrder, 'person'],
] as const)('the application’s subscribers (%s)', (layout, Person, PersonOrder, relation) => {
  const skip = layout === 'compact' && onPglite;
  const repo = () => db.dataSource.getRepository<Customer | CompactPerson>(Person);

  it.skipIf(skip)('see every loaded entity decrypted, with the data key cached and not', async () => {
    const saved = await repo().save(people(20, `${layout}-seen`));
    const ids = saved.map((p) => p.id);
    for (const cold of [false, true]) {
      if (cold) db.encryption.purgeCache();
      seen.length = 0;
      const found = await repo().findBy({ id: In(ids) });
      expect(found.length).toBe(20);
      for (const subscriber of SUBSCRIBERS) {
        const views = seen.filter((s) => s.subscriber === subscriber);
        expect(views.length, `${subscriber}, cold: ${cold}`).toBe(20);
        expect(views.map((v) => [v.email, v.phone]).sort()).toEqual(
          saved.map((p) => [p.email, p.contact.phone]).sort(),
        );
      }
    }
  });

  it.skipIf(skip)('see an entity loaded through an eager relation decrypted', async () => {
    const [owner] = await repo().save(people(1, `${layout}-owner`));
    const orders = db.dataSource.getRepository<Order | CompactOrder>(PersonOrder);
    const order = (await orders.save({
      cardNumber: '4111111111111111',
      [relation]: owner,
    } as never)) as unknown as {
      id: number;
    };
    db.encryption.purgeCache();
    seen.length = 0;
    const back = (await orders.findOneByOrFail({ id: order.id })) as unknown as Record<string, unknown>;
    expect((back[relation] as Customer).email).toBe(owner?.email);
    for (const subscriber of SUBSCRIBERS) {
      expect(seen.filter((s) => s.subscriber === subscriber).map((s) => s.email)).toEqual([owner?.email]);
    }
  });
});

describe('what a subscriber changes in afterLoad', () => {
  it('stays on the entity, warm and cold; reading writes nothing, and saving what was read loses nothing', async () => {
    const repo = db.dataSource.getRepository(Customer);
    const [saved] = await repo.save(people(1, 'display-'));
    type Stored = {
      email_ciphertext: Buffer;
      email_iv: Buffer;
      email_wrapped_key: Buffer;
      email_key_version: number;
    };
    const stored = async () =>
      (
        await rawQuery<Stored>(
          db.schema.url,
          `SELECT email_ciphertext, email_iv, email_wrapped_key, email_key_version FROM "${db.schema.schema}".customer WHERE id = $1`,
          [saved?.id],
        )
      )[0] as Stored;
    const before = await stored();
    for (const cold of [false, true]) {
      if (cold) db.encryption.purgeCache();
      expect((await repo.findOneByOrFail({ id: saved?.id })).email).toBe('DISPLAY-0@EXAMPLE.COM');
    }
    expect(await stored()).toEqual(before);
    /* The entity holds the display form, which differs from what was decrypted: it may be written. */
    await repo.save(await repo.findOneByOrFail({ id: saved?.id }));
    const after = await stored();
    expect(after.email_ciphertext.toString('latin1').toLowerCase()).not.toContain('display');
    const opened = await db.encryption.decryptValue(
      {
        ciphertext: after.email_ciphertext,
        iv: after.email_iv,
        wrappedKey: after.email_wrapped_key,
        keyVersion: after.email_key_version,
      },
      {
        schema: db.schema.schema,
        table: 'customer',
        column: 'email',
        /* An update knows the row's id: the value is bound to it when its header says so. */
        ...((after.email_ciphertext[1] ?? 0) & 0x01 ? { primaryKey: String(saved?.id) } : {}),
      },
    );
    expect(String(opened).toUpperCase()).toBe('DISPLAY-0@EXAMPLE.COM');
    db.encryption.purgeCache();
    expect((await repo.findOneByOrFail({ id: saved?.id })).email).toBe('DISPLAY-0@EXAMPLE.COM');
  });
});

describe('one subscriber class in two DataSources', () => {
  it('TypeORM shares its instance between them; each DataSource’s loads are seen decrypted', async () => {
    const other = await encryptedDatabase([Customer, Order], {
      prefix: 'user_subscribers_two',
      subscribers: [AuditBefore],
      encryption: { keyringId: 'second-app' },
    });
    try {
      const [mine] = await db.dataSource.getRepository(Customer).save(people(1, 'first-ds'));
      const [theirs] = await other.dataSource.getRepository(Customer).save(people(1, 'second-ds'));
      for (const cold of [false, true]) {
        if (cold) {
          db.encryption.purgeCache();
          other.encryption.purgeCache();
        }
        seen.length = 0;
        await db.dataSource.getRepository(Customer).findOneByOrFail({ id: mine?.id });
        await other.dataSource.getRepository(Customer).findOneByOrFail({ id: theirs?.id });
        expect(seen.filter((s) => s.subscriber === 'options').map((s) => s.email)).toEqual([
          'first-ds0@example.com',
          'second-ds0@example.com',
        ]);
      }
    } finally {
      await other.close();
    }
  });
});

describe('a frozen subscriber', () => {
  it('does not keep the DataSource from starting, and reads still decrypt', async () => {
    const frozen: EntitySubscriberInterface = Object.freeze({
      afterLoad(entity: object) {
        if (entity instanceof Customer) record('frozen', entity);
      },
    });
    const other = await encryptedDatabase([Customer, Order], { prefix: 'user_subscribers_frozen' });
    try {
      other.dataSource.subscribers.push(frozen);
      const [saved] = await other.dataSource.getRepository(Customer).save(people(1, 'frozen'));
      seen.length = 0;
      expect((await other.dataSource.getRepository(Customer).findOneByOrFail({ id: saved?.id })).email).toBe(
        'frozen0@example.com',
      );
      expect(seen.filter((s) => s.subscriber === 'frozen')).toHaveLength(1);
    } finally {
      await other.close();
    }
  });
});

describe('a DataSource destroyed and initialized again', () => {
  it('its subscribers still see each entity decrypted, once per load', async () => {
    const other = await encryptedDatabase([Customer, Order], {
      prefix: 'user_subscribers_again',
      subscribers: [AuditBefore],
    });
    try {
      other.dataSource.subscribers.push(late);
      const [saved] = await other.dataSource.getRepository(Customer).save(people(1, 'again'));
      await other.dataSource.destroy();
      await other.dataSource.initialize();
      /* initialize() built its subscribers anew: the one pushed before is gone, add it again. */
      other.dataSource.subscribers.push(late);
      for (const cold of [false, true]) {
        if (cold) other.encryption.purgeCache();
        seen.length = 0;
        await other.dataSource.getRepository(Customer).findOneByOrFail({ id: saved?.id });
        expect(seen.map((s) => [s.subscriber, s.email]).sort()).toEqual([
          ['late', 'again0@example.com'],
          ['options', 'again0@example.com'],
        ]);
      }
    } finally {
      await other.close();
    }
  });
});
