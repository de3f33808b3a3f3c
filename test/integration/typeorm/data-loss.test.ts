import 'reflect-metadata';
import { randomUUID } from 'node:crypto';
import {
  AfterLoad,
  Column,
  DataSource,
  Entity,
  In,
  IsNull,
  Not,
  PrimaryColumn,
  PrimaryGeneratedColumn,
} from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Encrypted, EnvelopeEncryption, IntegrityError, UnsupportedOperationError } from '../../../src';
import { rewrapDataKeys } from '../../../src/rotation/rewrap';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/**
 * Ordinary TypeORM use that must never write a row that cannot be read back: entities kept across
 * a re-wrap, primary keys changed or normalised by PostgreSQL, sealed state copied between objects.
 */

class ContactCard {
  @Encrypted({ nullable: true }) phone!: string | null;
}

@Entity()
class Note {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ nullable: true }) secret!: string | null;
  @Encrypted() title!: string;
  @Column({ type: 'int', default: 0 }) counter!: number;
}

@Entity()
class Member {
  @PrimaryColumn({ type: 'uuid' }) id!: string;
  @Encrypted() secret!: string;
  @Column({ type: 'varchar', unique: true }) handle!: string;
  @Column(() => ContactCard) contact!: ContactCard;
}

@Entity()
class Badge {
  @PrimaryColumn({ type: 'char', length: 8 }) code!: string;
  @Encrypted() secret!: string;
}

@Entity()
class Hooked {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted() secret!: string;
  seenInHook: unknown;
  @AfterLoad() remember() {
    this.seenInHook = this.secret;
  }
}

let db: EncryptedTestDatabase;

beforeAll(async () => {
  db = await encryptedDatabase([Note, Member, Badge, Hooked], {
    prefix: 'data_loss',
    extraKeys: [{ version: 2, provider: new CountingKeyProvider() }],
  });
});
afterAll(() => db?.close());

const notes = () => db.dataSource.getRepository(Note);
const members = () => db.dataSource.getRepository(Member);

async function rows(table: string, order = 'id') {
  return rawQuery<Record<string, unknown>>(
    db.schema.url,
    `SELECT * FROM "${db.schema.schema}".${table} ORDER BY ${order}`,
  );
}

function rejectionOf(promise: Promise<unknown>): Promise<unknown> {
  return promise.then(
    () => undefined,
    (e: unknown) => e,
  );
}

/** Every row of the table reads back through a fresh find(), with all four columns consistent. */
async function everyRowReads(entity: typeof Note | typeof Member) {
  const fresh = new EnvelopeEncryption({
    keys: db.encryption.keyring.versions.map((version) => ({
      version,
      provider: db.encryption.keyring.provider(version),
    })),
    activeVersion: 1,
  });
  fresh.purgeCache();
  db.encryption.purgeCache();
  return db.dataSource.getRepository(entity).find();
}

describe('an entity loaded before a re-wrap and saved after it', () => {
  it('keeps its values, nullable or not, and the row stays readable', async () => {
    db.encryption.keyring.activate(1);
    const saved = await notes().save({ secret: 'kept secret', title: 'kept title', counter: 0 });
    const loaded = await notes().findOneByOrFail({ id: saved.id });
    const result = await rewrapDataKeys(db.dataSource, db.encryption, { toVersion: 2, entities: [Note] });
    expect(result.error).toBeUndefined();
    loaded.counter += 1;
    await notes().save(loaded);
    const [row] = (await rows('note')).filter((r) => r.id === saved.id);
    expect(row?.secret_key_version).toBe(2);
    expect(row?.title_key_version).toBe(2);
    expect(row?.counter).toBe(1);
    db.encryption.purgeCache();
    const again = await notes().findOneByOrFail({ id: saved.id });
    expect(again).toMatchObject({ secret: 'kept secret', title: 'kept title', counter: 1 });
    await everyRowReads(Note);
  });

  it('a changed value saved after the re-wrap is written whole', async () => {
    const saved = await notes().save({ secret: 'before', title: 'before', counter: 0 });
    const loaded = await notes().findOneByOrFail({ id: saved.id });
    await rewrapDataKeys(db.dataSource, db.encryption, { toVersion: 1, entities: [Note] });
    loaded.secret = 'after';
    await notes().save(loaded);
    db.encryption.purgeCache();
    expect(await notes().findOneByOrFail({ id: saved.id })).toMatchObject({
      secret: 'after',
      title: 'before',
    });
  });
});

