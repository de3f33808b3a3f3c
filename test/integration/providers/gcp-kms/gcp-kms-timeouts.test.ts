import 'reflect-metadata';
import { createServer, type Server, type Socket } from 'node:net';
import { OAuth2Client } from 'google-auth-library';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { EnvelopeEncryption, GcpKmsKeyProvider, KeyProviderError } from '../../../../src';
import { createTestSchema, rawQuery, type TestSchema } from '../../../support/database';
import { Customer, Order } from '../../../support/entities';
import { type GcpKmsEmulator, startGcpKmsEmulator } from '../../../support/gcp-kms-emulator';

const KEY_NAME = 'projects/acme/locations/europe-west1/keyRings/app/cryptoKeys/data';
const CONTEXT = { 'typeorm-envelope:keyring': 'default' };

/** A Cloud KMS endpoint that accepts connections and never answers, not even with a status line. */
let silent: Server;
let port: number;
const sockets = new Set<Socket>();
let schema: TestSchema;
let emulator: GcpKmsEmulator;

beforeAll(async () => {
  silent = createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.resume(); // read the request, answer nothing
  });
  await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
  const address = silent.address();
  if (!address || typeof address === 'string') throw new Error('no port');
  port = address.port;
  schema = await createTestSchema('gcp_kms_timeouts');
  emulator = await startGcpKmsEmulator();
});
afterAll(async () => {
  for (const socket of sockets) socket.destroy();
  await new Promise((resolve) => silent?.close(resolve));
  await schema?.drop();
  await emulator?.close();
});

const silentProvider = () => {
  const authClient = new OAuth2Client();
  authClient.setCredentials({ access_token: 'test' });
  return new GcpKmsKeyProvider({
    keyName: KEY_NAME,
    apiEndpoint: '127.0.0.1',
    port,
    protocol: 'http',
    authClient,
    requestTimeout: 300,
    maxAttempts: 2,
    retryDelay: 5,
  });
};

async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (error) {
    return error as Error;
  }
  throw new Error('expected the call to fail');
}

describe('a Cloud KMS endpoint that accepts connections and never answers', () => {
  it('fails a call with a KeyProviderError naming the key, after requestTimeout per attempt', async () => {
    const kms = silentProvider();
    try {
      const error = await rejection(kms.generateDataKey(CONTEXT));
      expect(error).toBeInstanceOf(KeyProviderError);
      expect(error).toMatchObject({ keyId: KEY_NAME });
      expect(error.message).toMatch(/GCP KMS Encrypt timed out after 2 attempts/);
      expect(error.message).toContain(KEY_NAME);
      expect(error.cause).toMatchObject({ status: 'TIMEOUT' });
    } finally {
      kms.destroy();
    }
  });

  it('fails initialize() instead of hanging, and without validation fails the first save, writing nothing', async () => {
    const validated = new EnvelopeEncryption({
      keys: [{ version: 1, provider: silentProvider() }],
      activeVersion: 1,
    });
    const first = new DataSource({
      type: 'postgres',
      url: schema.url,
      schema: schema.schema,
      entities: [Customer, Order],
      synchronize: true,
    });
    validated.attach(first);
    const startup = await rejection(first.initialize());
    expect(startup).toBeInstanceOf(KeyProviderError);
    expect(startup).toMatchObject({ keyVersion: 1, keyId: KEY_NAME });
    expect(startup.message).toMatch(/GCP KMS GetCryptoKey timed out/);
    expect(first.isInitialized).toBe(false);

    const unvalidated = new EnvelopeEncryption({
      keys: [{ version: 1, provider: silentProvider() }],
      activeVersion: 1,
    });
    const second = new DataSource({
      type: 'postgres',
      url: schema.url,
      schema: schema.schema,
      entities: [Customer, Order],
      synchronize: true,
    });
    unvalidated.attach(second, { validate: false });
    await second.initialize();
    try {
      const repo = second.getRepository(Customer);
      const save = await rejection(
        repo.save(repo.create({ email: 'stuck@example.com', plan: 'gcp', address: null })),
      );
      expect(save).toBeInstanceOf(KeyProviderError);
      expect(save).toMatchObject({ keyVersion: 1, keyId: KEY_NAME });
      expect(save.message).toMatch(/GCP KMS Encrypt timed out after 2 attempts/);
      const [row] = await rawQuery<{ n: number }>(
        schema.url,
        `SELECT count(*)::int AS n FROM "${schema.schema}".customer`,
      );
      expect(row?.n).toBe(0);
    } finally {
      await second.destroy();
    }
  });

  it('a slow endpoint: answers within requestTimeout are used, answers later than it are not waited for', async () => {
    const key = emulator.createKey();
    const patient = new GcpKmsKeyProvider({
      keyName: key.name,
      ...emulator.connection(),
      requestTimeout: 5_000,
    });
    const hasty = new GcpKmsKeyProvider({
      keyName: key.name,
      ...emulator.connection(),
      requestTimeout: 50,
      maxAttempts: 2,
      retryDelay: 5,
    });
    try {
      emulator.setLatency(300);
      const { plaintextKey, wrappedKey } = await patient.generateDataKey(CONTEXT);
      expect((await patient.unwrapDataKey(wrappedKey, CONTEXT)).equals(plaintextKey)).toBe(true);
      emulator.resetCalls();
      const error = await rejection(hasty.unwrapDataKey(wrappedKey, CONTEXT));
      expect(error).toBeInstanceOf(KeyProviderError);
      expect(error.message).toContain('GCP KMS Decrypt timed out after 2 attempts');
    } finally {
      emulator.setLatency(0);
      patient.destroy();
      hasty.destroy();
    }
  });

  it('a request left unanswered once is abandoned and sent again: the second attempt answers', async () => {
    const key = emulator.createKey();
    /*
     * The hung request never answers, whatever the timeout: a long one only makes the test wait longer,
     * and gives the attempt that answers room for a stall (GC, a busy CPU) without being abandoned.
     */
    const kms = new GcpKmsKeyProvider({
      keyName: key.name,
      ...emulator.connection(),
      requestTimeout: 2_000,
      retryDelay: 5,
    });
    try {
      const { plaintextKey, wrappedKey } = await kms.generateDataKey(CONTEXT);
      emulator.resetCalls();
      emulator.injectFaults({ operation: 'Decrypt', fault: 'hang', times: 1 });
      expect((await kms.unwrapDataKey(wrappedKey, CONTEXT)).equals(plaintextKey)).toBe(true);
      expect(emulator.callLog.map((c) => c.status)).toEqual([undefined, 200]);
    } finally {
      kms.destroy();
    }
  });
});
