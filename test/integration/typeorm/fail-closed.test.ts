import 'reflect-metadata';
import { randomUUID } from 'node:crypto';
import { Column, DataSource, Entity, PrimaryColumn, PrimaryGeneratedColumn, Unique } from 'typeorm';
import { afterAll, describe, expect, it } from 'vitest';
import { ConfigError, Encrypted, EnvelopeEncryption, UnsupportedOperationError } from '../../../src';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';
import { RecordingLogger } from '../../support/typeorm';

/** Configurations and paths that must refuse rather than store what cannot be read back. */

@Entity()
class Patient {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ nullable: true }) phone!: string | null;
  @Encrypted() name!: string;
  @Encrypted({ nullable: true }) photo!: Buffer | null;
  @Column({ type: 'varchar', default: 'x' }) ward!: string;
}

@Entity()
class NumericKey {
  @PrimaryColumn({ type: 'numeric', precision: 10, scale: 2 }) id!: string;
  @Encrypted() secret!: string;
}

@Entity()
class NumericKeyUnbound {
  @PrimaryColumn({ type: 'numeric', precision: 10, scale: 2 }) id!: string;
  @Encrypted({ bindPrimaryKey: false }) secret!: string;
}

@Entity()
class TransformedKey {
  @PrimaryColumn({
    type: 'varchar',
    transformer: { to: (v: string) => v?.toLowerCase(), from: (v: string) => v },
  })
  id!: string;
  @Encrypted() secret!: string;
}

@Entity()
@Unique(['email'])
class UniqueEmail {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted() email!: string;
}

@Entity()
class SameName {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ name: 'contact' }) phone!: string;
  @Encrypted({ name: 'contact' }) mobile!: string;
}

const opened: Array<{ dataSource: DataSource; schema: TestSchema }> = [];
afterAll(async () => {
  for (const { dataSource, schema } of opened) {
    if (dataSource.isInitialized) await dataSource.destroy();
    await schema.drop();
  }
});

async function open(
  entities: DataSource['options']['entities'],
  options: { attach?: boolean; cache?: boolean; schema?: TestSchema } = {},
) {
  const schema = options.schema ?? (await createTestSchema('fail_closed'));
  const logger = new RecordingLogger();
  const dataSource = new DataSource({
    type: 'postgres',
    url: schema.url,
    schema: schema.schema,
    entities,
    synchronize: true,
    logging: true,
    logger,
    ...(options.cache ? { cache: { type: 'database' as const, tableName: 'query_cache' } } : {}),
  });
  const encryption = new EnvelopeEncryption({
    keys: [{ version: 1, provider: new CountingKeyProvider() }],
    activeVersion: 1,
  });
  if (options.attach !== false) encryption.attach(dataSource);
  opened.push({ dataSource, schema });
  await dataSource.initialize();
  return { dataSource, schema, encryption, logger };
}

function failureOf(fn: () => unknown): Promise<unknown> {
  return Promise.resolve()
    .then(fn)
    .then(
      () => undefined,
      (e: unknown) => e,
    );
}

describe('a DataSource that never called attach()', () => {
  it('refuses every write of an encrypted property before it reaches the driver', async () => {
    const attached = await open([Patient]);
    const { id } = await attached.dataSource
      .getRepository(Patient)
      .save({ name: 'Ada', phone: '+1 555 0100' });
    const seed = await open([Patient], { attach: false, schema: attached.schema });
    const repo = seed.dataSource.getRepository(Patient);
    const before = await rawQuery(attached.schema.url, `SELECT * FROM "${attached.schema.schema}".patient`);
    for (const attempt of [
      () => repo.update({ id }, { phone: '+1 555 0199' }),
      () => repo.save({ name: 'Plain Text', phone: null }),
      () => repo.insert({ name: 'Plain Text' }),
      () => repo.createQueryBuilder().update().set({ name: 'Plain Text' }).where({ id }).execute(),
      () => repo.update({ id }, { phone: null }),
    ]) {
      const error = await failureOf(attempt);
      expect(error).toBeInstanceOf(ConfigError);
      expect(error).toMatchObject({ entity: 'Patient' });
      expect(String((error as Error).message)).not.toMatch(/Plain Text|555/);
    }
    expect(await rawQuery(attached.schema.url, `SELECT * FROM "${attached.schema.schema}".patient`)).toEqual(
      before,
    );
    expect(seed.logger.lines.join('\n')).not.toMatch(/Plain Text|555 0199|506c61696e/);
    /* Other columns stay writable. */
    await repo.update({ id }, { ward: 'b' });
  });
});

