import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encryptionStatus, rewrapDataKeys, verifyEncryptedColumns } from '../../../src';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';
import { JOB_MIGRATIONS, JobContact } from './job-entities';
import { keyRows, keyTable, onPglite, type StoredKeyRow, tableChecksum } from './job-support';

/**
 * Tenants' key rows: each re-wrapped only in its own tenant's scope, to that tenant's key; never
 * under another tenant's key or the application's, whatever the job is asked.
 */
const v2 = new CountingKeyProvider();
let db: EncryptedTestDatabase;
const contacts = () => db.dataSource.getRepository(JobContact);
const expected = new Map<number, string>();
const tenants = ['ws-a', 'ws-b', 'ws-app'];

beforeAll(async () => {
  if (onPglite) return;
  db = await encryptedDatabase([JobContact], {
    prefix: 'cj_tenants',
    migrations: JOB_MIGRATIONS,
    encryption: { cache: { dataKeyMaxUses: 4 } },
    extraKeys: [{ version: 2, provider: v2 }],
  });
  for (const workspaceId of tenants) {
    const saved = await contacts().save(
      Array.from({ length: 10 }, (_, i) =>
        contacts().create({
          workspaceId,
          email: `${workspaceId}-${i}@example.com`,
          profile: { phone: `${i}` },
        }),
      ),
    );
    for (const c of saved) expected.set(c.id, c.email);
  }
});
afterAll(() => db?.close());

const rowsOf = (rows: StoredKeyRow[], tenant: string) => rows.filter((r) => r.tenant_id === tenant);

async function expectEveryValueReadable(): Promise<void> {
  db.encryption.purgeCache();
  const all = await contacts().find({ order: { id: 'ASC' } });
  expect(new Map(all.map((c) => [c.id, c.email]))).toEqual(expected);
  const verified = await verifyEncryptedColumns(db.dataSource, db.encryption);
  expect(verified).toMatchObject({ failed: 0, keyTable: { failed: 0 } });
}

describe.skipIf(onPglite)("tenants' key rows", () => {
  let versionA = 0;
  let versionB = 0;

  it('each carry their tenant, and a tenant job moves only that tenant’s key rows, to its key', async () => {
    const start = await keyRows(db);
    for (const tenant of tenants) expect(rowsOf(start, tenant).length).toBeGreaterThanOrEqual(5);
    expect(start.every((r) => r.tenant_id !== null && r.key_version === 1)).toBe(true);
    const data = await tableChecksum(db, 'job_contacts');

    const a = await db.encryption.tenants.addKey('ws-a', {
      kind: 'customer-key',
      key: randomBytes(32).toString('base64'),
    });
    versionA = a.version;
    const job = await db.encryption.tenants.runJob('ws-a');
    expect(job).toMatchObject({ state: 'completed', error: null });

    const afterA = await keyRows(db);
    expect(rowsOf(afterA, 'ws-a').every((r) => r.key_version === versionA && r.rewrapped_at)).toBe(true);
    expect(rowsOf(afterA, 'ws-b')).toEqual(rowsOf(start, 'ws-b'));
    expect(rowsOf(afterA, 'ws-app')).toEqual(rowsOf(start, 'ws-app'));
    expect(await tableChecksum(db, 'job_contacts')).toEqual(data);
    const status = await encryptionStatus(db.dataSource, db.encryption, { tenant: 'ws-a' });
    expect(status.find((p) => p.property === 'email')?.rowsByVersion).toEqual({ [String(versionA)]: 10 });

    const b = await db.encryption.tenants.addKey('ws-b', {
      kind: 'customer-key',
      key: randomBytes(32).toString('base64'),
    });
    versionB = b.version;
    expect((await db.encryption.tenants.runJob('ws-b')).state).toBe('completed');
    const afterB = await keyRows(db);
    expect(rowsOf(afterB, 'ws-a')).toEqual(rowsOf(afterA, 'ws-a'));
    expect(rowsOf(afterB, 'ws-b').every((r) => r.key_version === versionB)).toBe(true);
    await expectEveryValueReadable();
  });

  it("refuses to re-wrap a tenant's key rows under another tenant's key, and writes nothing", async () => {
    const before = await keyRows(db);
    const result = await rewrapDataKeys(db.dataSource, db.encryption, {
      tenant: 'ws-a',
      toVersion: versionB,
    });
    expect(result.error).toBeDefined();
    expect(String(result.error)).toMatch(/tenant/);
    expect(await keyRows(db)).toEqual(before);
    const intoApp = await rewrapDataKeys(db.dataSource, db.encryption, { toVersion: versionA });
    expect(String(intoApp.error)).toMatch(/tenant option/);
    expect(await keyRows(db)).toEqual(before);
  });

  it("an application rotation re-wraps the application key's rows (tenants' among them, each in its scope) and never a tenant's own", async () => {
    const before = await keyRows(db);
    await db.encryption.activate(2);
    const result = await rewrapDataKeys(db.dataSource, db.encryption);
    expect(result.error).toBeUndefined();
    expect(result.keyTable).toMatchObject({
      keyRowsTotal: rowsOf(before, 'ws-app').length,
      keyRowsRewrapped: rowsOf(before, 'ws-app').length,
      failures: [],
    });
    const after = await keyRows(db);
    expect(rowsOf(after, 'ws-a')).toEqual(rowsOf(before, 'ws-a'));
    expect(rowsOf(after, 'ws-b')).toEqual(rowsOf(before, 'ws-b'));
    expect(rowsOf(after, 'ws-app').every((r) => r.key_version === 2)).toBe(true);
    await expectEveryValueReadable();
  });

  it("a tenant's wrapped key copied into another tenant's key row is refused there and named", async () => {
    const before = await keyRows(db);
    const [fromA] = rowsOf(before, 'ws-a');
    const [ofB] = rowsOf(before, 'ws-b');
    // An attacker with write access to the table points B's key row at A's wrap
    await rawQuery(
      db.schema.url,
      `UPDATE ${keyTable(db)} SET wrapped_key = $1, key_version = $2 WHERE id = $3`,
      [fromA?.wrapped_key, fromA?.key_version, ofB?.id],
    );
    const tampered = await keyRows(db);
    // B's rotation to its own key: the row claims A's version, which is not B's key
    const rotation = await rewrapDataKeys(db.dataSource, db.encryption, { tenant: 'ws-b' });
    expect(rotation.error).toBeUndefined();
    expect(rotation.keyTable?.failures).toEqual([
      expect.objectContaining({ dataKeyId: ofB?.id, tenant: 'ws-b', keyVersion: versionA }),
    ]);
    expect(await keyRows(db)).toEqual(tampered);
    const verified = await verifyEncryptedColumns(db.dataSource, db.encryption, { tenant: 'ws-b' });
    expect(verified.keyTable?.failures.map((f) => f.dataKeyId)).toEqual([ofB?.id]);
    expect(verified.failed).toBeGreaterThan(0);
    for (const f of verified.properties.flatMap((p) => p.failures)) expect(f.dataKeyId).toBe(ofB?.id);
    // Restore, and everything reads again
    await rawQuery(
      db.schema.url,
      `UPDATE ${keyTable(db)} SET wrapped_key = $1, key_version = $2 WHERE id = $3`,
      [ofB?.wrapped_key, ofB?.key_version, ofB?.id],
    );
    await expectEveryValueReadable();
  });
});
