import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { resolve } from 'node:path';
import 'reflect-metadata';
import { DataSource } from 'typeorm';
import { expect } from 'vitest';
import { TypeormEnvelopeKeyRegistry1764300000000 } from '../../migrations/1764300000000-TypeormEnvelopeKeyRegistry';
import { EnvelopeEncryption, LocalKeyProvider } from '../../src';
import { createTestSchema, type TestSchema } from './database';
import { Customer, Order } from './entities';
import { TenantContact, tenantContactsDataSource } from './tenant-entities';

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

/** A schema with the tenant registry and workspace contacts, and the environment for test/fixtures/tenant-project.ts. */
export interface TenantCliProject {
  schema: TestSchema;
  /** Environment of the fixture: database, schema and the application's key (generated here). */
  env: Record<string, string>;
}

/**
 * Creates a schema with the key registry and tenant tables (their migrations run), and `rows`
 * contacts per workspace in `workspaces`, sealed under a fresh application key (version 1) with a
 * new data key every `maxUses` values.
 */
export async function createTenantCliProject(options: {
  prefix: string;
  workspaces: readonly string[];
  rows: number;
  maxUses: number;
}): Promise<TenantCliProject> {
  const schema = await createTestSchema(options.prefix);
  const key = randomBytes(32).toString('base64');
  const encryption = new EnvelopeEncryption({
    keys: [{ version: 1, provider: new LocalKeyProvider({ key }) }],
    activeVersion: 1,
    cache: { dataKeyMaxUses: options.maxUses },
  });
  const dataSource = tenantContactsDataSource(encryption, schema.url, schema.schema, {
    synchronize: true,
    migrationsRun: true,
  });
  await dataSource.initialize();
  const repo = dataSource.getRepository(TenantContact);
  for (const workspaceId of options.workspaces) {
    await repo.save(
      Array.from({ length: options.rows }, (_, i) =>
        repo.create({
          workspaceId,
          email: `c${i}@${workspaceId}.example`,
          profile: i % 2 === 0 ? { phone: `+1-555-${i}` } : null,
        }),
      ),
    );
  }
  await dataSource.destroy();
  return {
    schema,
    env: { TEST_DATABASE_URL: schema.url, TEST_SCHEMA: schema.schema, TEST_MASTER_KEY_1: key },
  };
}

/** The tenant fixture: a data source file with workspace contacts and tenant keys. */
export const TENANT_PROJECT_FILE = resolve(__dirname, '../fixtures/tenant-project.ts');

/**
 * Runs the CLI from source on the tenant fixture in a child process, without blocking this
 * process (emulators in it must keep answering the child), optionally writing `input` to its stdin.
 * `dataSourceFile` runs it on another fixture.
 */
export function runTenantCli(
  args: string[],
  env: Record<string, string>,
  options: { input?: string | Buffer; command?: string[]; dataSourceFile?: string } = {},
): Promise<{ status: number | null; stdout: string; stderr: string }> {
  const root = resolve(__dirname, '../..');
  const argv = [
    '-r',
    resolve(root, 'test/support/register-ts.cjs'),
    resolve(root, 'src/cli/main.ts'),
    '-d',
    options.dataSourceFile ?? TENANT_PROJECT_FILE,
    ...args,
  ];
  const [file, ...prefix] = options.command ?? [process.execPath];
  return new Promise((resolvePromise, reject) => {
    const child = spawn(file as string, [...prefix, ...argv], {
      cwd: root,
      env: { ...process.env, ...env },
      stdio: 'pipe',
    });
    const stdout: Buffer[] = [];
    const stderr: Buffer[] = [];
    child.stdout.on('data', (chunk: Buffer) => stdout.push(chunk));
    child.stderr.on('data', (chunk: Buffer) => stderr.push(chunk));
    const timer = setTimeout(() => child.kill('SIGKILL'), 120_000);
    child.on('error', reject);
    child.on('close', (status) => {
      clearTimeout(timer);
      resolvePromise({
        status,
        stdout: Buffer.concat(stdout).toString('utf8'),
        stderr: Buffer.concat(stderr).toString('utf8'),
      });
    });
    child.stdin.end(options.input ?? '');
  });
}

/**
 * A `--json` run of the CLI with its stdout parsed: it must be exactly one JSON document (the
 * test fails, showing stdout and stderr, when it is not).
 */
export function withJson<R extends { stdout: string; stderr: string }>(
  run: R,
  args: readonly string[],
  // biome-ignore lint/suspicious/noExplicitAny: tests read whatever the CLI printed
): R & { json: any } {
  let json: unknown;
  expect(
    () => {
      json = JSON.parse(run.stdout);
    },
    `stdout of ${args.join(' ')} is one JSON document: ${run.stdout}\n${run.stderr}`,
  ).not.toThrow();
  return { ...run, json };
}
