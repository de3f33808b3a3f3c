import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { IntegrityError, KeyRegistry, rewrapDataKeys, verifyEncryptedColumns } from '../../../src';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';
import { JOB_MIGRATIONS, JobCard } from './job-entities';
import { corruptKeyRow, dataKeyIdOf, keyRows, onPglite, storedValues, tableChecksum } from './job-support';

/**
 * Misuse of the key-table rotation: a corrupted key row, two rotations at once, an application
 * writing while the rotation runs. Each asserts what the application reads and the bytes stored.
 */
const v2 = new CountingKeyProvider();
const v3 = new CountingKeyProvider();
let db: EncryptedTestDatabase;
const cards = () => db.dataSource.getRepository(JobCard);

beforeAll(async () => {
  if (onPglite) return;
  db = await encryptedDatabase([JobCard], {
    prefix: 'cj_misuse',
    migrations: JOB_MIGRATIONS,
    encryption: { cache: { dataKeyMaxUses: 10 } },
    extraKeys: [
      { version: 2, provider: v2 },
      { version: 3, provider: v3 },
    ],
  });
});
afterAll(() => db?.close());

/** Saves cards `owner-0` … and returns their ids with the numbers they hold. */
async function saveCards(owner: string, count: number): Promise<Map<number, string>> {
  const saved = await cards().save(
    Array.from({ length: count }, (_, i) => cards().create({ owner, number: `4111-${owner}-${i}` })),
  );
  return new Map(saved.map((c) => [c.id, c.number]));
}

async function readAll(owner: string): Promise<Map<number, string>> {
  const rows = await cards().find({ where: { owner }, order: { id: 'ASC' } });
  return new Map(rows.map((c) => [c.id, c.number]));
}

describe.skipIf(onPglite)('a key row corrupted before the rotation', () => {
  it('is reported by its data-key id, left exactly as it was, and the other key rows are re-wrapped', async () => {
    const expected = await saveCards('corrupt', 30);
    const values = await storedValues(db, 'job_cards', 'number_ciphertext');
    const ids = [...new Set([...values.values()].map((v) => dataKeyIdOf(v as Buffer)))];
    expect(ids.length).toBe(3); // 10 values per data key
    const victim = ids[1] as string;
    await corruptKeyRow(db, victim);
    const before = await keyRows(db);
    const dataBefore = await tableChecksum(db, 'job_cards');

    await db.encryption.activate(2);
    const result = await rewrapDataKeys(db.dataSource, db.encryption, { entities: [JobCard] });

    expect(result.error).toBeUndefined();
    expect(result.properties).toEqual([]); // no sidecar property: no data row is read for re-wrapping
    expect(result.keyTable).toMatchObject({
      keyRowsTotal: 3,
      keyRowsRewrapped: 2,
      keyRowsSkipped: 0,
      dataRowsTouched: 0,
    });
    expect(result.keyTable?.failures).toEqual([
      { dataKeyId: victim, keyVersion: 1, error: expect.stringMatching(/^IntegrityError/) },
    ]);
    // Bytes: the corrupt row untouched, the others under version 2 with their fingerprint kept
    const after = await keyRows(db);
    for (const row of after) {
      const old = before.find((r) => r.id === row.id);
      expect(row.fingerprint).toEqual(old?.fingerprint);
      if (row.id === victim) {
        expect(row).toEqual(old);
      } else {
        expect(row.key_version).toBe(2);
        expect(row.wrapped_key.equals(old?.wrapped_key as Buffer)).toBe(false);
        expect(row.rewrapped_at).toBeInstanceOf(Date);
      }
    }
    expect(await tableChecksum(db, 'job_cards')).toEqual(dataBefore);

    // What the application reads, with nothing cached
    db.encryption.purgeCache();
    for (const [id, number] of expected) {
      const keyId = dataKeyIdOf(values.get(id) as Buffer);
      const read = cards().findOneByOrFail({ id });
      if (keyId === victim) await expect(read).rejects.toBeInstanceOf(IntegrityError);
      else expect((await read).number).toBe(number);
    }
    // Verify names the key row and every value under it
    const verified = await verifyEncryptedColumns(db.dataSource, db.encryption, { entities: [JobCard] });
    expect(verified.keyTable).toMatchObject({ failed: 1, failures: [{ dataKeyId: victim, keyVersion: 1 }] });
    expect(verified.failed).toBe(10);
    expect(new Set(verified.properties[0]?.failures.map((f) => f.dataKeyId))).toEqual(new Set([victim]));

    // The audit log records a failed rotation with its counts
    const [ended] = await new KeyRegistry(db.dataSource, db.encryption).auditLog({
      event: ['rotation-finished', 'rotation-failed'],
      limit: 1,
    });
    expect(ended).toMatchObject({
      event: 'rotation-failed',
      keyVersion: 2,
      details: expect.objectContaining({
        failures: 1,
        keyRowsRewrapped: 2,
        keyRowsTotal: 3,
        dataRowsTouched: 0,
      }),
    });

    // Run again: the corrupt row fails again, nothing else is left to do
    const again = await rewrapDataKeys(db.dataSource, db.encryption, { entities: [JobCard] });
    expect(again.keyTable).toMatchObject({ keyRowsTotal: 1, keyRowsRewrapped: 0 });
    expect(again.keyTable?.failures.map((f) => f.dataKeyId)).toEqual([victim]);
    await rawQuery(db.schema.url, `DELETE FROM "${db.schema.schema}".job_cards WHERE owner = 'corrupt'`);
    await rawQuery(
      db.schema.url,
      `DELETE FROM "${db.schema.schema}".typeorm_envelope_data_keys WHERE id = $1`,
      [victim],
    );
  });
});

