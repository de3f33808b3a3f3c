import { inspect } from 'node:util';
import { type KMSClient, ReEncryptCommand } from '@aws-sdk/client-kms';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { AwsKmsKeyProvider, ConfigError, KeyAccessDeniedError, KeyRegistry } from '../../../src';
import { rawQuery } from '../../support/database';
import { TENANT_MIGRATIONS, TenantContact } from '../../support/tenant-entities';
import {
  type CustomerAccount,
  createCustomerAccount,
  expectNoneOf,
  ROLE_ACTIONS,
  rejection,
  startTenantClouds,
  TENANT_CONTEXT,
  type TenantClouds,
  VENDOR_ACCOUNT,
} from '../../support/tenant-fixtures';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/**
 * Tenant keys in the customers' own AWS accounts, reached for real: STS `AssumeRole` with each
 * tenant's External ID (STS emulator), then KMS with the role's temporary credentials (KMS
 * emulator, which enforces each key's policy against the caller the credentials belong to).
 */
const MINUTE = 60_000;
let clouds: TenantClouds;
let db: EncryptedTestDatabase;
let accountSeq = 0;

beforeAll(async () => {
  clouds = await startTenantClouds();
  db = await encryptedDatabase([TenantContact], {
    prefix: 'tenant_xacct',
    migrations: TENANT_MIGRATIONS,
    /* One data key per value: every write reaches KMS, so credentials are used at every step. */
    encryption: { tenantKeys: { awsKms: clouds.awsKms() }, cache: { dataKeyMaxUses: 1 } },
  });
});
afterAll(async () => {
  await db?.close();
  await clouds?.close();
});
afterEach(() => {
  vi.useRealTimers();
});

const contacts = () => db.dataSource.getRepository(TenantContact);
const sql = <T = Record<string, unknown>>(text: string, params?: unknown[]) =>
  rawQuery<T>(db.schema.url, text, params);
const table = (name: string) => `"${db.schema.schema}".${name}`;
const account = (tenantId: string) =>
  createCustomerAccount(clouds, db.encryption, tenantId, String(500_000_000_000 + ++accountSeq));
const roleSession = (a: CustomerAccount) =>
  `arn:aws:sts::${a.account}:assumed-role/saas-${a.tenantId}/typeorm-envelope`;
const addRoleKey = (a: CustomerAccount, extra: Record<string, unknown> = {}) =>
  db.encryption.tenants.addKey(a.tenantId, {
    kind: 'aws-kms',
    keyId: a.keyArn,
    roleArn: a.roleArn,
    ...extra,
  });

async function saveContact(tenantId: string, tag: string) {
  return contacts().save(
    contacts().create({ workspaceId: tenantId, email: `${tag}@${tenantId}.example`, profile: null }),
  );
}
const storedVersion = async (id: number) =>
  (
    await sql<{ v: number }>(`SELECT email_key_version AS v FROM ${table('tenant_contacts')} WHERE id = $1`, [
      id,
    ])
  )[0]?.v;
const keysRecorded = async (tenantId: string) =>
  (
    await sql<{ n: number }>(
      `SELECT count(*)::int AS n FROM ${table('typeorm_envelope_tenant_keys')} WHERE tenant_id = $1`,
      [tenantId],
    )
  )[0]?.n;
const audit = (tenantId: string) =>
  new KeyRegistry(db.dataSource, db.encryption).auditLog({ tenant: tenantId });

