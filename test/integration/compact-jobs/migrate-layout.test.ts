import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encryptionStatus, KeyRegistry, type KeyringEntry, verifyEncryptedColumns } from '../../../src';
import { migrateLayout } from '../../../src/rotation/migrate-layout';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';
import {
  JOB_MIGRATIONS,
  LayoutCompact,
  LayoutSidecars,
  LayoutToCompact,
  LayoutToSidecars,
} from './job-entities';
import { dataKeyIdOf, keyRows, onPglite, tableOf, writeWhileJobWaits } from './job-support';

const keys: KeyringEntry[] = [{ version: 1, provider: new CountingKeyProvider() }];
const open: EncryptedTestDatabase[] = [];
let first: EncryptedTestDatabase;
const expected = new Map<number, { email: string; note: string | null; workspaceId: string }>();

async function mapped(
  entity: typeof LayoutSidecars | typeof LayoutToCompact | typeof LayoutCompact | typeof LayoutToSidecars,
) {
  const db = await encryptedDatabase([entity], {
    schema: first.schema,
    migrations: JOB_MIGRATIONS,
    encryption: { keys, cache: { dataKeyMaxUses: 25 } },
  });
  open.push(db);
  return db;
}

beforeAll(async () => {
  if (onPglite) return;
  first = await encryptedDatabase([LayoutSidecars], {
    prefix: 'cj_layout',
    migrations: JOB_MIGRATIONS,
    encryption: { keys, cache: { dataKeyMaxUses: 25 } },
  });
  const repo = first.dataSource.getRepository(LayoutSidecars);
  const saved = await repo.save(
    Array.from({ length: 120 }, (_, i) =>
      repo.create({
        workspaceId: i % 2 ? 'ws-2' : 'ws-1',
        email: `e${i}@example.com`,
        note: i % 3 ? `note ${i}` : null,
      }),
    ),
  );
  for (const s of saved) expected.set(s.id, { email: s.email, note: s.note, workspaceId: s.workspaceId });
});
afterAll(async () => {
  for (const db of open.reverse()) await db.close();
  await first?.close();
});

type Stored = {
  id: number;
  workspaceId: string;
  email_ciphertext: Buffer;
  note_ciphertext: Buffer | null;
  email_iv?: Buffer | null;
  note_iv?: Buffer | null;
  email_wrapped_key?: Buffer | null;
  email_key_version?: number | null;
};
const stored = () =>
  rawQuery<Stored>(first.schema.url, `SELECT * FROM ${tableOf(first, 'job_layout')} ORDER BY id`);

async function expectReads(db: EncryptedTestDatabase, entity: typeof LayoutToCompact): Promise<void> {
  db.encryption.purgeCache();
  const rows = await db.dataSource.getRepository(entity).find({ order: { id: 'ASC' } });
  expect(
    new Map(rows.map((r) => [r.id, { email: r.email, note: r.note, workspaceId: r.workspaceId }])),
  ).toEqual(expected);
}

