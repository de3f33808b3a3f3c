// Runs a re-encryption as two workers in a process of its own, for tests that kill it part-way:
// `node -r test/support/register-ts.cjs test/support/parallel-job-child.ts`, configured from the
// environment (database URL and schema, the master key, job id, lease length). Prints one JSON line
// when it starts and one after every batch of every worker.
import 'reflect-metadata';
import { DataSource } from 'typeorm';
import {
  EnvelopeEncryption,
  LocalKeyProvider,
  reencryptColumns,
  TypeormEnvelopeJobRanges1764700000000,
} from '../../src';
import { LedgerAccount } from './worker-entities';

function required(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

async function main(): Promise<void> {
  const encryption = new EnvelopeEncryption({
    keys: [{ version: 1, provider: new LocalKeyProvider({ key: required('WORKER_JOB_MASTER_KEY') }) }],
    activeVersion: 1,
  });
  const dataSource = new DataSource({
    type: 'postgres',
    url: required('WORKER_JOB_DATABASE_URL'),
    schema: required('WORKER_JOB_SCHEMA'),
    entities: [LedgerAccount],
    migrations: [TypeormEnvelopeJobRanges1764700000000],
  });
  encryption.attach(dataSource);
  await dataSource.initialize();
  const print = (line: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(line)}\n`);
  print({ event: 'started' });
  await reencryptColumns(dataSource, encryption, {
    jobId: required('WORKER_JOB_ID'),
    workers: 2,
    ranges: 8,
    leaseMs: Number(required('WORKER_JOB_LEASE_MS')),
    batchSize: 100,
    onProgress: (progress) => print({ event: 'batch', ...progress }),
  });
  print({ event: 'finished' });
  await dataSource.destroy();
}

main().catch((error: unknown) => {
  process.stderr.write(`${error instanceof Error ? `${error.name}: ${error.message}` : 'unknown error'}\n`);
  process.exit(1);
});
