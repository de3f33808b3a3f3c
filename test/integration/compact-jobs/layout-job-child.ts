// Runs one layout migration in a process of its own, for tests that kill it part-way:
// `node -r test/support/register-ts.cjs test/integration/compact-jobs/layout-job-child.ts`, configured
// from the environment (database URL and schema, the master key, the entity mapping, batch size).
// Prints one JSON line when the job starts, one after every batch, one when it ends.
import 'reflect-metadata';
import { DataSource } from 'typeorm';
import { EnvelopeEncryption, LocalKeyProvider } from '../../../src';
import { migrateLayout } from '../../../src/rotation/migrate-layout';
import { JOB_MIGRATIONS, LAYOUT_ENTITIES } from './job-entities';

function required(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

async function main(): Promise<void> {
  const entity = LAYOUT_ENTITIES[required('LAYOUT_JOB_ENTITY') as keyof typeof LAYOUT_ENTITIES];
  const encryption = new EnvelopeEncryption({
    keys: [{ version: 1, provider: new LocalKeyProvider({ key: required('LAYOUT_JOB_MASTER_KEY') }) }],
    activeVersion: 1,
    cache: { dataKeyMaxUses: 100 },
  });
  const dataSource = new DataSource({
    type: 'postgres',
    url: required('LAYOUT_JOB_DATABASE_URL'),
    schema: required('LAYOUT_JOB_SCHEMA'),
    entities: [entity],
    migrations: JOB_MIGRATIONS,
  });
  encryption.attach(dataSource);
  await dataSource.initialize();
  const print = (line: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(line)}\n`);
  print({ event: 'started' });
  const result = await migrateLayout(dataSource, encryption, {
    batchSize: Number(process.env.LAYOUT_JOB_BATCH_SIZE ?? 50),
    onProgress: (progress) => print({ event: 'batch', ...progress }),
  });
  print({
    event: 'finished',
    error: result.error === undefined ? null : String(result.error),
    migrated: result.properties.map((p) => p.rowsMigrated),
  });
  await dataSource.destroy();
}

main().catch((error: unknown) => {
  process.stderr.write(`${error instanceof Error ? `${error.name}: ${error.message}` : 'unknown error'}\n`);
  process.exit(1);
});