describe.skipIf(onPglite)('migrateLayout from sidecars to compact', () => {
  it('converts every row, tenant by tenant, leaving what the application writes meanwhile', async () => {
    const db = await mapped(LayoutToCompact);
    const [email, note] = await encryptionStatus(db.dataSource, db.encryption);
    expect(email).toMatchObject({
      layout: 'compact',
      migrateFrom: 'sidecars',
      rowsByVersion: { '1': 120 },
      valuesByLayout: { sidecars: 120, compact: 0 },
    });
    expect(note).toMatchObject({ valuesByLayout: { sidecars: 80, compact: 0 }, nullRows: 40 });

    const before = await stored();
    const dry = await migrateLayout(db.dataSource, db.encryption, { dryRun: true });
    expect(dry.properties.map((p) => [p.property, p.from, p.to, p.rowsTotal, p.rowsMigrated])).toEqual([
      ['email', 'sidecars', 'compact', 120, 0],
      ['note', 'sidecars', 'compact', 80, 0],
    ]);
    expect(await stored()).toEqual(before);

    // One tenant first: the other tenant's rows are left byte for byte
    const one = await migrateLayout(db.dataSource, db.encryption, { tenant: 'ws-1', batchSize: 7 });
    expect(one.error).toBeUndefined();
    expect(one.properties.map((p) => [p.property, p.rowsMigrated])).toEqual([
      ['email', 60],
      ['note', 40],
    ]);
    const half = await stored();
    for (const [i, row] of half.entries()) {
      if (row.workspaceId === 'ws-2') expect(row).toEqual(before[i]);
      else expect(row.email_ciphertext[0]).toBe(0x02);
    }
    await expectReads(db, LayoutToCompact);

    // The application changes a ws-2 row after the job read it: its write wins, the job skips it
    const raced = half.find((r) => r.workspaceId === 'ws-2')?.id as number;
    const rest = await writeWhileJobWaits(
      db,
      LayoutToCompact,
      'job_layout',
      raced,
      (row) => {
        row.email = 'changed@example.com';
      },
      () => migrateLayout(db.dataSource, db.encryption, { batchSize: 1_000 }),
    );
    (expected.get(raced) as { email: string }).email = 'changed@example.com';
    expect(rest.error).toBeUndefined();
    expect(
      rest.properties.map((p) => [p.property, p.rowsTotal, p.rowsMigrated, p.rowsSkipped, p.failures]),
    ).toEqual([
      ['email', 60, 59, 1, []],
      ['note', 40, 40, 0, []], // the application changed only the email
    ]);

    // Bytes: one compact value per property, sidecars NULL, every key row there and of the row's tenant
    const after = await stored();
    const rows = await keyRows(first);
    for (const row of after) {
      expect(row.email_ciphertext[0]).toBe(0x02);
      expect([row.email_iv, row.email_wrapped_key, row.email_key_version, row.note_iv]).toEqual([
        null,
        null,
        null,
        null,
      ]);
      for (const value of [row.email_ciphertext, row.note_ciphertext]) {
        if (value === null) continue;
        expect(rows.find((k) => k.id === dataKeyIdOf(value))?.tenant_id).toBe(row.workspaceId);
      }
    }
    await expectReads(db, LayoutToCompact);
    const verified = await verifyEncryptedColumns(db.dataSource, db.encryption);
    expect(verified).toMatchObject({ rowsChecked: 200, failed: 0, keyTable: { failed: 0 } });
    const [status] = await encryptionStatus(db.dataSource, db.encryption);
    expect(status?.valuesByLayout).toEqual({ sidecars: 0, compact: 120 });

    const again = await migrateLayout(db.dataSource, db.encryption);
    expect(again.properties.map((p) => p.rowsTotal)).toEqual([0, 0]);
    const log = await new KeyRegistry(db.dataSource, db.encryption).auditLog({
      event: ['layout-migration-started', 'layout-migration-finished', 'layout-migration-failed'],
    });
    expect(log.map((e) => e.event)).toEqual([
      'layout-migration-started',
      'layout-migration-finished',
      'layout-migration-started',
      'layout-migration-finished',
      'layout-migration-started',
      'layout-migration-finished',
    ]);
    expect(log[0]?.tenant).toBe('ws-1');
    expect(log[3]?.details).toMatchObject({ rowsMigrated: 99, failures: 0 });

    // Then migrateFrom is dropped and the sidecar columns with it: everything still reads
    const done = await mapped(LayoutCompact);
    const [columns] = await rawQuery<{ n: number }>(
      first.schema.url,
      `SELECT count(*)::int AS n FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'job_layout' AND column_name LIKE '%\\_iv'`,
      [first.schema.schema],
    );
    expect(columns?.n).toBe(0);
    await expectReads(done, LayoutCompact);
  });
});

describe.skipIf(onPglite)('migrateLayout from compact back to sidecars', () => {
  it('converts every compact value into four columns', async () => {
    const db = await mapped(LayoutToSidecars);
    const result = await migrateLayout(db.dataSource, db.encryption, { batchSize: 11 });
    expect(result.error).toBeUndefined();
    expect(result.properties.map((p) => [p.property, p.from, p.to, p.rowsTotal, p.rowsMigrated])).toEqual([
      ['email', 'compact', 'sidecars', 120, 120],
      ['note', 'compact', 'sidecars', 80, 80],
    ]);
    for (const row of await stored()) {
      expect(row.email_ciphertext[0]).toBe(0x01);
      expect(row.email_iv).toBeInstanceOf(Buffer);
      expect(row.email_key_version).toBe(1);
    }
    await expectReads(db, LayoutToSidecars);
    const back = await mapped(LayoutSidecars);
    await expectReads(back, LayoutSidecars);
    expect(await verifyEncryptedColumns(back.dataSource, back.encryption)).toMatchObject({
      rowsChecked: 200,
      failed: 0,
    });
  });
});
