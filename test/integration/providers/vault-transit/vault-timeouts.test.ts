import 'reflect-metadata';
import { createServer, type Server, type Socket } from 'node:net';
import { inspect } from 'node:util';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { EnvelopeEncryption, KeyProviderError, VaultTransitKeyProvider } from '../../../../src';
import { createTestSchema, rawQuery, type TestSchema } from '../../../support/database';
import { Customer, Order } from '../../../support/entities';
import { startVaultEmulator, type VaultEmulator } from '../../../support/vault-emulator';

const CONTEXT = { 'typeorm-envelope:keyring': 'default' };

/** An endpoint that accepts connections and never answers, not even with a status line. */
let silent: Server;
let silentAddress: string;
const sockets = new Set<Socket>();
let vault: VaultEmulator;
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
  silentAddress = `http://127.0.0.1:${address.port}`;
  vault = await startVaultEmulator();
  vault.createKey('app-data');
  schema = await createTestSchema('vault_timeouts');
});
afterAll(async () => {
  for (const socket of sockets) socket.destroy();
  await new Promise((resolve) => silent?.close(resolve));
  await vault?.close();
  await schema?.drop();
});

const hung = (options: { address?: string; appRole?: boolean } = {}) =>
  new VaultTransitKeyProvider({
    address: options.address ?? silentAddress,
    keyName: 'app-data',
    auth: options.appRole
      ? { appRole: { roleId: 'role', secretId: 'secret' } }
      : { token: 'hvs.never-sent-anywhere' },
    requestTimeout: 300,
    maxAttempts: 2,
    retryDelay: 1,
  });

async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (error) {
    return error as Error;
  }
  throw new Error('expected the call to fail');
}

describe('a Vault endpoint that accepts connections and never answers', () => {
  it('fails a Transit call with a KeyProviderError naming the key, after the configured timeout and attempts', async () => {
    const transit = hung();
    const error = await rejection(transit.generateDataKey(CONTEXT));
    expect(error).toBeInstanceOf(KeyProviderError);
    expect(error).toMatchObject({ keyId: `${silentAddress}/v1/transit/keys/app-data` });
    expect((error as KeyProviderError).detail).toBe(
      'Vault Transit datakey timed out after 2 attempts: the server did not answer within requestTimeout',
    );
    expect(inspect(error, { showHidden: true, depth: 10 })).not.toContain('hvs.never-sent-anywhere');
  });

  it('a slow Vault: an answer later than requestTimeout is a timeout; within it, the call succeeds', async () => {
    vault.setPolicy('slow', [{ path: 'transit/*', capabilities: ['update', 'read'] }]);
    const token = vault.createToken({ policies: ['slow'] });
    const make = (requestTimeout: number) =>
      new VaultTransitKeyProvider({
        address: vault.address,
        keyName: 'app-data',
        auth: { token },
        requestTimeout,
        maxAttempts: 2,
        retryDelay: 1,
      });
    vault.setLatency(400);
    try {
      const error = await rejection(make(100).generateDataKey(CONTEXT));
      expect(error).toBeInstanceOf(KeyProviderError);
      expect(error.message).toContain('Vault Transit datakey timed out after 2 attempts');
      const { plaintextKey } = await make(5_000).generateDataKey(CONTEXT);
      expect(plaintextKey).toHaveLength(32);
    } finally {
      vault.setLatency(0);
    }
  });

  it('fails an AppRole login the same way', async () => {
    const error = await rejection(hung({ appRole: true }).generateDataKey(CONTEXT));
    expect(error).toBeInstanceOf(KeyProviderError);
    expect(error.message).toContain('Vault AppRole login at auth/approle timed out after 2 attempts');
    expect(error.message).not.toContain('secret');
  });

  it('a Vault that reads the request and never answers (the emulator hanging) times out too', async () => {
    vault.resetCalls();
    vault.setHanging(true);
    try {
      const error = await rejection(
        hung({ address: vault.address }).unwrapDataKey(Buffer.from('vault:v1:AAAA'), CONTEXT),
      );
      expect(error).toBeInstanceOf(KeyProviderError);
      expect(error.message).toContain('Vault Transit decrypt timed out after 2 attempts');
      expect(vault.callLog.map((c) => [c.operation, c.status])).toEqual([
        ['decrypt', undefined],
        ['decrypt', undefined],
      ]);
    } finally {
      vault.setHanging(false);
    }
  });

  it('fails initialize() instead of hanging, and without validation fails the first save, writing nothing', async () => {
    const validated = new EnvelopeEncryption({ keys: [{ version: 1, provider: hung() }], activeVersion: 1 });
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
    expect(startup).toMatchObject({ keyVersion: 1 });
    expect(startup.message).toMatch(/timed out/);
    expect(first.isInitialized).toBe(false);

    const unvalidated = new EnvelopeEncryption({
      keys: [{ version: 1, provider: hung() }],
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
        repo.save(repo.create({ email: 'stuck@example.com', plan: 'vault', address: null })),
      );
      expect(save).toBeInstanceOf(KeyProviderError);
      expect(save).toMatchObject({ keyVersion: 1, keyId: `${silentAddress}/v1/transit/keys/app-data` });
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