describe('primary keys PostgreSQL stores in another form', () => {
  it('an upper-case UUID key reads back', async () => {
    const id = randomUUID().toUpperCase();
    await members().save({ id, secret: 'upper', handle: `h-${id}`, contact: { phone: '+1 555' } });
    db.encryption.purgeCache();
    const found = await members().findOneByOrFail({ id });
    expect(found.secret).toBe('upper');
    expect(found.contact.phone).toBe('+1 555');
    const [row] = await rawQuery<{ id: string }>(
      db.schema.url,
      `SELECT id FROM "${db.schema.schema}".member WHERE id = $1`,
      [id],
    );
    expect(row?.id).toBe(id.toLowerCase());
  });

  it('a char(8) key shorter than its column reads back', async () => {
    await db.dataSource.getRepository(Badge).save({ code: 'ab', secret: 'padded' });
    db.encryption.purgeCache();
    const found = await db.dataSource.getRepository(Badge).findOneByOrFail({ code: 'ab' });
    expect(found.secret).toBe('padded');
    expect(found.code).toBe('ab      ');
  });
});

describe('sealed state never outlives a change of primary key', () => {
  it('a loaded entity given a new id and saved', async () => {
    const id = randomUUID();
    await members().save({ id, secret: 'moved', handle: `m-${id}`, contact: { phone: null } });
    const loaded = await members().findOneByOrFail({ id });
    loaded.id = randomUUID();
    loaded.handle = `m2-${id}`;
    await members().save(loaded);
    db.encryption.purgeCache();
    expect((await members().findOneByOrFail({ id: loaded.id })).secret).toBe('moved');
    expect((await members().findOneByOrFail({ id })).secret).toBe('moved');
  });

  it('repo.create(loaded) given a new id', async () => {
    const id = randomUUID();
    await members().save({ id, secret: 'created', handle: `c-${id}`, contact: { phone: '1' } });
    const copy = members().create(await members().findOneByOrFail({ id }));
    copy.id = randomUUID();
    copy.handle = `c2-${id}`;
    await members().save(copy);
    db.encryption.purgeCache();
    expect(await members().findOneByOrFail({ id: copy.id })).toMatchObject({
      secret: 'created',
      contact: { phone: '1' },
    });
  });

  it('a loaded entity with a generated key re-saved with id = undefined', async () => {
    const saved = await notes().save({ secret: 'twice', title: 't', counter: 0 });
    const loaded = await notes().findOneByOrFail({ id: saved.id });
    (loaded as { id?: number }).id = undefined;
    const second = await notes().save(loaded);
    expect(second.id).not.toBe(saved.id);
    db.encryption.purgeCache();
    expect((await notes().findOneByOrFail({ id: second.id })).secret).toBe('twice');
  });

  it('a save that fails on a unique column, retried with a new id', async () => {
    const handle = `dup-${randomUUID()}`;
    await members().save({ id: randomUUID(), secret: 'first', handle, contact: { phone: null } });
    const fresh = members().create({ id: randomUUID(), secret: 'second', handle, contact: { phone: 'p' } });
    await expect(members().save(fresh)).rejects.toThrow();
    fresh.id = randomUUID();
    fresh.handle = `${handle}-b`;
    await members().save(fresh);
    db.encryption.purgeCache();
    expect(await members().findOneByOrFail({ id: fresh.id })).toMatchObject({
      secret: 'second',
      contact: { phone: 'p' },
    });
  });

  it('one embedded object assigned to two new entities', async () => {
    const contact = new ContactCard();
    contact.phone = '+44 20';
    const a = members().create({ id: randomUUID(), secret: 'a', handle: `a-${randomUUID()}` });
    const b = members().create({ id: randomUUID(), secret: 'b', handle: `b-${randomUUID()}` });
    a.contact = contact;
    b.contact = contact;
    await members().save([a, b]);
    db.encryption.purgeCache();
    expect((await members().findOneByOrFail({ id: a.id })).contact.phone).toBe('+44 20');
    expect((await members().findOneByOrFail({ id: b.id })).contact.phone).toBe('+44 20');
  });
});

