import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { Client } from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KeyRegistry, LocalKeyProvider, type TenantJob, verifyEncryptedColumns } from '../../../src';
import { rawQuery } from '../../support/database';
import { TENANT_MIGRATIONS, TenantContact } from '../../support/tenant-entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/**
 * A tenant's onboarding job and its revert, each run in a child process and killed with SIGKILL
 * after a number of batches chosen at random, then run again here: no row lost, every value under
 * the right key with its ciphertext and IV unchanged, other tenants untouched, the job completed.
 */
const ROWS = 3_000;
const BYSTANDERS = 200;
const BATCH = 50;
const RUNS = 5;
const TENANT = 'ws-kill';
/** Progress lines a whole job prints: one per batch of the table, for each of the two properties. */
const BATCHES = 2 * Math.ceil((ROWS + 2 * BYSTANDERS) / BATCH);
/** Values of the tenant: every email, and the profile of every other row. */
const VALUES = ROWS + ROWS / 2;

const root = resolve(__dirname, '../../..');
const masterKey = randomBytes(32).toString('base64');
let db: EncryptedTestDatabase;
const expected = new Map<number, { email: string; phone: string | null }>();

const contacts = () => db.dataSource.getRepository(TenantContact);
const table = () => `"${db.schema.schema}".tenant_contacts`;
const original = () => `"${db.schema.schema}".original_contacts`;

beforeAll(async () => {
  db = await encryptedDatabase([TenantContact], {
    prefix: 'tenant_kill',
    migrations: TENANT_MIGRATIONS,
    encryption: { keys: [{ version: 1, provider: new LocalKeyProvider({ key: masterKey }) }] },
  });
  const rows = (tenant: string, count: number) =>
    Array.from({ length: count }, (_, i) =>
      contacts().create({
        workspaceId: tenant,
        email: `${tenant}-${i}@example.com`,
        profile: i % 2 === 0 ? { phone: `+${i}` } : null,
      }),
    );
  for (const c of await contacts().save(rows(TENANT, ROWS), { chunk: 500 })) {
    expected.set(c.id, { email: c.email, phone: c.profile?.phone ?? null });
  }
  await contacts().save(rows('ws-bystander', BYSTANDERS), { chunk: 500 });
  await contacts().save(rows('ws-bystander-byok', BYSTANDERS), { chunk: 500 });
  await db.encryption.tenants.addKey('ws-bystander-byok', {
    kind: 'customer-key',
    key: randomBytes(32).toString('base64'),
  });
  expect((await db.encryption.tenants.runJob('ws-bystander-byok')).state).toBe('completed');
  await rawQuery(db.schema.url, `CREATE TABLE ${original()} AS SELECT * FROM ${table()}`);
}, 120_000);
afterAll(() => db?.close());

