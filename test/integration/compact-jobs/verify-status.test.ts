import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  ConfigError,
  encryptionStatus,
  IntegrityError,
  KeyRegistry,
  LocalKeyProvider,
  reencryptColumns,
  rewrapDataKeys,
  UnsupportedOperationError,
  verifyEncryptedColumns,
} from '../../../src';
import type { EncryptionContext } from '../../../src/keys/key-provider';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';
import { JOB_MIGRATIONS, JobAccount, JobCard } from './job-entities';
import { corruptKeyRow, dataKeyIdOf, keyRows, keyTable, onPglite, storedValues } from './job-support';

/** A master key whose wraps do not unwrap to the key they were given (a faulty backend). */
class MiswrappingKeyProvider extends LocalKeyProvider {
  protected override _wrapDataKey(plaintextKey: Buffer, context: EncryptionContext): Promise<Buffer> {
    const other = Buffer.from(plaintextKey);
    other[0] = (other[0] ?? 0) ^ 1;
    return super._wrapDataKey(other, context);
  }
}

const v2 = new CountingKeyProvider();
const faulty = new MiswrappingKeyProvider({ key: Buffer.alloc(32, 7).toString('base64') });
let db: EncryptedTestDatabase;
const cards = () => db.dataSource.getRepository(JobCard);
const accounts = () => db.dataSource.getRepository(JobAccount);

beforeAll(async () => {
  if (onPglite) return;
  db = await encryptedDatabase([JobCard, JobAccount], {
    prefix: 'cj_verify',
    migrations: JOB_MIGRATIONS,
    encryption: { cache: { dataKeyMaxUses: 5 } },
    extraKeys: [
      { version: 2, provider: v2 },
      { version: 9, provider: faulty },
    ],
  });
  await cards().save(Array.from({ length: 20 }, (_, i) => cards().create({ owner: 'v', number: `n-${i}` })));
  await accounts().save(
    Array.from({ length: 10 }, (_, i) => accounts().create({ iban: `DE-${i}`, holder: `holder-${i}` })),
  );
});
afterAll(() => db?.close());

describe.skipIf(onPglite)('status through the data-key table', () => {
  it('counts compact values under their key row’s version, sidecar values under their own', async () => {
    const status = await encryptionStatus(db.dataSource, db.encryption);
    expect(status).toEqual([
      {
        entity: 'JobCard',
        property: 'number',
        rowsByVersion: { '1': 20 },
        nullRows: 0,
        pendingBackfill: 0,
        layout: 'compact',
        valuesByLayout: { sidecars: 0, compact: 20 },
        valuesWithoutKeyRow: 0,
      },
      // A sidecar property reports exactly what it always did
      { entity: 'JobAccount', property: 'iban', rowsByVersion: { '1': 10 }, nullRows: 0, pendingBackfill: 0 },
      expect.objectContaining({ entity: 'JobAccount', property: 'holder', rowsByVersion: { '1': 10 } }),
    ]);
  });
});

describe.skipIf(onPglite)('a re-wrap whose new wrap does not unwrap to the original key', () => {
  it('is caught before anything is written: key rows and data rows stay as they were', async () => {
    const before = await keyRows(db);
    const values = await storedValues(db, 'job_cards', 'number_ciphertext');
    const result = await rewrapDataKeys(db.dataSource, db.encryption, { toVersion: 9, entities: [JobCard] });
    expect(result.error).toBeUndefined();
    expect(result.keyTable?.keyRowsRewrapped).toBe(0);
    expect(result.keyTable?.failures.length).toBe(before.length);
    for (const f of result.keyTable?.failures ?? []) {
      expect(f.error).toMatch(/IntegrityError: a re-wrapped data key does not unwrap to the original key/);
    }
    expect(await keyRows(db)).toEqual(before);
    expect(await storedValues(db, 'job_cards', 'number_ciphertext')).toEqual(values);
  });
});