describe('start-up refuses shapes that could not be read back', () => {
  it('a numeric primary key bound to values: ConfigError naming entity, column and bindPrimaryKey', async () => {
    const error = await failureOf(() => open([NumericKey]));
    expect(error).toBeInstanceOf(ConfigError);
    expect(error).toMatchObject({ entity: 'NumericKey', column: 'secret' });
    expect((error as Error).message).toMatch(/bindPrimaryKey: false/);
    expect((error as Error).message).toMatch(/"id"/);
  });

  it('the same key with bindPrimaryKey: false reads back', async () => {
    const { dataSource, encryption } = await open([NumericKeyUnbound]);
    const repo = dataSource.getRepository(NumericKeyUnbound);
    await repo.save({ id: '1.5', secret: 'unbound' });
    encryption.purgeCache();
    expect((await repo.findOneByOrFail({ id: '1.50' })).secret).toBe('unbound');
  });

  it('a primary key with a transformer', async () => {
    const error = await failureOf(() => open([TransformedKey]));
    expect(error).toBeInstanceOf(ConfigError);
    expect((error as Error).message).toMatch(/transformer/);
  });

  it('a unique constraint on an encrypted property', async () => {
    const error = await failureOf(() => open([UniqueEmail]));
    expect(error).toBeInstanceOf(ConfigError);
    expect(error).toMatchObject({ entity: 'UniqueEmail', column: 'email' });
  });

  it('two encrypted properties with the same column name', async () => {
    const error = await failureOf(() => open([SameName]));
    expect(error).toBeInstanceOf(ConfigError);
    expect((error as Error).message).toMatch(/contact_ciphertext/);
  });
});

describe('conditions that could never match are refused', () => {
  it('findBy() with a Buffer on an encrypted Buffer property', async () => {
    const { dataSource } = await open([Patient]);
    const photo = Buffer.from('jpeg bytes');
    await dataSource.getRepository(Patient).save({ name: 'P', photo });
    const error = await failureOf(() => dataSource.getRepository(Patient).findBy({ photo }));
    expect(error).toBeInstanceOf(UnsupportedOperationError);
    expect(error).toMatchObject({ entity: 'Patient', column: 'photo' });
  });
});

describe("TypeORM's query result cache", () => {
  it('a cached result decrypts from what was cached, without reading the encrypted columns again', async () => {
    const { dataSource, encryption, logger, schema } = await open([Patient], { cache: true });
    const repo = dataSource.getRepository(Patient);
    const saved = await repo.save({ name: 'Cached Name', phone: '+1 555 0142' });
    const first = await repo.find({ where: { id: saved.id }, cache: 60_000 });
    expect(first[0]).toMatchObject({ name: 'Cached Name', phone: '+1 555 0142' });
    const cacheRows = await rawQuery<{ result: string }>(
      schema.url,
      `SELECT result FROM "${schema.schema}".query_cache`,
    );
    expect(cacheRows.length).toBe(1);
    expect(cacheRows[0]?.result).not.toMatch(/Cached Name|555 0142/);
    await rawQuery(schema.url, `DELETE FROM "${schema.schema}".patient WHERE id = $1`, [saved.id]);
    encryption.purgeCache();
    logger.lines.length = 0;
    const hit = await repo.find({ where: { id: saved.id }, cache: 60_000 });
    expect(hit[0]).toMatchObject({ id: saved.id, name: 'Cached Name', phone: '+1 555 0142' });
    expect(logger.lines.filter((l) => l.startsWith('SELECT') && !l.includes('query_cache'))).toEqual([]);
    expect(logger.lines.length).toBeGreaterThan(0);
  });
});

