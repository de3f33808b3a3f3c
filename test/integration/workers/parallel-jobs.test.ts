import 'reflect-metadata';
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  LocalKeyProvider,
  reencryptColumns,
  rewrapDataKeys,
  TypeormEnvelopeJobRanges1764700000000,
} from '../../../src';
import { runCli } from '../../support/cli';
import { type CliProject, createCliProject } from '../../support/cli-project';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';
import { LedgerAccount } from '../../support/worker-entities';
import { expectLedgerReads, seedLedger } from './worker-support';

/**
 * Row-by-row jobs run as several workers over primary-key ranges, coordinated through the lease
 * table: every row done exactly as one worker would, the data as the single job leaves it, and a
 * job whose process is killed taken over by the next run of the same job id.
 */
const ROWS = 6_000;
const root = resolve(__dirname, '../../..');
const masterKey = randomBytes(32).toString('base64');
const secondKey = randomBytes(32).toString('base64');
let schema: TestSchema;
let db: EncryptedTestDatabase;

beforeAll(async () => {
  schema = await createTestSchema('workers');
  db = await encryptedDatabase([LedgerAccount], {
    schema,
    migrations: [TypeormEnvelopeJobRanges1764700000000],
    encryption: {
      keys: [
        { version: 1, provider: new LocalKeyProvider({ key: masterKey }) },
        { version: 2, provider: new LocalKeyProvider({ key: secondKey }) },
      ],
      activeVersion: 1,
    },
  });
  await seedLedger(db, ROWS);
}, 180_000);

afterAll(async () => {
  await db?.close();
  await schema?.drop();
});

const table = () => `"${schema.schema}".ledger_accounts`;
const snapshot = () =>
  rawQuery<{
    id: number;
    iban_ciphertext: Buffer;
    iban_iv: Buffer;
    iban_wrapped_key: Buffer;
    iban_key_version: number;
    holder_ciphertext: Buffer;
  }>(
    schema.url,
    `SELECT id, iban_ciphertext, iban_iv, iban_wrapped_key, iban_key_version, holder_ciphertext
     FROM ${table()} ORDER BY id`,
  );

/** Every row reads back through TypeORM as it was saved, with a cold cache. */
const everyRowReads = () => expectLedgerReads(db, ROWS);

const leaseStates = (jobId: string) =>
  rawQuery<{ state: string; n: number }>(
    schema.url,
    `SELECT state, count(*)::int AS n FROM "${schema.schema}".typeorm_envelope_job_ranges
     WHERE job_id = $1 GROUP BY state ORDER BY state`,
    [jobId],
  );

describe('workers over primary-key ranges', () => {
  it('re-encrypt every row exactly once with three workers', async () => {
    const before = await snapshot();
    const result = await reencryptColumns(db.dataSource, db.encryption, {
      workers: 3,
      jobId: 'reencrypt-3',
      ranges: 9,
    });
    expect(result.error).toBeUndefined();
    expect(
      result.properties.map((p) => [p.property, p.rowsReencrypted, p.rowsSkipped, p.failures.length]),
    ).toEqual([
      ['iban', ROWS, 0, 0],
      ['holder', ROWS, 0, 0],
    ]);
    expect(result.workers).toMatchObject({ jobId: 'reencrypt-3', workers: 3, planned: true, rangesDone: 9 });
    expect(await leaseStates('reencrypt-3')).toEqual([{ state: 'done', n: 9 }]);
    const after = await snapshot();
    /* Every value sealed anew: a new IV and ciphertext in every row, none left as it was. */
    const unchanged = after.filter((row, i) =>
      row.iban_ciphertext.equals(before[i]?.iban_ciphertext as Buffer),
    );
    expect(unchanged).toEqual([]);
    expect(new Set(after.map((r) => r.iban_iv.toString('hex'))).size).toBe(ROWS);
    await everyRowReads();
  });

  it('a second run of a finished job id does nothing', async () => {
    const before = await snapshot();
    const again = await reencryptColumns(db.dataSource, db.encryption, { workers: 2, jobId: 'reencrypt-3' });
    expect(again.workers).toMatchObject({ planned: false, rangesDone: 0 });
    expect(again.properties).toEqual([]);
    expect(await snapshot()).toEqual(before);
  });

  it('re-wrap the sidecar rows with two workers: data untouched, every wrapped key moved to version 2', async () => {
    await db.encryption.activate(2);
    const before = await snapshot();
    const result = await rewrapDataKeys(db.dataSource, db.encryption, { workers: 2, toVersion: 2 });
    expect(result.error).toBeUndefined();
    expect(result.properties.map((p) => [p.property, p.rowsRewrapped, p.failures.length])).toEqual([
      ['iban', ROWS, 0],
      ['holder', ROWS, 0],
    ]);
    expect(result.workers?.rangesDone).toBeGreaterThan(1);
    const after = await snapshot();
    for (const [i, row] of after.entries()) {
      const old = before[i] as (typeof before)[number];
      expect(row.iban_ciphertext.equals(old.iban_ciphertext) && row.iban_iv.equals(old.iban_iv)).toBe(true);
      expect(row.iban_key_version).toBe(2);
      expect(row.iban_wrapped_key.equals(old.iban_wrapped_key)).toBe(false);
    }
    await everyRowReads();
  });

  it('refuses workers inside a QueryRunner (a migration) and a key range beside workers', async () => {
    const runner = db.dataSource.createQueryRunner();
    try {
      await expect(reencryptColumns(runner, db.encryption, { workers: 2 })).rejects.toThrow(
        /needs a DataSource/,
      );
    } finally {
      await runner.release();
    }
    await expect(
      reencryptColumns(db.dataSource, db.encryption, { workers: 2, keyRange: { upTo: ['10'] } }),
    ).rejects.toThrow(/cannot be combined/);
  });
});

