import 'reflect-metadata';
import { randomUUID } from 'node:crypto';
import {
  Column,
  DataSource,
  type DataSourceOptions,
  Entity,
  type EntitySubscriberInterface,
  type InsertEvent,
  JoinColumn,
  ManyToOne,
  OneToMany,
  PrimaryColumn,
  PrimaryGeneratedColumn,
} from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError, Encrypted, EnvelopeEncryption, UnsupportedOperationError } from '../../../src';
import { backfillEncryptedColumns } from '../../../src/rotation/backfill';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { createTestSchema, rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/** What applications do with keys, upserts, subscribers and DataSources that must not lose a row. */

@Entity()
class MAccount {
  @PrimaryColumn({ type: 'uuid' }) id!: string;
  @Column({ type: 'varchar', unique: true }) handle!: string;
  @Encrypted() secret!: string;
  @Encrypted({ nullable: true }) note!: string | null;
}

@Entity()
class MScan {
  @PrimaryColumn({ type: 'uuid' }) id!: string;
  @Encrypted({ nullable: true }) image!: Buffer | null;
}

@Entity()
class MLegacy {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({
    type: 'bigint',
    plaintextColumn: { name: 'big', type: 'bigint' },
    readPlaintextFallback: true,
  })
  big!: bigint;
  @Encrypted({
    type: 'number',
    plaintextColumn: { name: 'amount', type: 'numeric' },
    readPlaintextFallback: true,
  })
  amount!: number;
}

@Entity()
class MContact {
  @PrimaryColumn({ type: 'uuid' }) id!: string;
  @Encrypted() email!: string;
}

@Entity()
class MInvoice {
  @PrimaryColumn({ type: 'uuid' }) id!: string;
  @OneToMany(
    () => MLine,
    (l) => l.invoice,
    { cascade: true },
  )
  lines!: MLine[];
}

@Entity()
class MLine {
  @PrimaryColumn({ type: 'uuid' }) invoiceId!: string;
  @PrimaryColumn({ type: 'int' }) lineNo!: number;
  @Encrypted() item!: string;
  @ManyToOne(
    () => MInvoice,
    (i) => i.lines,
    { onUpdate: 'CASCADE' },
  )
  @JoinColumn({ name: 'invoiceId' })
  invoice!: MInvoice;
}

@Entity()
class MRenamed {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ nullable: true }) email!: string | null;
  @Encrypted({ nullable: true, renamedFrom: 'email' }) backupEmail!: string | null;
}

const entities = [MAccount, MScan, MLegacy, MContact];
let db: EncryptedTestDatabase;
beforeAll(async () => {
  db = await encryptedDatabase(entities, { prefix: 'misuse' });
});
afterAll(() => db?.close());

const failureOf = (fn: () => unknown) =>
  Promise.resolve()
    .then(fn)
    .then(
      () => undefined,
      (e: unknown) => e,
    );
/** What `initialize()` of a DataSource with encryption attached and `entities` fails with. */
async function startUpFailure(prefix: string, entities: DataSourceOptions['entities']): Promise<unknown> {
  const schema = await createTestSchema(prefix);
  const encryption = new EnvelopeEncryption({
    keys: [{ version: 1, provider: new CountingKeyProvider() }],
    activeVersion: 1,
  });
  const dataSource = new DataSource({ type: 'postgres', url: schema.url, schema: schema.schema, entities });
  encryption.attach(dataSource);
  try {
    return await failureOf(() => dataSource.initialize());
  } finally {
    if (dataSource.isInitialized) await dataSource.destroy();
    await schema.drop();
  }
}
const table = (name: string) => `"${db.schema.schema}".${name}`;
const accounts = () => db.dataSource.getRepository(MAccount);

async function storedAccount(handle: string) {
  const [row] = await rawQuery(db.schema.url, `SELECT * FROM ${table('m_account')} WHERE handle = $1`, [
    handle,
  ]);
  return row;
}

