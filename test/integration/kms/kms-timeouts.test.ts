import 'reflect-metadata';
import { createServer, type Server, type Socket } from 'node:net';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AwsKmsKeyProvider, ConfigError, EnvelopeEncryption, KeyProviderError } from '../../../src';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';
import { Customer, Order } from '../../support/entities';

const KEY_ARN = 'arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab';

/** A KMS endpoint that accepts connections and never answers, not even with a status line. */
let silent: Server;
let endpoint: string;
const sockets = new Set<Socket>();
let schema: TestSchema;

beforeAll(async () => {
  silent = createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.resume(); // read the request, answer nothing
  });
  await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
  const address = silent.address();
  if (!address || typeof address === 'string') throw new Error('no port');
  endpoint = `http://127.0.0.1:${address.port}`;
  schema = await createTestSchema('kms_timeouts');
});
afterAll(async () => {
  for (const socket of sockets) socket.destroy();
  await new Promise((resolve) => silent?.close(resolve));
  await schema?.drop();
});

const silentProvider = (keyId = KEY_ARN) =>
  new AwsKmsKeyProvider({
    keyId,
    endpoint,
    region: 'us-east-1',
    requestTimeout: 300,
    connectTimeout: 300,
    maxAttempts: 2,
    clientConfig: { credentials: { accessKeyId: 'test', secretAccessKey: 'test' } },
  });

async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (error) {
    return error as Error;
  }
  throw new Error('expected the call to fail');
}

describe('a KMS endpoint that accepts connections and never answers', () => {
  it('fails a KMS call with a KeyProviderError naming the key, after the configured timeout', {
    timeout: 30_000,
  }, async () => {
    const kms = silentProvider();
    try {
      const error = await rejection(kms.generateDataKey({ 'typeorm-envelope:keyring': 'default' }));
      expect(error).toBeInstanceOf(KeyProviderError);
      expect(error).toMatchObject({ keyId: KEY_ARN });
      expect(error.message).toMatch(/KMS GenerateDataKey timed out after 2 attempts/);
      expect(error.message).toContain(KEY_ARN);
    } finally {
      kms.destroy();
    }
  });

  it('fails initialize() instead of hanging, and without validation fails the first save, writing nothing', {
    timeout: 60_000,
  }, async () => {
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
    expect(startup).toMatchObject({ keyVersion: 1, keyId: KEY_ARN });
    expect(startup.message).toMatch(/timed out/);
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
        repo.save(repo.create({ email: 'stuck@example.com', plan: 'kms', address: null })),
      );
      expect(save).toBeInstanceOf(KeyProviderError);
      expect(save).toMatchObject({ keyVersion: 1, keyId: KEY_ARN });
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

describe('AwsKmsKeyProvider timeout options', () => {
  it('refuses timeouts that are not positive numbers, and timeouts beside a client or a request handler', () => {
    for (const value of [0, -1, Number.NaN, Number.POSITIVE_INFINITY, '5' as unknown as number]) {
      expect(
        () => new AwsKmsKeyProvider({ keyId: KEY_ARN, region: 'us-east-1', requestTimeout: value }),
      ).toThrow(/requestTimeout must be a positive number of milliseconds/);
      expect(
        () => new AwsKmsKeyProvider({ keyId: KEY_ARN, region: 'us-east-1', connectTimeout: value }),
      ).toThrow(ConfigError);
    }
    const built = new AwsKmsKeyProvider({ keyId: KEY_ARN, region: 'us-east-1' });
    try {
      expect(
        () => new AwsKmsKeyProvider({ keyId: KEY_ARN, client: built.client, requestTimeout: 1_000 }),
      ).toThrow('Cannot set both client and requestTimeout');
      expect(
        () =>
          new AwsKmsKeyProvider({
            keyId: KEY_ARN,
            region: 'us-east-1',
            connectTimeout: 1_000,
            clientConfig: { requestHandler: built.client.config.requestHandler },
          }),
      ).toThrow(/Cannot set both clientConfig.requestHandler and connectTimeout/);
    } finally {
      built.destroy();
    }
  });
});
