import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rawQuery } from '../../support/database';
import { Customer, Order } from '../../support/entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

const MAX_UNWRAPPED_KEYS = 4;
const ROWS = 40;

let db: EncryptedTestDatabase;

beforeAll(async () => {
  db = await encryptedDatabase([Customer, Order], {
    prefix: 'many_keys',
    encryption: { cache: { maxUnwrappedKeys: MAX_UNWRAPPED_KEYS } },
  });
});
afterAll(async () => {
  await db?.close();
});

describe('one result under more data keys than maxUnwrappedKeys', () => {
  it('reads every row on a cold cache, unwrapping each key once, and keeps the cache within its bound', async () => {
    const repo = db.dataSource.getRepository(Customer);
    const emails: string[] = [];
    for (let i = 0; i < ROWS; i++) {
      const email = `many-${i}@example.com`;
      emails.push(email);
      await repo.save(
        repo.create({ email, plan: 'many', address: { street: `${i} Key Street`, city: 'Lisbon' } }),
      );
      db.encryption.cache.renewEncryptionKey(); // the next row gets a data key of its own
    }
    const [stored] = await rawQuery<{ keys: number; plaintext: number }>(
      db.schema.url,
      `SELECT count(DISTINCT email_wrapped_key)::int AS keys,
              count(*) FILTER (WHERE position('many-'::bytea IN email_ciphertext) > 0)::int AS plaintext
       FROM "${db.schema.schema}".customer WHERE plan = 'many'`,
    );
    expect(stored?.keys).toBe(ROWS);
    expect(stored?.plaintext).toBe(0);

    db.encryption.purgeCache(); // a cold cache, as in a process that has just started
    db.provider.reset();
    const loaded = await repo.find({ where: { plan: 'many' }, order: { id: 'ASC' } });
    expect(loaded.map((c) => c.email)).toEqual(emails);
    expect(loaded.map((c) => c.address?.street)).toEqual(emails.map((_, i) => `${i} Key Street`));
    expect(db.encryption.cache.unwrappedKeyCount).toBeLessThanOrEqual(MAX_UNWRAPPED_KEYS);
    // Each row's properties share its data key: one unwrap per distinct key, not per value.
    expect(db.provider.calls.unwrap).toBe(ROWS);
  });
});
