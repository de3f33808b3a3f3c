import 'reflect-metadata';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  AwsKmsKeyProvider,
  ConfigError,
  EnvelopeEncryption,
  KeyAccessDeniedError,
  KeyRegistry,
  type KeyringEntry,
  rewrapDataKeys,
  TypeormEnvelopeKeyRegistry1764300000000,
  VaultTransitKeyProvider,
} from '../../../../src';
import { createTestSchema, rawQuery, type TestSchema } from '../../../support/database';
import { Customer, Order } from '../../../support/entities';
import { type KmsEmulator, startKmsEmulator } from '../../../support/kms-emulator';
import { startVaultEmulator, transitPolicy, type VaultEmulator } from '../../../support/vault-emulator';

/**
 * Rotation with Vault Transit: to the key's next version (`rotate`, then a re-wrap that uses
 * Transit's `rewrap`), and from Vault to AWS KMS, with the data untouched: ciphertext and IV byte
 * for byte the same, the wrapped keys and versions changed.
 */
let vault: VaultEmulator;
let kms: KmsEmulator;
const opened: Array<{ dataSource: DataSource; schema: TestSchema }> = [];
let keySeq = 0;

beforeAll(async () => {
  vault = await startVaultEmulator();
  kms = await startKmsEmulator();
});
afterAll(async () => {
  for (const { dataSource, schema } of opened) {
    if (dataSource.isInitialized) await dataSource.destroy();
    await schema.drop();
  }
  await vault?.close();
  await kms?.close();
});

/** A new Transit key with a token holding its least-privilege policy. */
function transitKey(): { name: string; token: string; policy: string } {
  const name = `rot-${++keySeq}`;
  vault.createKey(name);
  vault.setPolicy(`p-${name}`, transitPolicy(name));
  return { name, policy: `p-${name}`, token: vault.createToken({ policies: [`p-${name}`] }) };
}
const transit = (key: { name: string; token: string }) =>
  new VaultTransitKeyProvider({
    address: vault.address,
    keyName: key.name,
    auth: { token: key.token },
    retryDelay: 1,
  });

async function setUp(keys: KeyringEntry[], options: { schema?: TestSchema } = {}) {
  const schema = options.schema ?? (await createTestSchema('vault_rotation'));
  const encryption = new EnvelopeEncryption({ keys, activeVersion: 1, cache: { dataKeyMaxUses: 40 } });
  const dataSource = new DataSource({
    type: 'postgres',
    url: schema.url,
    schema: schema.schema,
    entities: [Customer, Order],
    synchronize: true,
    migrations: [TypeormEnvelopeKeyRegistry1764300000000],
    migrationsRun: true,
  });
  encryption.attach(dataSource);
  await dataSource.initialize();
  opened.push({ dataSource, schema });
  const repo = dataSource.getRepository(Customer);
  const table = `"${schema.schema}".customer`;
  const snapshot = () =>
    rawQuery<{
      id: number;
      email_ciphertext: Buffer;
      email_iv: Buffer;
      email_wrapped_key: Buffer;
      email_key_version: number;
      address_ciphertext: Buffer | null;
      address_iv: Buffer | null;
      address_wrapped_key: Buffer | null;
    }>(
      schema.url,
      `SELECT id, email_ciphertext, email_iv, email_wrapped_key, email_key_version,
              address_ciphertext, address_iv, address_wrapped_key FROM ${table} ORDER BY id`,
    );
  return { schema, encryption, dataSource, repo, snapshot, table };
}

const customers = (n: number, tag: string) =>
  Array.from({ length: n }, (_, i) =>
    Object.assign(new Customer(), {
      email: `${tag}${i}@example.com`,
      plan: tag,
      address: i % 3 ? { street: `${i} Rotation Rd`, city: 'Vault' } : null,
    }),
  );

/** Data untouched, keys moved: the checks every rotation here ends with. */
function expectDataUntouched(
  before: Awaited<ReturnType<Awaited<ReturnType<typeof setUp>>['snapshot']>>,
  after: typeof before,
  toVersion: number,
): void {
  expect(after).toHaveLength(before.length);
  for (const [i, row] of before.entries()) {
    const now = after[i];
    expect(now?.email_ciphertext).toEqual(row.email_ciphertext);
    expect(now?.email_iv).toEqual(row.email_iv);
    expect(now?.address_ciphertext).toEqual(row.address_ciphertext);
    expect(now?.address_iv).toEqual(row.address_iv);
    expect(now?.email_wrapped_key).not.toEqual(row.email_wrapped_key);
    expect(now?.email_key_version).toBe(toVersion);
  }
}

