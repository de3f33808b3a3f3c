import 'reflect-metadata';
import {
  Column,
  DataSource,
  Entity,
  type MigrationInterface,
  PrimaryGeneratedColumn,
  type QueryRunner,
} from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  backfillEncryptedColumns,
  Encrypted,
  EnvelopeEncryption,
  encryptionStatus,
  UnsupportedOperationError,
  verifyEncryptedColumns,
} from '../../../src';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';

/** The application before encryption: a plain `email` column. */
@Entity('member')
class PlainMember {
  @PrimaryGeneratedColumn() id!: number;
  @Column({ type: 'varchar' }) email!: string;
  @Column({ type: 'varchar' }) name!: string;
}

/** The same table during the transition: `email` is encrypted, its old column still read. */
@Entity('member')
class Member {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({
    plaintextColumn: { name: 'email', type: 'varchar' },
    readPlaintextFallback: true,
    nullable: true,
  })
  email!: string;
  @Column({ type: 'varchar' }) name!: string;
}

/** The same, strict: a row not backfilled yet is an error. */
@Entity('member')
class StrictMember {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ plaintextColumn: { name: 'email', type: 'varchar' }, nullable: true }) email!: string;
  @Column({ type: 'varchar' }) name!: string;
}

let schema: TestSchema;
const sources: DataSource[] = [];
const provider = new CountingKeyProvider();
const table = () => `"${schema.schema}".member`;

async function open(entity: typeof PlainMember | typeof Member | typeof StrictMember) {
  const encryption = new EnvelopeEncryption({ keys: [{ version: 1, provider }], activeVersion: 1 });
  const dataSource = new DataSource({
    type: 'postgres',
    url: schema.url,
    schema: schema.schema,
    entities: [entity],
    synchronize: entity !== StrictMember,
  });
  if (entity !== PlainMember) encryption.attach(dataSource);
  await dataSource.initialize();
  sources.push(dataSource);
  return { dataSource, encryption };
}

beforeAll(async () => {
  schema = await createTestSchema('backfill');
  const { dataSource } = await open(PlainMember);
  await dataSource
    .getRepository(PlainMember)
    .save(Array.from({ length: 50 }, (_, i) => ({ email: `old${i}@example.com`, name: `n${i}` })));
});
afterAll(async () => {
  for (const s of sources) if (s.isInitialized) await s.destroy();
  await schema?.drop();
});

describe('encrypting an existing plaintext column', () => {
  it('reads not-yet-encrypted rows only when the fallback is enabled, then backfills them resumably', async () => {
    const { dataSource, encryption } = await open(Member);
    const strict = await open(StrictMember);
    const members = dataSource.getRepository(Member);

    expect((await members.findOneByOrFail({ name: 'n3' })).email).toBe('old3@example.com');
    await expect(
      strict.dataSource.getRepository(StrictMember).findOneByOrFail({ name: 'n3' }),
    ).rejects.toBeInstanceOf(UnsupportedOperationError);

    // A row written during the transition is encrypted and leaves no plaintext behind.
    const touched = await members.findOneByOrFail({ name: 'n4' });
    touched.email = 'changed4@example.com';
    await members.save(touched);
    const [row4] = await rawQuery<Record<string, unknown>>(
      schema.url,
      `SELECT * FROM ${table()} WHERE name = 'n4'`,
    );
    expect(row4?.email).toBeNull();
    expect(row4?.email_ciphertext).toBeInstanceOf(Buffer);

    const first = await backfillEncryptedColumns(dataSource, encryption, { batchSize: 7 });
    expect(first.error).toBeUndefined();
    expect(first.properties[0]).toMatchObject({ property: 'email', rowsEncrypted: 49, failures: [] });
    const again = await backfillEncryptedColumns(dataSource, encryption);
    expect(again.properties[0]?.rowsEncrypted).toBe(0);

    const stored = await rawQuery<Record<string, unknown>>(
      schema.url,
      `SELECT * FROM ${table()} ORDER BY id`,
    );
    expect(stored.every((r) => Buffer.isBuffer(r.email_ciphertext))).toBe(true);
    expect(stored.filter((r) => r.email !== null)).toHaveLength(49); // plaintext kept until the column is dropped

    const strictRows = await strict.dataSource.getRepository(StrictMember).find({ order: { id: 'ASC' } });
    expect(strictRows.map((m) => m.email)).toEqual(
      stored.map((_, i) => (i === 4 ? 'changed4@example.com' : `old${i}@example.com`)),
    );

    const cleared = await backfillEncryptedColumns(dataSource, encryption, { clearPlaintext: true });
    expect(cleared.properties[0]?.rowsEncrypted).toBe(0); // nothing left to encrypt; plaintext stays
    await rawQuery(
      schema.url,
      `UPDATE ${table()} SET email_ciphertext = NULL, email_iv = NULL, email_wrapped_key = NULL, email_key_version = NULL WHERE name = 'n7'`,
    );
    const last = await backfillEncryptedColumns(dataSource, encryption, { clearPlaintext: true });
    expect(last.properties[0]?.rowsEncrypted).toBe(1);
    const [row7] = await rawQuery<Record<string, unknown>>(
      schema.url,
      `SELECT * FROM ${table()} WHERE name = 'n7'`,
    );
    expect(row7?.email).toBeNull();
    expect((await members.findOneByOrFail({ name: 'n7' })).email).toBe('old7@example.com');
  });
});

