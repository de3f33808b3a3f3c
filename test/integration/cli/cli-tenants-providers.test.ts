import 'reflect-metadata';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { EnvelopeEncryption, LocalKeyProvider } from '../../../src';
import {
  type AzureKeyVaultEmulator,
  startAzureKeyVaultEmulator,
  testCredential,
} from '../../support/azure-key-vault-emulator';
import { createTenantCliProject, runTenantCli, withJson } from '../../support/cli-project';
import { rawQuery, type TestSchema } from '../../support/database';
import { APP_MEMBER, type GcpKmsEmulator, startGcpKmsEmulator } from '../../support/gcp-kms-emulator';
import { TenantContact, tenantContactsDataSource } from '../../support/tenant-entities';
import {
  type AppRoleCredentials,
  startVaultEmulator,
  transitPolicy,
  type VaultEmulator,
} from '../../support/vault-emulator';

/**
 * `tenants add` with a key in the customer's Azure Key Vault, Google Cloud KMS or Vault Transit:
 * the CLI, in a child process, reaches the emulators this process runs with the credentials the
 * application's configuration (the fixture) gives; the command line names only the key.
 */
const FIXTURE = `${__dirname}/../../fixtures/tenant-providers-project.ts`;
const WORKSPACES = ['ws-azure', 'ws-gcp', 'ws-vault', 'ws-refused'];
const ROWS = 2;
const APP = 'saas-app';
const ENCRYPTION_USER = 'Key Vault Crypto Service Encryption User';
/** The customer's Transit key lives on a mount of its own, so `--vault-mount` is exercised. */
const VAULT_MOUNT = 'customer-transit';
const VAULT_KEY = 'workspace-data';

let schema: TestSchema;
let env: Record<string, string>;
let azure: AzureKeyVaultEmulator;
let gcp: GcpKmsEmulator;
let vault: VaultEmulator;
let appRole: AppRoleCredentials;
let gcpKeyName: string;
/** The customer's next Cloud KMS key, added without activating it. */
let nextGcpKeyName: string;
/** Every stdout and stderr the CLI printed. */
const outputs: string[] = [];

const cli = async (args: string[]) => {
  const run = await runTenantCli(args, env, { dataSourceFile: FIXTURE });
  outputs.push(run.stdout, run.stderr);
  return run;
};

/** Runs the CLI with --json; its stdout must be exactly one JSON document. */
const cliJson = async (args: string[]) => {
  return withJson(await cli(['--json', ...args]), args);
};

const sql = <T = Record<string, unknown>>(text: string, params?: unknown[]) =>
  rawQuery<T>(schema.url, text.replaceAll('$schema', `"${schema.schema}"`), params);

const tenantKeys = (workspace: string) =>
  sql<{
    version: number;
    provider_kind: string;
    key_reference: string;
    state: string;
    descriptor: Record<string, unknown>;
  }>(
    'SELECT version, provider_kind, key_reference, state, descriptor FROM $schema.typeorm_envelope_tenant_keys WHERE tenant_id = $1 ORDER BY version',
    [workspace],
  );

const tenantRow = async (workspace: string) =>
  (
    await sql<{ state: string; active_version: number | null }>(
      'SELECT state, active_version FROM $schema.typeorm_envelope_tenants WHERE tenant_id = $1',
      [workspace],
    )
  )[0];

/** The secrets of the application's credentials, none of which may be stored or printed. */
const secrets = () => [
  appRole.roleId,
  appRole.secretId,
  vault.rootToken,
  ...gcp.issuedTokens(),
  env.TEST_MASTER_KEY_1 as string,
];

/** Saves a contact for `workspace` in this process (the application, configured like the fixture), reads it back. */
async function saveAndRead(workspace: string) {
  const encryption = new EnvelopeEncryption({
    keys: [{ version: 1, provider: new LocalKeyProvider({ key: env.TEST_MASTER_KEY_1 as string }) }],
    activeVersion: 1,
    tenantKeys: {
      azureKeyVault: {
        credential: testCredential(APP),
        clientOptions: { allowInsecureConnection: true, disableChallengeResourceVerification: true },
      },
      gcpKms: gcp.connection(),
      vaultTransit: { auth: { appRole }, addresses: [vault.address] },
    },
  });
  const dataSource = tenantContactsDataSource(encryption, schema.url, schema.schema);
  await dataSource.initialize();
  try {
    const repo = dataSource.getRepository(TenantContact);
    const email = `after-add@${workspace}.example`;
    const saved = await repo.save(
      repo.create({ workspaceId: workspace, email, profile: { phone: '+1-555-0' } }),
    );
    const [row] = await sql<{
      email_key_version: number;
      profile_key_version: number;
      email_ciphertext: Buffer;
    }>(
      'SELECT email_key_version, profile_key_version, email_ciphertext FROM $schema.tenant_contacts WHERE id = $1',
      [saved.id],
    );
    const read = await repo.findOneByOrFail({ id: saved.id });
    return { email, row, read };
  } finally {
    await dataSource.destroy();
  }
}

