// Runs one tenant's key job in a process of its own, for tests that kill it part-way:
// `node -r test/support/register-ts.cjs test/support/tenant-job-child.ts`, configured from the
// environment (database URL and schema, the application's master key, tenant, batch size).
// Prints one JSON line when the job starts, one after every batch, one when it ends.
import 'reflect-metadata';
import { EnvelopeEncryption, LocalKeyProvider } from '../../src';
import { tenantContactsDataSource } from './tenant-entities';

function required(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

async function main(): Promise<void> {
  const tenant = required('TENANT_JOB_TENANT');
  const encryption = new EnvelopeEncryption({
    keys: [{ version: 1, provider: new LocalKeyProvider({ key: required('TENANT_JOB_MASTER_KEY') }) }],
    activeVersion: 1,
  });
  const dataSource = tenantContactsDataSource(
    encryption,
    required('TENANT_JOB_DATABASE_URL'),
    required('TENANT_JOB_SCHEMA'),
  );
  await dataSource.initialize();
  const print = (line: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(line)}\n`);
  print({ event: 'started' });
  const job = await encryption.tenants.runJob(tenant, {
    batchSize: Number(process.env.TENANT_JOB_BATCH_SIZE ?? 50),
    onProgress: (state, progress) =>
      print({ event: 'batch', property: progress.property, rowsDone: state.rowsDone }),
  });
  print({ event: 'finished', state: job.state, rowsDone: job.rowsDone, error: job.error });
  await dataSource.destroy();
}

main().catch((error: unknown) => {
  process.stderr.write(`${error instanceof Error ? `${error.name}: ${error.message}` : 'unknown error'}\n`);
  process.exit(1);
});