describe('addKey with a role in the customer’s account', () => {
  it('succeeds when the trust policy requires the tenant’s externalIdFor() value; rows are sealed by the customer’s key through the role', async () => {
    const a = await account('acme');
    expect(a.externalId).toBe(await db.encryption.tenants.externalIdFor('acme')); // stable
    clouds.kms.resetCalls();
    clouds.sts.resetCalls();
    const added = await addRoleKey(a);
    expect(added).toMatchObject({
      tenantId: 'acme',
      kind: 'aws-kms',
      keyReference: a.keyArn,
      state: 'active',
    });
    expect(clouds.sts.callLog.length).toBeGreaterThan(0);
    for (const call of clouds.sts.callLog) {
      expect(call).toMatchObject({
        action: 'AssumeRole',
        roleArn: a.roleArn,
        externalId: a.externalId,
        accessKeyId: clouds.app.accessKeyId,
      });
      expect(call.error).toBeUndefined();
    }
    const saved = await saveContact('acme', 'alice');
    expect(await storedVersion(saved.id)).toBe(added.version);
    const [row] = await sql<{ email_wrapped_key: Buffer }>(
      `SELECT email_wrapped_key FROM ${table('tenant_contacts')} WHERE id = $1`,
      [saved.id],
    );
    expect(row?.email_wrapped_key.includes(Buffer.from(a.keyUuid, 'ascii'))).toBe(true);
    db.encryption.purgeCache('acme');
    expect((await contacts().findOneByOrFail({ id: saved.id })).email).toBe('alice@acme.example');
    const kmsCalls = clouds.kms.callLog;
    expect(kmsCalls.length).toBeGreaterThan(0);
    for (const call of kmsCalls) {
      expect(call.principal).toBe(roleSession(a));
      expect(call.keyId).toBe(a.keyArn);
      if (call.operation !== 'DescribeKey') expect(call.encryptionContext?.[TENANT_CONTEXT]).toBe('acme');
    }
    expect((await db.encryption.tenants.status('acme')).activeKeyReference).toBe(a.keyArn);
  });

  it.each([['a wrong External ID', { externalId: 'not-the-tenant-external-id' }]])(
    'with %s, the round trip fails with a typed error naming the tenant, and nothing is recorded',
    async (_name, extra) => {
      const tenantId = `bad-ext-${accountSeq + 1}`;
      const a = await account(tenantId);
      clouds.sts.resetCalls();
      clouds.kms.resetCalls();
      const error = await rejection(addRoleKey(a, extra));
      expect(error).toBeInstanceOf(KeyAccessDeniedError);
      expect(error).toMatchObject({ tenant: tenantId, keyId: a.keyArn });
      expect(error.message).toContain(tenantId);
      expect(error.message).toContain(a.roleArn);
      expect(error.message).toContain('AccessDenied');
      expect(error.message).not.toContain(a.externalId);
      expectNoneOf(clouds.secrets(), error, inspect(error));
      expect(clouds.sts.callLog.length).toBeGreaterThan(0);
      expect(clouds.sts.callLog.every((c) => c.error === 'AccessDenied')).toBe(true);
      expect(clouds.kms.callLog).toEqual([]); // never reached the key
      /* Nothing recorded: no key, the tenant still on the application key, its writes under it. */
      expect(await keysRecorded(tenantId)).toBe(0);
      const status = await db.encryption.tenants.status(tenantId);
      expect(status).toMatchObject({ activeVersion: null, keys: [] });
      expect(await storedVersion((await saveContact(tenantId, 'x')).id)).toBe(1);
      /* …but the refusal is in the audit log, naming the key, never a secret. */
      const entries = await audit(tenantId);
      const failed = entries.find((e) => e.event === 'tenant-key-validation-failed');
      expect(failed).toBeDefined();
      expect(JSON.stringify(failed)).toContain(a.keyArn);
      expectNoneOf([...clouds.secrets(), a.externalId], JSON.stringify(entries));
    },
  );

  it('an empty External ID is refused before any call (it would send none)', async () => {
    const tenantId = `empty-ext-${accountSeq + 1}`;
    const a = await account(tenantId);
    clouds.sts.resetCalls();
    clouds.kms.resetCalls();
    const error = await rejection(addRoleKey(a, { externalId: '' }));
    expect(error).toBeInstanceOf(ConfigError);
    expect(error).toMatchObject({ tenant: tenantId });
    expect(clouds.sts.callLog).toEqual([]);
    expect(clouds.kms.callLog).toEqual([]);
    expect(await keysRecorded(tenantId)).toBe(0);
  });

  it('the key of another tenant’s customer, given for this tenant, is refused before its role or key is used', async () => {
    const victim = await account('victim-co');
    await addRoleKey(victim);
    clouds.sts.resetCalls();
    clouds.kms.resetCalls();
    const error = await rejection(
      db.encryption.tenants.addKey('mallory-co', {
        kind: 'aws-kms',
        keyId: victim.keyArn,
        roleArn: victim.roleArn,
      }),
    );
    expect(error).toBeInstanceOf(ConfigError);
    expect(error.message).toContain('already registered for another tenant');
    expect(error).toMatchObject({ tenant: 'mallory-co', keyId: victim.keyArn });
    expect(clouds.sts.callLog).toEqual([]);
    expect(clouds.kms.callLog).toEqual([]);
    expect(await keysRecorded('mallory-co')).toBe(0);
  });

  it('another tenant’s key, role and External ID given outright are refused: as a key already registered, else by the key’s tenant condition', async () => {
    const mallory = (victim: CustomerAccount) =>
      rejection(
        db.encryption.tenants.addKey('mallory-two', {
          kind: 'aws-kms',
          keyId: victim.keyArn,
          roleArn: victim.roleArn,
          externalId: victim.externalId,
        }),
      );
    /* A key registered for another tenant is refused before its role or key is used. */
    const open = await account('victim-three');
    clouds.kms.putKeyPolicy(open.keyArn, open.policy({ requireTenant: null }));
    await addRoleKey(open);
    clouds.sts.resetCalls();
    clouds.kms.resetCalls();
    const refusedByRegistry = await mallory(open);
    expect(refusedByRegistry).toMatchObject({
      name: 'ConfigError',
      tenant: 'mallory-two',
      keyId: open.keyArn,
    });
    expect(refusedByRegistry.message).toContain('another tenant');
    expect(clouds.sts.callLog).toEqual([]);
    expect(clouds.kms.callLog).toEqual([]);
    /* A key not registered yet, whose policy allows data keys of its own tenant only: KMS refuses the round trip. */
    const guarded = await account('victim-two');
    const refusedByKms = await mallory(guarded);
    expect(refusedByKms).toBeInstanceOf(KeyAccessDeniedError);
    expect(refusedByKms).toMatchObject({ tenant: 'mallory-two', keyId: guarded.keyArn });
    expect(await keysRecorded('mallory-two')).toBe(0);
  });

  it('without a role, the application’s own credentials are refused by the customer’s key', async () => {
    const a = await account('no-role-co');
    clouds.kms.resetCalls();
    clouds.sts.resetCalls();
    const error = await rejection(
      db.encryption.tenants.addKey('no-role-co', { kind: 'aws-kms', keyId: a.keyArn }),
    );
    expect(error).toBeInstanceOf(KeyAccessDeniedError);
    expect(error).toMatchObject({ tenant: 'no-role-co', keyId: a.keyArn });
    expect(error.message).toContain('AccessDeniedException');
    expect(clouds.sts.calls.AssumeRole).toBe(0);
    expect(clouds.kms.callLog.length).toBeGreaterThan(0);
    expect(
      clouds.kms.callLog.every((c) => c.principal === `arn:aws:iam::${VENDOR_ACCOUNT}:user/saas-app`),
    ).toBe(true);
    expect(await keysRecorded('no-role-co')).toBe(0);
    expectNoneOf(clouds.secrets(), error, inspect(error));
  });
});