describe("rotation to the Transit key's next version (rotate, then rewrap inside Vault)", () => {
  it('re-wraps every data key with Transit rewrap (vault:v1 → vault:v2), data untouched; v1 can then be retired', async () => {
    const key = transitKey();
    const { encryption, dataSource, repo, snapshot } = await setUp([
      { version: 1, provider: transit(key) },
      { version: 2, provider: transit(key) }, // the same Transit key, after `rotate`
    ]);
    await repo.save(customers(120, 'r'));
    const before = await snapshot();
    const distinct = new Set(before.map((r) => r.email_wrapped_key.toString())).size;
    expect(distinct).toBeGreaterThan(2);
    expect(before.every((r) => r.email_wrapped_key.toString().startsWith('vault:v1:'))).toBe(true);

    vault.rotateKey(key.name);
    await encryption.activate(2);
    encryption.purgeCache();
    vault.resetCalls();
    const result = await rewrapDataKeys(dataSource, encryption, { toVersion: 2 });
    expect(result.error).toBeUndefined();
    expect(result.properties.flatMap((p) => p.failures)).toEqual([]);

    // Each distinct data key was re-wrapped once, inside Vault, from version 1 to 2.
    const rewraps = vault.callLog.filter((c) => c.operation === 'rewrap');
    expect(rewraps).toHaveLength(result.rewrapCalls);
    expect(result.rewrapCalls).toBeGreaterThanOrEqual(distinct);
    for (const call of rewraps) {
      expect(call).toMatchObject({
        ciphertextVersion: 1,
        keyVersion: 2,
        status: 200,
        context: encryption.keyring.context,
      });
    }
    expect(vault.calls).toMatchObject({ datakey: 0, encrypt: 0 });
    // The job checks each new wrapped key before writing it: those decrypts open version 2 (and
    // the old key, unless cached); the re-wrap itself never sent a data key out of Vault.
    const checks = vault.callLog.filter((c) => c.operation === 'decrypt');
    expect(checks.filter((c) => c.ciphertextVersion === 2)).toHaveLength(result.verificationCalls);
    expect(checks.filter((c) => c.ciphertextVersion === 1).length).toBeLessThanOrEqual(result.rewrapCalls);

    const after = await snapshot();
    expectDataUntouched(before, after, 2);
    expect(after.every((r) => r.email_wrapped_key.toString().startsWith('vault:v2:'))).toBe(true);
    expect(
      after
        .filter((r) => r.address_wrapped_key)
        .every((r) => r.address_wrapped_key?.toString().startsWith('vault:v2:')),
    ).toBe(true);

    // Version 1 of the Transit key retired: every row still reads.
    vault.setMinDecryptionVersion(key.name, 2);
    encryption.purgeCache();
    const loaded = await repo.find({ where: { plan: 'r' }, order: { id: 'ASC' } });
    expect(loaded.map((c) => c.email)).toEqual(before.map((_, i) => `r${i}@example.com`));
  });

  it('a rewrap refused mid-job leaves those rows as they were; running the job again finishes', async () => {
    const key = transitKey();
    const { encryption, dataSource, repo, snapshot } = await setUp([
      { version: 1, provider: transit(key) },
      { version: 2, provider: transit(key) },
    ]);
    await repo.save(customers(90, 'm'));
    const before = await snapshot();
    vault.rotateKey(key.name);
    await encryption.activate(2);
    vault.injectFaults({ operation: 'rewrap', fault: 'forbidden', times: 1 });
    const first = await rewrapDataKeys(dataSource, encryption, { toVersion: 2 });
    // One data key refused: reported for each property it serves, its rows left under version 1.
    const failures = first.properties.flatMap((p) => p.failures);
    expect(failures.length).toBeGreaterThan(0);
    for (const failure of failures) {
      expect(failure.error).toContain('KeyAccessDeniedError');
      expect(failure.error).toContain('Vault denied rewrap');
      expect(failure.keyVersion).toBe(1);
    }
    const emailFailure = first.properties.find((p) => p.property === 'email')?.failures[0];
    const middle = await snapshot();
    const untouched = middle.filter((r) => r.email_key_version === 1);
    expect(untouched.length).toBe(emailFailure?.rows);
    for (const row of untouched) {
      const old = before.find((b) => b.id === row.id);
      expect(row.email_wrapped_key).toEqual(old?.email_wrapped_key);
      expect(row.email_ciphertext).toEqual(old?.email_ciphertext);
    }
    const second = await rewrapDataKeys(dataSource, encryption, { toVersion: 2 });
    expect(second.properties.flatMap((p) => p.failures)).toEqual([]);
    expectDataUntouched(before, await snapshot(), 2);
  });
});

