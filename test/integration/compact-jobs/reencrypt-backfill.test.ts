import { Column, DataSource, Entity, PrimaryGeneratedColumn } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TypeormEnvelopeDataKeys1764500000000 } from '../../../migrations/1764500000000-TypeormEnvelopeDataKeys';
import {
  backfillEncryptedColumns,
  Encrypted,
  EnvelopeEncryption,
  encryptionStatus,
  reencryptColumns,
  verifyEncryptedColumns,
} from '../../../src';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';
import { JOB_MIGRATIONS, JobCard } from './job-entities';
import { dataKeyIdOf, keyRows, onPglite, storedValues, writeWhileJobWaits } from './job-support';

let db: EncryptedTestDatabase;
const cards = () => db.dataSource.getRepository(JobCard);

beforeAll(async () => {
  if (onPglite) return;
  db = await encryptedDatabase([JobCard], {
    prefix: 'cj_reencrypt',
    migrations: JOB_MIGRATIONS,
    encryption: { cache: { dataKeyMaxUses: 1_000 } },
  });
});
afterAll(() => db?.close());

describe.skipIf(onPglite)('reencryptColumns on a compact property', () => {
  it('writes compact values under a fresh data key whose row is committed, and reads the same values', async () => {
    const saved = await cards().save(
      Array.from({ length: 40 }, (_, i) => cards().create({ owner: 're', number: `re-${i}` })),
    );
    const expected = new Map(saved.map((c) => [c.id, c.number]));
    const before = await storedValues(db, 'job_cards', 'number_ciphertext');
    const rowsBefore = await keyRows(db);
    expect(rowsBefore.length).toBe(1);

    const result = await reencryptColumns(db.dataSource, db.encryption, { batchSize: 15 });
    expect(result.error).toBeUndefined();
    expect(result.properties).toEqual([
      { entity: 'JobCard', property: 'number', rowsReencrypted: 40, rowsSkipped: 0, failures: [] },
    ]);
    // Bytes: every value changed, still format 2, naming a new key row that exists
    const after = await storedValues(db, 'job_cards', 'number_ciphertext');
    const rowsAfter = await keyRows(db);
    expect(rowsAfter.length).toBe(2);
    const fresh = rowsAfter[1]?.id as string;
    for (const [id, value] of after) {
      expect(value?.[0]).toBe(0x02);
      expect(value?.equals(before.get(id) as Buffer)).toBe(false);
      expect(dataKeyIdOf(value as Buffer)).toBe(fresh);
    }
    db.encryption.purgeCache();
    const read = await cards().find({ where: { owner: 're' } });
    expect(new Map(read.map((c) => [c.id, c.number]))).toEqual(expected);
  });

  it('leaves a value the application writes meanwhile as the application wrote it', async () => {
    const card = await cards().save(cards().create({ owner: 'race', number: 'before' }));
    const result = await writeWhileJobWaits(
      db,
      JobCard,
      'job_cards',
      card.id,
      (row) => {
        row.number = 'written by the application';
      },
      () => reencryptColumns(db.dataSource, db.encryption, { entities: [JobCard] }),
    );
    expect(result.error).toBeUndefined();
    expect(result.properties[0]).toMatchObject({ rowsSkipped: 1, failures: [] });
    db.encryption.purgeCache();
    expect((await cards().findOneByOrFail({ id: card.id })).number).toBe('written by the application');
    const stored = (await storedValues(db, 'job_cards', 'number_ciphertext')).get(card.id) as Buffer;
    expect(stored[0]).toBe(0x02);
    expect((await keyRows(db)).some((r) => r.id === dataKeyIdOf(stored))).toBe(true);
  });

  it('a value whose key row is missing fails by its data-key id and is left as it is', async () => {
    const card = await cards().save(cards().create({ owner: 'lost', number: 'gone' }));
    const stored = (await storedValues(db, 'job_cards', 'number_ciphertext')).get(card.id) as Buffer;
    // Put it under a key row that does not exist (one the table never had)
    const moved = Buffer.from(stored);
    moved.writeBigUInt64BE(999_999n, 2);
    await rawQuery(
      db.schema.url,
      `UPDATE "${db.schema.schema}".job_cards SET number_ciphertext = $1 WHERE id = $2`,
      [moved, card.id],
    );
    const result = await reencryptColumns(db.dataSource, db.encryption, { entities: [JobCard] });
    expect(result.properties[0]?.failures).toEqual([
      {
        primaryKey: String(card.id),
        error: expect.stringMatching(/^IntegrityError: data key 999999 is not in the data-key table/),
      },
    ]);
    expect((await storedValues(db, 'job_cards', 'number_ciphertext')).get(card.id)).toEqual(moved);
    await rawQuery(db.schema.url, `DELETE FROM "${db.schema.schema}".job_cards WHERE id = $1`, [card.id]);
  });
});

