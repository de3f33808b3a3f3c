import { spawn } from 'node:child_process';
import { resolve } from 'node:path';
import { In } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LocalKeyProvider, TenantOffboardedError } from '../../../src';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { rawQuery } from '../../support/database';
import { TENANT_MIGRATIONS, TenantContact } from '../../support/tenant-entities';
import {
  type CustomerAccount,
  createCustomerAccount,
  customerKey,
  rejection,
  startTenantClouds,
  type TenantClouds,
} from '../../support/tenant-fixtures';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/**
 * Two instances of one SaaS on one database. The first manages tenant keys; the second is
 * configured with the application's key only (and how it reaches KMS and STS) and learns every
 * tenant's key from the registry: at its refresh interval, and at once for a key version it has not
 * seen. Once in a child process too.
 */
const root = resolve(__dirname, '../../..');
let clouds: TenantClouds;
let vendorKey: string;
let first: EncryptedTestDatabase;
let second: EncryptedTestDatabase;
let accountSeq = 0;
const accounts = new Map<string, CustomerAccount>();
const versions = new Map<string, number>();
const expected = new Map<number, { workspaceId: string; email: string; profile: { phone: string } | null }>();

/** The application's configuration of `EnvelopeEncryption`, as any instance has it: no tenant key in it. */
const vendorOnly = (refreshInterval?: number) => ({
  keys: [{ version: 1, provider: new LocalKeyProvider({ key: vendorKey }) }],
  activeVersion: 1,
  tenantKeys: { awsKms: clouds.awsKms(), ...(refreshInterval ? { refreshInterval } : {}) },
});

const repoOf = (db: EncryptedTestDatabase) => db.dataSource.getRepository(TenantContact);
const sql = <T = Record<string, unknown>>(text: string, params?: unknown[]) =>
  rawQuery<T>(first.schema.url, text, params);
const table = () => `"${first.schema.schema}".tenant_contacts`;

async function write(db: EncryptedTestDatabase, workspaceId: string, tag: string) {
  const repo = repoOf(db);
  const saved = await repo.save(
    repo.create({ workspaceId, email: `${tag}@${workspaceId}.example`, profile: { phone: `+1-${tag}` } }),
  );
  expected.set(saved.id, { workspaceId, email: saved.email, profile: { phone: `+1-${tag}` } });
  return saved;
}
const storedVersion = async (id: number) =>
  (await sql<{ v: number }>(`SELECT email_key_version AS v FROM ${table()} WHERE id = $1`, [id]))[0]?.v;