describe('writes that would leave values bound to another primary key are refused, the row unchanged', () => {
  it('repository.upsert() on a natural key with a fresh client-assigned id', async () => {
    await accounts().save({ id: randomUUID(), handle: 'u1', secret: 's1', note: 'n1' });
    const before = await storedAccount('u1');
    const error = await failureOf(() =>
      accounts().upsert({ id: randomUUID(), handle: 'u1', secret: 's2' }, ['handle']),
    );
    expect(error).toBeInstanceOf(UnsupportedOperationError);
    expect(error).toMatchObject({ entity: 'MAccount' });
    expect(await storedAccount('u1')).toEqual(before);
    db.encryption.purgeCache();
    expect(await accounts().findOneByOrFail({ handle: 'u1' })).toMatchObject({ secret: 's1', note: 'n1' });
  });

  it('insert().orUpdate() on a natural key', async () => {
    await accounts().save({ id: randomUUID(), handle: 'u2', secret: 's1', note: null });
    const before = await storedAccount('u2');
    const error = await failureOf(() =>
      db.dataSource
        .createQueryBuilder()
        .insert()
        .into(MAccount)
        .values({ id: randomUUID(), handle: 'u2', secret: 's2', note: null })
        .orUpdate(['secret_ciphertext'], ['handle'])
        .execute(),
    );
    expect(error).toBeInstanceOf(UnsupportedOperationError);
    expect(await storedAccount('u2')).toEqual(before);
  });

  it('an upsert on the primary key still works', async () => {
    const id = randomUUID();
    await accounts().save({ id, handle: 'u3', secret: 's1', note: 'n' });
    await accounts().upsert({ id, handle: 'u3', secret: 's2', note: 'n2' }, ['id']);
    db.encryption.purgeCache();
    expect(await accounts().findOneByOrFail({ id })).toMatchObject({ secret: 's2', note: 'n2' });
  });

  it('repository.update(id, { id: newId }) and update().set({ id }).whereInIds()', async () => {
    const id = randomUUID();
    await accounts().save({ id, handle: 'u4', secret: 's', note: 'n' });
    const before = await storedAccount('u4');
    for (const attempt of [
      () => accounts().update(id, { id: randomUUID() }),
      () =>
        db.dataSource
          .createQueryBuilder()
          .update(MAccount)
          .set({ id: randomUUID(), secret: 'new' })
          .whereInIds(id)
          .execute(),
    ]) {
      const error = await failureOf(attempt);
      expect(error).toBeInstanceOf(UnsupportedOperationError);
      expect((error as Error).message).toMatch(/primary-key column "id"/);
    }
    expect(await storedAccount('u4')).toEqual(before);
  });

  it('a relation that updates part of a bound primary key ON UPDATE CASCADE is refused at start-up', async () => {
    const error = await startUpFailure('misuse_cascade', [MInvoice, MLine]);
    expect(error).toBeInstanceOf(ConfigError);
    expect(error).toMatchObject({ entity: 'MLine', column: 'item' });
  });
});

describe('an entity read through a DataSource without encryption and saved through one with it', () => {
  it('is refused: it holds ciphertext, not plaintext', async () => {
    const id = randomUUID();
    await db.dataSource.getRepository(MScan).save({ id, image: Buffer.from('the real image') });
    const plain = new DataSource({
      type: 'postgres',
      url: db.schema.url,
      schema: db.schema.schema,
      entities,
    });
    await plain.initialize();
    const loaded = await plain.getRepository(MScan).findOneByOrFail({ id });
    await plain.destroy();
    const error = await failureOf(() => db.dataSource.getRepository(MScan).save(loaded));
    expect(error).toBeInstanceOf(UnsupportedOperationError);
    db.encryption.purgeCache();
    expect((await db.dataSource.getRepository(MScan).findOneByOrFail({ id })).image?.toString()).toBe(
      'the real image',
    );
  });
});

