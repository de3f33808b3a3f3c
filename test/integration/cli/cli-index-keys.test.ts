import { randomBytes, randomUUID } from 'node:crypto';
import { resolve } from 'node:path';
import 'reflect-metadata';
import { DataSource, In } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { EnvelopeEncryption, LocalKeyProvider, rotateIndexKey } from '../../../src';
import { Account, BLIND_INDEX_MIGRATIONS, Member } from '../../support/blind-index-entities';
import { runCli } from '../../support/cli';
import { createCliProject, runTenantCli, withJson } from '../../support/cli-project';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';
import { TENANT_MIGRATIONS } from '../../support/tenant-entities';

/**
 * `typeorm-envelope index-keys rotate|fill` on a project with searchable properties: workspace
 * members (tenant scopes) and accounts (the application keyring's own index key).
 */
const PROJECT = resolve(__dirname, '../../fixtures/blind-index-project.ts');
/** The index-key refresh interval the fixture's instances use (the minimum the library allows). */
const REFRESH_INTERVAL = 1_000;

let schema: TestSchema;
let env: Record<string, string>;
let masterKey: string;
let dataSource: DataSource;
let encryption: EnvelopeEncryption;
/** Every stdout and stderr the CLI printed, searched for secrets at the end. */
const outputs: string[] = [];
/** Every plaintext the tests stored. */
const plaintexts: string[] = [];

const cli = async (args: string[], extraEnv: Record<string, string> = {}) => {
  const run = await runTenantCli(args, { ...env, ...extraEnv }, { dataSourceFile: PROJECT });
  outputs.push(run.stdout, run.stderr);
  return run;
};

const cliJson = async (args: string[], extraEnv: Record<string, string> = {}) => {
  return withJson(await cli(['--json', ...args], extraEnv), args);
};

const sql = <T = Record<string, unknown>>(text: string, params?: unknown[]) =>
  rawQuery<T>(schema.url, text.replaceAll('$schema', `"${schema.schema}"`), params);

interface IndexKeyRow {
  version: number;
  state: string;
  wrapped_key: Buffer | null;
}
/** The index-key records of a scope (`''`: the application keyring's own). */
const indexKeys = (tenant: string) =>
  sql<IndexKeyRow>(
    `SELECT version, state, wrapped_key FROM $schema.typeorm_envelope_index_keys WHERE tenant_id = $1 ORDER BY version`,
    [tenant],
  );

/** Rows of a workspace per 2-byte version prefix of their email and phone indexes (`null`: no index). */
const memberPrefixes = async (workspace: string) =>
  sql<{ email: string | null; phone: string | null; n: number }>(
    `SELECT encode(substring(email_bidx from 1 for 2), 'hex') AS email,
            encode(substring(phone_bidx from 1 for 2), 'hex') AS phone, count(*)::int AS n
       FROM $schema.bidx_members WHERE "workspaceId" = $1 GROUP BY 1, 2 ORDER BY 1, 2`,
    [workspace],
  );

const memberIndexes = async (workspace: string) =>
  (
    await sql<{ id: number; email_bidx: Buffer | null }>(
      `SELECT id, email_bidx FROM $schema.bidx_members WHERE "workspaceId" = $1 ORDER BY id`,
      [workspace],
    )
  ).map((r) => `${r.id}:${r.email_bidx?.toString('hex') ?? 'null'}`);

const emailsOf = (workspace: string, count: number) =>
  Array.from({ length: count }, (_, i) => `${workspace}-${i}@example.com`);

/** Looks members up by email through the library, as the application does (not from its caches). */
async function found(workspace: string, emails: readonly string[]): Promise<string[]> {
  encryption.purgeCache();
  const rows = await dataSource
    .getRepository(Member)
    .findBy({ workspaceId: workspace, email: In(emails.map((e) => e.toUpperCase())) });
  return rows.map((m) => m.email).sort();
}

async function accountsFound(emails: readonly string[]): Promise<string[]> {
  encryption.purgeCache();
  const rows = await dataSource.getRepository(Account).findBy({ email: In([...emails]) });
  return rows.map((a) => a.email).sort();
}