describe.skipIf(onPglite)('verify through the data-key table', () => {
  it('passes when every key row unwraps and every value opens with its key row', async () => {
    const result = await verifyEncryptedColumns(db.dataSource, db.encryption);
    expect(result).toMatchObject({ rowsChecked: 40, failed: 0 });
    expect(result.keyTable).toEqual({
      keyRowsChecked: (await keyRows(db)).length,
      failed: 0,
      offboarded: 0,
      failures: [],
    });
  });

  it('names a deleted key row by its data-key id, in verify, in status and on read', async () => {
    const values = await storedValues(db, 'job_cards', 'number_ciphertext');
    const [firstId, value] = [...values.entries()][0] as [number, Buffer];
    const victim = dataKeyIdOf(value);
    const affected = [...values.values()].filter((v) => dataKeyIdOf(v as Buffer) === victim).length;
    const [saved] = await rawQuery<Record<string, unknown>>(
      db.schema.url,
      `SELECT * FROM ${keyTable(db)} WHERE id = $1`,
      [victim],
    );
    await rawQuery(db.schema.url, `DELETE FROM ${keyTable(db)} WHERE id = $1`, [victim]);
    try {
      const result = await verifyEncryptedColumns(db.dataSource, db.encryption, { entities: [JobCard] });
      expect(result.failed).toBe(affected);
      const failures = result.properties[0]?.failures ?? [];
      expect(failures.length).toBe(affected);
      for (const f of failures) {
        expect(f).toMatchObject({ dataKeyId: victim, keyVersion: null });
        expect(f.error).toMatch(
          new RegExp(`^IntegrityError: data key ${victim} is not in the data-key table`),
        );
      }
      const [status] = await encryptionStatus(db.dataSource, db.encryption, { entities: [JobCard] });
      expect(status).toMatchObject({ rowsByVersion: { '1': 20 - affected }, valuesWithoutKeyRow: affected });
      db.encryption.purgeCache();
      const read = cards().findOneByOrFail({ id: firstId });
      await expect(read).rejects.toBeInstanceOf(IntegrityError);
      await expect(read).rejects.toThrow(new RegExp(`data key ${victim}\\b`));
    } finally {
      // Restored from the backup: everything reads again
      await rawQuery(
        db.schema.url,
        `INSERT INTO ${keyTable(db)} (id, keyring, tenant_id, key_version, wrapped_key, fingerprint, created_at)
         OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3, $4, $5, $6, $7)`,
        [
          saved?.id,
          saved?.keyring,
          saved?.tenant_id,
          saved?.key_version,
          saved?.wrapped_key,
          saved?.fingerprint,
          saved?.created_at,
        ],
      );
    }
    db.encryption.purgeCache();
    expect((await verifyEncryptedColumns(db.dataSource, db.encryption)).failed).toBe(0);
  });

  it('names a corrupted key row by its data-key id, and every value under it', async () => {
    const values = await storedValues(db, 'job_accounts', 'holder_ciphertext');
    const victim = dataKeyIdOf([...values.values()][3] as Buffer);
    const affected = [...values.values()].filter((v) => dataKeyIdOf(v as Buffer) === victim).length;
    const [saved] = await rawQuery<{ wrapped_key: Buffer }>(
      db.schema.url,
      `SELECT wrapped_key FROM ${keyTable(db)} WHERE id = $1`,
      [victim],
    );
    await corruptKeyRow(db, victim);
    db.encryption.purgeCache();
    try {
      const result = await verifyEncryptedColumns(db.dataSource, db.encryption);
      expect(result.keyTable).toMatchObject({
        failed: 1,
        failures: [{ dataKeyId: victim, keyVersion: 1, error: expect.stringMatching(/^IntegrityError/) }],
      });
      const holder = result.properties.find((p) => p.property === 'holder');
      expect(holder?.failed).toBe(affected);
      expect(holder?.failures.every((f) => f.dataKeyId === victim && f.keyVersion === 1)).toBe(true);
      expect(result.properties.find((p) => p.property === 'iban')?.failed).toBe(0);
      expect(JSON.stringify(result)).not.toMatch(/holder-\d/);
    } finally {
      await rawQuery(db.schema.url, `UPDATE ${keyTable(db)} SET wrapped_key = $1 WHERE id = $2`, [
        saved?.wrapped_key,
        victim,
      ]);
    }
  });
});