/** Before: a populated table with a NOT NULL plaintext column. */
@Entity('account')
class PlainAccount {
  @PrimaryGeneratedColumn() id!: number;
  @Column({ type: 'varchar' }) iban!: string;
  @Column({ type: 'varchar' }) holder!: string;
}

/** Step 1: the property is encrypted, its old column still declared (a NOT NULL property). */
@Entity('account')
class MigratingAccount {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ plaintextColumn: { name: 'iban', type: 'varchar' }, readPlaintextFallback: true })
  iban!: string;
  @Column({ type: 'varchar' }) holder!: string;
}

/** Step 2, after the backfill: no old column; the sidecars are NOT NULL like any non-nullable property. */
@Entity('account')
class EncryptedAccount {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted() iban!: string;
  @Column({ type: 'varchar' }) holder!: string;
}

/** What `typeorm migration:generate` writes: the schema builder's queries, as a migration class. */
async function generateMigration(dataSource: DataSource, name: string) {
  const sql = await dataSource.driver.createSchemaBuilder().log();
  const up = sql.upQueries.map((q) => ({ query: q.query, parameters: q.parameters }));
  const down = sql.downQueries.map((q) => ({ query: q.query, parameters: q.parameters }));
  const migration = class implements MigrationInterface {
    name = name;
    async up(runner: QueryRunner) {
      for (const q of up) await runner.query(q.query, q.parameters);
    }
    async down(runner: QueryRunner) {
      for (const q of down.reverse()) await runner.query(q.query, q.parameters);
    }
  };
  Object.defineProperty(migration, 'name', { value: name });
  return { migration, up: up.map((q) => q.query).join('\n') };
}

async function openAccounts(entity: typeof PlainAccount | typeof MigratingAccount | typeof EncryptedAccount) {
  const encryption = new EnvelopeEncryption({ keys: [{ version: 1, provider }], activeVersion: 1 });
  const make = (migrations: Array<new () => MigrationInterface> = []) =>
    new DataSource({
      type: 'postgres',
      url: schema.url,
      schema: schema.schema,
      entities: [entity],
      synchronize: entity === PlainAccount,
      migrations,
    });
  const dataSource = make();
  if (entity !== PlainAccount) encryption.attach(dataSource);
  await dataSource.initialize();
  sources.push(dataSource);
  return { dataSource, encryption, make };
}

/** Runs a generated migration the way `typeorm migration:run` does, on a DataSource of its own. */
async function runMigration(
  make: (m: Array<new () => MigrationInterface>) => DataSource,
  encryption: EnvelopeEncryption,
  migration: new () => MigrationInterface,
) {
  const runner = make([migration]);
  encryption.attach(runner);
  await runner.initialize();
  sources.push(runner);
  try {
    await runner.runMigrations({ transaction: 'each' });
  } finally {
    await runner.destroy();
  }
}