async function seedMembers(workspace: string, count: number): Promise<string[]> {
  const emails = emailsOf(workspace, count);
  const repo = dataSource.getRepository(Member);
  await repo.save(
    emails.map((email, i) =>
      repo.create({ workspaceId: workspace, email, phone: i % 2 ? `+1 555 01${i}` : null, note: null }),
    ),
  );
  plaintexts.push(...emails);
  return emails;
}

const accountEmails = Array.from({ length: 12 }, (_, i) => `account-${i}@example.org`);

beforeAll(async () => {
  schema = await createTestSchema('cli_index_keys');
  masterKey = randomBytes(32).toString('base64');
  encryption = new EnvelopeEncryption({
    keys: [{ version: 1, provider: new LocalKeyProvider({ key: masterKey }) }],
    activeVersion: 1,
    tenantKeys: { refreshInterval: REFRESH_INTERVAL },
  });
  dataSource = new DataSource({
    type: 'postgres',
    url: schema.url,
    schema: schema.schema,
    entities: [Member, Account],
    synchronize: true,
    migrations: BLIND_INDEX_MIGRATIONS,
    migrationsRun: true,
  });
  encryption.attach(dataSource);
  await dataSource.initialize();
  await seedMembers('ws-a', 30);
  await seedMembers('ws-b', 10);
  await seedMembers('ws-c', 8);
  const accounts = dataSource.getRepository(Account);
  await accounts.save(
    accountEmails.map((email, i) =>
      accounts.create({
        id: randomUUID(),
        name: '',
        email,
        recoveryEmail: i % 3 ? null : `r-${email}`,
        address: { street: '', city: i % 2 ? 'Lisbon' : null },
      }),
    ),
  );
  plaintexts.push(...accountEmails, 'Lisbon');
  env = {
    TEST_DATABASE_URL: schema.url,
    TEST_SCHEMA: schema.schema,
    TEST_MASTER_KEY_1: masterKey,
    TEST_REFRESH_INTERVAL: String(REFRESH_INTERVAL),
    TYPEORM_ENVELOPE_ACTOR: 'cli-index-keys-test',
  };
});
afterAll(async () => {
  if (dataSource?.isInitialized) await dataSource.destroy();
  await schema?.drop();
});

