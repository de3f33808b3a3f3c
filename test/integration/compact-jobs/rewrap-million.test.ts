import { In } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encryptionStatus, KeyRegistry, rewrapDataKeys } from '../../../src';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';
import { JOB_MIGRATIONS, JobNote } from './job-entities';
import { keyRows, onPglite, tableChecksum, tableOf } from './job-support';

/**
 * Rotation of the compact layout is O(data keys): 1,000,000 data rows under 10 data keys are
 * rotated by re-wrapping 10 key rows, and not one data row is written.
 */
const ROWS = 1_000_000;
const KEYS = 10;
const v2 = new CountingKeyProvider();
let db: EncryptedTestDatabase;

beforeAll(async () => {
  if (onPglite) return;
  db = await encryptedDatabase([JobNote], {
    prefix: 'cj_million',
    migrations: JOB_MIGRATIONS,
    // One value per data key: the ten templates get ten data keys.
    encryption: { cache: { dataKeyMaxUses: 1 } },
    extraKeys: [{ version: 2, provider: v2 }],
  });
  const notes = db.dataSource.getRepository(JobNote);
  for (let template = 0; template < KEYS; template++) {
    await notes.save(notes.create({ template, body: `note-${template}` }));
  }
  /* The other rows copy the templates' sealed values (they are bound to table and column, not to the row). */
  await rawQuery(
    db.schema.url,
    `INSERT INTO ${tableOf(db, 'job_notes')} (template, body_ciphertext)
     SELECT tpl.template, tpl.body_ciphertext
     FROM generate_series(1, ${ROWS - KEYS}) AS g
     JOIN (SELECT template, body_ciphertext FROM ${tableOf(db, 'job_notes')}) AS tpl ON tpl.template = g % ${KEYS}`,
  );
}, 600_000);
afterAll(() => db?.close());

describe.skipIf(onPglite)('rewrapDataKeys on 1,000,000 compact rows under 10 data keys', () => {
  it('updates the 10 key rows, each verified, changes no data row, and every sampled row reads', async () => {
    const before = await keyRows(db);
    expect(before.length).toBe(KEYS);
    expect(before.every((r) => r.key_version === 1)).toBe(true);
    const data = await tableChecksum(db, 'job_notes');
    expect(data.rows).toBe(ROWS);

    await db.encryption.activate(2);
    db.provider.reset();
    v2.reset();
    const result = await rewrapDataKeys(db.dataSource, db.encryption);

    expect(result.error).toBeUndefined();
    expect(result.properties).toEqual([]);
    expect(result.keyTable).toMatchObject({
      keyRowsTotal: KEYS,
      keyRowsRewrapped: KEYS,
      keyRowsSkipped: 0,
      dataRowsTouched: 0,
      failures: [],
    });
    // One re-wrap and one check per key row, whatever the number of rows
    expect(result.rewrapCalls).toBe(KEYS);
    expect(result.verificationCalls).toBe(KEYS);
    expect(v2.calls.unwrap).toBe(KEYS);

    const after = await keyRows(db);
    for (const [i, row] of after.entries()) {
      const old = before[i];
      expect(row.id).toBe(old?.id);
      expect(row.key_version).toBe(2);
      expect(row.rewrapped_at).toBeInstanceOf(Date);
      expect(row.fingerprint).toEqual(old?.fingerprint);
      expect(row.wrapped_key.equals(old?.wrapped_key as Buffer)).toBe(false);
    }
    expect(await tableChecksum(db, 'job_notes')).toEqual(data);

    const [ended] = await new KeyRegistry(db.dataSource, db.encryption).auditLog({
      event: 'rotation-finished',
      limit: 1,
    });
    expect(ended?.details).toMatchObject({ keyRowsRewrapped: KEYS, keyRowsTotal: KEYS, dataRowsTouched: 0 });

    const [status] = await encryptionStatus(db.dataSource, db.encryption);
    expect(status).toMatchObject({ rowsByVersion: { '2': ROWS }, valuesWithoutKeyRow: 0 });

    // Sampled rows through TypeORM, with nothing cached: the re-wrapped key rows open them
    db.encryption.purgeCache();
    const sample = Array.from({ length: 300 }, () => 1 + Math.floor(Math.random() * ROWS));
    const read = await db.dataSource.getRepository(JobNote).findBy({ id: In(sample) });
    expect(read.length).toBe(new Set(sample).size);
    for (const note of read) expect(note.body).toBe(`note-${note.template}`);

    // Resumable trivially: nothing is left to do
    const again = await rewrapDataKeys(db.dataSource, db.encryption);
    expect(again.keyTable).toMatchObject({ keyRowsTotal: 0, keyRowsRewrapped: 0 });
    expect(again.rewrapCalls).toBe(0);
  }, 600_000);
});
