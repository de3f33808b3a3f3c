import { randomUUID } from 'node:crypto';
import { IsNull, Not } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UnsupportedOperationError, ValueTypeError } from '../../../src';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';
import { COMPACT_MIGRATIONS, CompactBadge, CompactOrder, CompactPerson } from './compact-entities';
import {
  dataKeyIdOf,
  expectCompactValue,
  keyRows,
  keyTableQueries,
  onPglite,
  storedRow,
} from './compact-support';

let db: EncryptedTestDatabase;

beforeAll(async () => {
  if (onPglite) return;
  db = await encryptedDatabase([CompactPerson, CompactOrder, CompactBadge], {
    prefix: 'compact_rw',
    migrations: COMPACT_MIGRATIONS,
  });
});
afterAll(() => db?.close());

const people = () => db.dataSource.getRepository(CompactPerson);
const orders = () => db.dataSource.getRepository(CompactOrder);
const badges = () => db.dataSource.getRepository(CompactBadge);
const person = (email: string, extra: Partial<CompactPerson> = {}) =>
  people().create({ email, address: null, plan: 'p', contact: { phone: null, channel: null }, ...extra });

describe.skipIf(onPglite)('compact layout: the schema', () => {
  it('maps one bytea column per property and no sidecars', async () => {
    const columns = await rawQuery<{ column_name: string; data_type: string; is_nullable: string }>(
      db.schema.url,
      `SELECT column_name, data_type, is_nullable FROM information_schema.columns
       WHERE table_schema = $1 AND table_name = 'compact_people' ORDER BY column_name`,
      [db.schema.schema],
    );
    expect(columns.map((c) => [c.column_name, c.data_type, c.is_nullable])).toEqual([
      ['address_ciphertext', 'bytea', 'YES'],
      ['contactChannel', 'character varying', 'YES'],
      ['contactPhone_ciphertext', 'bytea', 'YES'],
      ['email_ciphertext', 'bytea', 'NO'],
      ['id', 'integer', 'NO'],
      ['plan', 'character varying', 'NO'],
    ]);
  });
});