describe('index-keys rotate', () => {
  it("rotates one tenant's index key: every row under the new version, the old key erased, rows still found", async () => {
    const emails = emailsOf('ws-a', 30);
    expect(await indexKeys('ws-a')).toMatchObject([{ version: 1, state: 'active' }]);
    const bystanders = await memberIndexes('ws-b');
    const bystanderKeys = await indexKeys('ws-b');

    const run = await cli(['index-keys', 'rotate', '--tenant', 'ws-a', '--batch-size', '7']);
    expect(run.stderr).toBe('');
    expect(run.status).toBe(0);
    expect(run.stdout).toContain('tenant ws-a: index key rotated from version 1 to version 2');
    expect(run.stdout).toContain('version 1 retired');
    expect(run.stdout).toMatch(/Member\s+email\s+30\b/);
    expect(run.stdout).toMatch(/Member\s+phone\s+15\b/);

    const keys = await indexKeys('ws-a');
    expect(keys).toMatchObject([
      { version: 1, state: 'retired', wrapped_key: null },
      { version: 2, state: 'active' },
    ]);
    expect(keys[1]?.wrapped_key).toBeInstanceOf(Buffer);
    expect(await memberPrefixes('ws-a')).toEqual([
      { email: '0002', phone: '0002', n: 15 },
      { email: '0002', phone: null, n: 15 },
    ]);
    // The default wait is the refresh interval, by the database's clock: the new key was made
    // active for writes only once every instance had had the time to read it.
    const [gap] = await sql<{ waited: boolean }>(
      `SELECT activated_at - created_at >= $1::interval AS waited FROM $schema.typeorm_envelope_index_keys
        WHERE tenant_id = 'ws-a' AND version = 2`,
      [`${REFRESH_INTERVAL} milliseconds`],
    );
    expect(gap?.waited).toBe(true);
    expect(await found('ws-a', emails)).toEqual([...emails].sort());
    // Another tenant's rows and keys are left alone.
    expect(await memberIndexes('ws-b')).toEqual(bystanders);
    expect(await indexKeys('ws-b')).toEqual(bystanderKeys);
  });

  it("--json without --tenant rotates the application keyring's own key; a second run rotates again", async () => {
    const before = await sql<{ hex: string }>(
      `SELECT encode(email_bidx, 'hex') AS hex FROM $schema.bidx_accounts ORDER BY id`,
    );
    const tenantsBefore = await memberIndexes('ws-a');
    // An instance configured with a long refresh interval: --settle-time 0 does not wait for it.
    const slow = { TEST_REFRESH_INTERVAL: '600000' };
    const run = await cliJson(['index-keys', 'rotate', '--settle-time', '0'], slow);
    expect(run.status).toBe(0);
    expect(run.stderr).toContain('--settle-time 0 ms is shorter than the index-key refresh interval');
    expect(run.json).toMatchObject({
      toVersion: 2,
      fromVersion: 1,
      resumed: false,
      rowsLeft: 0,
      previousRetired: true,
    });
    expect(run.json.tenant).toBeUndefined();
    expect(run.json.error).toBeUndefined();
    expect(typeof run.json.durationMs).toBe('number');
    const accountResult = (property: string) =>
      run.json.properties.find(
        (p: { entity: string; property: string }) => p.entity === 'Account' && p.property === property,
      );
    expect(accountResult('email')).toEqual({
      entity: 'Account',
      property: 'email',
      rowsIndexed: 12,
      rowsSkipped: 0,
      duplicates: [],
      failures: [],
    });
    expect(accountResult('recoveryEmail')?.rowsIndexed).toBe(4);
    expect(accountResult('address.city')?.rowsIndexed).toBe(6);
    // Tenant rows are not under the application keyring's own index key.
    for (const p of run.json.properties.filter((p: { entity: string }) => p.entity === 'Member'))
      expect(p.rowsIndexed).toBe(0);
    expect(await memberIndexes('ws-a')).toEqual(tenantsBefore);

    expect(await indexKeys('')).toMatchObject([
      { version: 1, state: 'retired', wrapped_key: null },
      { version: 2, state: 'active' },
    ]);
    const prefixes = await sql<{ email: string; recovery: string | null; city: string | null }>(
      `SELECT DISTINCT encode(substring(email_bidx from 1 for 2), 'hex') AS email,
              encode(substring("recoveryEmail_bidx" from 1 for 2), 'hex') AS recovery,
              encode(substring("addressCity_bidx" from 1 for 2), 'hex') AS city
         FROM $schema.bidx_accounts`,
    );
    expect(new Set(prefixes.flatMap((p) => [p.email, p.recovery, p.city]).filter(Boolean))).toEqual(
      new Set(['0002']),
    );
    const after = await sql<{ hex: string }>(
      `SELECT encode(email_bidx, 'hex') AS hex FROM $schema.bidx_accounts ORDER BY id`,
    );
    expect(after.every((a, i) => a.hex !== before[i]?.hex)).toBe(true);
    expect(await accountsFound(accountEmails)).toEqual([...accountEmails].sort());

    // With no rotation under way, running it again starts a new one.
    const again = await cliJson(['index-keys', 'rotate', '--settle-time', '0'], slow);
    expect(again.status).toBe(0);
    expect(again.json).toMatchObject({ toVersion: 3, fromVersion: 2, resumed: false, previousRetired: true });
    expect(await indexKeys('')).toMatchObject([
      { version: 1, state: 'retired', wrapped_key: null },
      { version: 2, state: 'retired', wrapped_key: null },
      { version: 3, state: 'active' },
    ]);
    expect(await accountsFound(accountEmails)).toEqual([...accountEmails].sort());
  });

  it('takes over a rotation that stopped part-way, where the rows show it got to', async () => {
    const emails = emailsOf('ws-b', 10);
    // A rotation that ends after its first batch, as a killed job does.
    const stopped = await rotateIndexKey(dataSource, encryption, {
      tenant: 'ws-b',
      batchSize: 3,
      settleTime: 0,
      onProgress: () => Promise.reject(new Error('stopped')),
    });
    expect(stopped.error).toBeDefined();
    expect(await indexKeys('ws-b')).toMatchObject([
      { version: 1, state: 'previous' },
      { version: 2, state: 'active' },
    ]);
    const [left] = await sql<{ n: number }>(
      `SELECT count(*)::int AS n FROM $schema.bidx_members WHERE "workspaceId" = 'ws-b' AND substring(email_bidx from 1 for 2) = '\\x0001'::bytea`,
    );
    expect(left?.n).toBeGreaterThan(0);
    expect(await found('ws-b', emails)).toEqual([...emails].sort());

    const run = await cliJson(['index-keys', 'rotate', '--tenant', 'ws-b', '--batch-size', '4']);
    expect(run.status).toBe(0);
    expect(run.json).toMatchObject({
      tenant: 'ws-b',
      toVersion: 2,
      fromVersion: 1,
      resumed: true,
      rowsLeft: 0,
      previousRetired: true,
    });
    const email = run.json.properties.find((p: { property: string }) => p.property === 'email');
    expect(email.rowsIndexed).toBe(left?.n);
    expect(await indexKeys('ws-b')).toMatchObject([
      { version: 1, state: 'retired', wrapped_key: null },
      { version: 2, state: 'active' },
    ]);
    expect(await memberPrefixes('ws-b')).toEqual([
      { email: '0002', phone: '0002', n: 5 },
      { email: '0002', phone: null, n: 5 },
    ]);
    expect(await found('ws-b', emails)).toEqual([...emails].sort());

    const text = await cli(['index-keys', 'rotate', '--tenant', 'ws-b', '--settle-time', '0'], {
      TEST_REFRESH_INTERVAL: '600000',
    });
    expect(text.status).toBe(0);
    expect(text.stdout).toContain('tenant ws-b: index key rotated from version 2 to version 3');
  });

  it('refuses a bad --batch-size or --settle-time before connecting', async () => {
    const batch = await cliJson(['index-keys', 'rotate', '--batch-size', '0']);
    expect(batch.status).toBe(1);
    expect(batch.json.error).toMatchObject({ name: 'UsageError' });
    expect(batch.stderr).toContain('expected a positive integer');
    const settle = await cli(['index-keys', 'rotate', '--settle-time', '-5']);
    expect(settle.status).toBe(1);
    expect(settle.stderr).toContain('expected a number of milliseconds');
  });
});