beforeAll(async () => {
  [azure, gcp, vault] = await Promise.all([
    startAzureKeyVaultEmulator(),
    startGcpKmsEmulator(),
    startVaultEmulator(),
  ]);
  await azure.createKey('acme-data');
  azure.grant(APP, ENCRYPTION_USER, { key: 'acme-data' });
  gcpKeyName = gcp.createKey({ project: 'customer-ws-gcp', keyRing: 'saas', id: 'workspace-data' }).name;
  nextGcpKeyName = gcp.createKey({
    project: 'customer-ws-gcp',
    keyRing: 'saas',
    id: 'workspace-data-2',
  }).name;
  vault.enableTransit(VAULT_MOUNT);
  vault.createKey(VAULT_KEY, { mount: VAULT_MOUNT });
  vault.setPolicy('saas-app', transitPolicy(VAULT_KEY, VAULT_MOUNT));
  appRole = vault.createAppRole('saas-app', { policies: ['saas-app'] });
  const project = await createTenantCliProject({
    prefix: 'cli_tenant_providers',
    workspaces: WORKSPACES,
    rows: ROWS,
    maxUses: 4,
  });
  schema = project.schema;
  env = {
    ...project.env,
    TYPEORM_ENVELOPE_ACTOR: 'cli-tenants-providers-test',
    TEST_AZURE_PRINCIPAL: APP,
    TEST_GCP_PORT: String(gcp.port),
    TEST_GCP_TOKEN: gcp.tokenFor(APP_MEMBER),
    TEST_VAULT_ADDRESS: vault.address,
    TEST_VAULT_ROLE_ID: appRole.roleId,
    TEST_VAULT_SECRET_ID: appRole.secretId,
  };
});
afterAll(async () => {
  await schema?.drop();
  await Promise.all([azure?.close(), gcp?.close(), vault?.close()]);
});

describe('typeorm-envelope tenants add: refusals', () => {
  it('two kinds, or one kind with another kind’s options, are refused naming the options, before any key service is called', async () => {
    azure.resetCalls();
    gcp.resetCalls();
    vault.resetCalls();
    const azureKey = azure.kid('acme-data');
    const cases: Array<{ args: string[]; names: string[] }> = [
      { args: ['--azure-key', azureKey, '--gcp-key', gcpKeyName], names: ['--azure-key', '--gcp-key'] },
      {
        args: ['--kms-key', 'arn:aws:kms:us-east-1:111122223333:key/x', '--vault-key', VAULT_KEY],
        names: ['--kms-key', '--vault-key'],
      },
      {
        args: ['--customer-key-file', '/nonexistent', '--gcp-key', gcpKeyName],
        names: ['--customer-key-file', '--gcp-key'],
      },
      {
        args: ['--azure-key', azureKey, '--vault-mount', VAULT_MOUNT],
        names: ['--vault-mount', '--azure-key'],
      },
      {
        args: ['--gcp-key', gcpKeyName, '--role-arn', 'arn:aws:iam::1:role/r'],
        names: ['--role-arn', '--gcp-key'],
      },
      {
        args: ['--vault-key', VAULT_KEY, '--vault-address', vault.address, '--region', 'us-east-1'],
        names: ['--region', '--vault-key'],
      },
      {
        args: ['--kms-key', 'arn:aws:kms:us-east-1:111122223333:key/x', '--vault-address', vault.address],
        names: ['--vault-address', '--kms-key'],
      },
    ];
    for (const { args, names } of cases) {
      const run = await cli(['tenants', 'add', 'ws-refused', ...args]);
      expect(run.status, `${args.join(' ')}: ${run.stderr}`).toBe(1);
      for (const name of names) expect(run.stderr, args.join(' ')).toContain(name);
      expect(run.stderr).not.toMatch(/unknown option/);
      expect(run.stderr).not.toMatch(/\n\s+at /);
    }
    expect(azure.callLog).toEqual([]);
    expect(gcp.callLog).toEqual([]);
    expect(vault.callLog).toEqual([]);
    expect(await tenantKeys('ws-refused')).toEqual([]);
    expect(await tenantRow('ws-refused')).toBeUndefined();
  });

  it('a missing required option is refused naming it', async () => {
    const noAddress = await cli(['tenants', 'add', 'ws-refused', '--vault-key', VAULT_KEY]);
    expect(noAddress.status).toBe(1);
    expect(noAddress.stderr).toContain('--vault-address');
    const none = await cli(['tenants', 'add', 'ws-refused']);
    expect(none.status).toBe(1);
    for (const name of ['--customer-key-file', '--kms-key', '--azure-key', '--gcp-key', '--vault-key']) {
      expect(none.stderr).toContain(name);
    }
    expect(vault.callLog).toEqual([]);
    expect(await tenantKeys('ws-refused')).toEqual([]);
    expect(await tenantRow('ws-refused')).toBeUndefined();
  });
});