describe('query-builder upserts', () => {
  it('orUpdate() naming only the ciphertext column writes the whole value', async () => {
    const id = randomUUID();
    await members().save({ id, secret: 'old', handle: `u-${id}`, contact: { phone: null } });
    await db.dataSource
      .createQueryBuilder()
      .insert()
      .into(Member)
      .values({ id, secret: 'new', handle: `u-${id}`, contact: { phone: null } })
      .orUpdate(['secret_ciphertext'], ['id'])
      .execute();
    db.encryption.purgeCache();
    expect((await members().findOneByOrFail({ id })).secret).toBe('new');
  });
});

describe('updates through the query builder and repository.update()', () => {
  it('1,500 concurrent repository.update() calls all succeed', async () => {
    const saved = await notes().save(
      Array.from({ length: 1_500 }, (_, i) => ({ secret: `s${i}`, title: `t${i}`, counter: 0 })),
    );
    const results = await Promise.allSettled(
      saved.map((n, i) => notes().update(n.id, { secret: `updated ${i}` })),
    );
    expect(results.filter((r) => r.status === 'rejected')).toEqual([]);
    db.encryption.purgeCache();
    const found = await notes().findBy({});
    const byId = new Map(found.map((n) => [n.id, n]));
    expect(saved.map((n) => byId.get(n.id)?.secret)).toEqual(saved.map((_, i) => `updated ${i}`));
  });

  it('repository.update(id) binds the value to its row', async () => {
    const [a, b] = (await notes().save([
      { secret: 'a', title: 'a', counter: 0 },
      { secret: 'b', title: 'b', counter: 0 },
    ])) as [Note, Note];
    await notes().update(a.id, { secret: 'bound' });
    const [row] = (await rows('note')).filter((r) => r.id === a.id);
    const header = row?.secret_ciphertext as Buffer;
    expect((header[1] ?? 0) & 1).toBe(1);
    await rawQuery(
      db.schema.url,
      `UPDATE "${db.schema.schema}".note AS t SET secret_ciphertext = s.secret_ciphertext, secret_iv = s.secret_iv,
         secret_wrapped_key = s.secret_wrapped_key, secret_key_version = s.secret_key_version
       FROM "${db.schema.schema}".note AS s WHERE s.id = $1 AND t.id = $2`,
      [a.id, b.id],
    );
    db.encryption.purgeCache();
    expect(await rejectionOf(notes().findOneByOrFail({ id: b.id }))).toBeInstanceOf(IntegrityError);
    await notes().update(b.id, { secret: 'b again' });
  });

  it('update/delete criteria and query-builder object where on an encrypted property are refused up front', async () => {
    for (const attempt of [
      () => notes().update({ secret: 'x' }, { counter: 1 }),
      () => notes().delete({ secret: 'x' }),
      () => notes().createQueryBuilder().update().set({ counter: 2 }).where({ title: 'x' }).execute(),
      () => notes().createQueryBuilder('n').where({ title: 'x' }).getMany(),
    ] as Array<() => Promise<unknown>>) {
      const error = await rejectionOf(Promise.resolve().then(attempt));
      expect(error).toBeInstanceOf(UnsupportedOperationError);
      expect((error as UnsupportedOperationError).entity).toBe('Note');
      expect(['secret', 'title']).toContain((error as UnsupportedOperationError).column);
    }
  });

  it('ordering by an encrypted property of a relation is refused', async () => {
    const error = await rejectionOf(members().find({ order: { contact: { phone: 'ASC' } } as never }));
    expect(error).toBeInstanceOf(UnsupportedOperationError);
    expect((error as UnsupportedOperationError).column).toBe('contact.phone');
  });

  it('IsNull() in update/delete criteria and query-builder object where tests null-ness', async () => {
    const [nulled, kept] = (await notes().save([
      { secret: null, title: 'null-test', counter: 0 },
      { secret: 'not null', title: 'null-test', counter: 0 },
    ])) as [Note, Note];
    await notes().update({ secret: IsNull(), id: In([nulled.id, kept.id]) }, { counter: 5 });
    const qb = await notes()
      .createQueryBuilder('n')
      .where({ secret: Not(IsNull()), id: In([nulled.id, kept.id]) })
      .getMany();
    expect(qb.map((n) => [n.id, n.secret])).toEqual([[kept.id, 'not null']]);
    await notes().delete({ secret: IsNull(), id: In([nulled.id, kept.id]) });
    const left = (await rows('note')).filter((r) => r.id === nulled.id || r.id === kept.id);
    expect(left.map((r) => [r.id, r.counter])).toEqual([[kept.id, 0]]);
  });

  it('ordering by an encrypted property is refused', async () => {
    const error = await rejectionOf(notes().find({ order: { secret: 'ASC' } }));
    expect(error).toBeInstanceOf(UnsupportedOperationError);
    expect((error as UnsupportedOperationError).column).toBe('secret');
  });
});