function startJob(): ChildProcess {
  return spawn(
    process.execPath,
    ['-r', resolve(root, 'test/support/register-ts.cjs'), resolve(root, 'test/support/tenant-job-child.ts')],
    {
      cwd: root,
      env: {
        ...process.env,
        TENANT_JOB_DATABASE_URL: db.schema.url,
        TENANT_JOB_SCHEMA: db.schema.schema,
        TENANT_JOB_MASTER_KEY: masterKey,
        TENANT_JOB_TENANT: TENANT,
        TENANT_JOB_BATCH_SIZE: String(BATCH),
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
}

/** Runs the tenant's job in a child and kills it (SIGKILL) once it has printed `batches` batches. */
async function killAfter(
  batches: number,
): Promise<{ seen: number; signal: NodeJS.Signals | null; stderr: string }> {
  const child = startJob();
  let stderr = '';
  child.stderr?.on('data', (chunk) => {
    stderr += String(chunk);
  });
  const exited = new Promise<NodeJS.Signals | null>((done) =>
    child.on('exit', (_code, signal) => done(signal)),
  );
  let seen = 0;
  for await (const line of createInterface({ input: child.stdout as NodeJS.ReadableStream })) {
    const event = JSON.parse(line) as { event: string };
    if (event.event === 'batch') seen += 1;
    if (seen >= batches) {
      child.kill('SIGKILL');
      break;
    }
  }
  const signal = await exited;
  return { seen, signal, stderr };
}

/** The tenant's values under `version`, and rows and values in all. */
async function counts(version: number) {
  const [row] = await rawQuery<{ rows: number; values: number; under: number }>(
    db.schema.url,
    `SELECT count(*)::int AS rows,
            (count(*) + count(profile_key_version))::int AS values,
            (count(*) FILTER (WHERE email_key_version = $2)
              + count(*) FILTER (WHERE profile_key_version = $2))::int AS under
     FROM ${table()} WHERE "workspaceId" = $1`,
    [TENANT, version],
  );
  return row as { rows: number; values: number; under: number };
}

/** Every row against the original copy: ciphertext and IV of the tenant's rows, whole rows of the others. */
async function compareWithOriginal(version: number | null) {
  const [row] = await rawQuery<Record<string, number>>(
    db.schema.url,
    `SELECT count(*)::int AS total,
            count(*) FILTER (WHERE c.id IS NULL)::int AS lost,
            count(*) FILTER (WHERE c."workspaceId" = $1
              AND c.email_ciphertext = o.email_ciphertext AND c.email_iv = o.email_iv
              AND c.profile_ciphertext IS NOT DISTINCT FROM o.profile_ciphertext
              AND c.profile_iv IS NOT DISTINCT FROM o.profile_iv)::int AS unchanged,
            count(*) FILTER (WHERE c."workspaceId" = $1 AND c.email_key_version = $2
              AND (c.profile_key_version IS NULL OR c.profile_key_version = $2))::int AS under_target,
            count(*) FILTER (WHERE c."workspaceId" <> $1 AND ROW(c.*)::text = ROW(o.*)::text)::int AS others_identical
     FROM ${original()} o LEFT JOIN ${table()} c USING (id)`,
    [TENANT, version ?? -1],
  );
  return row;
}

/** Adds a customer-provided key for the tenant, made here, and activates it. */
const addTenantKey = () =>
  db.encryption.tenants.addKey(TENANT, { kind: 'customer-key', key: randomBytes(32).toString('base64') });

/** Reads every row of the tenant through TypeORM with nothing cached. */
async function expectEveryRowReadable(): Promise<void> {
  db.encryption.purgeCache();
  const rows = await contacts().find({ where: { workspaceId: TENANT }, order: { id: 'ASC' } });
  expect(rows.length).toBe(ROWS);
  for (const r of rows) {
    expect({ email: r.email, phone: r.profile?.phone ?? null }).toEqual(expected.get(r.id));
  }
}

/** Kills the tenant's pending job at a random batch, checks the state left, resumes it here, checks the end. */
async function killAndResume(kind: TenantJob['kind'], target: number): Promise<void> {
  const at = 5 + Math.floor(Math.random() * (BATCHES - 30));
  const { seen, signal, stderr } = await killAfter(at);
  expect(signal, `killed after ${at} of ${BATCHES} batches; stderr: ${stderr}`).toBe('SIGKILL');
  expect(seen).toBeGreaterThanOrEqual(at);

  // What the kill left: a persisted, unfinished job, part of the rows moved, every row readable
  const left = (await db.encryption.tenants.status(TENANT)).job as TenantJob;
  expect(['validating', 'rewrapping']).toContain(left.state);
  expect(left).toMatchObject({ kind, toVersion: kind === 'revert' ? null : target, finishedAt: null });
  const partial = await counts(target);
  expect(partial.rows).toBe(ROWS);
  expect(partial.under).toBeGreaterThan(0);
  expect(partial.under).toBeLessThan(VALUES);
  expect(left.rowsTotal).toBe(VALUES);
  expect(left.rowsDone).toBeGreaterThan(0);
  expect(left.rowsDone).toBeLessThanOrEqual(partial.under);
  await expectEveryRowReadable();

  // Resumed here: the same job, completed
  const resumed = await db.encryption.tenants.runJob(TENANT, { batchSize: 500 });
  expect(resumed).toMatchObject({ kind, state: 'completed', error: null });
  expect(resumed.rowsDone).toBe(VALUES - partial.under);
  expect((await db.encryption.tenants.status(TENANT)).job).toMatchObject({ kind, state: 'completed' });
  const [started] = await new KeyRegistry(db.dataSource, db.encryption).auditLog({
    tenant: TENANT,
    event: 'tenant-job-started',
    limit: 1,
  });
  expect(started?.details.resumedFrom).toBe(left.state);

  expect(await compareWithOriginal(target)).toEqual({
    total: ROWS + 2 * BYSTANDERS,
    lost: 0,
    unchanged: ROWS,
    under_target: ROWS,
    others_identical: 2 * BYSTANDERS,
  });
  await expectEveryRowReadable();
  const verified = await verifyEncryptedColumns(db.dataSource, db.encryption, { tenant: TENANT });
  expect(verified).toMatchObject({ rowsChecked: VALUES, failed: 0, offboarded: 0 });
}

describe('tenant jobs killed with SIGKILL and resumed', () => {
  it(`onboarding and revert each finish correctly after ${RUNS} kills at random points`, async () => {
    for (let run = 0; run < RUNS; run++) {
      const added = await addTenantKey();
      expect(added.job).toMatchObject({ kind: 'onboarding', state: 'pending' });
      await killAndResume('onboarding', added.version);

      const revert = await db.encryption.tenants.revert(TENANT);
      expect(revert).toMatchObject({ kind: 'revert', state: 'pending' });
      await killAndResume('revert', 1);
    }
  }, 600_000);

  it('an onboarding killed part-way can be reverted instead of resumed', async () => {
    const added = await addTenantKey();
    const at = 5 + Math.floor(Math.random() * (BATCHES - 30));
    expect((await killAfter(at)).signal).toBe('SIGKILL');
    const partial = await counts(added.version);
    expect(partial.under).toBeGreaterThan(0);
    expect(partial.under).toBeLessThan(VALUES);
    // The customer cancels: back to the application key, the rows already moved come back too
    const revert = await db.encryption.tenants.revert(TENANT);
    expect(revert).toMatchObject({ kind: 'revert', state: 'pending' });
    const done = await db.encryption.tenants.runJob(TENANT, { batchSize: 500 });
    expect(done).toMatchObject({ kind: 'revert', state: 'completed', rowsDone: partial.under });
    expect(await compareWithOriginal(1)).toEqual({
      total: ROWS + 2 * BYSTANDERS,
      lost: 0,
      unchanged: ROWS,
      under_target: ROWS,
      others_identical: 2 * BYSTANDERS,
    });
    await expectEveryRowReadable();
  }, 120_000);
});

/** What a process stopped after a report finds: the progress it reported, persisted. */
describe("a tenant job's progress", () => {
  it('onProgress hears only of progress already persisted, as another connection reads it', async () => {
    const added = await addTenantKey();
    /* Connected beforehand, so each read is sent the moment onProgress is called. */
    const observer = new Client({ connectionString: db.schema.url });
    await observer.connect();
    const reads: Array<Promise<{ told: number; persisted: { state: string; rowsDone: number } }>> = [];
    try {
      const job = await db.encryption.tenants.runJob(TENANT, {
        batchSize: 500,
        onProgress: (state) => {
          const told = state.rowsDone;
          const read = observer
            .query<{ state: string; rowsDone: number }>(
              `SELECT job->>'state' AS state, (job->>'rowsDone')::int AS "rowsDone"
               FROM "${db.schema.schema}".typeorm_envelope_tenants WHERE tenant_id = $1`,
              [TENANT],
            )
            .then((r) => ({ told, persisted: r.rows[0] as { state: string; rowsDone: number } }));
          reads.push(read);
          return read.then(() => undefined);
        },
      });
      expect(job).toMatchObject({ kind: 'onboarding', state: 'completed', rowsDone: VALUES });
    } finally {
      await Promise.allSettled(reads);
      await observer.end();
    }
    const seen = await Promise.all(reads);
    expect(seen.length).toBeGreaterThan(1);
    for (const { told, persisted } of seen) {
      expect(persisted.state).toBe('rewrapping');
      expect(persisted.rowsDone).toBeGreaterThanOrEqual(told);
    }
    expect((await counts(added.version)).under).toBe(VALUES);
    expect(await compareWithOriginal(added.version)).toMatchObject({
      lost: 0,
      unchanged: ROWS,
      under_target: ROWS,
    });
    await expectEveryRowReadable();
  }, 120_000);

  it('a progress save that fails is not reported, and the job still saves its later states', async () => {
    const added = await addTenantKey();
    /* The first progress save of the job fails in PostgreSQL (a sequence is not rolled back with it). */
    const s = db.schema.schema;
    await rawQuery(db.schema.url, `CREATE SEQUENCE "${s}".progress_saves`);
    await rawQuery(
      db.schema.url,
      `CREATE FUNCTION "${s}".fail_first_progress() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         IF NEW.job->>'state' = 'rewrapping' AND (NEW.job->>'rowsDone')::int > 0
            AND nextval('"${s}".progress_saves') = 1 THEN
           RAISE EXCEPTION 'progress save refused';
         END IF;
         RETURN NEW;
       END $$`,
    );
    await rawQuery(
      db.schema.url,
      `CREATE TRIGGER fail_first_progress BEFORE UPDATE ON "${s}".typeorm_envelope_tenants
       FOR EACH ROW EXECUTE FUNCTION "${s}".fail_first_progress()`,
    );
    const told: number[] = [];
    try {
      const job = await db.encryption.tenants.runJob(TENANT, {
        batchSize: 500,
        onProgress: (state) => {
          told.push(state.rowsDone);
        },
      });
      expect(job).toMatchObject({ kind: added.job?.kind, state: 'completed', rowsDone: VALUES, error: null });
    } finally {
      await rawQuery(db.schema.url, `DROP TRIGGER fail_first_progress ON "${s}".typeorm_envelope_tenants`);
    }
    const [saves] = await rawQuery<{ n: number }>(
      db.schema.url,
      `SELECT last_value::int AS n FROM "${s}".progress_saves`,
    );
    /* Every progress save but the refused one was reported. */
    expect(saves?.n).toBeGreaterThan(1);
    expect(told).toHaveLength((saves?.n ?? 0) - 1);
    expect((await db.encryption.tenants.status(TENANT)).job).toMatchObject({
      kind: added.job?.kind,
      state: 'completed',
      rowsDone: VALUES,
    });
    expect((await counts(added.version)).under).toBe(VALUES);
    await expectEveryRowReadable();
  }, 120_000);

  it('a job replaced while it runs stops at its next batch', async () => {
    const first = await addTenantKey();
    let second: Awaited<ReturnType<typeof addTenantKey>> | undefined;
    const told: number[] = [];
    const job = await db.encryption.tenants.runJob(TENANT, {
      batchSize: 500,
      onProgress: async (state) => {
        told.push(state.rowsDone);
        /* Another key activated after the first batch: the job is no longer the tenant's. */
        second ??= await addTenantKey();
      },
    });
    expect(job.state).toBe('failed');
    expect(job.error).toContain('replaced while it ran');
    /* Told of the batch after which the key was added, never of one after it. */
    expect(told).toHaveLength(1);
    const moved = await counts(first.version);
    expect(moved.under).toBeGreaterThan(0);
    expect(moved.under).toBeLessThan(VALUES);
    expect((await db.encryption.tenants.status(TENANT)).job).toMatchObject({
      state: 'pending',
      toVersion: second?.version,
    });
    expect((await db.encryption.tenants.runJob(TENANT, { batchSize: 500 })).state).toBe('completed');
    expect((await counts(second?.version ?? -1)).under).toBe(VALUES);
    await expectEveryRowReadable();
  }, 120_000);
});
