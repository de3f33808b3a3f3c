import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../../support/cli';
import { createCliProject } from '../../support/cli-project';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';

const root = resolve(__dirname, '../../..');

/** Runs the CLI from source with another data source file, optionally in another directory. */
function runCliWith(dataSourceFile: string, args: string[], env: Record<string, string>, cwd = root) {
  const result = spawnSync(
    process.execPath,
    [
      '-r',
      resolve(root, 'test/support/register-ts.cjs'),
      resolve(root, 'src/cli/main.ts'),
      '-d',
      dataSourceFile,
      ...args,
    ],
    { cwd, env: { ...process.env, ...env }, encoding: 'utf8', timeout: 120_000 },
  );
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

const esmDataSource = resolve(root, 'test/fixtures/esm-data-source.mjs');

let schema: TestSchema;
let env: Record<string, string>;

beforeAll(async () => {
  const project = await createCliProject({
    prefix: 'cli',
    rows: 60,
    maxUses: 25,
    registry: true,
    customer: (i) => ({ email: `cli${i}@example.com`, plan: 'cli', address: null }),
  });
  schema = project.schema;
  env = { ...project.env, TEST_ACTIVE_VERSION: '1', TYPEORM_ENVELOPE_ACTOR: 'cli-test' };
});
afterAll(() => schema?.drop());

const versions = async () =>
  rawQuery<{ v: number; n: number }>(
    schema.url,
    `SELECT email_key_version AS v, count(*)::int AS n FROM "${schema.schema}".customer GROUP BY 1 ORDER BY 1`,
  );

describe('typeorm-envelope CLI', () => {
  it('status --json reports rows per key version', () => {
    const { status, stdout } = runCli(['--json', 'status'], env);
    expect(status).toBe(0);
    const report = JSON.parse(stdout);
    expect(report.activeVersion).toBe(1);
    expect(report.properties).toContainEqual(
      expect.objectContaining({ entity: 'Customer', property: 'email', rowsByVersion: { '1': 60 } }),
    );
  });

  it('status tells registry tables without a recorded version from missing tables', () => {
    const { status, stdout } = runCli(['status'], env);
    expect(status).toBe(0);
    expect(stdout).toContain('no key version recorded yet');
    expect(stdout).not.toContain('run the TypeormEnvelopeKeyRegistry migration');
    const report = JSON.parse(runCli(['--json', 'status'], env).stdout);
    expect(report.registry).toBe('empty');
  });

  it('rotate --to a version that is not active is refused until it is activated', async () => {
    const refused = runCli(['rotate', '--to', '2'], env);
    expect(refused.status).toBe(1);
    expect(refused.stderr).toContain('key version 2 is not the active version (1)');
    expect(refused.stderr).toContain('typeorm-envelope activate 2');
    expect(refused.stdout).not.toContain('re-wrapped');
    expect(await versions()).toEqual([{ v: 1, n: 60 }]);
  });

  it('validate prints a table, and JSON only with --json', () => {
    const text = runCli(['validate'], env);
    expect(text.status).toBe(0);
    expect(text.stdout).toMatch(/^version\s+kind\s+key\s+check\s+registry\s+result$/m);
    expect(text.stdout).toMatch(/^1\s+local\s+sha256:[0-9a-f]+\s+round trip\s+matches\s+ok$/m);
    expect(() => JSON.parse(text.stdout)).toThrow();
    const json = JSON.parse(runCli(['--json', 'validate'], env).stdout);
    expect(json).toContainEqual(expect.objectContaining({ version: 1, check: 'round trip', result: 'ok' }));
  });

  it('validate, activate, rotate with a dry run first, then retire the old version', async () => {
    expect(runCli(['validate'], env)).toMatchObject({ status: 0 });
    const activated = runCli(['activate', '2'], env);
    expect(activated.status).toBe(0);
    expect(activated.stdout).toContain('key version 2 is active');

    const dry = runCli(['--json', 'rotate', '--to', '2', '--dry-run'], env);
    expect(dry.status).toBe(0);
    expect(JSON.parse(dry.stdout).properties[0]).toMatchObject({ rowsTotal: 60, rowsRewrapped: 0 });
    expect(await versions()).toEqual([{ v: 1, n: 60 }]);

    const refused = runCli(['retire', '1'], env);
    expect(refused.status).toBe(1);
    expect(refused.stderr).toContain('still use this key version');

    const rotated = runCli(['--json', 'rotate', '--to', '2', '--batch-size', '7'], env);
    expect(rotated.status).toBe(0);
    const result = JSON.parse(rotated.stdout);
    expect(result.properties.find((p: { property: string }) => p.property === 'email')).toMatchObject({
      rowsTotal: 60,
      rowsRewrapped: 60,
      distinctDataKeys: 3,
    });
    expect(await versions()).toEqual([{ v: 2, n: 60 }]);

    expect(runCli(['retire', '1'], env)).toMatchObject({ status: 0 });
    const status = JSON.parse(runCli(['--json', 'status'], { ...env, TEST_ACTIVE_VERSION: '2' }).stdout);
    expect(status.keys.map((k: { version: number; state: string }) => [k.version, k.state])).toEqual([
      [1, 'retired'],
      [2, 'active'],
    ]);
  }, 240_000);

  it('verify decrypts everything, and names the rows that fail without printing plaintext', async () => {
    const clean = runCli(['verify'], env);
    expect(clean.status).toBe(0);
    expect(clean.stdout).toContain('60 values checked, 0 failed');
    const [victim] = await rawQuery<{ id: number }>(
      schema.url,
      `SELECT id FROM "${schema.schema}".customer ORDER BY id LIMIT 1`,
    );
    await rawQuery(
      schema.url,
      `UPDATE "${schema.schema}".customer SET email_iv = set_byte(email_iv, 0, get_byte(email_iv, 0) # 1) WHERE id = $1`,
      [victim?.id],
    );
    const dirty = runCli(['--json', 'verify'], env);
    expect(dirty.status).toBe(1);
    const report = JSON.parse(dirty.stdout);
    expect(report.failed).toBe(1);
    expect(report.properties[0].failures).toEqual([
      expect.objectContaining({ primaryKey: String(victim?.id), keyVersion: 2 }),
    ]);
    expect(dirty.stdout + dirty.stderr).not.toMatch(/cli\d+@example\.com/);
    await rawQuery(
      schema.url,
      `UPDATE "${schema.schema}".customer SET email_iv = set_byte(email_iv, 0, get_byte(email_iv, 0) # 1) WHERE id = $1`,
      [victim?.id],
    );
  });

  it('reencrypt seals every value again under fresh data keys', async () => {
    const before = await rawQuery<{ ct: Buffer; wk: Buffer }>(
      schema.url,
      `SELECT email_ciphertext AS ct, email_wrapped_key AS wk FROM "${schema.schema}".customer ORDER BY id`,
    );
    const run = runCli(['--json', 'reencrypt'], { ...env, TEST_ACTIVE_VERSION: '2' });
    expect(run.status).toBe(0);
    const after = await rawQuery<{ ct: Buffer; wk: Buffer }>(
      schema.url,
      `SELECT email_ciphertext AS ct, email_wrapped_key AS wk FROM "${schema.schema}".customer ORDER BY id`,
    );
    expect(after.every((row, i) => !row.ct.equals(before[i]?.ct as Buffer))).toBe(true);
    const oldKeys = new Set(before.map((r) => r.wk.toString('hex')));
    expect(after.some((r) => oldKeys.has(r.wk.toString('hex')))).toBe(false);
    expect(runCli(['verify'], env).stdout).toContain('60 values checked, 0 failed');
  });

  it('audit refuses an event name it does not know, instead of printing nothing', () => {
    const { status, stderr } = runCli(['audit', '--event', 'key-activatd'], env);
    expect(status).not.toBe(0);
    expect(stderr).toContain('key-activated');
  });

  it('audit prints the log as CSV with who ran what', () => {
    const { status, stdout } = runCli(['audit', '--format', 'csv'], env);
    expect(status).toBe(0);
    const lines = stdout.trim().split('\r\n');
    expect(lines[0]).toBe('id,at,event,tenant,keyVersion,actor,details');
    for (const event of [
      'key-created',
      'key-activated',
      'rotation-started',
      'rotation-finished',
      'key-retired',
      'reencryption-finished',
    ]) {
      expect(stdout).toContain(event);
    }
    expect(lines.slice(1).every((l) => l.includes(',cli-test,'))).toBe(true);
  });

  it('migration:generate-rotation writes a migration that calls rewrapDataKeys', () => {
    const dir = mkdtempSync(join(tmpdir(), 'rotation-migration-'));
    const { status } = runCli(['migration:generate-rotation', '--to', '3', '--dir', dir], env);
    expect(status).toBe(0);
    const [file] = readdirSync(dir);
    const source = readFileSync(join(dir, file as string), 'utf8');
    expect(source).toContain('rewrapDataKeys(queryRunner, encryption, { toVersion: 3 })');
    expect(file).toMatch(/^\d{13}-RewrapDataKeysToV3\.ts$/);
    const timestamp = (file as string).slice(0, 13);
    expect(source).toContain(`export class RewrapDataKeysToV3At${timestamp} implements MigrationInterface`);
  });

  it('migration:generate-rotation writes into the directory named by the DataSource migrations option', () => {
    const cwd = mkdtempSync(join(tmpdir(), 'rotation-migration-cwd-'));
    const dir = join(cwd, 'db', 'migrations');
    mkdirSync(dir, { recursive: true });
    const run = runCliWith(
      esmDataSource,
      ['migration:generate-rotation', '--to', '2'],
      { ...env, TEST_MIGRATIONS: join(dir, '*.{ts,js}') },
      cwd,
    );
    expect(run.status, run.stderr).toBe(0);
    const [file] = readdirSync(dir);
    expect(file).toMatch(/^\d{13}-RewrapDataKeysToV2\.ts$/);
    expect(run.stdout).toContain(join(dir, file as string));
    // The import names the data source file, relative to the migration.
    const source = readFileSync(join(dir, file as string), 'utf8');
    expect(source).toContain(`from '${join('..', '..', '..')}`);
  });

  it('migration:generate-rotation defaults to src/migrations when it exists, else migrations', () => {
    const cwd = mkdtempSync(join(tmpdir(), 'rotation-migration-cwd-'));
    const plain = runCliWith(esmDataSource, ['migration:generate-rotation', '--to', '2'], env, cwd);
    expect(plain.status, plain.stderr).toBe(0);
    expect(readdirSync(join(cwd, 'migrations'))).toEqual([expect.stringMatching(/RewrapDataKeysToV2\.ts$/)]);

    mkdirSync(join(cwd, 'src', 'migrations'), { recursive: true });
    const src = runCliWith(esmDataSource, ['migration:generate-rotation', '--to', '2'], env, cwd);
    expect(src.status, src.stderr).toBe(0);
    expect(readdirSync(join(cwd, 'src', 'migrations'))).toEqual([
      expect.stringMatching(/RewrapDataKeysToV2\.ts$/),
    ]);
  });
});

describe('typeorm-envelope CLI without the key registry', () => {
  let plain: TestSchema;
  let plainEnv: Record<string, string>;
  beforeAll(async () => {
    const project = await createCliProject({
      prefix: 'cli_plain',
      rows: 12,
      maxUses: 5,
      customer: (i) => ({ email: `plain${i}@example.com`, plan: 'plain', address: null }),
    });
    plain = project.schema;
    plainEnv = { ...project.env, TEST_ACTIVE_VERSION: '1' };
  });
  afterAll(() => plain?.drop());

  const storedVersions = async () =>
    rawQuery<{ v: number; n: number }>(
      plain.url,
      `SELECT email_key_version AS v, count(*)::int AS n FROM "${plain.schema}".customer GROUP BY 1 ORDER BY 1`,
    );

  it('status says the registry tables are missing', () => {
    const { status, stdout } = runCli(['status'], plainEnv);
    expect(status).toBe(0);
    expect(stdout).toContain('no key registry tables');
    expect(stdout).toContain('TypeormEnvelopeKeyRegistry');
    expect(JSON.parse(runCli(['--json', 'status'], plainEnv).stdout).registry).toBe('missing');

    const validate = runCli(['validate'], plainEnv);
    expect(validate.status).toBe(0);
    expect(validate.stdout).toMatch(/^1\s+local\s+sha256:[0-9a-f]+\s+round trip\s+absent\s+ok$/m);
    expect(validate.stdout).toContain('no recorded key reference to compare it with');
  });

  it('rotate --to a configured but inactive version is refused, and re-wraps with --force', async () => {
    const refused = runCli(['rotate', '--to', '2'], plainEnv);
    expect(refused.status).toBe(1);
    expect(refused.stderr).toContain('key version 2 is not the active version (1)');
    expect(refused.stderr).toContain('--force');
    expect(await storedVersions()).toEqual([{ v: 1, n: 12 }]);

    // A dry run only warns.
    const dry = runCli(['rotate', '--to', '2', '--dry-run'], plainEnv);
    expect(dry.status, dry.stderr).toBe(0);
    expect(dry.stderr).toContain('warning: key version 2 is not the active version (1)');
    expect(dry.stdout).toContain('would re-wrap to key version 2');
    expect(await storedVersions()).toEqual([{ v: 1, n: 12 }]);

    const forced = runCli(['rotate', '--to', '2', '--force'], plainEnv);
    expect(forced.status, forced.stderr).toBe(0);
    expect(forced.stderr).toContain('warning: key version 2 is not the active version (1)');
    expect(forced.stdout).toContain('re-wrapped to key version 2');
    expect(await storedVersions()).toEqual([{ v: 2, n: 12 }]);
    // Re-wrapping leaves every value readable.
    expect(runCli(['verify'], plainEnv).stdout).toContain('12 values checked, 0 failed');
  }, 240_000);

  it('-d loads an ES module data source with top-level await', () => {
    const run = runCliWith(esmDataSource, ['--json', 'status'], plainEnv);
    expect(run.stderr).not.toContain('ERR_REQUIRE_ASYNC_MODULE');
    expect(run.status, run.stderr).toBe(0);
    const report = JSON.parse(run.stdout);
    expect(report.properties).toContainEqual(
      expect.objectContaining({ entity: 'Customer', property: 'email', rowsByVersion: { '2': 12 } }),
    );
  });

  it('-d explains top-level await in a TypeScript data source compiled to CommonJS', () => {
    const dir = mkdtempSync(join(tmpdir(), 'tla-data-source-'));
    const file = join(dir, 'data-source.ts');
    writeFileSync(file, 'const ready = await Promise.resolve(1);\nexport const value = ready;\n');
    const run = runCliWith(file, ['status'], plainEnv);
    expect(run.status).toBe(1);
    expect(run.stderr).toContain('top-level await');
  });
});

describe('typeorm-envelope CLI while a plaintext column waits for its backfill', () => {
  const fixture = resolve(root, 'test/fixtures/backfill-project.ts');
  let backfillSchema: TestSchema;
  let backfillEnv: Record<string, string>;

  beforeAll(async () => {
    backfillSchema = await createTestSchema('cli_backfill');
    backfillEnv = { ...env, TEST_SCHEMA: backfillSchema.schema };
    await rawQuery(
      backfillSchema.url,
      `CREATE TABLE "${backfillSchema.schema}".member (id serial PRIMARY KEY, email varchar, plan varchar NOT NULL);
       INSERT INTO "${backfillSchema.schema}".member (email, plan)
         SELECT 'm' || i || '@example.com', 'p' FROM generate_series(1, 12) AS i`,
    );
  });
  afterAll(() => backfillSchema?.drop());

  it('status and verify report the rows pending backfill until backfill has run', async () => {
    const status = runCliWith(fixture, ['status'], backfillEnv);
    expect(status.status).toBe(0);
    expect(status.stdout).toMatch(/pending backfill/);
    expect(status.stdout).toMatch(/\b12\b/);
    const before = runCliWith(fixture, ['verify'], backfillEnv);
    expect(before.status).not.toBe(0);
    expect(before.stdout).toMatch(/12 pending backfill/);
    expect(`${before.stdout}${before.stderr}`).not.toMatch(/m\d+@example\.com/);

    expect(runCliWith(fixture, ['backfill'], backfillEnv).status).toBe(0);
    const after = runCliWith(fixture, ['verify'], backfillEnv);
    expect(after.status).toBe(0);
    expect(after.stdout).toMatch(/12 values checked, 0 failed/);
    const rows = await rawQuery<{ email_ciphertext: Buffer | null }>(
      backfillSchema.url,
      `SELECT email_ciphertext FROM "${backfillSchema.schema}".member`,
    );
    expect(rows.every((r) => Buffer.isBuffer(r.email_ciphertext))).toBe(true);
  }, 120_000);
});

describe('typeorm-envelope -d with unusual data source files', () => {
  let loadSchema: TestSchema;
  let loadEnv: Record<string, string>;
  beforeAll(async () => {
    const project = await createCliProject({
      prefix: 'cli_load',
      rows: 3,
      maxUses: 2,
      customer: (i) => ({ email: `load${i}@example.com`, plan: 'load', address: null }),
    });
    loadSchema = project.schema;
    loadEnv = { ...project.env, TEST_ACTIVE_VERSION: '1' };
  });
  afterAll(() => loadSchema?.drop());

  it('a file whose top-level await never settles exits non-zero and says so', () => {
    const run = runCliWith(resolve(root, 'test/fixtures/unsettled-data-source.mjs'), ['status'], loadEnv);
    expect(run.status).toBe(1);
    expect(run.stdout).toBe('');
    expect(run.stderr).toContain('never finished loading');
    expect(run.stderr).toContain('top-level await');
  });

  it('uses the DataSource the EnvelopeEncryption is attached to, even when another is exported first', async () => {
    const run = runCliWith(
      resolve(root, 'test/fixtures/replica-data-source.ts'),
      ['--json', 'status'],
      loadEnv,
    );
    expect(run.status, run.stderr).toBe(0);
    expect(JSON.parse(run.stdout).properties).toContainEqual(
      expect.objectContaining({ entity: 'Customer', property: 'email', rowsByVersion: { '1': 3 } }),
    );
    const [row] = await rawQuery<{ n: number }>(
      loadSchema.url,
      `SELECT count(*)::int AS n FROM "${loadSchema.schema}".customer WHERE email_key_version = 1`,
    );
    expect(row?.n).toBe(3);
  });

  it('a file whose EnvelopeEncryption is attached to none of its DataSources is refused', () => {
    const run = runCliWith(resolve(root, 'test/fixtures/unattached-data-source.ts'), ['status'], loadEnv);
    expect(run.status).toBe(1);
    expect(run.stdout).toBe('');
    expect(run.stderr).toContain('ConfigError');
    expect(run.stderr).toContain('not attached to any DataSource it exports');
  });
});