describe('temporary credentials', () => {
  it('are refreshed before they expire, and every KMS call keeps succeeding', async () => {
    /* A whole second, as STS gives expirations to the second: every margin below is then exact. */
    vi.useFakeTimers({ toFake: ['Date'], now: Math.floor(Date.now() / 1000) * 1000 });
    const a = await account('short-sessions');
    clouds.sts.defineRole({
      roleArn: a.roleArn,
      trust: { principals: [VENDOR_ACCOUNT], externalId: a.externalId },
      sessionDurationSeconds: 900,
    });
    await addRoleKey(a);
    const ids: number[] = [];
    ids.push((await saveContact('short-sessions', 't0')).id);
    clouds.sts.resetCalls();
    clouds.kms.resetCalls();

    vi.setSystemTime(Date.now() + 5 * MINUTE); // 10 minutes left: the session is still used
    ids.push((await saveContact('short-sessions', 't5')).id);
    expect(clouds.sts.calls.AssumeRole).toBe(0);

    vi.setSystemTime(Date.now() + 6 * MINUTE); // 4 minutes left: inside the SDK's refresh window
    ids.push((await saveContact('short-sessions', 't11')).id);
    expect(clouds.sts.calls.AssumeRole).toBe(1);

    // The first session has expired; the second has 3 minutes left, inside the refresh window.
    // (At exactly 5 minutes left the SDK, which refreshes below 5, would keep it.)
    vi.setSystemTime(Date.now() + 12 * MINUTE);
    db.encryption.cache.purge(); // data keys only: the provider and its credentials stay
    const read = await contacts().findBy({ workspaceId: 'short-sessions' });
    expect(read.map((c) => c.email).sort()).toEqual(
      ['t0', 't11', 't5'].map((t) => `${t}@short-sessions.example`).sort(),
    );
    expect(clouds.sts.calls.AssumeRole).toBe(2);
    const issued = clouds.sts.issuedAccessKeyIds();
    expect(new Set(issued.slice(-3)).size).toBe(3);
    /* The emulator refuses expired sessions: every call made was signed by a live one. */
    expect(clouds.kms.callLog.length).toBeGreaterThan(0);
    for (const call of clouds.kms.callLog) expect(call.principal).toBe(roleSession(a));
    for (const id of ids) expect(await storedVersion(id)).toBeGreaterThanOrEqual(1_000_000);
  });
});