/** Before: a plaintext column. */
@Entity('job_members')
class PlainJobMember {
  @PrimaryGeneratedColumn() id!: number;
  @Column({ type: 'varchar' }) email!: string;
}

/** During: encrypted in the compact layout, the old column still read. */
@Entity('job_members')
class CompactJobMember {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({
    layout: 'compact',
    plaintextColumn: { name: 'email', type: 'varchar' },
    readPlaintextFallback: true,
    nullable: true,
  })
  email!: string;
}

describe.skipIf(onPglite)('backfillEncryptedColumns into a compact property', () => {
  let schema: TestSchema;
  const sources: DataSource[] = [];
  const provider = new CountingKeyProvider();
  afterAll(async () => {
    for (const s of sources) if (s.isInitialized) await s.destroy();
    await schema?.drop();
  });

  it('encrypts the old column into compact values, guarded and resumable', async () => {
    schema = await createTestSchema('cj_backfill');
    const plain = new DataSource({
      type: 'postgres',
      url: schema.url,
      schema: schema.schema,
      entities: [PlainJobMember],
      synchronize: true,
    });
    await plain.initialize();
    sources.push(plain);
    await plain
      .getRepository(PlainJobMember)
      .save(Array.from({ length: 30 }, (_, i) => ({ email: `m${i}@example.com` })));

    const encryption = new EnvelopeEncryption({ keys: [{ version: 1, provider }], activeVersion: 1 });
    const dataSource = new DataSource({
      type: 'postgres',
      url: schema.url,
      schema: schema.schema,
      entities: [CompactJobMember],
      synchronize: true,
      migrations: [TypeormEnvelopeDataKeys1764500000000],
      migrationsRun: true,
    });
    encryption.attach(dataSource);
    await dataSource.initialize();
    sources.push(dataSource);
    const table = `"${schema.schema}".job_members`;

    const pending = await encryptionStatus(dataSource, encryption);
    expect(pending[0]).toMatchObject({ pendingBackfill: 30, valuesByLayout: { sidecars: 0, compact: 0 } });

    const first = await backfillEncryptedColumns(dataSource, encryption, { batchSize: 7 });
    expect(first.error).toBeUndefined();
    expect(first.properties).toEqual([
      { entity: 'CompactJobMember', property: 'email', rowsEncrypted: 30, failures: [] },
    ]);
    const stored = await rawQuery<{ id: number; email: string | null; email_ciphertext: Buffer }>(
      schema.url,
      `SELECT id, email, email_ciphertext FROM ${table} ORDER BY id`,
    );
    const [keyRow] = await rawQuery<{ id: string }>(
      schema.url,
      `SELECT id::text AS id FROM "${schema.schema}".typeorm_envelope_data_keys`,
    );
    for (const row of stored) {
      expect(row.email_ciphertext[0]).toBe(0x02);
      expect(dataKeyIdOf(row.email_ciphertext)).toBe(keyRow?.id);
      expect(row.email_ciphertext.includes(Buffer.from(row.email as string))).toBe(false);
    }
    const again = await backfillEncryptedColumns(dataSource, encryption);
    expect(again.properties[0]?.rowsEncrypted).toBe(0);
    encryption.purgeCache();
    const members = await dataSource.getRepository(CompactJobMember).find({ order: { id: 'ASC' } });
    expect(members.map((m) => m.email)).toEqual(stored.map((_, i) => `m${i}@example.com`));
    const verified = await verifyEncryptedColumns(dataSource, encryption);
    expect(verified).toMatchObject({
      rowsChecked: 30,
      failed: 0,
      pendingBackfill: 0,
      keyTable: { failed: 0 },
    });
  });
});
