import 'reflect-metadata';
import { createServer, type Server, type Socket } from 'node:net';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AzureKeyVaultKeyProvider, EnvelopeEncryption, KeyProviderError } from '../../../../src';
import {
  type AzureKeyVaultEmulator,
  startAzureKeyVaultEmulator,
  testCredential,
} from '../../../support/azure-key-vault-emulator';
import { createTestSchema, rawQuery, type TestSchema } from '../../../support/database';
import { Customer, Order } from '../../../support/entities';

/** A vault address that accepts connections and never answers, not even the bearer challenge. */
let silent: Server;
let kid: string;
const sockets = new Set<Socket>();
let schema: TestSchema;
let emulator: AzureKeyVaultEmulator;
const app = testCredential('app');

beforeAll(async () => {
  silent = createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.resume(); // read the request, answer nothing
  });
  await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
  const address = silent.address();
  if (!address || typeof address === 'string') throw new Error('no port');
  kid = `http://127.0.0.1:${address.port}/keys/customer-key/0123456789abcdef0123456789abcdef`;
  schema = await createTestSchema('azure_kv_timeouts');
  emulator = await startAzureKeyVaultEmulator();
  emulator.grant('app');
});
afterAll(async () => {
  for (const socket of sockets) socket.destroy();
  await new Promise((resolve) => silent?.close(resolve));
  await schema?.drop();
  await emulator?.close();
});

const silentProvider = () =>
  new AzureKeyVaultKeyProvider({
    keyId: kid,
    credential: app,
    requestTimeout: 300,
    retryOptions: { maxRetries: 1, retryDelayInMs: 5 },
    clientOptions: { allowInsecureConnection: true, disableChallengeResourceVerification: true },
  });

async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (error) {
    return error as Error;
  }
  throw new Error('expected the call to fail');
}

const dataSourceOn = () =>
  new DataSource({
    type: 'postgres',
    url: schema.url,
    schema: schema.schema,
    entities: [Customer, Order],
    synchronize: true,
  });

describe('a Key Vault that accepts connections and never answers', () => {
  it('fails a call with a KeyProviderError naming the key, after the configured timeout per attempt', {
    timeout: 30_000,
  }, async () => {
    const error = await rejection(
      silentProvider().generateDataKey({ 'typeorm-envelope:keyring': 'default' }),
    );
    expect(error).toBeInstanceOf(KeyProviderError);
    expect(error).toMatchObject({ keyId: kid });
    expect((error as KeyProviderError).detail).toBe(
      'Key Vault get timed out after 2 attempts: no answer within requestTimeout (300 ms)',
    );
    expect(sockets.size).toBeGreaterThan(0);
  });

  it('fails initialize() instead of hanging, and without validation fails the first save, writing nothing', {
    timeout: 60_000,
  }, async () => {
    const validated = new EnvelopeEncryption({
      keys: [{ version: 1, provider: silentProvider() }],
      activeVersion: 1,
    });
    const first = dataSourceOn();
    validated.attach(first);
    const startup = await rejection(first.initialize());
    expect(startup).toBeInstanceOf(KeyProviderError);
    expect(startup).toMatchObject({ keyVersion: 1, keyId: kid });
    expect(startup.message).toMatch(/key check "exists" failed: Key Vault get timed out/);
    expect(first.isInitialized).toBe(false);

    const unvalidated = new EnvelopeEncryption({
      keys: [{ version: 1, provider: silentProvider() }],
      activeVersion: 1,
    });
    const second = dataSourceOn();
    unvalidated.attach(second, { validate: false });
    await second.initialize();
    try {
      const repo = second.getRepository(Customer);
      const save = await rejection(
        repo.save(repo.create({ email: 'stuck@example.com', plan: 'akv', address: null })),
      );
      expect(save).toBeInstanceOf(KeyProviderError);
      expect(save).toMatchObject({ keyVersion: 1, keyId: kid });
      expect(save.message).toContain('timed out');
      const [row] = await rawQuery<{ n: number }>(
        schema.url,
        `SELECT count(*)::int AS n FROM "${schema.schema}".customer`,
      );
      expect(row?.n).toBe(0);
    } finally {
      await second.destroy();
    }
  });
});

describe('a slow Key Vault', () => {
  it('answers slower than usual but within requestTimeout: the calls succeed; unwrap requests left unanswered are retried', {
    timeout: 30_000,
  }, async () => {
    const key = await emulator.createKey('slow');
    const azure = new AzureKeyVaultKeyProvider({
      keyId: key.kid,
      credential: app,
      requestTimeout: 5_000,
      retryOptions: { maxRetries: 2, retryDelayInMs: 5 },
      clientOptions: emulator.clientOptions(),
    });
    const context = { 'typeorm-envelope:keyring': 'default' };
    emulator.setLatency(150);
    const { plaintextKey, wrappedKey } = await azure.generateDataKey(context);
    emulator.setLatency(0);
    /*
     * The hung requests never answer, whatever the timeout: a long one only makes the test wait longer,
     * and gives the attempt that answers room for a stall (GC, a busy CPU) without being abandoned.
     */
    const quick = new AzureKeyVaultKeyProvider({
      keyId: key.kid,
      credential: app,
      requestTimeout: 2_000,
      retryOptions: { maxRetries: 2, retryDelayInMs: 5 },
      clientOptions: emulator.clientOptions(),
    });
    await quick.resolveKeyReference();
    emulator.resetCalls();
    emulator.hang({ operation: 'unwrapkey', times: 2 });
    expect((await quick.unwrapDataKey(wrappedKey, context)).equals(plaintextKey)).toBe(true);
    expect(emulator.callLog.filter((c) => c.operation === 'unwrapkey').map((c) => c.status)).toEqual([
      0, 0, 200,
    ]);
  });
});
