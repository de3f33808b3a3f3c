import { mkdtempSync, readdirSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '../../support/cli';
import { createCliProject } from '../../support/cli-project';
import { rawQuery, type TestSchema } from '../../support/database';

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
  });

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

  it('audit prints the log as CSV with who ran what', () => {
    const { status, stdout } = runCli(['audit', '--format', 'csv'], env);
    expect(status).toBe(0);
    const lines = stdout.trim().split('\n');
    expect(lines[0]).toBe('at,event,version,actor,details');
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
    expect(source).toMatch(/export class RewrapDataKeysToVersion3\d+ implements MigrationInterface/);
  });
});