describe('revoking the role’s permission in the key policy', () => {
  async function revokedErrors(
    tenantId: string,
    revoke: (a: CustomerAccount) => void,
    restore: (a: CustomerAccount) => void,
  ) {
    const a = await account(tenantId);
    const added = await addRoleKey(a);
    const saved = await saveContact(tenantId, 'kept');
    db.encryption.purgeCache(tenantId);
    expect((await contacts().findOneByOrFail({ id: saved.id })).email).toBe(`kept@${tenantId}.example`);
    revoke(a);
    /* Until purged, the unwrapped data key cached here still reads (as with a disabled key). */
    expect((await contacts().findOneByOrFail({ id: saved.id })).email).toBe(`kept@${tenantId}.example`);
    db.encryption.purgeCache(tenantId);
    const read = await rejection(contacts().findOneByOrFail({ id: saved.id }));
    const count = async () =>
      (
        await sql<{ n: number }>(
          `SELECT count(*)::int AS n FROM ${table('tenant_contacts')} WHERE "workspaceId" = $1`,
          [tenantId],
        )
      )[0]?.n;
    const before = await count();
    const write = await rejection(saveContact(tenantId, 'refused'));
    expect(await count()).toBe(before);
    const validate = await rejection(db.encryption.tenants.validate(tenantId));
    restore(a);
    db.encryption.purgeCache(tenantId);
    expect((await contacts().findOneByOrFail({ id: saved.id })).email).toBe(`kept@${tenantId}.example`);
    for (const error of [read, write, validate]) {
      expect(error).toBeInstanceOf(KeyAccessDeniedError);
      expect(error).toMatchObject({ tenant: tenantId, keyId: a.keyArn });
      expectNoneOf([...clouds.secrets(), `kept@${tenantId}.example`], error, inspect(error));
    }
    expect(read).toMatchObject({ entity: 'TenantContact', column: 'email', keyVersion: added.version });
    return { read, write, validate };
  }

  it('has the same effect as disabling the key (after purgeCache(tenant)): the same typed errors, naming the tenant and the key', async () => {
    const disabled = await revokedErrors(
      'disabled-co',
      (a) => clouds.kms.disableKey(a.keyArn),
      (a) => clouds.kms.enableKey(a.keyArn),
    );
    const revoked = await revokedErrors(
      'revoked-co',
      (a) => clouds.kms.putKeyPolicy(a.keyArn, a.policy({ roleActions: [] })),
      (a) => clouds.kms.putKeyPolicy(a.keyArn, a.policy()),
    );
    const shape = (e: Error) => {
      const {
        tenant: _t,
        keyId: _k,
        primaryKey: _p,
        keyVersion: _v,
        ...rest
      } = (e as KeyAccessDeniedError).context;
      return { name: e.name, ...rest };
    };
    for (const step of ['read', 'write', 'validate'] as const) {
      expect(shape(revoked[step])).toEqual(shape(disabled[step]));
    }
    expect(disabled.read.message).toContain('disabled');
    expect(revoked.read.message).toContain('AccessDeniedException');
  });

  it('a policy whose tenant condition names another tenant refuses this tenant’s data keys', async () => {
    const a = await account('conditioned-co');
    await addRoleKey(a);
    const saved = await saveContact('conditioned-co', 'c');
    clouds.kms.putKeyPolicy(a.keyArn, a.policy({ requireTenant: 'someone-else' }));
    try {
      db.encryption.purgeCache('conditioned-co');
      const error = await rejection(contacts().findOneByOrFail({ id: saved.id }));
      expect(error).toBeInstanceOf(KeyAccessDeniedError);
      expect(error).toMatchObject({ tenant: 'conditioned-co', keyId: a.keyArn });
      expect(clouds.kms.callLog.at(-1)).toMatchObject({
        operation: 'Decrypt',
        encryptionContext: expect.objectContaining({ [TENANT_CONTEXT]: 'conditioned-co' }),
      });
    } finally {
      clouds.kms.putKeyPolicy(a.keyArn, a.policy());
    }
  });
});

