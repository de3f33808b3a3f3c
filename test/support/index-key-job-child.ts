// Rotates one tenant's index key in a process of its own, for tests that kill it part-way:
// `node -r test/support/register-ts.cjs test/support/index-key-job-child.ts`, configured from the
// environment (database URL and schema, the application's master key, tenant, batch size).
// Prints one JSON line when the job starts, one after every batch, one when it ends.
import 'reflect-metadata';
import { DataSource } from 'typeorm';
import { EnvelopeEncryption, LocalKeyProvider, rotateIndexKey } from '../../src';
import { BLIND_INDEX_MIGRATIONS, Member } from './blind-index-entities';

function required(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

async function main(): Promise<void> {
  const encryption = new EnvelopeEncryption({
    keys: [{ version: 1, provider: new LocalKeyProvider({ key: required('INDEX_JOB_MASTER_KEY') }) }],
    activeVersion: 1,
    tenantKeys: { refreshInterval: Number(required('INDEX_JOB_REFRESH_INTERVAL')) },
  });
  const dataSource = new DataSource({
    type: 'postgres',
    url: required('INDEX_JOB_DATABASE_URL'),
    schema: required('INDEX_JOB_SCHEMA'),
    entities: [Member],
    migrations: BLIND_INDEX_MIGRATIONS,
  });
  encryption.attach(dataSource);
  await dataSource.initialize();
  const print = (line: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(line)}\n`);
  print({ event: 'started' });
  const result = await rotateIndexKey(dataSource, encryption, {
    tenant: required('INDEX_JOB_TENANT'),
    batchSize: Number(process.env.INDEX_JOB_BATCH_SIZE ?? 20),
    onProgress: (progress) =>
      print({ event: 'batch', property: progress.property, rowsDone: progress.rowsDone }),
  });
  print({
    event: 'finished',
    toVersion: result.toVersion,
    rowsLeft: result.rowsLeft,
    previousRetired: result.previousRetired,
    error: result.error === undefined ? null : String(result.error),
  });
  await dataSource.destroy();
}

main().catch((error: unknown) => {
  process.stderr.write(`${error instanceof Error ? `${error.name}: ${error.message}` : 'unknown error'}\n`);
  process.exit(1);
});
