import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';
import {
  BackAsCompact,
  BackMigrating,
  COMPACT_MIGRATIONS,
  ForwardAsSidecars,
  ForwardMigrating,
} from './compact-entities';
import { expectCompactValue, keyRows, onPglite } from './compact-support';

let schema: TestSchema;
const provider = new CountingKeyProvider();
const keys = [{ version: 1, provider }];
const open: EncryptedTestDatabase[] = [];

async function database(entity: new () => unknown): Promise<EncryptedTestDatabase> {
  const db = await encryptedDatabase([entity], {
    schema,
    migrations: COMPACT_MIGRATIONS,
    encryption: { keys },
  });
  open.push(db);
  return db;
}

beforeAll(async () => {
  if (onPglite) return;
  schema = await createTestSchema('compact_migrate');
});
afterAll(async () => {
  for (const db of open) await db.close();
  await schema?.drop();
});

/** The format byte of a stored value. */
const format = (value: unknown) => (value as Buffer)[0];

const rowsOf = (table: string) =>
  rawQuery<Record<string, unknown>>(schema.url, `SELECT * FROM "${schema.schema}".${table} ORDER BY id`);

async function nullability(table: string): Promise<Record<string, string>> {
  const columns = await rawQuery<{ column_name: string; is_nullable: string }>(
    schema.url,
    `SELECT column_name, is_nullable FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2`,
    [schema.schema, table],
  );
  return Object.fromEntries(columns.map((c) => [c.column_name, c.is_nullable]));
}

describe.skipIf(onPglite)('migrateFrom: sidecars → compact', () => {
  it('reads rows of both formats in one column; every write stores format 2 and NULLs the sidecars', async () => {
    const before = await database(ForwardAsSidecars);
    const old = before.dataSource.getRepository(ForwardAsSidecars);
    const [r1, r2, r3] = await old.save([
      old.create({ email: 'one@example.com', note: 'n1' }),
      old.create({ email: 'two@example.com', note: null }),
      old.create({ email: 'three@example.com', note: 'n3' }),
    ]);
    for (const row of await rowsOf('layout_forward')) {
      expect((row.email_ciphertext as Buffer)[0]).toBe(0x01);
      expect(row.email_iv).toBeInstanceOf(Buffer);
    }
    await before.dataSource.destroy();

    const during = await database(ForwardMigrating);
    const repo = during.dataSource.getRepository(ForwardMigrating);
    /* The sidecars are kept, nullable: rows not yet migrated keep their values there. */
    expect(await nullability('layout_forward')).toMatchObject({
      email_ciphertext: 'NO',
      email_iv: 'YES',
      email_wrapped_key: 'YES',
      email_key_version: 'YES',
    });
    expect((await repo.find({ order: { id: 'ASC' } })).map((r) => [r.email, r.note])).toEqual([
      ['one@example.com', 'n1'],
      ['two@example.com', null],
      ['three@example.com', 'n3'],
    ]);
    /* save() of a change */
    const loaded = await repo.findOneByOrFail({ id: (r1 as ForwardAsSidecars).id });
    loaded.email = 'one-changed@example.com';
    await repo.save(loaded);
    /* query-builder update */
    await repo
      .createQueryBuilder()
      .update()
      .set({ note: 'n2-now' })
      .where('id = :id', { id: (r2 as ForwardAsSidecars).id })
      .execute();
    /* insert */
    const inserted = await repo.save(repo.create({ email: 'four@example.com', note: 'n4' }));
    const rows = await rowsOf('layout_forward');
    const keyed = await keyRows(during);
    const [s1, s2, s3, s4] = rows;
    expectCompactValue(s1?.email_ciphertext, 'one-changed@example.com', keyed);
    expect([s1?.email_iv, s1?.email_wrapped_key, s1?.email_key_version]).toEqual([null, null, null]);
    /* the unchanged note of row 1 stays format 1 with its sidecars */
    expect(format(s1?.note_ciphertext)).toBe(0x01);
    expect(s1?.note_iv).toBeInstanceOf(Buffer);
    expectCompactValue(s2?.note_ciphertext, 'n2-now', keyed);
    expect([s2?.note_iv, s2?.note_wrapped_key, s2?.note_key_version]).toEqual([null, null, null]);
    expect(format(s2?.email_ciphertext)).toBe(0x01);
    expect(format(s3?.email_ciphertext)).toBe(0x01);
    expectCompactValue(s4?.email_ciphertext, 'four@example.com', keyed);
    expect([s4?.email_iv, s4?.note_iv]).toEqual([null, null]);
    during.encryption.purgeCache();
    const all = await repo.find({ order: { id: 'ASC' } });
    expect(all.map((r) => [r.email, r.note])).toEqual([
      ['one-changed@example.com', 'n1'],
      ['two@example.com', 'n2-now'],
      ['three@example.com', 'n3'],
      ['four@example.com', 'n4'],
    ]);
    /* a partial select reads either format */
    const partial = await repo.find({ select: { id: true, email: true }, order: { id: 'ASC' } });
    expect(partial.map((r) => r.email)).toEqual(all.map((r) => r.email));
    expect(inserted.id).toBe(s4?.id);
    expect(r3).toBeDefined();
  });
});