describe('a partial select', () => {
  it('reads the four columns of each value in the same statement, also from the query result cache', async () => {
    const { dataSource, encryption, logger, schema } = await open([Patient], { cache: true });
    const repo = dataSource.getRepository(Patient);
    const saved = await repo.save({ name: 'Partial One', phone: '+1 555 0111', ward: 'w1' });
    logger.lines.length = 0;
    const first = await repo.find({
      select: { id: true, phone: true },
      where: { id: saved.id },
      cache: 60_000,
    });
    expect(first[0]).toMatchObject({ id: saved.id, phone: '+1 555 0111' });
    expect(first[0]?.name).toBeUndefined();
    const selects = logger.lines.filter((l) => l.startsWith('SELECT') && !l.includes('query_cache'));
    expect(selects).toHaveLength(1);
    expect(selects[0]).toMatch(/phone_iv/);
    await repo.update(saved.id, { phone: '+1 555 0222' });
    await repo.delete(saved.id);
    encryption.purgeCache();
    logger.lines.length = 0;
    const hit = await repo.find({
      select: { id: true, phone: true },
      where: { id: saved.id },
      cache: 60_000,
    });
    expect(hit[0]).toMatchObject({ id: saved.id, phone: '+1 555 0111' });
    expect(logger.lines.filter((l) => l.startsWith('SELECT') && !l.includes('query_cache'))).toEqual([]);
    expect(
      await rawQuery(schema.url, `SELECT * FROM "${schema.schema}".patient WHERE id = $1`, [saved.id]),
    ).toEqual([]);
  });

  it('without the primary key, and through a query builder', async () => {
    const { dataSource, encryption } = await open([Patient]);
    const repo = dataSource.getRepository(Patient);
    await repo.save({ name: 'No Key', phone: '+1 555 0333', ward: 'nokey' });
    encryption.purgeCache();
    const qb = await repo
      .createQueryBuilder('p')
      .select(['p.phone'])
      .where('p.ward = :w', { w: 'nokey' })
      .getMany();
    expect(qb.map((p) => p.phone)).toEqual(['+1 555 0333']);
  });
});

describe('one table reached through search_path and through the schema option', () => {
  it('binds values to the same schema', async () => {
    const first = await open([Patient]);
    const { id } = await first.dataSource.getRepository(Patient).save({ name: 'Search Path' });
    const logger = new RecordingLogger();
    const second = new DataSource({
      type: 'postgres',
      url: first.schema.url,
      entities: [Patient],
      extra: { options: `-c search_path=${first.schema.schema}` },
      logging: true,
      logger,
    });
    first.encryption.attach(second);
    opened.push({ dataSource: second, schema: first.schema });
    await second.initialize();
    expect((await second.getRepository(Patient).findOneByOrFail({ id })).name).toBe('Search Path');
    const { id: other } = await second.getRepository(Patient).save({ name: 'Written Unqualified' });
    first.encryption.purgeCache();
    expect((await first.dataSource.getRepository(Patient).findOneByOrFail({ id: other })).name).toBe(
      'Written Unqualified',
    );
  });
});

describe('a primary key given as upper-case text in a composite-free uuid table', () => {
  it('is refused by nothing and reads back after update()', async () => {
    @Entity({ name: `uuid_${randomUUID().slice(0, 8)}` })
    class Account {
      @PrimaryColumn({ type: 'uuid' }) id!: string;
      @Encrypted() secret!: string;
    }
    const { dataSource, encryption } = await open([Account]);
    const repo = dataSource.getRepository(Account);
    const id = randomUUID().toUpperCase();
    await repo.save({ id, secret: 'first' });
    await repo.update(id, { secret: 'second' });
    encryption.purgeCache();
    expect((await repo.findOneByOrFail({ id })).secret).toBe('second');
  });
});
