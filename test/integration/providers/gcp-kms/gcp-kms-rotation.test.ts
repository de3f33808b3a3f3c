import 'reflect-metadata';
import { KeyManagementServiceClient } from '@google-cloud/kms';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  AwsKmsKeyProvider,
  ConfigError,
  EnvelopeEncryption,
  GcpKmsKeyProvider,
  KeyAccessDeniedError,
  KeyRegistry,
  type KeyringEntry,
  TypeormEnvelopeKeyRegistry1764300000000,
} from '../../../../src';
import { rewrapDataKeys } from '../../../../src/rotation/rewrap';
import { verifyEncryptedColumns } from '../../../../src/rotation/verify';
import { createTestSchema, rawQuery, type TestSchema } from '../../../support/database';
import { Customer, Order } from '../../../support/entities';
import { ADMIN_MEMBER, type GcpKmsEmulator, startGcpKmsEmulator } from '../../../support/gcp-kms-emulator';
import { type KmsEmulator, startKmsEmulator } from '../../../support/kms-emulator';

/**
 * Rotation through rewrapDataKeys with a Cloud KMS key: onto the key's new primary version (the
 * customer's own rotation in Cloud KMS), and from an AWS KMS key to a Cloud KMS key. Data columns
 * stay byte for byte the same; only wrapped keys and versions change.
 */
let gcp: GcpKmsEmulator;
let aws: KmsEmulator;
const opened: Array<{ dataSource: DataSource; schema?: TestSchema }> = [];

beforeAll(async () => {
  gcp = await startGcpKmsEmulator();
  aws = await startKmsEmulator();
});
afterAll(async () => {
  for (const { dataSource, schema } of opened.reverse()) {
    if (dataSource.isInitialized) await dataSource.destroy();
    await schema?.drop();
  }
  await gcp?.close();
  await aws?.close();
});

const gcpKey = (keyName: string) =>
  new GcpKmsKeyProvider({ keyName, ...gcp.connection(), retryDelay: 2, maxRetryDelay: 5 });

/** An instance of the application: its keyring, a DataSource on `schema` (made when not given). */
async function instance(
  keys: KeyringEntry[],
  options: { schema?: TestSchema; registry?: boolean; activeVersion?: number } = {},
) {
  const schema = options.schema ?? (await createTestSchema('gcp_rotation'));
  const encryption = new EnvelopeEncryption({
    keys,
    activeVersion: options.activeVersion ?? 1,
    cache: { dataKeyMaxUses: 10 },
  });
  const dataSource = new DataSource({
    type: 'postgres',
    url: schema.url,
    schema: schema.schema,
    entities: [Customer, Order],
    synchronize: true,
    migrations: options.registry ? [TypeormEnvelopeKeyRegistry1764300000000] : [],
    migrationsRun: options.registry ?? false,
  });
  encryption.attach(dataSource);
  opened.push({ dataSource, ...(options.schema ? {} : { schema }) });
  await dataSource.initialize();
  return { schema, encryption, dataSource, repo: dataSource.getRepository(Customer) };
}

type Row = {
  id: number;
  email_ciphertext: Buffer;
  email_iv: Buffer;
  email_wrapped_key: Buffer;
  email_key_version: number;
  address_ciphertext: Buffer | null;
};
const rows = (schema: TestSchema) =>
  rawQuery<Row>(
    schema.url,
    `SELECT id, email_ciphertext, email_iv, email_wrapped_key, email_key_version, address_ciphertext
       FROM "${schema.schema}".customer ORDER BY id`,
  );
const versionsOf = (stored: Row[]) =>
  new Set(stored.map((r) => GcpKmsKeyProvider.keyVersionOf(r.email_wrapped_key)));

/** Data untouched, data keys moved: the assertion every rotation here ends with. */
function expectOnlyWrappedKeysChanged(before: Row[], after: Row[], toVersion: number) {
  expect(after.map((r) => r.id)).toEqual(before.map((r) => r.id));
  for (const [i, row] of before.entries()) {
    const now = after[i] as Row;
    expect(now.email_ciphertext.equals(row.email_ciphertext)).toBe(true);
    expect(now.email_iv.equals(row.email_iv)).toBe(true);
    if (row.address_ciphertext === null) expect(now.address_ciphertext).toBeNull();
    else expect(now.address_ciphertext?.equals(row.address_ciphertext)).toBe(true);
    expect(now.email_wrapped_key.equals(row.email_wrapped_key)).toBe(false);
    expect(now.email_key_version).toBe(toVersion);
  }
}

const save = (repo: ReturnType<DataSource['getRepository']>, tag: string, n: number) =>
  repo.save(
    Array.from({ length: n }, (_, i) =>
      repo.create({
        email: `${tag}${i}@example.com`,
        plan: tag,
        address: i % 2 ? { street: `${i}`, city: 'R' } : null,
      }),
    ),
  );

