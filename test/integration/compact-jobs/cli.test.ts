import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LocalKeyProvider } from '../../../src';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';
import { JOB_MIGRATIONS, JobCard, LayoutSidecars, LayoutToCompact } from './job-entities';
import { corruptKeyRow, keyRows, onPglite, tableChecksum, tableOf } from './job-support';

const root = resolve(__dirname, '../../..');
const masterKeys = { 1: randomBytes(32).toString('base64'), 2: randomBytes(32).toString('base64') };
let db: EncryptedTestDatabase;
let env: Record<string, string>;

/** Runs the CLI from source against test/integration/compact-jobs/compact-project.ts. */
function cli(args: string[]) {
  const result = spawnSync(
    process.execPath,
    [
      '-r',
      resolve(root, 'test/support/register-ts.cjs'),
      resolve(root, 'src/cli/main.ts'),
      '-d',
      resolve(root, 'test/integration/compact-jobs/compact-project.ts'),
      ...args,
    ],
    { cwd: root, env: { ...process.env, ...env }, encoding: 'utf8', timeout: 120_000 },
  );
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

beforeAll(async () => {
  if (onPglite) return;
  const keys = [
    { version: 1, provider: new LocalKeyProvider({ key: masterKeys[1] }) },
    { version: 2, provider: new LocalKeyProvider({ key: masterKeys[2] }) },
  ];
  db = await encryptedDatabase([JobCard, LayoutSidecars], {
    prefix: 'cj_cli',
    migrations: JOB_MIGRATIONS,
    encryption: { keys, cache: { dataKeyMaxUses: 10 } },
  });
  const cards = db.dataSource.getRepository(JobCard);
  await cards.save(Array.from({ length: 30 }, (_, i) => cards.create({ owner: 'cli', number: `cli-${i}` })));
  const layout = db.dataSource.getRepository(LayoutSidecars);
  await layout.save(
    Array.from({ length: 40 }, (_, i) =>
      layout.create({ workspaceId: 'ws-cli', email: `cli${i}@example.com`, note: null }),
    ),
  );
  // The application's next release maps the table as migrating (its sidecar columns become nullable)
  const next = await encryptedDatabase([LayoutToCompact], {
    schema: db.schema,
    migrations: JOB_MIGRATIONS,
    encryption: { keys },
  });
  await next.close();
  env = {
    TEST_DATABASE_URL: db.schema.url,
    TEST_SCHEMA: db.schema.schema,
    TEST_MASTER_KEY_1: masterKeys[1],
    TEST_MASTER_KEY_2: masterKeys[2],
    TEST_ACTIVE_VERSION: '1',
    TYPEORM_ENVELOPE_ACTOR: 'cli-compact-test',
  };
}, 120_000);
afterAll(() => db?.close());

describe.skipIf(onPglite)('typeorm-envelope CLI on compact properties', () => {
  it('status shows the layouts, and migrate-layout converts the rows (dry run first)', () => {
    const status = cli(['--json', 'status']);
    expect(status.status, status.stderr).toBe(0);
    const report = JSON.parse(status.stdout);
    expect(report.properties).toContainEqual(
      expect.objectContaining({
        entity: 'JobCard',
        property: 'number',
        layout: 'compact',
        rowsByVersion: { '1': 30 },
      }),
    );
    expect(report.properties).toContainEqual(
      expect.objectContaining({
        entity: 'LayoutToCompact',
        property: 'email',
        layout: 'compact',
        migrateFrom: 'sidecars',
        valuesByLayout: { sidecars: 40, compact: 0 },
      }),
    );
    const text = cli(['status']);
    expect(text.stdout).toMatch(/sidecars → compact/);

    const dry = cli(['migrate-layout', '--dry-run']);
    expect(dry.status, dry.stderr).toBe(0);
    expect(dry.stdout).toMatch(/nothing changed/);
    expect(dry.stdout).toMatch(/LayoutToCompact\s+email\s+sidecars\s+compact\s+40/);

    const run = cli(['--json', 'migrate-layout', '--batch-size', '7']);
    expect(run.status, run.stderr).toBe(0);
    const result = JSON.parse(run.stdout);
    expect(result.properties).toEqual([
      expect.objectContaining({ property: 'email', rowsTotal: 40, rowsMigrated: 40, failures: [] }),
      expect.objectContaining({ property: 'note', rowsTotal: 0, rowsMigrated: 0 }),
    ]);
    expect(run.stdout).not.toMatch(/cli\d+@example\.com/);
  });

  it('rotate re-wraps the key rows and writes no data row; the text says so', async () => {
    const migrated = await rawQuery<{ n: number }>(
      db.schema.url,
      `SELECT count(*)::int AS n FROM ${tableOf(db, 'job_layout')} WHERE get_byte(email_ciphertext, 0) = 2 AND email_iv IS NULL`,
    );
    expect(migrated[0]?.n).toBe(40);
    const cards = await tableChecksum(db, 'job_cards');
    const layout = await tableChecksum(db, 'job_layout');
    const due = (await keyRows(db)).length;
    expect(cli(['activate', '2']).status).toBe(0);
    const rotated = cli(['rotate']);
    expect(rotated.status, rotated.stderr).toBe(0);
    expect(rotated.stdout).toContain(
      `data-key table (compact properties): re-wrapped ${due} of ${due} key rows, 0 data rows written`,
    );
    expect(await tableChecksum(db, 'job_cards')).toEqual(cards);
    expect(await tableChecksum(db, 'job_layout')).toEqual(layout);
    expect((await keyRows(db)).every((r) => r.key_version === 2)).toBe(true);
    const verified = cli(['verify']);
    expect(verified.status, verified.stdout).toBe(0);
    expect(verified.stdout).toMatch(new RegExp(`data-key table: ${due} key rows checked, 0 failed`));
  });

  it('verify and rotate name a corrupted key row by its data-key id and exit non-zero; retire is refused', async () => {
    const [victim] = await keyRows(db);
    await corruptKeyRow(db, victim?.id as string);
    const verified = cli(['verify']);
    expect(verified.status).toBe(1);
    expect(verified.stdout).toMatch(/data-key table: \d+ key rows checked, 1 failed/);
    expect(verified.stdout).toMatch(new RegExp(`^${victim?.id}\\s+2\\s+IntegrityError`, 'm'));
    expect(verified.stdout).toMatch(/restore the failed key rows from the backup/);
    expect(verified.stdout).not.toMatch(/cli-\d+|cli\d+@example/);
    const json = JSON.parse(cli(['--json', 'verify']).stdout);
    expect(json.keyTable.failures).toEqual([
      expect.objectContaining({ dataKeyId: victim?.id, keyVersion: 2 }),
    ]);

    // The corrupt row is under version 1 as far as the table says: rotation to 2 fails on it, and 1 cannot be retired
    await rawQuery(
      db.schema.url,
      `UPDATE "${db.schema.schema}".typeorm_envelope_data_keys SET key_version = 1 WHERE id = $1`,
      [victim?.id],
    );
    const rotated = cli(['rotate']);
    expect(rotated.status).toBe(1);
    expect(rotated.stdout).toMatch(new RegExp(`^${victim?.id}\\s+1\\s+IntegrityError`, 'm'));
    const retired = cli(['retire', '1']);
    expect(retired.status).toBe(1);
    expect(retired.stderr).toMatch(
      /still use this key version|data-key table are still wrapped by this key version/,
    );
  });
});
