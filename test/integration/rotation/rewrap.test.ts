import type { MigrationInterface, QueryRunner } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rewrapDataKeys } from '../../../src/rotation/rewrap';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { rawQuery } from '../../support/database';
import { Customer, Employee, Order } from '../../support/entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

let db: EncryptedTestDatabase;
const v2 = new CountingKeyProvider();

beforeAll(async () => {
  db = await encryptedDatabase([Customer, Order, Employee], {
    prefix: 'rewrap',
    encryption: { cache: { dataKeyMaxUses: 40 } },
    extraKeys: [{ version: 2, provider: v2 }],
  });
});
afterAll(() => db?.close());

const customers = () => db.dataSource.getRepository(Customer);
const table = () => `"${db.schema.schema}".customer`;

async function snapshot() {
  return rawQuery<Record<string, Buffer | number | null>>(
    db.schema.url,
    `SELECT id, email_ciphertext, email_iv, email_wrapped_key, email_key_version, address_ciphertext, address_iv, address_key_version FROM ${table()} ORDER BY id`,
  );
}

describe('rewrapDataKeys', () => {
  it('re-wraps every data key under the new version, leaving ciphertext and IV byte for byte', async () => {
    await customers().save(
      Array.from({ length: 120 }, (_, i) =>
        customers().create({
          email: `r${i}@example.com`,
          plan: 'r',
          address: i % 3 ? { street: `${i}`, city: 'R' } : null,
        }),
      ),
    );
    const before = await snapshot();
    const distinctV1 = new Set(before.map((r) => (r.email_wrapped_key as Buffer).toString('hex'))).size;
    expect(distinctV1).toBeGreaterThan(2); // several data keys (40 uses each across two properties)

    await db.encryption.activate(2);
    await customers().save(customers().create({ email: 'new@example.com', plan: 'r', address: null }));
    db.provider.reset();
    v2.reset();

    const dry = await rewrapDataKeys(db.dataSource, db.encryption, { dryRun: true, entities: [Customer] });
    expect(dry.error).toBeUndefined();
    expect(dry.properties.find((p) => p.property === 'email')?.rowsTotal).toBe(120);
    expect(dry.rewrapCalls).toBe(0);
    expect(await snapshot()).toEqual([...before, ...(await snapshot()).slice(before.length)]);

    const progress: number[] = [];
    const result = await rewrapDataKeys(db.dataSource, db.encryption, {
      batchSize: 25,
      entities: [Customer],
      onProgress: (p) => p.property === 'email' && progress.push(p.rowsDone),
    });
    expect(result.error).toBeUndefined();
    const email = result.properties.find((p) => p.property === 'email');
    expect(email).toMatchObject({ rowsTotal: 120, rowsRewrapped: 120, failures: [] });
    expect(progress.at(-1)).toBe(120);
    expect(progress.length).toBeGreaterThanOrEqual(5);

    const distinctAll = new Set(
      before.flatMap((r) => [
        r.email_wrapped_key,
        r.address_ciphertext ? r.address_iv && r.email_wrapped_key : null,
      ]),
    );
    expect(result.rewrapCalls).toBe(distinctV1);
    expect(distinctAll.size).toBeGreaterThan(0);

    const after = await snapshot();
    for (const [i, row] of before.entries()) {
      const now = after[i];
      expect(now?.email_ciphertext).toEqual(row.email_ciphertext);
      expect(now?.email_iv).toEqual(row.email_iv);
      expect(now?.address_ciphertext).toEqual(row.address_ciphertext);
      expect(now?.email_key_version).toBe(2);
      expect(now?.email_wrapped_key).not.toEqual(row.email_wrapped_key);
      expect(now?.address_key_version).toBe(row.address_ciphertext ? 2 : null);
    }
    db.encryption.purgeCache();
    const loaded = await customers().find({ where: { plan: 'r' }, order: { id: 'ASC' } });
    expect(loaded.map((c) => c.email)).toEqual([
      ...before.map((_, i) => `r${i}@example.com`),
      'new@example.com',
    ]);

    const again = await rewrapDataKeys(db.dataSource, db.encryption, { entities: [Customer] });
    expect(again.properties.every((p) => p.rowsTotal === 0)).toBe(true);
    expect(again.rewrapCalls).toBe(0);
  });
});

describe('rewrapDataKeys inside a TypeORM migration', () => {
  it('runs on the migration query runner, in its transaction, when the migration runs', async () => {
    const repo = db.dataSource.getRepository(Customer);
    await repo.save(repo.create({ email: 'migration@example.com', plan: 'mig', address: null }));
    db.encryption.keyring.activate(1);
    await repo.save(repo.create({ email: 'migration-v1@example.com', plan: 'mig', address: null }));
    const encryption = db.encryption;
    class RewrapToVersion2Migration1764400000000 implements MigrationInterface {
      name = 'RewrapToVersion2Migration1764400000000';
      async up(queryRunner: QueryRunner): Promise<void> {
        expect(queryRunner.isTransactionActive).toBe(true);
        const result = await rewrapDataKeys(queryRunner, encryption, { toVersion: 2 });
        if (result.error) throw result.error;
      }
      async down(): Promise<void> {}
    }
    const migrations = db.dataSource.migrations as MigrationInterface[];
    migrations.push(new RewrapToVersion2Migration1764400000000());
    const ran = await db.dataSource.runMigrations({ transaction: 'each' });
    expect(ran.map((m) => m.name)).toEqual(['RewrapToVersion2Migration1764400000000']);
    const rows = await rawQuery<{ v: number }>(
      db.schema.url,
      `SELECT DISTINCT email_key_version AS v FROM ${table()} WHERE plan = 'mig'`,
    );
    expect(rows).toEqual([{ v: 2 }]);
    db.encryption.keyring.activate(2);
  });
});
