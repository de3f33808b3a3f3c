import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';
import { COMPACT_MIGRATIONS, CompactOrder, CompactPerson } from './compact-entities';
import { keyRows, keyTableQueries, onPglite } from './compact-support';

const ROWS = 10_000;
const DATA_KEYS = 5;
let db: EncryptedTestDatabase;

beforeAll(async () => {
  if (onPglite) return;
  db = await encryptedDatabase([CompactPerson, CompactOrder], {
    prefix: 'compact_batch',
    migrations: COMPACT_MIGRATIONS,
  });
  const people = db.dataSource.getRepository(CompactPerson);
  const perKey = ROWS / DATA_KEYS;
  for (let k = 0; k < DATA_KEYS; k++) {
    /* A fresh data key for each fifth of the rows. */
    db.encryption.cache.renewEncryptionKey();
    for (let start = 0; start < perKey; start += 500) {
      await people.save(
        Array.from({ length: 500 }, (_, i) => {
          const n = k * perKey + start + i;
          return people.create({
            email: `person-${n}@example.com`,
            address: { street: `${n} Main St`, city: 'Springfield' },
            plan: 'batch',
            contact: { phone: `+1 555 ${n}`, channel: null },
          });
        }),
      );
    }
  }
}, 240_000);
afterAll(() => db?.close());

describe.skipIf(onPglite)('reads resolve data keys per result set', () => {
  it(`a cold find() of ${ROWS} rows costs one key-table query and one provider call per data key`, async () => {
    const rows = await keyRows(db);
    expect(rows).toHaveLength(DATA_KEYS);
    db.encryption.purgeCache();
    db.provider.reset();
    const from = db.logger.lines.length;
    const all = await db.dataSource.getRepository(CompactPerson).find({ order: { id: 'ASC' } });
    expect(all).toHaveLength(ROWS);
    for (const [n, p] of all.entries()) {
      if (
        p.email !== `person-${n}@example.com` ||
        p.contact.phone !== `+1 555 ${n}` ||
        p.address?.street !== `${n} Main St`
      ) {
        throw new Error(`row ${n} did not decrypt to what was written`);
      }
    }
    expect(keyTableQueries(db, from, 'SELECT')).toHaveLength(1);
    expect(keyTableQueries(db, from, 'INSERT')).toHaveLength(0);
    expect(db.provider.calls.unwrap).toBe(DATA_KEYS);

    /* Warm: nothing more is asked of the key table or the provider. */
    const warmFrom = db.logger.lines.length;
    await db.dataSource.getRepository(CompactPerson).find({ take: 1000 });
    expect(keyTableQueries(db, warmFrom)).toHaveLength(0);
    expect(db.provider.calls.unwrap).toBe(DATA_KEYS);
  });

  it('two result sets read cold, one after the other, ask for the ids each needs once', async () => {
    db.encryption.purgeCache();
    db.provider.reset();
    const from = db.logger.lines.length;
    const people = db.dataSource.getRepository(CompactPerson);
    const first = await people.find({ order: { id: 'ASC' }, take: 2000 });
    const second = await people.find({ order: { id: 'ASC' }, skip: 2000, take: 2000 });
    expect(first[0]?.email).toBe('person-0@example.com');
    expect(second[0]?.email).toBe('person-2000@example.com');
    expect(keyTableQueries(db, from, 'SELECT')).toHaveLength(2);
    expect(db.provider.calls.unwrap).toBe(2);
  });

  it('stores about 22 + 17 bytes of overhead per value and no wrapped key in the data table', async () => {
    const [size] = await rawQuery<{ overhead: string }>(
      db.schema.url,
      `SELECT avg(octet_length(email_ciphertext) - octet_length(convert_to('person-' || (id - 1) || '@example.com', 'UTF8'))) AS overhead
       FROM "${db.schema.schema}".compact_people`,
    );
    expect(Number(size?.overhead)).toBe(22 + 1 + 16);
  });
});