describe('index-keys fill', () => {
  it("indexes the rows that have none: --tenant only that tenant's, then every other; a second run has nothing to do", async () => {
    const emails = emailsOf('ws-c', 8);
    await sql(
      `UPDATE $schema.bidx_members SET email_bidx = NULL, phone_bidx = NULL WHERE "workspaceId" = 'ws-c'`,
    );
    await sql(`UPDATE $schema.bidx_accounts SET email_bidx = NULL`);
    expect(await found('ws-c', emails)).toEqual([]);
    expect(await accountsFound(accountEmails)).toEqual([]);
    const others = await memberIndexes('ws-a');

    const tenant = await cli(['index-keys', 'fill', '--tenant', 'ws-c']);
    expect(tenant.stderr).toBe('');
    expect(tenant.status).toBe(0);
    expect(tenant.stdout).toContain('tenant ws-c: 12 blind indexes filled');
    expect(await memberPrefixes('ws-c')).toEqual([
      { email: '0001', phone: '0001', n: 4 },
      { email: '0001', phone: null, n: 4 },
    ]);
    expect(await found('ws-c', emails)).toEqual([...emails].sort());
    // The accounts have no tenant: --tenant leaves them.
    const [missing] = await sql<{ n: number }>(
      `SELECT count(*)::int AS n FROM $schema.bidx_accounts WHERE email_bidx IS NULL`,
    );
    expect(missing?.n).toBe(12);
    expect(await memberIndexes('ws-a')).toEqual(others);

    const all = await cliJson(['index-keys', 'fill', '--batch-size', '5']);
    expect(all.status).toBe(0);
    expect(all.json).toMatchObject({ resumed: false, rowsLeft: 0, previousRetired: false });
    expect(all.json.toVersion).toBeUndefined();
    expect(all.json.error).toBeUndefined();
    const filled = all.json.properties.filter((p: { rowsIndexed: number }) => p.rowsIndexed > 0);
    expect(filled).toEqual([
      { entity: 'Account', property: 'email', rowsIndexed: 12, rowsSkipped: 0, duplicates: [], failures: [] },
    ]);
    // Filled under the application keyring's active index key (version 3 after the rotations above).
    const prefixes = await sql<{ v: string; n: number }>(
      `SELECT encode(substring(email_bidx from 1 for 2), 'hex') AS v, count(*)::int AS n FROM $schema.bidx_accounts GROUP BY 1`,
    );
    expect(prefixes).toEqual([{ v: '0003', n: 12 }]);
    expect(await accountsFound(accountEmails)).toEqual([...accountEmails].sort());

    const again = await cli(['index-keys', 'fill']);
    expect(again.status).toBe(0);
    expect(again.stdout).toContain('no row without a blind index: nothing to do');
  });
});