describe.skipIf(onPglite)('retiring a master-key version', () => {
  it('is refused while a key row still has that version, even when no sidecar value uses it', async () => {
    const registry = new KeyRegistry(db.dataSource, db.encryption);
    await registry.sync();
    await registry.activate(2);
    const sidecarsOnly = await rewrapDataKeys(db.dataSource, db.encryption, { entities: [JobAccount] });
    expect(sidecarsOnly.error).toBeUndefined();
    expect((await keyRows(db)).every((r) => r.key_version === 2)).toBe(true); // JobAccount has a compact property too

    // A compact value whose key row is under version 1: counted as a stored value of version 1
    const [row] = await keyRows(db);
    await rawQuery(db.schema.url, `UPDATE ${keyTable(db)} SET key_version = 1 WHERE id = $1`, [row?.id]);
    expect(await registry.rowsUsingVersion(1)).toBeGreaterThan(0);
    await expect(registry.retire(1)).rejects.toThrow(/stored values still use this key version/);
    await rawQuery(db.schema.url, `UPDATE ${keyTable(db)} SET key_version = 2 WHERE id = $1`, [row?.id]);

    // A key row no value names any more, still wrapped by version 1 (an instance that had not seen the activation)
    const orphan = await db.provider.generateDataKey(db.encryption.keyring.context);
    orphan.plaintextKey.fill(0);
    await rawQuery(
      db.schema.url,
      `INSERT INTO ${keyTable(db)} (keyring, key_version, wrapped_key, fingerprint) VALUES ($1, 1, $2, sha256($2))`,
      [db.encryption.keyring.keyringId, orphan.wrappedKey],
    );
    expect(await registry.rowsUsingVersion(1)).toBe(0);
    await expect(registry.retire(1)).rejects.toBeInstanceOf(UnsupportedOperationError);
    await expect(registry.retire(1)).rejects.toThrow(
      /1 rows of the data-key table are still wrapped by this key version/,
    );
    // The re-wrap moves it too (no entity names it: the table is re-wrapped whole), then retiring works
    const rotation = await rewrapDataKeys(db.dataSource, db.encryption);
    expect(rotation.keyTable).toMatchObject({ keyRowsRewrapped: 1, failures: [] });
    await registry.retire(1);
    expect((await registry.list()).find((k) => k.version === 1)?.state).toBe('retired');
  });
});

describe.skipIf(onPglite)('jobs on compact properties without the data-key table', () => {
  it('are refused with a ConfigError naming the migration, before any row is read', async () => {
    const bare = await encryptedDatabase([JobCard], { prefix: 'cj_no_table' });
    try {
      await rawQuery(
        bare.schema.url,
        `INSERT INTO "${bare.schema.schema}".job_cards (number_ciphertext) VALUES ('\\x02')`,
      );
      const named = /TypeormEnvelopeDataKeys1764500000000/;
      const verified = await verifyEncryptedColumns(bare.dataSource, bare.encryption);
      expect(verified.error).toBeInstanceOf(ConfigError);
      expect(String(verified.error)).toMatch(named);
      await expect(encryptionStatus(bare.dataSource, bare.encryption)).rejects.toThrow(named);
      const reencrypted = await reencryptColumns(bare.dataSource, bare.encryption);
      expect(String(reencrypted.error)).toMatch(named);
      expect(reencrypted.properties).toEqual([]);
    } finally {
      await bare.close();
    }
  });
});