describe('reads', () => {
  it('an entity @AfterLoad hook sees the decrypted value', async () => {
    const repo = db.dataSource.getRepository(Hooked);
    const saved = await repo.save({ secret: 'hooked' });
    db.encryption.purgeCache();
    const found = await repo.findOneByOrFail({ id: saved.id });
    expect(found.seenInHook).toBe('hooked');
  });

  it('an @AfterLoad hook after a partial select inside a transaction sees the uncommitted value', async () => {
    await db.dataSource.transaction(async (manager) => {
      const repo = manager.getRepository(Hooked);
      const saved = await repo.save({ secret: 'uncommitted' });
      db.encryption.purgeCache();
      const [found] = await repo.find({ select: { id: true, secret: true }, where: { id: saved.id } });
      expect(found?.secret).toBe('uncommitted');
      expect(found?.seenInHook).toBe('uncommitted');
    });
  });

  it('a partial select over more rows than PostgreSQL takes parameters', async () => {
    const seed = await notes().save({ secret: 'many', title: 'many', counter: 7 });
    await rawQuery(
      db.schema.url,
      `INSERT INTO "${db.schema.schema}".note (secret_ciphertext, secret_iv, secret_wrapped_key, secret_key_version,
          title_ciphertext, title_iv, title_wrapped_key, title_key_version, counter)
       SELECT secret_ciphertext, secret_iv, secret_wrapped_key, secret_key_version,
          title_ciphertext, title_iv, title_wrapped_key, title_key_version, 7
       FROM "${db.schema.schema}".note, generate_series(1, 70001) WHERE id = $1`,
      [seed.id],
    );
    const found = await notes().find({ select: { id: true, secret: true }, where: { counter: 7 } });
    expect(found.length).toBe(70_002);
    expect(found.every((n) => n.secret === 'many')).toBe(true);
    await rawQuery(db.schema.url, `DELETE FROM "${db.schema.schema}".note WHERE counter = 7`);
  });
});

describe('a schema per tenant', () => {
  const opened: Array<{ dataSource: DataSource; schema: TestSchema }> = [];
  afterAll(async () => {
    for (const { dataSource, schema } of opened) {
      if (dataSource.isInitialized) await dataSource.destroy();
      await schema.drop();
    }
  });

  it('a row copied between schemas with the same id does not decrypt there', async () => {
    const encryption = new EnvelopeEncryption({
      keys: [{ version: 1, provider: new CountingKeyProvider() }],
      activeVersion: 1,
    });
    const open = async (label: string) => {
      const schema = await createTestSchema(label);
      const dataSource = new DataSource({
        type: 'postgres',
        url: schema.url,
        schema: schema.schema,
        entities: [Member],
        synchronize: true,
      });
      encryption.attach(dataSource);
      await dataSource.initialize();
      opened.push({ dataSource, schema });
      return { dataSource, schema };
    };
    const a = await open('tenant_a');
    const b = await open('tenant_b');
    const id = randomUUID();
    await b.dataSource.getRepository(Member).save({ id, secret: 'b', handle: 'h', contact: { phone: null } });
    await a.dataSource.getRepository(Member).save({ id, secret: 'a', handle: 'h', contact: { phone: null } });
    await rawQuery(
      a.schema.url,
      `UPDATE "${b.schema.schema}".member AS t SET secret_ciphertext = s.secret_ciphertext, secret_iv = s.secret_iv,
         secret_wrapped_key = s.secret_wrapped_key, secret_key_version = s.secret_key_version
       FROM "${a.schema.schema}".member AS s WHERE s.id = t.id`,
    );
    const error = await rejectionOf(b.dataSource.getRepository(Member).findOneByOrFail({ id }));
    expect(error).toBeInstanceOf(IntegrityError);
    expect((await a.dataSource.getRepository(Member).findOneByOrFail({ id })).secret).toBe('a');
  });
});

