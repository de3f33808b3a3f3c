import { inspect } from 'node:util';
import 'reflect-metadata';
import { DataSource, Entity, PrimaryGeneratedColumn } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Encrypted, EnvelopeEncryption, LocalKeyProvider } from '../../../src';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';
import { Customer, Order } from '../../support/entities';

let schema: TestSchema;
let dataSource: DataSource;
let encryption: EnvelopeEncryption;
const masterKey = Buffer.from(Array.from({ length: 32 }, () => Math.floor(Math.random() * 256)));

beforeAll(async () => {
  schema = await createTestSchema('schema');
  encryption = new EnvelopeEncryption({
    keys: [{ version: 1, provider: new LocalKeyProvider({ key: masterKey.toString('base64') }) }],
    activeVersion: 1,
  });
  dataSource = new DataSource({
    type: 'postgres',
    url: schema.url,
    schema: schema.schema,
    entities: [Customer, Order],
  });
  encryption.attach(dataSource);
  await dataSource.initialize();
});
afterAll(async () => {
  await dataSource?.destroy();
  await schema?.drop();
});

describe('schema', () => {
  it('migration generation (the schema builder TypeORM uses) creates the four sidecar columns per property', async () => {
    const sql = (await dataSource.driver.createSchemaBuilder().log()).upQueries
      .map((q) => q.query)
      .join('\n');
    for (const column of [
      'email_ciphertext',
      'email_iv',
      'email_wrapped_key',
      'email_key_version',
      'cardNumber_ciphertext',
    ]) {
      expect(sql).toContain(`"${column}"`);
    }
    expect(sql).toMatch(/"email_ciphertext" bytea NOT NULL/);
    expect(sql).toMatch(/"email_key_version" integer NOT NULL/);
    expect(sql).toMatch(/"address_ciphertext" bytea,/);
    expect(sql).not.toMatch(/"email" /);
    expect(sql).not.toMatch(/\$iv|\$wrappedKey/);
  });
});

describe('no key material in inspect output or JSON', () => {
  it('the encryption object, its keyring, cache and providers print no key bytes after use', async () => {
    await dataSource.synchronize();
    const repo = dataSource.getRepository(Customer);
    const saved = await repo.save(repo.create({ email: 'inspect@example.com', plan: 'p', address: null }));
    await repo.findOneByOrFail({ id: saved.id });
    const printed = [
      inspect(encryption, { depth: 8, showHidden: true }),
      inspect(encryption.keyring.provider(1), { depth: 8, showHidden: true }),
      JSON.stringify(encryption.keyring.provider(1)),
      String(encryption.keyring.provider(1)),
    ].join('\n');
    for (const form of [
      masterKey.toString('base64'),
      masterKey.toString('hex'),
      masterKey.toString('base64url'),
    ]) {
      expect(printed).not.toContain(form);
    }
    expect(printed).not.toContain('inspect@example.com');
  });
});

describe('column names', () => {
  it('can be overridden per property, and values still round-trip', async () => {
    @Entity('renamed_contact')
    class RenamedContact {
      @PrimaryGeneratedColumn() id!: number;
      @Encrypted({ name: 'mail', columnNames: { keyVersion: 'mail_kv' } }) email!: string;
    }
    const other = await createTestSchema('renamed');
    const ds = new DataSource({
      type: 'postgres',
      url: other.url,
      schema: other.schema,
      entities: [RenamedContact],
      synchronize: true,
    });
    encryption.attach(ds);
    await ds.initialize();
    try {
      const saved = await ds.getRepository(RenamedContact).save({ email: 'renamed@example.com' });
      const columns = await rawQuery<{ column_name: string }>(
        other.url,
        `SELECT column_name FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'renamed_contact' ORDER BY 1`,
        [other.schema],
      );
      expect(columns.map((c) => c.column_name)).toEqual([
        'id',
        'mail_ciphertext',
        'mail_iv',
        'mail_kv',
        'mail_wrapped_key',
      ]);
      expect((await ds.getRepository(RenamedContact).findOneByOrFail({ id: saved.id })).email).toBe(
        'renamed@example.com',
      );
    } finally {
      await ds.destroy();
      await other.drop();
    }
  });
});