describe('the two migrations that encrypt an existing column of a populated table', () => {
  const rows = 30;
  const accountTable = () => `"${schema.schema}".account`;

  it('adds nullable sidecars, backfills, then makes them NOT NULL and drops the old column', async () => {
    const plain = await openAccounts(PlainAccount);
    await plain.dataSource
      .getRepository(PlainAccount)
      .save(Array.from({ length: rows }, (_, i) => ({ iban: `DE00 ${i}`, holder: `h${i}` })));

    // Migration 1, generated with plaintextColumn declared: nullable ADDs, so it runs on a populated table.
    const migrating = await openAccounts(MigratingAccount);
    const first = await generateMigration(migrating.dataSource, 'EncryptIban1700000000001');
    for (const column of ['iban_ciphertext', 'iban_iv', 'iban_wrapped_key', 'iban_key_version']) {
      expect(first.up).toMatch(new RegExp(`ADD "${column}" (bytea|integer)(,|\\s*$|\\n)`, 'm'));
      expect(first.up).not.toMatch(new RegExp(`"${column}" (bytea|integer) NOT NULL`));
    }
    expect(first.up).not.toMatch(/DROP COLUMN "iban"/);
    expect(first.up).toMatch(/ALTER COLUMN "iban" DROP NOT NULL/);
    await runMigration(migrating.make, migrating.encryption, first.migration);
    const added = await rawQuery<{ column_name: string; is_nullable: string }>(
      schema.url,
      `SELECT column_name, is_nullable FROM information_schema.columns
       WHERE table_schema = $1 AND table_name = 'account' ORDER BY column_name`,
      [schema.schema],
    );
    expect(Object.fromEntries(added.map((c) => [c.column_name, c.is_nullable]))).toEqual({
      holder: 'NO',
      iban: 'YES',
      iban_ciphertext: 'YES',
      iban_iv: 'YES',
      iban_key_version: 'YES',
      iban_wrapped_key: 'YES',
      id: 'NO',
    });

    // While rows wait for the backfill: verify fails and names them, status counts them apart from nulls.
    const accounts = migrating.dataSource.getRepository(MigratingAccount);
    const written = await accounts.save(accounts.create({ iban: 'DE00 new', holder: 'new' }));
    const pending = await verifyEncryptedColumns(migrating.dataSource, migrating.encryption);
    expect(pending).toMatchObject({ rowsChecked: 1, pendingBackfill: rows, failed: rows });
    expect(pending.properties[0]).toMatchObject({ property: 'iban', pendingBackfill: rows, failed: rows });
    expect(pending.properties[0]?.failures[0]?.error).toMatch(/pending backfill/);
    expect(JSON.stringify(pending)).not.toContain('DE00');
    expect(await encryptionStatus(migrating.dataSource, migrating.encryption)).toEqual([
      {
        entity: 'MigratingAccount',
        property: 'iban',
        rowsByVersion: { '1': 1 },
        nullRows: 0,
        pendingBackfill: rows,
      },
    ]);
    // The read path serves pending rows from the old column (readPlaintextFallback).
    expect((await accounts.findOneByOrFail({ holder: 'h3' })).iban).toBe('DE00 3');

    const filled = await backfillEncryptedColumns(migrating.dataSource, migrating.encryption, {
      batchSize: 8,
      clearPlaintext: true,
    });
    expect(filled.error).toBeUndefined();
    expect(filled.properties[0]).toMatchObject({ rowsEncrypted: rows, failures: [] });
    const done = await verifyEncryptedColumns(migrating.dataSource, migrating.encryption);
    expect(done).toMatchObject({ rowsChecked: rows + 1, pendingBackfill: 0, failed: 0 });
    expect((await encryptionStatus(migrating.dataSource, migrating.encryption))[0]).toMatchObject({
      rowsByVersion: { '1': rows + 1 },
      nullRows: 0,
      pendingBackfill: 0,
    });

    // Migration 2, generated once plaintextColumn is removed: NOT NULL sidecars, old column dropped.
    const final = await openAccounts(EncryptedAccount);
    const second = await generateMigration(final.dataSource, 'EncryptIban1700000000002');
    expect(second.up).toMatch(/DROP COLUMN "iban"/);
    for (const column of ['iban_ciphertext', 'iban_iv', 'iban_wrapped_key', 'iban_key_version']) {
      expect(second.up).toMatch(new RegExp(`ALTER COLUMN "${column}" SET NOT NULL`));
    }
    await runMigration(final.make, final.encryption, second.migration);

    const stored = await rawQuery<Record<string, unknown>>(
      schema.url,
      `SELECT * FROM ${accountTable()} ORDER BY id`,
    );
    expect(stored).toHaveLength(rows + 1);
    expect(
      stored.every((r) => !('iban' in r) && Buffer.isBuffer(r.iban_ciphertext) && r.iban_key_version === 1),
    ).toBe(true);
    expect(stored.map((r) => (r.iban_ciphertext as Buffer).toString('latin1')).join()).not.toContain('DE00');
    const read = await final.dataSource.getRepository(EncryptedAccount).find({ order: { id: 'ASC' } });
    expect(read.map((a) => a.iban)).toEqual([
      ...Array.from({ length: rows }, (_, i) => `DE00 ${i}`),
      'DE00 new',
    ]);
    expect(read.at(-1)?.id).toBe(written.id);
  });

  it('migration 2 fails, changing nothing, when run before the backfill finished', async () => {
    await rawQuery(schema.url, `DROP TABLE IF EXISTS ${accountTable()}`);
    const plain = await openAccounts(PlainAccount);
    await plain.dataSource.getRepository(PlainAccount).save([{ iban: 'DE00 x', holder: 'x' }]);
    const migrating = await openAccounts(MigratingAccount);
    const first = await generateMigration(migrating.dataSource, 'EncryptIbanEarly1700000000003');
    await runMigration(migrating.make, migrating.encryption, first.migration);
    const final = await openAccounts(EncryptedAccount);
    const second = await generateMigration(final.dataSource, 'EncryptIbanEarly1700000000004');
    await expect(runMigration(final.make, final.encryption, second.migration)).rejects.toThrow(/null values/);
    const [row] = await rawQuery<Record<string, unknown>>(schema.url, `SELECT * FROM ${accountTable()}`);
    expect(row).toMatchObject({ iban: 'DE00 x', iban_ciphertext: null });
  });
});