describe('backfilling bigint and numeric plaintext columns', () => {
  it('reads them in the declared type, and the backfill encrypts every row', async () => {
    await rawQuery(
      db.schema.url,
      `INSERT INTO ${table('m_legacy')} (big, amount) VALUES (9007199254740993, 12.5)`,
    );
    db.encryption.purgeCache();
    const [before] = await db.dataSource.getRepository(MLegacy).find();
    expect(before).toMatchObject({ big: 9007199254740993n, amount: 12.5 });
    const result = await backfillEncryptedColumns(db.dataSource, db.encryption, { entities: [MLegacy] });
    expect(result.error).toBeUndefined();
    expect(result.properties.flatMap((p) => p.failures)).toEqual([]);
    const [row] = await rawQuery<Record<string, unknown>>(
      db.schema.url,
      `SELECT * FROM ${table('m_legacy')}`,
    );
    expect(Buffer.isBuffer(row?.big_ciphertext) && Buffer.isBuffer(row?.amount_ciphertext)).toBe(true);
    db.encryption.purgeCache();
    expect((await db.dataSource.getRepository(MLegacy).find())[0]).toMatchObject({
      big: 9007199254740993n,
      amount: 12.5,
    });
  });
});

describe('renamedFrom naming another live encrypted property', () => {
  it('is refused at start-up', async () => {
    const error = await startUpFailure('misuse_renamed', [MRenamed]);
    expect(error).toBeInstanceOf(ConfigError);
    expect(error).toMatchObject({ entity: 'MRenamed', column: 'backupEmail' });
  });
});

describe('subscribers and query builders', () => {
  it('a subscriber registered after initialize() that normalises an encrypted property', async () => {
    const normalise: EntitySubscriberInterface<MContact> = {
      listenTo: () => MContact,
      beforeInsert(event: InsertEvent<MContact>) {
        event.entity.email = event.entity.email.toLowerCase();
      },
    };
    db.dataSource.subscribers.push(normalise);
    try {
      const id = randomUUID();
      await db.dataSource.getRepository(MContact).save({ id, email: 'MiXeD@Example.COM' });
      db.encryption.purgeCache();
      expect((await db.dataSource.getRepository(MContact).findOneByOrFail({ id })).email).toBe(
        'mixed@example.com',
      );
      const [row] = await rawQuery<{ email_ciphertext: Buffer }>(
        db.schema.url,
        `SELECT email_ciphertext FROM ${table('m_contact')} WHERE id = $1`,
        [id],
      );
      expect(row?.email_ciphertext.includes(Buffer.from('mixed'))).toBe(false);
    } finally {
      db.dataSource.subscribers.splice(db.dataSource.subscribers.indexOf(normalise as never), 1);
    }
  });

  it('a value changed after encryption is refused with the entity and column named', async () => {
    const late: EntitySubscriberInterface<MContact> = {
      listenTo: () => MContact,
      async beforeInsert(event: InsertEvent<MContact>) {
        await new Promise((resolve) => setTimeout(resolve, 5));
        event.entity.email = 'changed-late@example.com';
      },
    };
    db.dataSource.subscribers.push(late);
    try {
      const error = await failureOf(() =>
        db.dataSource.getRepository(MContact).save({ id: randomUUID(), email: 'x@y' }),
      );
      const cause = (error as { driverError?: unknown })?.driverError ?? error;
      expect(cause).toBeInstanceOf(UnsupportedOperationError);
      expect(cause).toMatchObject({ entity: 'MContact', column: 'email' });
      expect(String(error)).not.toMatch(/changed-late/);
    } finally {
      db.dataSource.subscribers.splice(db.dataSource.subscribers.indexOf(late as never), 1);
    }
  });

  it("TypeORM's two-argument update(Entity, values)", async () => {
    const id = randomUUID();
    await db.dataSource.getRepository(MContact).save({ id, email: 'x@y' });
    await db.dataSource
      .createQueryBuilder(MContact, 'c')
      .update(MContact, { email: 'z@y' })
      .whereInIds(id)
      .execute();
    db.encryption.purgeCache();
    expect((await db.dataSource.getRepository(MContact).findOneByOrFail({ id })).email).toBe('z@y');
  });
});