describe('rotation to the key’s new primary version (Cloud KMS rotation, one keyring version per key version)', () => {
  it('moves every data key onto version 2 with data untouched; version 1 can then be disabled', async () => {
    const key = gcp.createKey({ id: 'rotated' });
    const v1 = `${key.name}/cryptoKeyVersions/1`;
    const v2 = `${key.name}/cryptoKeyVersions/2`;
    const first = await instance([{ version: 1, provider: gcpKey(v1) }], { registry: true });
    await save(first.repo, 'r', 30);

    // The customer rotates the key in Cloud KMS: a new version, made primary.
    const admin = new KeyManagementServiceClient({ fallback: 'rest', ...gcp.connection(ADMIN_MEMBER) });
    await admin.createCryptoKeyVersion({ parent: key.name, cryptoKeyVersion: {} });
    await admin.updateCryptoKeyPrimaryVersion({ name: key.name, cryptoKeyVersionId: '2' });

    // The release with keyring version 2 pinned to it is deployed, and version 2 activated.
    const next = await instance(
      [
        { version: 1, provider: gcpKey(v1) },
        { version: 2, provider: gcpKey(v2) },
      ],
      { schema: first.schema, registry: true },
    );
    await new KeyRegistry(next.dataSource, next.encryption).activate(2);
    const recorded = await rawQuery<{ version: number; key_reference: string; state: string }>(
      first.schema.url,
      `SELECT version, key_reference, state FROM "${first.schema.schema}".typeorm_envelope_key_versions ORDER BY version`,
    );
    expect(recorded).toEqual([
      { version: 1, key_reference: v1, state: 'decrypt-only' },
      { version: 2, key_reference: v2, state: 'active' },
    ]);
    await save(next.repo, 'n', 3); // new writes: wrapped by version 2 at once
    const before = (await rows(first.schema)).filter((r) => r.email_key_version === 1);
    expect(before).toHaveLength(30);
    expect(versionsOf(before)).toEqual(new Set([v1]));

    // Disabling version 1 now would lock the old rows out:
    gcp.setVersionState(v1, 'DISABLED');
    next.encryption.purgeCache();
    await expect(next.repo.findOneByOrFail({ id: before[0]?.id })).rejects.toBeInstanceOf(
      KeyAccessDeniedError,
    );
    gcp.setVersionState(v1, 'ENABLED');

    gcp.resetCalls();
    const result = await rewrapDataKeys(next.dataSource, next.encryption);
    expect(result.error).toBeUndefined();
    expect(result.properties.find((p) => p.property === 'email')).toMatchObject({
      rowsTotal: 30,
      rowsRewrapped: 30,
    });
    const distinct = new Set(before.map((r) => r.email_wrapped_key.toString('hex'))).size;
    expect(result.rewrapCalls).toBe(distinct);
    expect(
      gcp.callLog.filter((c) => c.operation === 'Encrypt').every((c) => c.name === v2 && c.version === v2),
    ).toBe(true);
    const after = (await rows(first.schema)).filter((r) => before.some((b) => b.id === r.id));
    expectOnlyWrappedKeysChanged(before, after, 2);
    expect(versionsOf(after)).toEqual(new Set([v2]));

    // The customer disables version 1 (through the API): everything still reads, through version 2.
    await admin.updateCryptoKeyVersion({
      cryptoKeyVersion: { name: v1, state: 'DISABLED' },
      updateMask: { paths: ['state'] },
    });
    next.encryption.purgeCache();
    const loaded = await next.repo.find({ order: { id: 'ASC' } });
    expect(loaded.map((c) => c.email)).toEqual([
      ...Array.from({ length: 30 }, (_, i) => `r${i}@example.com`),
      ...Array.from({ length: 3 }, (_, i) => `n${i}@example.com`),
    ]);
    expect(await verifyEncryptedColumns(next.dataSource, next.encryption)).toMatchObject({ failed: 0 });
    await admin.close();
  });

  it('an instance configured with another key version for a recorded version is refused at start-up', async () => {
    const key = gcp.createKey({ id: 'recorded', versions: 2 });
    const [v1, v2] = key.versions as [string, string];
    const first = await instance([{ version: 1, provider: gcpKey(v1) }], { registry: true });
    await new KeyRegistry(first.dataSource, first.encryption).sync();
    await save(first.repo, 'w', 2);
    const before = await rows(first.schema);
    // Version 1 of the keyring is recorded as key version 1; this instance says key version 2.
    const wrong = instance([{ version: 1, provider: gcpKey(v2) }], { schema: first.schema, registry: true });
    const error = await wrong.catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ConfigError);
    expect(String(error)).toContain(
      `the master key configured for version 1 (${v2}) is not the one the key registry recorded for that version (${v1})`,
    );
    expect(await rows(first.schema)).toEqual(before);
  });
});

