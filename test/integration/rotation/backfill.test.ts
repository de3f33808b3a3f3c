import 'reflect-metadata';
import { Column, DataSource, Entity, PrimaryGeneratedColumn } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  backfillEncryptedColumns,
  Encrypted,
  EnvelopeEncryption,
  UnsupportedOperationError,
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