describe('typeorm-envelope tenants add: keys in other key services', () => {
  it('--azure-key: a version-less key id is stored as the versioned one, with no credential; new rows are sealed under it', async () => {
    const run = await cliJson(['tenants', 'add', 'ws-azure', '--azure-key', azure.kid('acme-data')]);
    expect(run.status, run.stderr).toBe(0);
    const versioned = azure.callLog.find((c) => c.operation === 'wrapkey')?.version;
    expect(versioned).toBeTruthy();
    const keyId = azure.kid('acme-data', versioned);
    expect(run.json).toMatchObject({
      tenantId: 'ws-azure',
      kind: 'azure-key-vault',
      keyReference: keyId,
      state: 'active',
      job: { kind: 'onboarding', state: 'pending' },
    });
    expect(run.json.version).toBeGreaterThanOrEqual(1_000_000);
    expect(await tenantKeys('ws-azure')).toEqual([
      {
        version: run.json.version,
        provider_kind: 'azure-key-vault',
        key_reference: keyId,
        state: 'active',
        descriptor: { keyId },
      },
    ]);
    expect(await tenantRow('ws-azure')).toMatchObject({ state: 'active', active_version: run.json.version });
    // Every call the CLI made was the application's identity, on the customer's key.
    expect(azure.callLog.every((c) => c.principal === APP && c.name === 'acme-data')).toBe(true);

    const { email, row, read } = await saveAndRead('ws-azure');
    expect(row).toMatchObject({ email_key_version: run.json.version, profile_key_version: run.json.version });
    expect(row?.email_ciphertext.includes(Buffer.from(email))).toBe(false);
    expect(read.email).toBe(email);
  });

  it('--gcp-key: the key name is stored as it is, with no credential; new rows are sealed under it', async () => {
    gcp.resetCalls();
    const run = await cliJson(['tenants', 'add', 'ws-gcp', '--gcp-key', gcpKeyName]);
    expect(run.status, run.stderr).toBe(0);
    expect(run.json).toMatchObject({
      tenantId: 'ws-gcp',
      kind: 'gcp-kms',
      keyReference: gcpKeyName,
      state: 'active',
    });
    expect(await tenantKeys('ws-gcp')).toEqual([
      {
        version: run.json.version,
        provider_kind: 'gcp-kms',
        key_reference: gcpKeyName,
        state: 'active',
        descriptor: { keyName: gcpKeyName },
      },
    ]);
    expect(gcp.callLog.map((c) => c.operation)).toEqual(['GetCryptoKey', 'Encrypt', 'Decrypt']);

    const { email, row, read } = await saveAndRead('ws-gcp');
    expect(row).toMatchObject({ email_key_version: run.json.version, profile_key_version: run.json.version });
    expect(read.email).toBe(email);
  });

  it('--vault-key with --vault-address and --vault-mount: where the key is, never a token; new rows are sealed under it', async () => {
    vault.resetCalls();
    const run = await cliJson([
      'tenants',
      'add',
      'ws-vault',
      '--vault-key',
      VAULT_KEY,
      '--vault-address',
      vault.address,
      '--vault-mount',
      VAULT_MOUNT,
    ]);
    expect(run.status, run.stderr).toBe(0);
    const keyReference = `${vault.address}/v1/${VAULT_MOUNT}/keys/${VAULT_KEY}`;
    expect(run.json).toMatchObject({
      tenantId: 'ws-vault',
      kind: 'vault-transit',
      keyReference,
      state: 'active',
    });
    expect(await tenantKeys('ws-vault')).toEqual([
      {
        version: run.json.version,
        provider_kind: 'vault-transit',
        key_reference: keyReference,
        state: 'active',
        descriptor: { address: vault.address, mount: VAULT_MOUNT, keyName: VAULT_KEY },
      },
    ]);
    expect(vault.callLog.map((c) => c.operation)).toEqual(['login', 'readKey', 'datakey', 'decrypt']);

    const { email, row, read } = await saveAndRead('ws-vault');
    expect(row).toMatchObject({ email_key_version: run.json.version, profile_key_version: run.json.version });
    expect(read.email).toBe(email);
  });

  it('without --json, says what was added; no credential appears in any output or table', async () => {
    const run = await cli(['tenants', 'add', 'ws-gcp', '--gcp-key', nextGcpKeyName, '--no-activate']);
    expect(run.status, run.stderr).toBe(0);
    expect(run.stdout).toContain(`(gcp-kms ${nextGcpKeyName}), decrypt-only`);
    expect(run.stdout).toContain('typeorm-envelope tenants activate ws-gcp');
    expect((await tenantKeys('ws-gcp')).map((k) => [k.key_reference, k.state])).toEqual([
      [gcpKeyName, 'active'],
      [nextGcpKeyName, 'decrypt-only'],
    ]);
    const tables = JSON.stringify(
      await sql(
        `SELECT k.*, t.* FROM $schema.typeorm_envelope_tenant_keys k JOIN $schema.typeorm_envelope_tenants t USING (tenant_id)`,
      ),
    );
    const audit = JSON.stringify(await sql('SELECT * FROM $schema.typeorm_envelope_audit_log'));
    for (const secret of secrets()) {
      expect(tables).not.toContain(secret);
      expect(audit).not.toContain(secret);
      for (const output of outputs) expect(output).not.toContain(secret);
    }
    // No bearer token either (the Azure emulator's are JWTs).
    expect(tables).not.toMatch(/eyJ[\w-]+\.eyJ/);
  });
});