describe('rotation with the crypto key as master key (Cloud KMS rotates its primary version)', () => {
  it('new data keys follow the new primary at once; a re-wrap onto a new keyring version retires the old one', async () => {
    const key = gcp.createKey({ id: 'auto-rotated' });
    const [v1] = key.versions as [string];
    const first = await instance([{ version: 1, provider: gcpKey(key.name) }]);
    await save(first.repo, 'a', 20);
    const v2 = gcp.rotate(key.name); // the key's rotation schedule made a new primary
    first.encryption.purgeCache(); // new data keys from here on
    await save(first.repo, 'b', 5);
    const mixed = await rows(first.schema);
    expect(mixed.slice(0, 20).every((r) => GcpKmsKeyProvider.keyVersionOf(r.email_wrapped_key) === v1)).toBe(
      true,
    );
    expect(mixed.slice(20).every((r) => GcpKmsKeyProvider.keyVersionOf(r.email_wrapped_key) === v2)).toBe(
      true,
    );
    first.encryption.purgeCache();
    expect(await first.repo.count()).toBe(25);
    expect((await first.repo.find()).every((c) => /^[ab]\d+@example\.com$/.test(c.email))).toBe(true);

    // To retire version 1, the data keys it wrapped move to a keyring version on the same key.
    const next = await instance(
      [
        { version: 1, provider: gcpKey(key.name) },
        { version: 2, provider: gcpKey(key.name) },
      ],
      { schema: first.schema },
    );
    await next.encryption.activate(2);
    const result = await rewrapDataKeys(next.dataSource, next.encryption);
    expect(result.error).toBeUndefined();
    const after = await rows(first.schema);
    expectOnlyWrappedKeysChanged(mixed, after, 2);
    expect(versionsOf(after)).toEqual(new Set([v2]));
    gcp.setVersionState(v1, 'DISABLED');
    next.encryption.purgeCache();
    expect((await next.repo.find()).map((c) => c.email).sort()).toEqual(
      [
        ...Array.from({ length: 20 }, (_, i) => `a${i}@example.com`),
        ...Array.from({ length: 5 }, (_, i) => `b${i}@example.com`),
      ].sort(),
    );
  });
});

describe('rotation from AWS KMS to Google Cloud KMS', () => {
  it('unwraps each data key with KMS Decrypt and wraps it with Cloud KMS Encrypt; data untouched; the AWS key can go', async () => {
    const awsKeyArn = aws.createKey({ description: 'leaving' }).Arn;
    const target = gcp.createKey({ id: 'arriving' });
    const fromAws = new AwsKmsKeyProvider({ keyId: awsKeyArn, clientConfig: aws.clientConfig() });
    const toGcp = gcpKey(target.name);
    const app = await instance([
      { version: 1, provider: fromAws },
      { version: 2, provider: toGcp },
    ]);
    await save(app.repo, 'x', 40);
    const before = await rows(app.schema);
    const distinct = new Set(before.map((r) => r.email_wrapped_key.toString('hex'))).size;
    expect(distinct).toBeGreaterThan(1);
    expect(
      before.every((r) => r.email_wrapped_key.includes(Buffer.from(awsKeyArn.split('/')[1] as string))),
    ).toBe(true);

    await app.encryption.activate(2);
    aws.resetCalls();
    gcp.resetCalls();
    const result = await rewrapDataKeys(app.dataSource, app.encryption);
    expect(result.error).toBeUndefined();
    expect(result.properties.find((p) => p.property === 'email')).toMatchObject({
      rowsTotal: 40,
      rowsRewrapped: 40,
    });
    expect(result.rewrapCalls).toBe(distinct);
    expect(aws.calls).toMatchObject({ Decrypt: distinct, ReEncrypt: 0, Encrypt: 0, GenerateDataKey: 0 });
    expect(gcp.calls.Encrypt).toBe(distinct);
    expect(gcp.calls.Decrypt).toBe(result.verificationCalls); // each new wrap checked before it is written
    expect(gcp.callLog.every((c) => c.aad === '[["typeorm-envelope:keyring","default"]]')).toBe(true);

    const after = await rows(app.schema);
    expectOnlyWrappedKeysChanged(before, after, 2);
    expect(versionsOf(after)).toEqual(new Set([target.primary]));
    expect(after.every((r) => r.email_wrapped_key.subarray(0, 2).equals(Buffer.from([0x47, 0x01])))).toBe(
      true,
    );

    aws.disableKey(awsKeyArn);
    app.encryption.purgeCache();
    aws.resetCalls();
    const loaded = await app.repo.find({ order: { id: 'ASC' } });
    expect(loaded.map((c) => c.email)).toEqual(Array.from({ length: 40 }, (_, i) => `x${i}@example.com`));
    expect(aws.callLog).toEqual([]);
    expect(await verifyEncryptedColumns(app.dataSource, app.encryption)).toMatchObject({ failed: 0 });
    fromAws.destroy();
  });
});