describe('index-keys errors', () => {
  it('without the index-keys table: exit 1, naming the migration to run', async () => {
    const bare = await createTestSchema('cli_index_keys_bare');
    try {
      const ds = new DataSource({
        type: 'postgres',
        url: bare.url,
        schema: bare.schema,
        entities: [Member, Account],
        synchronize: true,
        migrations: TENANT_MIGRATIONS,
        migrationsRun: true,
      });
      await ds.initialize();
      await ds.destroy();
      const bareEnv = { TEST_DATABASE_URL: bare.url, TEST_SCHEMA: bare.schema };
      for (const job of ['rotate', 'fill']) {
        const run = await cli(['index-keys', job], bareEnv);
        expect(run.status).toBe(1);
        expect(run.stderr).toContain(
          'ConfigError: searchable encrypted properties need the typeorm_envelope_index_keys table',
        );
        expect(run.stderr).toContain('TypeormEnvelopeIndexKeys1764600000000');
        expect(run.stderr).not.toContain('    at ');
      }
      const json = await cliJson(['index-keys', 'rotate'], bareEnv);
      expect(json.status).toBe(1);
      expect(json.json.error).toMatchObject({ name: 'ConfigError' });
      expect(json.json.error.message).toContain('TypeormEnvelopeIndexKeys1764600000000');
    } finally {
      await bare.drop();
    }
  });

  it('a project without searchable properties: exit 1, saying so', async () => {
    const project = await createCliProject({
      prefix: 'cli_index_keys_plain',
      rows: 2,
      maxUses: 10,
      customer: (i) => ({ email: `plain${i}@example.com`, plan: 'p', address: null }),
    });
    try {
      for (const job of ['rotate', 'fill']) {
        const run = runCli(['index-keys', job], project.env);
        outputs.push(run.stdout, run.stderr);
        expect(run.status).toBe(1);
        expect(run.stderr).toContain('no entity has searchable encrypted properties');
      }
      const selected = await cli(['index-keys', 'fill', '--entity', 'NoSuchEntity']);
      expect(selected.status).toBe(1);
      expect(selected.stderr).toContain('none of the selected entities has searchable properties');
      // A rotation covers every entity of the scope: the old key is erased once none of its rows uses it.
      const partial = await cli(['index-keys', 'rotate', '--entity', 'Member']);
      expect(partial.status).toBe(1);
      expect(partial.stderr).toContain("unknown option '--entity'");
    } finally {
      await project.schema.drop();
    }
  });
});

describe('what the commands print', () => {
  it('never key material, plaintext or index values', async () => {
    const wrapped = await sql<{ wrapped_key: Buffer }>(
      `SELECT wrapped_key FROM $schema.typeorm_envelope_index_keys WHERE wrapped_key IS NOT NULL`,
    );
    const indexes = await sql<{ hex: string }>(
      `SELECT encode(email_bidx, 'hex') AS hex FROM $schema.bidx_members UNION ALL
       SELECT encode(email_bidx, 'hex') FROM $schema.bidx_accounts`,
    );
    const master = Buffer.from(masterKey, 'base64');
    const secrets = [
      masterKey,
      master.toString('hex'),
      ...wrapped.flatMap((w) => [w.wrapped_key.toString('hex'), w.wrapped_key.toString('base64')]),
      ...indexes.map((i) => i.hex).filter(Boolean),
    ];
    expect(outputs.length).toBeGreaterThan(10);
    const printed = outputs.join('\n');
    for (const secret of secrets) expect(printed).not.toContain(secret);
    for (const plaintext of plaintexts) expect(printed.toLowerCase()).not.toContain(plaintext.toLowerCase());
  });
});