describe('a worker process killed part-way', () => {
  function startJob(jobId: string): ChildProcess {
    return spawn(
      process.execPath,
      [
        '-r',
        resolve(root, 'test/support/register-ts.cjs'),
        resolve(root, 'test/support/parallel-job-child.ts'),
      ],
      {
        cwd: root,
        env: {
          ...process.env,
          WORKER_JOB_DATABASE_URL: schema.url,
          WORKER_JOB_SCHEMA: schema.schema,
          WORKER_JOB_MASTER_KEY: masterKey,
          WORKER_JOB_ID: jobId,
          /* Longer than the test may run: the leases run out only when the test expires them (SQL). */
          WORKER_JOB_LEASE_MS: '600000',
        },
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
  }

  it('leaves ranges to be taken over once their leases run out; the next run finishes the job and every row reads', {
    timeout: 300_000,
  }, async () => {
    /* The child holds only version 1; the rows are back under it for this test. */
    await db.encryption.activate(1);
    await rewrapDataKeys(db.dataSource, db.encryption, { toVersion: 1 });
    const child = startJob('killed');
    let stderr = '';
    child.stderr?.on('data', (chunk) => {
      stderr += String(chunk);
    });
    const exited = new Promise<NodeJS.Signals | null>((done) =>
      child.on('exit', (_code, signal) => done(signal)),
    );
    let batches = 0;
    for await (const line of createInterface({ input: child.stdout as NodeJS.ReadableStream })) {
      if ((JSON.parse(line) as { event: string }).event === 'batch') batches++;
      if (batches >= 12) {
        child.kill('SIGKILL');
        break;
      }
    }
    expect(await exited, stderr).toBe('SIGKILL');
    const left = await leaseStates('killed');
    expect(left.find((s) => s.state === 'running')?.n).toBeGreaterThan(0);
    await everyRowReads();
    /* Its leases still run: a run now does the free ranges and leaves the held ones alone. */
    const meanwhile = await reencryptColumns(db.dataSource, db.encryption, { workers: 2, jobId: 'killed' });
    expect(meanwhile.error).toBeUndefined();
    expect(meanwhile.workers?.progress.running).toBeGreaterThan(0);
    /* The dead worker's leases run out. */
    await rawQuery(
      schema.url,
      `UPDATE "${schema.schema}".typeorm_envelope_job_ranges SET lease_expires_at = now() - interval '1 second'
       WHERE job_id = 'killed' AND state = 'running'`,
    );
    const resumed = await reencryptColumns(db.dataSource, db.encryption, { workers: 2, jobId: 'killed' });
    expect(resumed.error).toBeUndefined();
    expect(resumed.workers?.rangesResumed).toBeGreaterThan(0);
    expect(resumed.workers?.progress).toMatchObject({ total: 8, done: 8, running: 0, pending: 0, failed: 0 });
    await everyRowReads();
  });
});

describe('the CLI with --workers', () => {
  let project: CliProject;
  beforeAll(async () => {
    project = await createCliProject({
      prefix: 'cli_workers',
      rows: 2_000,
      maxUses: 1_000_000,
      customer: (i) => ({ email: `w${i}@example.com`, plan: 'cli', address: null }),
    });
  }, 120_000);
  afterAll(() => project?.schema.drop());

  it('names the migration it needs when the lease table is missing, and changes nothing', async () => {
    const before = await rawQuery(
      project.schema.url,
      `SELECT * FROM "${project.schema.schema}".customer ORDER BY id`,
    );
    const { status, stderr } = runCli(['reencrypt', '--workers', '2'], project.env);
    expect(status).not.toBe(0);
    expect(stderr).toContain('TypeormEnvelopeJobRanges1764700000000');
    expect(
      await rawQuery(project.schema.url, `SELECT * FROM "${project.schema.schema}".customer ORDER BY id`),
    ).toEqual(before);
  });

  it('reencrypt --workers 2 --job-id: every row once, the ranges done in the lease table', async () => {
    const migrator = new DataSource({
      type: 'postgres',
      url: project.schema.url,
      schema: project.schema.schema,
      migrations: [TypeormEnvelopeJobRanges1764700000000],
    });
    await migrator.initialize();
    await migrator.runMigrations();
    await migrator.destroy();
    const { status, stdout, stderr } = runCli(
      ['--json', 'reencrypt', '--workers', '2', '--job-id', 'cli-reencrypt'],
      project.env,
    );
    expect(status, stderr).toBe(0);
    const result = JSON.parse(stdout);
    expect(result.workers).toMatchObject({ jobId: 'cli-reencrypt', workers: 2, planned: true });
    expect(result.workers.progress).toMatchObject({ done: result.workers.progress.total, running: 0 });
    const email = result.properties.find((p: { property: string }) => p.property === 'email');
    expect(email).toMatchObject({ rowsReencrypted: 2_000, rowsSkipped: 0, failures: [] });
    const [{ n } = { n: -1 }] = await rawQuery<{ n: number }>(
      project.schema.url,
      `SELECT count(*)::int AS n FROM "${project.schema.schema}".typeorm_envelope_job_ranges
       WHERE job_id = 'cli-reencrypt' AND state = 'done'`,
    );
    expect(n).toBe(result.workers.progress.total);
  });
});