describe('rotation from Vault to AWS KMS', () => {
  it('unwraps each data key with Transit decrypt and wraps it with KMS Encrypt; afterwards Vault is not needed', async () => {
    const key = transitKey();
    const kmsKey = kms.createKey({ description: 'after Vault' }).Arn;
    const { encryption, dataSource, repo, snapshot } = await setUp([
      { version: 1, provider: transit(key) },
      { version: 2, provider: new AwsKmsKeyProvider({ keyId: kmsKey, clientConfig: kms.clientConfig() }) },
    ]);
    await repo.save(customers(100, 'k'));
    const before = await snapshot();
    const distinct = new Set(before.map((r) => r.email_wrapped_key.toString())).size;

    await encryption.activate(2);
    encryption.purgeCache();
    vault.resetCalls();
    kms.resetCalls();
    const result = await rewrapDataKeys(dataSource, encryption, { toVersion: 2 });
    expect(result.error).toBeUndefined();
    expect(result.rewrapCalls).toBeGreaterThanOrEqual(distinct);
    // Vault only unwrapped; KMS wrapped each data key under the same keyring context.
    expect(vault.calls).toMatchObject({ datakey: 0, encrypt: 0, rewrap: 0 });
    expect(vault.calls.decrypt).toBeGreaterThanOrEqual(result.rewrapCalls);
    expect(kms.calls.Encrypt).toBe(result.rewrapCalls);
    expect(kms.callLog.filter((c) => c.operation === 'Encrypt').every((c) => c.keyId === kmsKey)).toBe(true);
    expect(kms.callLog.every((c) => c.encryptionContext?.['typeorm-envelope:keyring'] === 'default')).toBe(
      true,
    );

    const after = await snapshot();
    expectDataUntouched(before, after, 2);
    expect(after.some((r) => r.email_wrapped_key.toString('latin1').startsWith('vault:'))).toBe(false);

    // The customer revokes the application in Vault: nothing stored depends on it any more.
    vault.deletePolicy(key.policy);
    encryption.purgeCache();
    vault.resetCalls();
    const loaded = await repo.find({ where: { plan: 'k' }, order: { id: 'ASC' } });
    expect(loaded.map((c) => c.email)).toEqual(before.map((_, i) => `k${i}@example.com`));
    expect(vault.callLog).toEqual([]);
    // Were a row left under version 1, it would now fail closed, naming Vault's refusal.
    const v1 = transit(key);
    const error = await v1
      .unwrapDataKey(before[0]?.email_wrapped_key as Buffer, encryption.keyring.context)
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(KeyAccessDeniedError);
  });
});

describe('the key registry records the Transit key reference', () => {
  it('refuses a version configured with another Transit key, mount or namespace than the one recorded', async () => {
    const key = transitKey();
    const { schema, repo, dataSource, encryption } = await setUp([{ version: 1, provider: transit(key) }]);
    await repo.save(customers(3, 'g'));
    await new KeyRegistry(dataSource, encryption).sync();
    const recorded = await rawQuery<{ key_reference: string; provider_kind: string }>(
      schema.url,
      `SELECT key_reference, provider_kind FROM "${schema.schema}".typeorm_envelope_key_versions`,
    );
    expect(recorded).toEqual([
      { key_reference: `${vault.address}/v1/transit/keys/${key.name}`, provider_kind: 'vault-transit' },
    ]);

    const other = transitKey();
    vault.enableTransit('transit-b');
    vault.createKey(key.name, { mount: 'transit-b' });
    for (const provider of [
      transit(other),
      new VaultTransitKeyProvider({
        address: vault.address,
        mount: 'transit-b',
        keyName: key.name,
        auth: { token: vault.rootToken },
      }),
    ]) {
      const error = await setUp([{ version: 1, provider }], { schema }).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(ConfigError);
      expect(String(error)).toContain(
        `is not the one the key registry recorded for that version (${vault.address}/v1/transit/keys/${key.name})`,
      );
      expect(String(error)).toContain(provider.describe().keyReference);
    }
  });
});