describe('two application instances keep entities across live re-wraps', () => {
  it('every row reads back with the value its instance last wrote', async () => {
    const keys = db.encryption.keyring.versions.map((version) => ({
      version,
      provider: db.encryption.keyring.provider(version),
    }));
    const instance = async () => {
      const encryption = new EnvelopeEncryption({ keys, activeVersion: 1, cache: { dataKeyMaxUses: 25 } });
      const dataSource = new DataSource({
        type: 'postgres',
        url: db.schema.url,
        schema: db.schema.schema,
        entities: [Note, Member, Badge, Hooked],
      });
      encryption.attach(dataSource);
      await dataSource.initialize();
      return { encryption, dataSource, repo: dataSource.getRepository(Note) };
    };
    const [a, b] = [await instance(), await instance()];
    const seeded = await a.repo.save(
      Array.from({ length: 60 }, (_, i) => ({ secret: i % 3 ? `s${i}` : null, title: `t${i}`, counter: 0 })),
    );
    const ids = seeded.map((n) => n.id);
    const expected = new Map(seeded.map((n) => [n.id, { secret: n.secret, title: n.title, counter: 0 }]));
    let running = true;
    const writer = async (app: typeof a, mine: number[], label: string) => {
      const kept = await app.repo.findBy(mine.map((id) => ({ id })));
      let round = 0;
      while (running || round < 20) {
        const note = kept[round % kept.length] as Note;
        note.counter += 1;
        if (round % 4 === 0) note.secret = `${label}${round}`;
        if (round % 7 === 0) note.title = `${label}-title-${round}`;
        await app.repo.save(note);
        expected.set(note.id, { secret: note.secret, title: note.title, counter: note.counter });
        round += 1;
      }
    };
    const writers = Promise.all([
      writer(
        a,
        ids.filter((_, i) => i % 2 === 0),
        'a',
      ),
      writer(
        b,
        ids.filter((_, i) => i % 2 === 1),
        'b',
      ),
    ]);
    for (let rotation = 0; rotation < 6; rotation++) {
      const toVersion = rotation % 2 === 0 ? 2 : 1;
      const result = await rewrapDataKeys(db.dataSource, db.encryption, {
        toVersion,
        entities: [Note],
        batchSize: 7,
      });
      expect(result.error).toBeUndefined();
    }
    running = false;
    await writers;
    for (const app of [a, b]) {
      app.encryption.purgeCache();
      const found = await app.repo.findBy(ids.map((id) => ({ id })));
      expect(
        new Map(found.map((n) => [n.id, { secret: n.secret, title: n.title, counter: n.counter }])),
      ).toEqual(expected);
      await app.dataSource.destroy();
    }
  });
});

describe('null given through create() and merge()', () => {
  it('merge(loaded, { secret: null }) then save() clears the stored value', async () => {
    const saved = await notes().save(notes().create({ secret: 'to be cleared', title: 'kept' }));
    const loaded = await notes().findOneByOrFail({ id: saved.id });
    notes().merge(loaded, { secret: null });
    expect(loaded.secret).toBeNull();
    await notes().save(loaded);
    const [row] = (await rows('note')).filter((r) => r.id === saved.id);
    expect(row?.secret_ciphertext).toBeNull();
    expect(row?.secret_iv).toBeNull();
    expect(row?.secret_wrapped_key).toBeNull();
    expect(row?.secret_key_version).toBeNull();
    expect((await notes().findOneByOrFail({ id: saved.id })).secret).toBeNull();
    expect((await notes().findOneByOrFail({ id: saved.id })).title).toBe('kept');
  });

  it('create({ id, secret: null }) then save() clears the stored value of that row', async () => {
    const saved = await notes().save(notes().create({ secret: 'also cleared', title: 't' }));
    const partial = notes().create({ id: saved.id, secret: null });
    expect(partial.secret).toBeNull();
    await notes().save(partial);
    expect((await notes().findOneByOrFail({ id: saved.id })).secret).toBeNull();
  });

  it('merge(loaded, { title: null }) on a non-nullable property is refused, the row unchanged', async () => {
    const saved = await notes().save(notes().create({ secret: null, title: 'must stay' }));
    const loaded = await notes().findOneByOrFail({ id: saved.id });
    notes().merge(loaded, { title: null as unknown as string });
    await expect(notes().save(loaded)).rejects.toThrow(/null is not allowed/);
    expect((await notes().findOneByOrFail({ id: saved.id })).title).toBe('must stay');
  });
});