describe.skipIf(onPglite)('two rotations at the same time', () => {
  it('re-wrap each key row exactly once between them, every value still reading', async () => {
    const second = await encryptedDatabase([JobCard], {
      schema: db.schema,
      migrations: JOB_MIGRATIONS,
      encryption: {
        keys: [
          { version: 1, provider: db.provider },
          { version: 2, provider: v2 },
          { version: 3, provider: v3 },
        ],
        activeVersion: 2,
      },
    });
    try {
      db.encryption.cache.renewEncryptionKey();
      const expected = await saveCards('twice', 60); // under version 2, six key rows
      await db.encryption.activate(3);
      await second.encryption.activate(3);
      const before = await keyRows(db);
      const dataBefore = await tableChecksum(db, 'job_cards');
      const due = before.filter((r) => r.key_version !== 3).length;
      expect(due).toBeGreaterThanOrEqual(6);

      const [a, b] = await Promise.all([
        rewrapDataKeys(db.dataSource, db.encryption, { entities: [JobCard] }),
        rewrapDataKeys(second.dataSource, second.encryption, { entities: [JobCard] }),
      ]);
      expect(a.error).toBeUndefined();
      expect(b.error).toBeUndefined();
      expect(a.keyTable?.failures).toEqual([]);
      expect(b.keyTable?.failures).toEqual([]);
      expect((a.keyTable?.keyRowsRewrapped ?? 0) + (b.keyTable?.keyRowsRewrapped ?? 0)).toBe(due);
      const after = await keyRows(db);
      expect(after.map((r) => r.key_version)).toEqual(after.map(() => 3));
      expect(after.map((r) => r.fingerprint)).toEqual(before.map((r) => r.fingerprint));
      expect(await tableChecksum(db, 'job_cards')).toEqual(dataBefore);

      db.encryption.purgeCache();
      expect(await readAll('twice')).toEqual(expected);
      const verified = await verifyEncryptedColumns(db.dataSource, db.encryption, { entities: [JobCard] });
      expect(verified).toMatchObject({ failed: 0, keyTable: { failed: 0, keyRowsChecked: after.length } });
    } finally {
      await second.close();
    }
  });
});

describe.skipIf(onPglite)('an application instance writing while the rotation runs', () => {
  it('loses no value: its new key rows are committed before its values, and a second run re-wraps what it registered meanwhile', async () => {
    // An instance that has not yet seen the activation of version 1 → 2 below: it keeps writing under 3
    const writer = await encryptedDatabase([JobCard], {
      schema: db.schema,
      migrations: JOB_MIGRATIONS,
      encryption: {
        keys: [
          { version: 1, provider: db.provider },
          { version: 2, provider: v2 },
          { version: 3, provider: v3 },
        ],
        activeVersion: 3,
        cache: { dataKeyMaxUses: 3 },
      },
    });
    try {
      const expected = await saveCards('live', 30);
      await db.encryption.activate(2);
      const writes = (async () => {
        const repo = writer.dataSource.getRepository(JobCard);
        for (let i = 0; i < 40; i++) {
          const card = await repo.save(repo.create({ owner: 'live', number: `4111-live-w${i}` }));
          expected.set(card.id, card.number);
          if (i % 5 === 0) {
            // and changes an older one
            const old = await repo.findOneByOrFail({ id: card.id - 20 });
            old.number = `${old.number}-changed`;
            await repo.save(old);
            expected.set(old.id, old.number);
          }
        }
      })();
      const first = await rewrapDataKeys(db.dataSource, db.encryption, { toVersion: 2 });
      await writes;
      expect(first.error).toBeUndefined();
      expect(first.keyTable?.failures).toEqual([]);
      expect(first.keyTable?.dataRowsTouched).toBe(0);

      // Every key row a value names exists (registered before the value was committed)
      const values = await storedValues(db, 'job_cards', 'number_ciphertext');
      const ids = new Set((await keyRows(db)).map((r) => r.id));
      for (const value of values.values()) expect(ids.has(dataKeyIdOf(value as Buffer))).toBe(true);

      const second = await rewrapDataKeys(db.dataSource, db.encryption, { toVersion: 2 });
      expect(second.keyTable?.failures).toEqual([]);
      expect((await keyRows(db)).every((r) => r.key_version === 2)).toBe(true);

      db.encryption.purgeCache();
      writer.encryption.purgeCache();
      expect(await readAll('live')).toEqual(expected);
      const fromWriter = await writer.dataSource.getRepository(JobCard).find({ where: { owner: 'live' } });
      expect(new Map(fromWriter.map((c) => [c.id, c.number]))).toEqual(expected);
    } finally {
      await writer.close();
    }
  });
});