describe('a tenant moving to another of its keys', () => {
  it('in the same account: re-wrapped with ReEncrypt under the tenant condition, ciphertext untouched', async () => {
    const a = await account('rotating-co');
    const first = await addRoleKey(a);
    const saved = await saveContact('rotating-co', 'r');
    const second = clouds.kms.createKey({
      accountId: a.account,
      description: 'second key',
      policy: a.policy({ roleActions: [...ROLE_ACTIONS, 'kms:ReEncryptFrom', 'kms:ReEncryptTo'] }),
    });
    clouds.kms.putKeyPolicy(a.keyArn, a.policy({ roleActions: [...ROLE_ACTIONS, 'kms:ReEncryptFrom'] }));
    const next = await db.encryption.tenants.addKey('rotating-co', {
      kind: 'aws-kms',
      keyId: second.Arn,
      roleArn: a.roleArn,
    });
    const [before] = await sql<{ email_ciphertext: Buffer }>(
      `SELECT email_ciphertext FROM ${table('tenant_contacts')} WHERE id = $1`,
      [saved.id],
    );
    clouds.kms.resetCalls();
    const job = await db.encryption.tenants.runJob('rotating-co');
    expect(job).toMatchObject({ state: 'completed', error: null });
    expect(await storedVersion(saved.id)).toBe(next.version);
    expect(next.version).not.toBe(first.version);
    const [after] = await sql<{ email_ciphertext: Buffer; email_wrapped_key: Buffer }>(
      `SELECT email_ciphertext, email_wrapped_key FROM ${table('tenant_contacts')} WHERE id = $1`,
      [saved.id],
    );
    expect(after?.email_ciphertext).toEqual(before?.email_ciphertext);
    expect(after?.email_wrapped_key.includes(Buffer.from(second.KeyId, 'ascii'))).toBe(true);
    expect(clouds.kms.calls.ReEncrypt).toBeGreaterThan(0);
    db.encryption.purgeCache('rotating-co');
    expect((await contacts().findOneByOrFail({ id: saved.id })).email).toBe('r@rotating-co.example');
  });

  it('ReEncrypt is checked against the source context for ReEncryptFrom and the destination context for ReEncryptTo', async () => {
    const a = await account('reencrypt-co');
    const actions = [...ROLE_ACTIONS, 'kms:ReEncryptFrom', 'kms:ReEncryptTo'];
    clouds.kms.putKeyPolicy(a.keyArn, a.policy({ roleActions: actions }));
    const second = clouds.kms.createKey({ accountId: a.account, policy: a.policy({ roleActions: actions }) });
    const provider = new AwsKmsKeyProvider({
      ...clouds.awsKms(),
      keyId: a.keyArn,
      roleArn: a.roleArn,
      externalId: a.externalId,
    });
    try {
      const own = db.encryption.tenantKeyrings.contextOf('reencrypt-co');
      const other = db.encryption.tenantKeyrings.contextOf('another-co');
      const { wrappedKey } = await provider.generateDataKey(own);
      const reEncrypt = (source: object, destination: object) =>
        (provider.client as unknown as KMSClient).send(
          new ReEncryptCommand({
            CiphertextBlob: wrappedKey,
            SourceKeyId: a.keyArn,
            SourceEncryptionContext: { ...source },
            DestinationKeyId: second.Arn,
            DestinationEncryptionContext: { ...destination },
          }),
        );
      expect((await reEncrypt(own, own)).KeyId).toBe(second.Arn);
      for (const [source, destination, action] of [
        [own, other, 'kms:ReEncryptTo'],
        [other, own, 'kms:ReEncryptFrom'],
      ] as const) {
        const error = await rejection(reEncrypt(source, destination));
        expect(error.name).toBe('AccessDeniedException');
        expect(error.message).toContain(action);
      }
    } finally {
      provider.destroy();
    }
  });

  it('in another of its accounts, through another role: the job completes and the rows read', async () => {
    const tenantId = 'moving-co';
    const a = await account(tenantId);
    await addRoleKey(a);
    const saved = await saveContact(tenantId, 'm');
    const b = await account(tenantId); // a second account of the same customer, with its own role
    expect(b.roleArn).toBe(a.roleArn.replace(a.account, b.account));
    const next = await addRoleKey(b);
    clouds.kms.resetCalls();
    const job = await db.encryption.tenants.runJob(tenantId);
    expect(job).toMatchObject({ state: 'completed', error: null });
    /* No ReEncrypt (neither role may use both keys): each key is used as its own account's role. */
    expect(clouds.kms.calls.ReEncrypt).toBe(0);
    const unwrapped = clouds.kms.callLog.filter((c) => c.operation === 'Decrypt' && c.keyId === a.keyArn);
    const wrapped = clouds.kms.callLog.filter((c) => c.operation === 'Encrypt' && c.keyId === b.keyArn);
    expect(unwrapped.length).toBeGreaterThan(0);
    expect(wrapped.length).toBeGreaterThan(0);
    for (const call of unwrapped) expect(call.principal).toBe(roleSession(a));
    for (const call of wrapped) expect(call.principal).toBe(roleSession(b));
    expect(await storedVersion(saved.id)).toBe(next.version);
    db.encryption.purgeCache(tenantId);
    expect((await contacts().findOneByOrFail({ id: saved.id })).email).toBe(`m@${tenantId}.example`);
  });
});
