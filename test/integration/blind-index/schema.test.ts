import { inspect } from 'node:util';
import 'reflect-metadata';
import { DataSource, Entity, PrimaryGeneratedColumn } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError, Encrypted } from '../../../src';
import { indexKeyContext } from '../../../src/keys/index-keys';
import { Account, BLIND_INDEX_MIGRATIONS, Invoice, Member } from '../../support/blind-index-entities';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/**
 * The blind-index column and its index come from TypeORM's metadata, so the CLI's
 * `migration:generate` (which loads the entities without this library's runtime) proposes them,
 * and a schema made with the library attached shows it nothing left to do.
 */
let db: EncryptedTestDatabase;

beforeAll(async () => {
  db = await encryptedDatabase([Member, Account, Invoice], {
    prefix: 'bidx_schema',
    migrations: BLIND_INDEX_MIGRATIONS,
  });
});
afterAll(() => db?.close());

/** A DataSource on the same schema that nothing attached encryption to: what the TypeORM CLI builds. */
async function unattached(): Promise<DataSource> {
  const dataSource = new DataSource({
    type: 'postgres',
    url: db.schema.url,
    schema: db.schema.schema,
    entities: [Member, Account, Invoice],
  });
  await dataSource.initialize();
  return dataSource;
}

describe('schema', () => {
  it('migration generation creates the index column and a (unique) B-tree index on it', async () => {
    const fresh = new DataSource({
      type: 'postgres',
      url: db.schema.url,
      schema: `${db.schema.schema}_empty`,
      entities: [Member, Account, Invoice],
    });
    await rawQuery(db.schema.url, `CREATE SCHEMA "${db.schema.schema}_empty"`);
    try {
      await fresh.initialize();
      const sql = (await fresh.driver.createSchemaBuilder().log()).upQueries.map((q) => q.query).join('\n');
      expect(sql).toMatch(/"email_bidx" bytea,/);
      expect(sql).toMatch(/"phone_bidx" bytea,/);
      expect(sql).toMatch(/"addressCity_bidx" bytea/); // embedded: prefixed like its other columns
      expect(sql).toMatch(/CREATE UNIQUE INDEX "[^"]+" ON "[^"]+"\."bidx_members"\s+\("email_bidx"\)/);
      expect(sql).toMatch(/CREATE INDEX "[^"]+" ON "[^"]+"\."bidx_members"\s+\("phone_bidx"\)/);
      expect(sql).toMatch(/CREATE UNIQUE INDEX "[^"]+" ON "[^"]+"\."bidx_accounts"\s+\("email_bidx"\)/);
      expect(sql).not.toMatch(/"note_bidx"/); // not searchable
      expect(sql).not.toMatch(/\$bidx/);
    } finally {
      if (fresh.isInitialized) await fresh.destroy();
      await rawQuery(db.schema.url, `DROP SCHEMA "${db.schema.schema}_empty" CASCADE`);
    }
  });

  it('a schema synchronized with the library attached leaves migration generation nothing to do', async () => {
    const cli = await unattached();
    try {
      const { upQueries } = await cli.driver.createSchemaBuilder().log();
      expect(upQueries.map((q) => q.query)).toEqual([]);
    } finally {
      await cli.destroy();
    }
  });

  it('refuses options that could not work, when the entity is declared', () => {
    expect(() => {
      @Entity('bidx_bad_unique')
      class BadUnique {
        @PrimaryGeneratedColumn() id!: number;
        @Encrypted({ unique: true }) email!: string;
      }
      return BadUnique;
    }).toThrow(ConfigError);
    expect(() => {
      @Entity('bidx_bad_json')
      class BadJson {
        @PrimaryGeneratedColumn() id!: number;
        @Encrypted({ type: 'json', searchable: true }) profile!: object;
      }
      return BadJson;
    }).toThrow(/json property cannot be searchable/);
    expect(() => {
      @Entity('bidx_bad_normaliser')
      class BadNormaliser {
        @PrimaryGeneratedColumn() id!: number;
        @Encrypted({ type: 'number', searchable: { normalize: 'email' } }) score!: number;
      }
      return BadNormaliser;
    }).toThrow(/normaliser applies to strings/);
  });
});

describe('no key material in inspect output or JSON', () => {
  it('index keys held in memory print no key bytes', async () => {
    const members = db.dataSource.getRepository(Member);
    await members.save(
      members.create({ workspaceId: 'ws-inspect', email: 'i@example.com', phone: null, note: null }),
    );
    await members.findOneByOrFail({ workspaceId: 'ws-inspect', email: 'i@example.com' });
    const [row] = await rawQuery<{ wrapped_key: Buffer }>(
      db.schema.url,
      `SELECT wrapped_key FROM "${db.schema.schema}".typeorm_envelope_index_keys WHERE tenant_id = 'ws-inspect'`,
    );
    const key = await db.provider.unwrapDataKey(
      row?.wrapped_key as Buffer,
      indexKeyContext(db.encryption.keyScope('ws-inspect')),
    );
    const printed = [
      inspect(db.encryption.indexKeys, { depth: 10, showHidden: true }),
      inspect(db.encryption, { depth: 6, showHidden: true }),
      JSON.stringify(db.encryption.indexKeys),
    ].join('\n');
    for (const form of [key.toString('hex'), key.toString('base64'), key.toString('base64url')]) {
      expect(printed).not.toContain(form);
    }
    key.fill(0);
  });
});
