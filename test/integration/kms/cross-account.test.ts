import { randomUUID } from 'node:crypto';
import { inspect } from 'node:util';
import { ConfiguredRetryStrategy } from '@smithy/core/retry';
import 'reflect-metadata';
import { DataSource } from 'typeorm';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest';
import {
  AwsKmsKeyProvider,
  type AwsKmsKeyProviderOptions,
  EnvelopeEncryption,
  KeyAccessDeniedError,
  KeyProviderError,
} from '../../../src';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';
import { Customer, Order } from '../../support/entities';
import { type KeyPolicyStatement, type KmsEmulator, startKmsEmulator } from '../../support/kms-emulator';
import { type EmulatedUserCredentials, type StsEmulator, startStsEmulator } from '../../support/sts-emulator';

/** The customer owns the key and the role; the vendor runs the application. */
const CUSTOMER = '111122223333';
const VENDOR = '444455556666';
const ROLE = `arn:aws:iam::${CUSTOMER}:role/app-data-encryption`;
const CONTEXT = Object.freeze({ 'typeorm-envelope:keyring': 'default' });
const MINUTE = 60_000;
const ROLE_ACTIONS = ['kms:DescribeKey', 'kms:GenerateDataKey', 'kms:Decrypt', 'kms:Encrypt'];
const fastRetries = () => new ConfiguredRetryStrategy(3, () => 5);

let sts: StsEmulator;
let kms: KmsEmulator;
let app: EmulatedUserCredentials;
let externalId: string;
let keyArn: string;
let keyUuid: string;
let schema: TestSchema;
let dataSource: DataSource;
let encryption: EnvelopeEncryption;
const providers: AwsKmsKeyProvider[] = [];

/**
 * The customer's key policy: a key-admin role administers the key, the application's role may use
 * it. (Naming the account root instead would delegate to IAM, letting any principal of the account
 * through: the emulator treats it so.)
 */
const policy = (roleActions = ROLE_ACTIONS): KeyPolicyStatement[] => [
  { principals: [`arn:aws:iam::${CUSTOMER}:role/key-admin`], actions: ['kms:*'] },
  ...(roleActions.length ? [{ principals: [ROLE], actions: roleActions }] : []),
];

/** A provider as a SaaS builds one from a tenant's key record: key ARN, role, external id. */
function crossAccount(options: Partial<AwsKmsKeyProviderOptions> = {}): AwsKmsKeyProvider {
  const provider = new AwsKmsKeyProvider({
    keyId: keyArn,
    roleArn: ROLE,
    externalId,
    stsEndpoint: sts.endpoint,
    clientConfig: {
      endpoint: kms.endpoint,
      region: kms.region,
      credentials: app,
      retryStrategy: fastRetries(),
    },
    ...options,
  });
  providers.push(provider);
  return provider;
}

async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (error) {
    return error as Error;
  }
  throw new Error('expected the call to fail');
}

/** Everything secret the emulators handed out: the application's secret key, every session's secret and token. */
const secrets = () => [app.secretAccessKey, ...sts.issuedSecrets()];

function expectNoSecrets(...outputs: unknown[]): void {
  const texts = outputs.map((o) =>
    typeof o === 'string' ? o : `${inspect(o, { depth: 20, showHidden: true })}\n${JSON.stringify(o)}`,
  );
  for (const secret of secrets()) for (const text of texts) expect(text).not.toContain(secret);
}

beforeAll(async () => {
  sts = await startStsEmulator();
  kms = await startKmsEmulator({ accountId: VENDOR, principalOf: (id) => sts.principalOf(id) });
  app = sts.createUser(VENDOR, 'app');
  externalId = `tenant-${randomUUID()}`;
  sts.defineRole({ roleArn: ROLE, trust: { principals: [VENDOR], externalId } });
  const key = kms.createKey({ accountId: CUSTOMER, description: 'customer key', policy: policy() });
  keyArn = key.Arn;
  keyUuid = key.KeyId;

  schema = await createTestSchema('xacct');
  encryption = new EnvelopeEncryption({
    keys: [{ version: 1, provider: crossAccount() }],
    activeVersion: 1,
    cache: { dataKeyMaxAge: 30 * MINUTE, unwrappedKeyTtl: 30 * MINUTE, refreshAhead: 0 },
  });
  dataSource = new DataSource({
    type: 'postgres',
    url: schema.url,
    schema: schema.schema,
    entities: [Customer, Order],
    synchronize: true,
  });
  encryption.attach(dataSource);
  await dataSource.initialize();
});
afterAll(async () => {
  await dataSource?.destroy();
  await schema?.drop();
  for (const provider of providers) provider.destroy();
  await kms?.close();
  await sts?.close();
});
beforeEach(() => {
  kms.putKeyPolicy(keyArn, policy());
  sts.setTrustPolicy(ROLE, { principals: [VENDOR], externalId });
  kms.resetCalls();
  sts.resetCalls();
});
afterEach(() => {
  vi.useRealTimers();
});

