import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AwsKmsKeyProvider, IntegrityError, type KeyProvider, LocalKeyProvider } from '../../../src';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';
import { Customer, Order } from '../../support/entities';
import { type KmsEmulator, startKmsEmulator } from '../../support/kms-emulator';
import { encryptedDatabase } from '../../support/typeorm';

let emulator: KmsEmulator;
let schema: TestSchema;
beforeAll(async () => {
  emulator = await startKmsEmulator();
  schema = await createTestSchema('keyring_id');
});
afterAll(async () => {
  await emulator?.close();
  await schema?.drop();
});

const stored = (plan: string) =>
  rawQuery<{ id: number; ct: string; wrapped: string; version: number }>(
    schema.url,
    `SELECT id, encode(email_ciphertext, 'hex') AS ct, encode(email_wrapped_key, 'hex') AS wrapped,
            email_key_version AS version
     FROM "${schema.schema}".customer WHERE plan = $1`,
    [plan],
  );

/** Writes a row under `keyringId` 'app-a', then reads it with the same master key under 'app-b'. */
async function readUnderOtherKeyringId(provider: () => KeyProvider, plan: string) {
  const writer = await encryptedDatabase([Customer, Order], {
    schema,
    encryption: { keys: [{ version: 1, provider: provider() }], keyringId: 'app-a' },
  });
  const repo = writer.dataSource.getRepository(Customer);
  const { id } = await repo.save(repo.create({ email: `${plan}@example.com`, plan, address: null }));
  await writer.close();
  const before = await stored(plan);
  const reader = await encryptedDatabase([Customer, Order], {
    schema,
    encryption: { keys: [{ version: 1, provider: provider() }], keyringId: 'app-b' },
  });
  try {
    const error = await reader.dataSource
      .getRepository(Customer)
      .findOneByOrFail({ id })
      .catch((e: unknown) => e);
    return { error, before, after: await stored(plan) };
  } finally {
    await reader.close();
  }
}

describe('a keyringId changed after data was written', () => {
  it('with a local key: the IntegrityError names a different keyringId as a cause', async () => {
    const key = randomBytes(32).toString('base64');
    const r = await readUnderOtherKeyringId(() => new LocalKeyProvider({ key }), 'local-id');
    expect(r.error).toBeInstanceOf(IntegrityError);
    expect(String((r.error as Error).message)).toMatch(/or keyringId differs from the one that wrapped it/);
    expect(r.error).toMatchObject({ entity: 'Customer', column: 'email', keyVersion: 1 });
    expect(String((r.error as Error).message)).not.toContain('local-id@');
    expect(r.after).toEqual(r.before);
    expect(r.after).toHaveLength(1);
  });

  it('with a KMS key: the IntegrityError names a different keyringId as a cause', async () => {
    const keyId = emulator.createKey().Arn;
    const provider = () => new AwsKmsKeyProvider({ keyId, clientConfig: emulator.clientConfig() });
    const r = await readUnderOtherKeyringId(provider, 'kms-id');
    expect(r.error).toBeInstanceOf(IntegrityError);
    expect(String((r.error as Error).message)).toMatch(/or keyringId differs from the one that wrapped it/);
    expect(r.error).toMatchObject({ entity: 'Customer', column: 'email', keyVersion: 1 });
    expect(r.after).toEqual(r.before);
    expect(r.after).toHaveLength(1);
  });
});