describe.skipIf(onPglite)('migrateFrom: compact → sidecars', () => {
  it('reads format-2 values through the key table; every write stores format 1 in all four columns', async () => {
    const before = await database(BackAsCompact);
    const compact = before.dataSource.getRepository(BackAsCompact);
    const [r1, r2] = await compact.save([
      compact.create({ email: 'back-one@example.com', note: 'b1' }),
      compact.create({ email: 'back-two@example.com', note: 'b2' }),
    ]);
    expect(Object.keys((await rowsOf('layout_back'))[0] ?? {}).sort()).toEqual([
      'email_ciphertext',
      'id',
      'note_ciphertext',
    ]);
    await before.dataSource.destroy();

    const during = await database(BackMigrating);
    const repo = during.dataSource.getRepository(BackMigrating);
    expect(await nullability('layout_back')).toMatchObject({
      email_ciphertext: 'NO',
      email_iv: 'YES',
      email_key_version: 'YES',
    });
    during.encryption.purgeCache();
    expect((await repo.find({ order: { id: 'ASC' } })).map((r) => [r.email, r.note])).toEqual([
      ['back-one@example.com', 'b1'],
      ['back-two@example.com', 'b2'],
    ]);
    const loaded = await repo.findOneByOrFail({ id: (r1 as BackAsCompact).id });
    loaded.email = 'back-one-changed@example.com';
    loaded.note = null;
    await repo.save(loaded);
    await repo.update({ id: (r2 as BackAsCompact).id }, { note: 'b2-now' });
    await repo.insert({ email: 'back-three@example.com', note: 'b3' });
    const [s1, s2, s3] = await rowsOf('layout_back');
    expect(format(s1?.email_ciphertext)).toBe(0x01);
    expect(s1?.email_iv).toBeInstanceOf(Buffer);
    expect(s1?.email_wrapped_key).toBeInstanceOf(Buffer);
    expect(s1?.email_key_version).toBe(1);
    expect([s1?.note_ciphertext, s1?.note_iv, s1?.note_wrapped_key, s1?.note_key_version]).toEqual([
      null,
      null,
      null,
      null,
    ]);
    expect(format(s2?.email_ciphertext)).toBe(0x02);
    expect(s2?.email_iv).toBeNull();
    expect(format(s2?.note_ciphertext)).toBe(0x01);
    expect(s2?.note_key_version).toBe(1);
    expect(format(s3?.email_ciphertext)).toBe(0x01);
    during.encryption.purgeCache();
    expect((await repo.find({ order: { id: 'ASC' } })).map((r) => [r.email, r.note])).toEqual([
      ['back-one-changed@example.com', null],
      ['back-two@example.com', 'b2-now'],
      ['back-three@example.com', 'b3'],
    ]);
  });
});