/** Polls `probe` until it returns a value (a safety deadline ends a test that would hang; nothing is timed). */
async function eventually<T>(what: string, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`gave up waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function addKmsKey(tenantId: string) {
  const a = await createCustomerAccount(
    clouds,
    first.encryption,
    tenantId,
    String(800_000_000_000 + ++accountSeq),
  );
  accounts.set(tenantId, a);
  const added = await first.encryption.tenants.addKey(tenantId, {
    kind: 'aws-kms',
    keyId: a.keyArn,
    roleArn: a.roleArn,
  });
  versions.set(tenantId, added.version);
  return added;
}
async function addCustomerKey(tenantId: string) {
  const added = await first.encryption.tenants.addKey(tenantId, { kind: 'customer-key', key: customerKey() });
  versions.set(tenantId, added.version);
  return added;
}

const TENANTS = ['ck-1', 'ck-2', 'kms-1', 'kms-2', 'v-1', 'v-2'];
const offboarded = new Set<string>();

beforeAll(async () => {
  clouds = await startTenantClouds();
  vendorKey = customerKey();
  first = await encryptedDatabase([TenantContact], {
    prefix: 'tenant_instances',
    migrations: TENANT_MIGRATIONS,
    encryption: { ...vendorOnly(), keys: [{ version: 1, provider: new CountingKeyProvider(vendorKey) }] },
  });
  await addCustomerKey('ck-1');
  await addCustomerKey('ck-2');
  await addKmsKey('kms-1');
  await addKmsKey('kms-2');
  for (const tenantId of TENANTS) for (const tag of ['a', 'b']) await write(first, tenantId, tag);
  second = await encryptedDatabase([TenantContact], {
    schema: first.schema,
    migrations: TENANT_MIGRATIONS,
    encryption: vendorOnly(1_000),
  });
}, 120_000);
afterAll(async () => {
  await second?.close();
  await first?.close();
  await clouds?.close();
});

function expectRead(found: TenantContact[], ids: Iterable<number>): void {
  const wanted = [...ids];
  expect(found.map((c) => c.id).sort((a, b) => a - b)).toEqual([...wanted].sort((a, b) => a - b));
  for (const c of found) {
    const e = expected.get(c.id);
    expect({ workspaceId: c.workspaceId, email: c.email, profile: c.profile }).toEqual(e);
  }
}

describe('a second instance with only the application key in its configuration', () => {
  it('reads every tenant’s rows through the registry', async () => {
    expect((await sql(`SELECT DISTINCT email_key_version FROM ${table()}`)).length).toBe(5); // 4 own keys + 1
    expectRead(await repoOf(second).find(), expected.keys());
    for (const tenantId of ['kms-1', 'kms-2']) {
      const a = accounts.get(tenantId) as CustomerAccount;
      expect(
        clouds.kms.callLog.some(
          (c) =>
            c.operation === 'Decrypt' && c.keyId === a.keyArn && c.principal?.includes(`saas-${tenantId}`),
        ),
      ).toBe(true);
    }
  });

  it('in a child process too: it reads every row and writes under each tenant’s key', async () => {
    const env = {
      ...process.env,
      TEST_DATABASE_URL: first.schema.url,
      TEST_SCHEMA: first.schema.schema,
      TEST_MASTER_KEY_1: vendorKey,
      TEST_KMS_ENDPOINT: clouds.kms.endpoint,
      TEST_KMS_REGION: clouds.kms.region,
      TEST_STS_ENDPOINT: clouds.sts.endpoint,
      TEST_AWS_ACCESS_KEY_ID: clouds.app.accessKeyId,
      TEST_AWS_SECRET_ACCESS_KEY: clouds.app.secretAccessKey,
      TEST_WRITE_TENANTS: TENANTS.join(','),
    };
    /* Not spawnSync: the emulators the child calls run in this process. */
    const child = spawn(
      process.execPath,
      ['-r', resolve(root, 'test/support/register-ts.cjs'), resolve(root, 'test/fixtures/tenant-reader.ts')],
      { cwd: root, env, stdio: 'pipe' },
    );
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => {
      stdout += d.toString('utf8');
    });
    child.stderr.on('data', (d: Buffer) => {
      stderr += d.toString('utf8');
    });
    const code = await new Promise<number | null>((done) => child.on('exit', done));
    expect(code, stderr).toBe(0);
    const [readLine, writtenLine] = stdout.trim().split('\n');
    const { read } = JSON.parse(readLine as string) as { read: TenantContact[] };
    expectRead(read, expected.keys());
    const { written } = JSON.parse(writtenLine as string) as { written: number[] };
    expect(written.length).toBe(TENANTS.length);
    const rows = await sql<{ id: number; workspaceId: string; email_key_version: number }>(
      `SELECT id, "workspaceId", email_key_version FROM ${table()} WHERE id = ANY($1)`,
      [written],
    );
    for (const row of rows) expect(row.email_key_version).toBe(versions.get(row.workspaceId) ?? 1);
    first.encryption.purgeCache();
    const back = await repoOf(first).findBy({ id: In(written) });
    expect(back.map((c) => `${c.workspaceId}:${c.email}`).sort()).toEqual(
      TENANTS.map((t) => `${t}:child@${t}.example`).sort(),
    );
    await sql(`DELETE FROM ${table()} WHERE id = ANY($1)`, [written]);
  }, 120_000);

  it('uses a key the first instance added once it has refreshed, and reads rows under it at once', async () => {
    const before = await write(second, 'v-2', 'before');
    expect(await storedVersion(before.id)).toBe(1);
    const added = await addCustomerKey('v-2');
    /* Rows the first instance writes under the new key read here at once: the version is resolved on demand. */
    const fresh = await write(first, 'v-2', 'fresh');
    expect(await storedVersion(fresh.id)).toBe(added.version);
    expectRead([await repoOf(second).findOneByOrFail({ id: fresh.id })], [fresh.id]);
    /* Its own writes move to the new key within its refresh interval. */
    await eventually('the second instance to follow the new key', async () =>
      second.encryption.tenantKeyrings.tenant('v-2')?.activeVersion === added.version ? true : undefined,
    );
    const after = await write(second, 'v-2', 'after');
    expect(await storedVersion(after.id)).toBe(added.version);
    first.encryption.purgeCache('v-2');
    expectRead(
      await repoOf(first).findBy({ workspaceId: 'v-2' }),
      [...expected].filter(([, c]) => c.workspaceId === 'v-2').map(([id]) => id),
    );
  });

  it('resolves an unseen version on demand, without waiting for a refresh (an instance refreshing once a minute)', async () => {
    const third = await encryptedDatabase([TenantContact], {
      schema: first.schema,
      migrations: TENANT_MIGRATIONS,
      encryption: vendorOnly(60_000),
    });
    try {
      const added = await addKmsKey('v-1');
      const row = await write(first, 'v-1', 'kms-now');
      expect(await storedVersion(row.id)).toBe(added.version);
      expect(third.encryption.tenantKeyrings.key(added.version)).toBeUndefined(); // not seen yet
      expectRead([await repoOf(third).findOneByOrFail({ id: row.id })], [row.id]);
      expect(third.encryption.tenantKeyrings.key(added.version)).toMatchObject({
        tenantId: 'v-1',
        keyReference: accounts.get('v-1')?.keyArn,
      });
      expectRead([await repoOf(second).findOneByOrFail({ id: row.id })], [row.id]);
    } finally {
      await third.close();
    }
  });

  it('follows a revert to the application key within its refresh interval; rows under the tenant key still read', async () => {
    const own = [...expected].filter(([, c]) => c.workspaceId === 'ck-1').map(([id]) => id);
    const ownKey = versions.get('ck-1') as number;
    expect(await storedVersion(own[0] as number)).toBe(ownKey);
    await first.encryption.tenants.revert('ck-1');
    await eventually('the second instance to follow the revert', async () =>
      second.encryption.tenantKeyrings.tenant('ck-1')?.activeVersion === null ? true : undefined,
    );
    const after = await write(second, 'ck-1', 'reverted');
    expect(await storedVersion(after.id)).toBe(1);
    second.encryption.purgeCache('ck-1');
    expectRead(await repoOf(second).findBy({ workspaceId: 'ck-1' }), [...own, after.id]);
    versions.delete('ck-1');
  });

  it.each(['ck-2', 'kms-2'])(
    'refuses %s within its refresh interval once the first instance offboarded it; other tenants keep working',
    async (tenantId) => {
      const own = [...expected].filter(([, c]) => c.workspaceId === tenantId).map(([id]) => id);
      const others = [...expected]
        .filter(([, c]) => c.workspaceId !== tenantId && !offboarded.has(c.workspaceId))
        .map(([id]) => id);
      /* Warm: its data keys are cached in the second instance. */
      expectRead(await repoOf(second).findBy({ workspaceId: tenantId }), own);
      await first.encryption.tenants.offboard(tenantId);
      const refused = await eventually('the second instance to refuse the offboarded tenant', async () => {
        try {
          await repoOf(second).findBy({ workspaceId: tenantId });
          return undefined;
        } catch (error) {
          return error as Error;
        }
      });
      expect(refused).toBeInstanceOf(TenantOffboardedError);
      expect(refused).toMatchObject({ tenant: tenantId });
      const kmsCalls = clouds.kms.callLog.length;
      const write2 = await rejection(write(second, tenantId, 'late'));
      expect(write2).toBeInstanceOf(TenantOffboardedError);
      await expect(repoOf(second).findBy({ workspaceId: tenantId })).rejects.toBeInstanceOf(
        TenantOffboardedError,
      );
      expect(clouds.kms.callLog.length).toBe(kmsCalls); // refused before any key is asked
      for (const id of own) expected.delete(id);
      offboarded.add(tenantId);
      second.encryption.purgeCache();
      const active = TENANTS.filter((t) => !offboarded.has(t));
      expectRead(await repoOf(second).findBy({ workspaceId: In(active) }), others);
      const written = await Promise.all(active.map((t) => write(second, t, `after-${tenantId}`)));
      first.encryption.purgeCache();
      expectRead(
        await repoOf(first).findBy({ id: In(written.map((c) => c.id)) }),
        written.map((c) => c.id),
      );
    },
  );
});