describe.skipIf(onPglite)('compact layout: writes and reads', () => {
  it('save() stores format 2 pointing at a committed key row; reads decrypt', async () => {
    const saved = await people().save(
      person('ada@example.com', {
        address: { street: 'S', city: 'C' },
        contact: { phone: '+1 555', channel: 'sms' },
      }),
    );
    const row = await storedRow(db, 'compact_people', saved.id);
    const rows = await keyRows(db);
    const key = expectCompactValue(row.email_ciphertext, 'ada@example.com', rows, 0x02);
    expectCompactValue(row.contactPhone_ciphertext, '+1 555', rows);
    expectCompactValue(row.address_ciphertext, undefined, rows);
    expect(key.keyring).toBe('default');
    expect(key.tenant_id).toBeNull();
    expect(key.key_version).toBe(1);
    expect(key.wrapped_key.length).toBeGreaterThan(32);
    expect(key.fingerprint.length).toBe(32);
    /* One data key for every value this instance sealed so far. */
    expect(
      new Set([row.email_ciphertext, row.address_ciphertext].map((v) => dataKeyIdOf(v as Buffer))),
    ).toEqual(new Set([key.id]));
    expect(rows).toHaveLength(1);
    const back = await people().findOneByOrFail({ id: saved.id });
    expect([back.email, back.address, back.contact.phone]).toEqual([
      'ada@example.com',
      { street: 'S', city: 'C' },
      '+1 555',
    ]);
    db.encryption.purgeCache();
    const cold = await people().findOneByOrFail({ id: saved.id });
    expect(cold.email).toBe('ada@example.com');
  });

  it('the data row holds neither the plaintext nor the wrapped key anywhere', async () => {
    const saved = await people().save(person('nowhere@example.com'));
    const [raw] = await rawQuery<Record<string, unknown>>(
      db.schema.url,
      `SELECT row_to_json(p)::text AS json, encode(p.email_ciphertext, 'hex') AS hex FROM "${db.schema.schema}".compact_people p WHERE id = $1`,
      [saved.id],
    );
    expect(String(raw?.json)).not.toContain('nowhere');
    for (const key of await keyRows(db))
      expect(String(raw?.hex)).not.toContain(key.wrapped_key.toString('hex'));
  });

  it('insert() and query-builder insert encrypt each value', async () => {
    const values = {
      email: 'insert@example.com',
      address: null,
      plan: 'ins',
      contact: { phone: null, channel: null },
    };
    const result = await people().insert(values);
    expect(values.email).toBe('insert@example.com');
    const id = result.identifiers[0]?.id as number;
    expectCompactValue(
      (await storedRow(db, 'compact_people', id)).email_ciphertext,
      'insert@example.com',
      await keyRows(db),
    );
    await people()
      .createQueryBuilder()
      .insert()
      .values([
        { email: 'qb1@example.com', plan: 'qb', address: null },
        { email: 'qb2@example.com', plan: 'qb', address: null },
      ])
      .execute();
    const rows = await people().find({ where: { plan: 'qb' }, order: { id: 'ASC' } });
    expect(rows.map((r) => r.email)).toEqual(['qb1@example.com', 'qb2@example.com']);
    expect((await people().findOneByOrFail({ id })).email).toBe('insert@example.com');
  });

  it('save() of a loaded entity: unchanged writes nothing, a change re-seals only that column', async () => {
    const saved = await people().save(person('same@example.com', { address: { street: 'A', city: 'B' } }));
    const before = await storedRow(db, 'compact_people', saved.id);
    const loaded = await people().findOneByOrFail({ id: saved.id });
    const from = db.logger.lines.length;
    await people().save(loaded);
    expect(db.logger.lines.slice(from).some((l) => l.includes('UPDATE'))).toBe(false);
    loaded.email = 'changed@example.com';
    await people().save(loaded);
    const after = await storedRow(db, 'compact_people', saved.id);
    expect(after.address_ciphertext).toEqual(before.address_ciphertext);
    expect(after.email_ciphertext).not.toEqual(before.email_ciphertext);
    expectCompactValue(after.email_ciphertext, 'changed@example.com', await keyRows(db));
    expect((await people().findOneByOrFail({ id: saved.id })).email).toBe('changed@example.com');
  });

  it('update() and a query-builder update seal the SET values and leave the SET map as given', async () => {
    const saved = await people().save(person('qb-before@example.com'));
    const set = { email: 'upd@example.com' };
    await people().update({ id: saved.id }, set);
    expect(set).toEqual({ email: 'upd@example.com' });
    expectCompactValue(
      (await storedRow(db, 'compact_people', saved.id)).email_ciphertext,
      'upd@example.com',
      await keyRows(db),
    );
    expect((await people().findOneByOrFail({ id: saved.id })).email).toBe('upd@example.com');
    await people()
      .createQueryBuilder()
      .update(CompactPerson)
      .set({ email: 'qbu@example.com', address: { street: 'Q', city: 'B' } })
      .where('id = :id', { id: saved.id })
      .execute();
    const row = await storedRow(db, 'compact_people', saved.id);
    expectCompactValue(row.email_ciphertext, 'qbu@example.com', await keyRows(db));
    const back = await people().findOneByOrFail({ id: saved.id });
    expect([back.email, back.address]).toEqual(['qbu@example.com', { street: 'Q', city: 'B' }]);
  });

  it('a query-builder update of many rows seals one value for all, readable in each row only when unbound', async () => {
    const [a, b] = await people().save([
      person('m1@example.com', { plan: 'many' }),
      person('m2@example.com', { plan: 'many' }),
    ]);
    await people()
      .createQueryBuilder()
      .update()
      .set({ address: { street: 'M', city: 'N' } })
      .where('plan = :p', { p: 'many' })
      .execute();
    const rows = await people().findBy({ plan: 'many' });
    expect(rows.map((r) => r.address)).toEqual([
      { street: 'M', city: 'N' },
      { street: 'M', city: 'N' },
    ]);
    const ra = await storedRow(db, 'compact_people', (a as CompactPerson).id);
    const rb = await storedRow(db, 'compact_people', (b as CompactPerson).id);
    expect((ra.address_ciphertext as Buffer)[1] ?? 0).toBe(0x02); // schema bound, no primary key
    expect(ra.address_ciphertext).toEqual(rb.address_ciphertext);
  });

  it('nullable properties store NULL and read null; IsNull works', async () => {
    const saved = await people().save(person('nul@example.com', { address: null }));
    const row = await storedRow(db, 'compact_people', saved.id);
    expect(row.address_ciphertext).toBeNull();
    expect(row.contactPhone_ciphertext).toBeNull();
    const back = await people().findOneByOrFail({ id: saved.id });
    expect([back.address, back.contact.phone]).toEqual([null, null]);
    expect((await people().findBy({ id: saved.id, address: IsNull() })).length).toBe(1);
    expect((await people().findBy({ id: saved.id, address: Not(IsNull()) })).length).toBe(0);
    back.address = { street: 'now', city: 'set' };
    await people().save(back);
    expect((await storedRow(db, 'compact_people', saved.id)).address_ciphertext).toBeInstanceOf(Buffer);
    back.address = null;
    await people().save(back);
    expect((await storedRow(db, 'compact_people', saved.id)).address_ciphertext).toBeNull();
    await expect(people().save(person(null as unknown as string))).rejects.toBeInstanceOf(ValueTypeError);
  });

  it('embedded objects: written, read, changed', async () => {
    const saved = await people().save(
      person('emb@example.com', { contact: { phone: '+44 1', channel: 'call' } }),
    );
    const loaded = await people().findOneByOrFail({ id: saved.id });
    expect(loaded.contact).toEqual({ phone: '+44 1', channel: 'call' });
    loaded.contact.phone = '+44 2';
    await people().save(loaded);
    const row = await storedRow(db, 'compact_people', saved.id);
    expectCompactValue(row.contactPhone_ciphertext, '+44 2', await keyRows(db));
    expect((await people().findOneByOrFail({ id: saved.id })).contact.phone).toBe('+44 2');
  });

  it('relations: eager, relations option and joins decrypt both sides', async () => {
    const owner = await people().save(person('owner@example.com'));
    await orders().save([
      { cardNumber: '4111111111111111', person: owner },
      { cardNumber: '5500000000000004', person: owner },
    ]);
    const found = await orders().find({ where: { person: { id: owner.id } }, order: { id: 'ASC' } });
    expect(found.map((o) => [o.cardNumber, o.person.email])).toEqual([
      ['4111111111111111', 'owner@example.com'],
      ['5500000000000004', 'owner@example.com'],
    ]);
    const joined = await people()
      .createQueryBuilder('p')
      .leftJoinAndSelect('p.orders', 'o')
      .where('p.id = :id', { id: owner.id })
      .getOneOrFail();
    expect(joined.orders.map((o) => o.cardNumber).sort()).toEqual(['4111111111111111', '5500000000000004']);
  });

  it('a partial select naming the property decrypts it with no extra query on the data table', async () => {
    const saved = await people().save(person('partial@example.com', { plan: 'partial' }));
    db.encryption.purgeCache();
    const from = db.logger.lines.length;
    const rows = await people().find({ select: { id: true, email: true }, where: { plan: 'partial' } });
    expect(rows.map((r) => [r.id, r.email, r.plan])).toEqual([[saved.id, 'partial@example.com', undefined]]);
    const dataQueries = db.logger.lines.slice(from).filter((l) => l.includes('compact_people'));
    expect(dataQueries).toHaveLength(1);
    const noId = await people().find({ select: { email: true }, where: { plan: 'partial' } });
    expect(noId.map((r) => r.email)).toEqual(['partial@example.com']);
    const none = await people().find({ select: { id: true, plan: true }, where: { plan: 'partial' } });
    expect(none[0]?.email).toBeUndefined();
  });

  it('upsert() on a client-assigned key inserts then updates, always readable and bound to the key', async () => {
    const id = randomUUID();
    await badges().upsert({ id, holder: 'First', level: 1, team: 'up' }, ['id']);
    /* An upsert naming only some properties keeps the others. */
    await badges().upsert({ id, holder: 'Second', team: 'up' }, ['id']);
    const kept = await badges().findOneByOrFail({ id });
    expect([kept.holder, kept.level]).toEqual(['Second', 1]);
    await badges().upsert({ id, holder: 'Third', level: null, team: 'up' }, ['id']);
    const row = await storedRow(db, 'compact_badges', id);
    expectCompactValue(row.holder_ciphertext, 'Third', await keyRows(db), 0x03);
    expect(row.level_ciphertext).toBeNull();
    const back = await badges().findOneByOrFail({ id });
    expect([back.holder, back.level]).toEqual(['Third', null]);
    await expect(
      badges().upsert({ id: randomUUID(), holder: 'x', team: 'up' }, ['team']),
    ).rejects.toBeInstanceOf(UnsupportedOperationError);
  });

  it('a where on an encrypted property and an order by it are refused', async () => {
    await expect(people().findBy({ email: 'ada@example.com' })).rejects.toBeInstanceOf(
      UnsupportedOperationError,
    );
    await expect(people().find({ order: { email: 'ASC' } })).rejects.toBeInstanceOf(
      UnsupportedOperationError,
    );
  });

  it('one key row per data key: every id in the data names a row, and no row is unused', async () => {
    const rows = await keyRows(db);
    const used = await rawQuery<{ id: string }>(
      db.schema.url,
      `SELECT DISTINCT ('x' || encode(substring(v from 3 for 8), 'hex'))::bit(64)::bigint::text AS id FROM (
         SELECT email_ciphertext AS v FROM "${db.schema.schema}".compact_people
         UNION ALL SELECT address_ciphertext FROM "${db.schema.schema}".compact_people
         UNION ALL SELECT "contactPhone_ciphertext" FROM "${db.schema.schema}".compact_people
         UNION ALL SELECT "cardNumber_ciphertext" FROM "${db.schema.schema}".compact_orders
         UNION ALL SELECT holder_ciphertext FROM "${db.schema.schema}".compact_badges) v WHERE v IS NOT NULL`,
    );
    expect(used.map((u) => u.id).sort()).toEqual(rows.map((r) => r.id).sort());
    expect(new Set(rows.map((r) => r.fingerprint.toString('hex'))).size).toBe(rows.length);
    /* Registrations this instance made: one INSERT per data key, however many values. */
    expect(keyTableQueries(db, 0, 'INSERT')).toHaveLength(rows.length);
  });
});
