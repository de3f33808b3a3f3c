import { randomBytes } from 'node:crypto';
import 'reflect-metadata';
import { DataSource } from 'typeorm';
import { TypeormEnvelopeKeyRegistry1764300000000 } from '../../migrations/1764300000000-TypeormEnvelopeKeyRegistry';
import { EnvelopeEncryption, LocalKeyProvider } from '../../src';
import { createTestSchema, type TestSchema } from './database';
import { Customer, Order } from './entities';

/** A schema seeded with customers under key version 1, and the environment for the CLI fixture. */
export interface CliProject {
  schema: TestSchema;
  /** Environment for test/fixtures/rotation-project.ts (database, schema, keys 1 and 2). */
  env: Record<string, string>;
}

/**
 * Creates a schema, writes `rows` customers encrypted under a fresh version-1 key (with a new data
 * key every `maxUses` values), and returns the environment the CLI fixture reads: both master
 * keys are generated here, at run time.
 */
export async function createCliProject(options: {
  prefix: string;
  rows: number;
  maxUses: number;
  registry?: boolean;
  customer: (i: number) => Partial<Customer>;
}): Promise<CliProject> {
  const schema = await createTestSchema(options.prefix);
  const keys = { 1: randomBytes(32).toString('base64'), 2: randomBytes(32).toString('base64') };
  const encryption = new EnvelopeEncryption({
    keys: [{ version: 1, provider: new LocalKeyProvider({ key: keys[1] }) }],
    activeVersion: 1,
    cache: { dataKeyMaxUses: options.maxUses },
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
  await dataSource.initialize();
  const repo = dataSource.getRepository(Customer);
  await repo.save(
    Array.from({ length: options.rows }, (_, i) => repo.create(options.customer(i))),
    { chunk: 500 },
  );
  await dataSource.destroy();
  return {
    schema,
    env: {
      TEST_DATABASE_URL: schema.url,
      TEST_SCHEMA: schema.schema,
      TEST_MASTER_KEY_1: keys[1],
      TEST_MASTER_KEY_2: keys[2],
    },
  };
}
