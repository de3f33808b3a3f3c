import { DataSource } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError, EnvelopeEncryption } from '../../../src';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { type RunningServer, startPglite } from '../../support/postgres-servers';
import { COMPACT_MIGRATIONS, CompactOrder, CompactPerson, ForwardAsSidecars } from './compact-entities';

/*
 * PGlite runs one session at a time: while a transaction is open, its socket server serves no other
 * connection. A compact write registering a new data key on a connection of its own would wait for
 * its own transaction forever, so the compact layout is refused there at initialize().
 */
let server: RunningServer;

beforeAll(async () => {
  server = await startPglite({ maxConnections: 10 });
}, 60_000);
afterAll(() => server?.stop());

function dataSourceFor(entities: DataSource['options']['entities']) {
  const encryption = new EnvelopeEncryption({
    keys: [{ version: 1, provider: new CountingKeyProvider() }],
    activeVersion: 1,
  });
  const dataSource = new DataSource({
    type: 'postgres',
    url: server.url,
    entities,
    synchronize: true,
    migrations: COMPACT_MIGRATIONS,
    migrationsRun: true,
  });
  encryption.attach(dataSource);
  return dataSource;
}

describe('the compact layout on PGlite', () => {
  it('is refused at initialize() with a ConfigError saying why, instead of a write that never finishes', async () => {
    const dataSource = dataSourceFor([CompactPerson, CompactOrder]);
    const error = await dataSource.initialize().then(
      () => undefined,
      (e: unknown) => e,
    );
    if (dataSource.isInitialized) await dataSource.destroy();
    expect(error).toBeInstanceOf(ConfigError);
    expect((error as Error).message).toMatch(/PGlite serves one session at a time/);
    expect((error as Error).message).toMatch(/layout: 'sidecars'/);
  });

  it('leaves the sidecar layout working there', async () => {
    const dataSource = dataSourceFor([ForwardAsSidecars]);
    await dataSource.initialize();
    try {
      const repo = dataSource.getRepository(ForwardAsSidecars);
      const saved = await repo.save(repo.create({ email: 'pglite@example.com', note: null }));
      expect((await repo.findOneByOrFail({ id: saved.id })).email).toBe('pglite@example.com');
    } finally {
      await dataSource.destroy();
    }
  });
});