describe('a non-nullable property while its sidecars are nullable (migration 1 applied)', () => {
  const accountTable = () => `"${schema.schema}".account`;
  let runs = 0;
  async function migrated() {
    await rawQuery(schema.url, `DROP TABLE IF EXISTS ${accountTable()}`);
    const plain = await openAccounts(PlainAccount);
    await plain.dataSource.getRepository(PlainAccount).save([
      { iban: 'DE00 a', holder: 'a' },
      { iban: 'DE00 b', holder: 'b' },
    ]);
    const migrating = await openAccounts(MigratingAccount);
    const first = await generateMigration(migrating.dataSource, `EncryptIbanNull${1700000000010 + runs++}`);
    await runMigration(migrating.make, migrating.encryption, first.migration);
    return { ...migrating, accounts: migrating.dataSource.getRepository(MigratingAccount) };
  }

  it('a partial select of a pending row reads the old column, never null', async () => {
    const { accounts } = await migrated();
    const [row] = await accounts.find({ select: { id: true, iban: true }, where: { holder: 'a' } });
    expect(row?.iban).toBe('DE00 a');
  });

  it('a row with neither ciphertext nor plaintext is an error for a non-nullable property, not null', async () => {
    const { accounts } = await migrated();
    await rawQuery(schema.url, `UPDATE ${accountTable()} SET iban = NULL WHERE holder = 'a'`);
    await expect(accounts.findOneByOrFail({ holder: 'a' })).rejects.toMatchObject({
      entity: 'MigratingAccount',
      column: 'iban',
    });
  });

  it('saving null into a non-nullable property is refused, and the row keeps its value', async () => {
    const { accounts } = await migrated();
    const loaded = await accounts.findOneByOrFail({ holder: 'b' });
    (loaded as { iban: string | null }).iban = null;
    await expect(accounts.save(loaded)).rejects.toMatchObject({ entity: 'MigratingAccount', column: 'iban' });
    const [row] = await rawQuery<Record<string, unknown>>(
      schema.url,
      `SELECT * FROM ${accountTable()} WHERE holder = 'b'`,
    );
    expect(row).toMatchObject({ iban: 'DE00 b', iban_ciphertext: null });
  });
});