const customers = () => dataSource.getRepository(Customer);
const newCustomer = (tag: string) =>
  customers().create({
    email: `${tag}@tenant.example`,
    address: { street: `1 ${tag} St`, city: 'Xacct' },
    plan: 'cross-account',
    contact: { phone: '+1 555 0199', preferredChannel: null },
  });
const storedRow = async (id: number) =>
  (
    await rawQuery<Record<string, unknown>>(
      schema.url,
      `SELECT * FROM "${schema.schema}".customer WHERE id = $1`,
      [id],
    )
  )[0] as Record<string, unknown>;
const rowCount = async () =>
  Number(
    (await rawQuery<{ n: string }>(schema.url, `SELECT count(*) AS n FROM "${schema.schema}".customer`))[0]
      ?.n,
  );

describe('cross-account KMS through STS AssumeRole', () => {
  it("the application's own credentials are refused by the customer's key", async () => {
    const own = new AwsKmsKeyProvider({
      keyId: keyArn,
      clientConfig: { endpoint: kms.endpoint, region: kms.region, credentials: app, maxAttempts: 1 },
    });
    providers.push(own);
    const error = await rejection(own.generateDataKey(CONTEXT));
    expect(error).toBeInstanceOf(KeyAccessDeniedError);
    expect(error).toMatchObject({ keyId: keyArn });
    expect(error.message).toContain('AccessDeniedException');
    expect(kms.callLog).toEqual([
      expect.objectContaining({ operation: 'GenerateDataKey', principal: `arn:aws:iam::${VENDOR}:user/app` }),
    ]);
    expect(sts.calls.AssumeRole).toBe(0);
    expectNoSecrets(error, own, error.message);
  });

  it('the assumed role with the right external id saves and reads back; the database holds only ciphertext', async () => {
    const saved = await customers().save(newCustomer('alice'));
    const row = await storedRow(saved.id);
    const bytes = Object.values(row).filter(Buffer.isBuffer) as Buffer[];
    expect(bytes.length).toBeGreaterThan(0);
    for (const value of bytes) expect(value.toString('latin1')).not.toContain('alice');
    /* The wrapped data key is a blob of the customer's key (the emulator's blob names its key). */
    expect(bytes.some((b) => b.includes(Buffer.from(keyUuid, 'ascii')))).toBe(true);

    encryption.purgeCache();
    const loaded = await customers().findOneByOrFail({ id: saved.id });
    expect(loaded.email).toBe('alice@tenant.example');
    expect(loaded.address).toEqual({ street: '1 alice St', city: 'Xacct' });

    const roleSession = `arn:aws:sts::${CUSTOMER}:assumed-role/app-data-encryption/typeorm-envelope`;
    expect(kms.callLog.length).toBeGreaterThan(0);
    expect(kms.callLog.every((c) => c.principal === roleSession && c.keyId === keyArn)).toBe(true);
    expect(sts.callLog.every((c) => c.accessKeyId === app.accessKeyId && c.externalId === externalId)).toBe(
      true,
    );
  });

  it('a wrong or missing external id is refused by STS: a typed error naming the key and the role', async () => {
    for (const options of [{ externalId: 'not-the-tenant-id' }, { externalId: undefined }]) {
      sts.resetCalls();
      const provider = crossAccount({ ...options });
      const error = await rejection(provider.generateDataKey(CONTEXT));
      expect(error).toBeInstanceOf(KeyAccessDeniedError);
      expect(error).toMatchObject({ keyId: keyArn });
      expect(error.message).toContain(ROLE);
      expect(error.message).toContain('AccessDenied');
      expect(error.message).not.toContain(externalId);
      expect(sts.calls.AssumeRole).toBeGreaterThan(0);
      expect(sts.callLog.every((c) => c.error === 'AccessDenied')).toBe(true);
      expectNoSecrets(error, provider, error.message);
    }
    expect(kms.callLog).toEqual([]);
  });

  it('a trust policy without the vendor account: the same typed error, and nothing stored', async () => {
    sts.setTrustPolicy(ROLE, { principals: ['999988887777'], externalId });
    const provider = crossAccount();
    const error = await rejection(provider.generateDataKey(CONTEXT));
    expect(error).toBeInstanceOf(KeyAccessDeniedError);
    expect(error.message).toContain(ROLE);
  });

  it('credentials are refreshed before they expire, and calls keep succeeding', async () => {
    /* A whole second, as STS gives expirations to the second: every margin below is then exact. */
    vi.useFakeTimers({ toFake: ['Date'], now: Math.floor(Date.now() / 1000) * 1000 });
    sts.defineRole({
      roleArn: ROLE,
      trust: { principals: [VENDOR], externalId },
      sessionDurationSeconds: 900,
    });
    try {
      const provider = crossAccount();
      const first = await provider.generateDataKey(CONTEXT);
      expect(sts.calls.AssumeRole).toBe(1);
      const firstKey = kms.callLog.at(-1)?.principal;

      vi.setSystemTime(Date.now() + 5 * MINUTE); // 10 minutes left: still used
      await provider.unwrapDataKey(first.wrappedKey, CONTEXT);
      expect(sts.calls.AssumeRole).toBe(1);

      vi.setSystemTime(Date.now() + 6 * MINUTE); // 4 minutes left: inside the SDK's refresh window
      const second = await provider.generateDataKey(CONTEXT);
      expect(sts.calls.AssumeRole).toBe(2);

      // The first session has expired; the second has 3 minutes left, inside the refresh window.
      // (At exactly 5 minutes left the SDK, which refreshes below 5, would keep it.)
      vi.setSystemTime(Date.now() + 12 * MINUTE);
      expect((await provider.unwrapDataKey(first.wrappedKey, CONTEXT)).equals(first.plaintextKey)).toBe(true);
      expect((await provider.unwrapDataKey(second.wrappedKey, CONTEXT)).equals(second.plaintextKey)).toBe(
        true,
      );
      expect(sts.calls.AssumeRole).toBe(3);

      const issued = sts.issuedAccessKeyIds();
      expect(new Set(issued.slice(-3)).size).toBe(3);
      expect(firstKey).toContain('assumed-role/app-data-encryption');
      /* Every KMS call was signed with a session that had not expired (the emulator refuses those). */
      expect(kms.callLog.every((c) => c.principal?.startsWith(`arn:aws:sts::${CUSTOMER}:`))).toBe(true);
    } finally {
      sts.defineRole({ roleArn: ROLE, trust: { principals: [VENDOR], externalId } });
    }
  });

  it('removing the role from the key policy acts like disabling the key: cached keys until purge, then KeyAccessDeniedError', async () => {
    const saved = await customers().save(newCustomer('bob'));
    encryption.purgeCache();
    expect((await customers().findOneByOrFail({ id: saved.id })).email).toBe('bob@tenant.example');

    kms.putKeyPolicy(keyArn, policy([]));
    expect((await customers().findOneByOrFail({ id: saved.id })).email).toBe('bob@tenant.example');

    encryption.purgeCache();
    const error = await rejection(customers().findOneByOrFail({ id: saved.id }));
    expect(error).toBeInstanceOf(KeyAccessDeniedError);
    expect(error).toMatchObject({ keyId: keyArn, entity: 'Customer', keyVersion: 1 });
    expect(error.message).toContain('AccessDeniedException');
    expect(error.message).not.toContain('bob');
    expectNoSecrets(error, error.message, encryption);

    const before = await rowCount();
    const writeError = await rejection(customers().save(newCustomer('carol')));
    expect(writeError).toBeInstanceOf(KeyAccessDeniedError);
    expect(await rowCount()).toBe(before);

    /* The customer restores the grant: the same rows read again. */
    kms.putKeyPolicy(keyArn, policy());
    expect((await customers().findOneByOrFail({ id: saved.id })).email).toBe('bob@tenant.example');
  });

  it('the provider prints no credentials: inspect and JSON name only the key', async () => {
    const provider = crossAccount();
    await provider.generateDataKey(CONTEXT);
    expect(inspect(provider)).toBe(`AwsKmsKeyProvider { kind: 'aws-kms', keyId: '${keyArn}' }`);
    expect(JSON.parse(JSON.stringify(provider))).toEqual({ kind: 'aws-kms', keyId: keyArn });
    expectNoSecrets(provider);
  });

  it('stsEndpoint needs roleArn', () => {
    expect(
      () => new AwsKmsKeyProvider({ keyId: keyArn, region: kms.region, stsEndpoint: sts.endpoint }),
    ).toThrow('stsEndpoint needs roleArn');
  });

  it('an STS outage is a KeyProviderError (not access denied), naming the role', async () => {
    sts.failAll('ServiceUnavailable');
    try {
      const error = await rejection(crossAccount().generateDataKey(CONTEXT));
      expect(error).toBeInstanceOf(KeyProviderError);
      expect(error).not.toBeInstanceOf(KeyAccessDeniedError);
      expect(error.message).toContain(ROLE);
      expect(error).toMatchObject({ keyId: keyArn });
    } finally {
      sts.failAll(null);
    }
  });
});
