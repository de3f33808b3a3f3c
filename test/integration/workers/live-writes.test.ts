import 'reflect-metadata';
import { randomBytes } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import {
  backfillEncryptedColumns,
  migrateLayout,
  reencryptColumns,
  rewrapDataKeys,
  TypeormEnvelopeJobRanges1764700000000,
  verifyEncryptedColumns,
  type WorkersReport,
} from '../../../src';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';
import { LayoutMigrating, LivePlain, LiveSecret } from '../../support/live-entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';
import { JOB_MIGRATIONS } from '../compact-jobs/job-entities';
import { dataKeyIdOf, keyRows, onPglite } from '../compact-jobs/job-support';
import { generatedKeys } from './worker-support';

/**
 * Each row-by-row job run with two workers over primary-key ranges while the application, through
 * a DataSource of its own, updates rows with a repository save, inserts rows and deletes rows the
 * whole time: afterwards every row reads back as the application last wrote it, deleted rows stay
 * deleted, no row is lost or doubled, and every stored value is in the form the job produces (format,
 * key version or data-key row), with no plaintext in any column.
 */
const ROWS = 3_000;
const BATCH = 50;
/** Concurrent application writers; each owns every WRITERS-th row and the rows it inserts. */
const WRITERS = 3;
/** Text in every plaintext value, looked for in the stored bytes. */
const MARK = 'live-secret';

type LiveEntity = typeof LiveSecret | typeof LivePlain | typeof LayoutMigrating;
type Row = { id: number; secret: string; n: number };
type Stored = Record<string, unknown> & { id: number };

const seeded = (n: number) => `${MARK} ${n}`;
const keys = generatedKeys();
const open: Array<{ close(): Promise<void> }> = [];
let schemaToDrop: TestSchema | undefined;

afterEach(async () => {
  for (const db of open.splice(0).reverse()) await db.close();
  await schemaToDrop?.drop();
  schemaToDrop = undefined;
});

/** A DataSource of one application instance on the schema, with its own EnvelopeEncryption. */
async function instance(schema: TestSchema, entity: LiveEntity, activeVersion = 1) {
  const db = await encryptedDatabase([entity], {
    schema,
    migrations: [...JOB_MIGRATIONS, TypeormEnvelopeJobRanges1764700000000],
    encryption: { keys, activeVersion },
  });
  open.push(db);
  return db;
}

async function newSchema(): Promise<TestSchema> {
  const schema = await createTestSchema('live_workers');
  schemaToDrop = schema;
  return schema;
}

/** ROWS rows saved through TypeORM, `secret` = seeded(n). */
async function seed(db: EncryptedTestDatabase, entity: LiveEntity): Promise<void> {
  const repo = db.dataSource.getRepository<Row>(entity);
  await repo.save(
    Array.from({ length: ROWS }, (_, n) => repo.create({ secret: seeded(n), n })),
    { chunk: 500 },
  );
}

const stored = (db: EncryptedTestDatabase, table: string) =>
  rawQuery<Stored>(db.schema.url, `SELECT * FROM "${db.schema.schema}".${table} ORDER BY id`);

/** What the application did while the job ran. */
interface LiveWrites {
  /** Every row that must exist, with the value last written to it. */
  expected: Map<number, string>;
  /** Rows the application updated or inserted. */
  written: Set<number>;
  deleted: Set<number>;
  /** Writes (updates, inserts, deletes) done before the job returned. */
  duringJob: { updates: number; inserts: number; deletes: number };
}

/**
 * Runs `job` while WRITERS application writers update (repository save), insert and delete rows
 * through `app`, until the job returns. Each batch the job reports waits until the writers have
 * done one more write, so writes land throughout the job, in ranges done and not yet done.
 */
async function whileWriting<R>(
  app: EncryptedTestDatabase,
  entity: LiveEntity,
  job: (onProgress: () => Promise<void>) => Promise<R>,
): Promise<{ result: R; live: LiveWrites }> {
  const repo = app.dataSource.getRepository<Row>(entity);
  const initial = await rawQuery<{ id: number; n: number }>(
    app.schema.url,
    `SELECT id, n FROM "${app.schema.schema}".${repo.metadata.tableName} ORDER BY id`,
  );
  const live: LiveWrites = {
    expected: new Map(initial.map((r) => [r.id, seeded(r.n)])),
    written: new Set(),
    deleted: new Set(),
    duringJob: { updates: 0, inserts: 0, deletes: 0 },
  };
  let running = true;
  let writes = 0;
  let failure: unknown;
  const waiting: Array<() => void> = [];
  const wake = () => {
    for (const resume of waiting.splice(0)) resume();
  };
  const count = (kind: keyof LiveWrites['duringJob']) => {
    if (running) live.duringJob[kind] += 1;
    writes += 1;
    wake();
  };
  const writer = async (w: number) => {
    const own = initial.map((r) => r.id).filter((_, i) => i % WRITERS === w);
    for (let k = 0; running || k < 8; k++) {
      const id = own[(k * 37) % own.length] as number;
      const value = `${MARK} w${w} k${k} ${randomBytes(4).toString('hex')}`;
      if (k % 4 === 3) {
        await repo.delete({ id });
        own.splice(own.indexOf(id), 1);
        live.expected.delete(id);
        live.written.delete(id);
        live.deleted.add(id);
        count('deletes');
      } else if (k % 4 === 2) {
        const inserted = await repo.save(repo.create({ secret: value, n: -1 }));
        own.push(inserted.id);
        live.expected.set(inserted.id, value);
        live.written.add(inserted.id);
        count('inserts');
      } else {
        const row = await repo.findOneByOrFail({ id });
        row.secret = value;
        await repo.save(row);
        live.expected.set(id, value);
        live.written.add(id);
        count('updates');
      }
    }
  };
  const writers = Array.from({ length: WRITERS }, (_, w) =>
    writer(w).catch((error: unknown) => {
      failure ??= error;
      wake();
    }),
  );
  let reports = 0;
  const onProgress = async () => {
    const due = ++reports;
    while (writes < due && failure === undefined) await new Promise<void>((resume) => waiting.push(resume));
  };
  let result: R;
  try {
    result = await job(onProgress);
  } finally {
    running = false;
  }
  await Promise.all(writers);
  if (failure !== undefined) throw failure;
  return { result, live };
}

/**
 * Every row reads back through the application as last written, deleted rows are gone, no row is
 * lost or doubled, no column holds plaintext, and verify passes. Returns the stored rows.
 */
async function expectAsWritten(
  app: EncryptedTestDatabase,
  entity: LiveEntity,
  live: LiveWrites,
): Promise<Stored[]> {
  const { duringJob } = live;
  expect(duringJob.updates).toBeGreaterThan(0);
  expect(duringJob.inserts).toBeGreaterThan(0);
  expect(duringJob.deletes).toBeGreaterThan(0);

  app.encryption.purgeCache();
  const repo = app.dataSource.getRepository<Row>(entity);
  const read = await repo.find({ order: { id: 'ASC' } });
  expect(new Map(read.map((r) => [r.id, r.secret]))).toEqual(live.expected);
  for (const id of live.deleted) expect(await repo.findOneBy({ id })).toBeNull();

  const rows = await stored(app, repo.metadata.tableName);
  expect(rows.map((r) => r.id)).toEqual([...live.expected.keys()].sort((a, b) => a - b));
  const plaintext = rows.filter((row) =>
    Object.values(row).some((v) =>
      (Buffer.isBuffer(v) ? v.toString('latin1') : String(v ?? '')).includes(MARK),
    ),
  );
  expect(plaintext.map((r) => r.id)).toEqual([]);
  const verified = await verifyEncryptedColumns(app.dataSource, app.encryption);
  expect(verified).toMatchObject({ failed: 0, pendingBackfill: 0, rowsChecked: live.expected.size });
  return rows;
}

/** The job's share between the workers: more than one range, all of them done. */
function expectShared(report: WorkersReport | undefined): void {
  expect(report).toMatchObject({ workers: 2, planned: true });
  expect(report?.rangesDone).toBeGreaterThan(1);
  expect(report?.progress).toMatchObject({ running: 0, pending: 0, failed: 0 });
  expect(report?.progress.done).toBe(report?.progress.total);
}

const byId = (rows: Stored[]) => new Map(rows.map((r) => [r.id, r]));

/**
 * ROWS rows of `live_secrets` saved under version 1, then version 2 activated in the application;
 * the job's instance has version 2 active. Returns both, and the rows as stored before the job.
 */
async function sealedUnderVersionOne() {
  const schema = await newSchema();
  const app = await instance(schema, LiveSecret);
  await seed(app, LiveSecret);
  const before = byId(await stored(app, 'live_secrets'));
  await app.encryption.activate(2);
  const job = await instance(schema, LiveSecret, 2);
  return { app, job, before };
}

/**
 * The job ended without error or failure, shared between the workers, and wrote at least every
 * row the application did not write (`done`, its count of rows written). Returns those rows' ids.
 */
function expectFinished(
  result: { error?: unknown; workers?: WorkersReport; properties: Array<{ failures: unknown[] }> },
  done: number | undefined,
  live: LiveWrites,
): Set<number> {
  expect(result.error).toBeUndefined();
  expectShared(result.workers);
  expect(result.properties.flatMap((p) => p.failures)).toEqual([]);
  const untouched = new Set([...live.expected.keys()].filter((id) => !live.written.has(id)));
  expect(done).toBeGreaterThanOrEqual(untouched.size);
  return untouched;
}

/** A sidecar value (format 1, all four columns) under master-key version `version`. */
function expectSidecarValue(row: Stored, version: number): void {
  expect((row.secret_ciphertext as Buffer)[0]).toBe(0x01);
  expect([row.secret_iv, row.secret_wrapped_key].every(Buffer.isBuffer)).toBe(true);
  expect(row.secret_key_version).toBe(version);
}

/** The stored columns of a row before the job and after it, for the rows only the job wrote. */
function jobOnlyRows(rows: Stored[], before: Map<number, Stored>, untouched: Set<number>) {
  return rows.filter((r) => untouched.has(r.id)).map((now) => ({ now, old: before.get(now.id) as Stored }));
}

const same = (a: unknown, b: unknown) => (a as Buffer).equals(b as Buffer);

describe('application writes while a job runs with two workers', () => {
  it('reencryptColumns: every value sealed anew under the active version, the writes kept', async () => {
    const { app, job, before } = await sealedUnderVersionOne();
    const { result, live } = await whileWriting(app, LiveSecret, (onProgress) =>
      reencryptColumns(job.dataSource, job.encryption, { workers: 2, batchSize: BATCH, onProgress }),
    );
    const untouched = expectFinished(result, result.properties[0]?.rowsReencrypted, live);

    const rows = await expectAsWritten(app, LiveSecret, live);
    for (const row of rows) expectSidecarValue(row, 2);
    /* The rows only the job wrote: a new ciphertext and IV, not the ones they had. */
    const kept = jobOnlyRows(rows, before, untouched).filter(
      ({ now, old }) =>
        same(now.secret_ciphertext, old.secret_ciphertext) || same(now.secret_iv, old.secret_iv),
    );
    expect(kept).toEqual([]);
  }, 300_000);

  it('rewrapDataKeys (sidecars): every wrapped key under the target version, ciphertexts of untouched rows unchanged', async () => {
    const { app, job, before } = await sealedUnderVersionOne();
    const { result, live } = await whileWriting(app, LiveSecret, (onProgress) =>
      rewrapDataKeys(job.dataSource, job.encryption, {
        workers: 2,
        batchSize: BATCH,
        toVersion: 2,
        onProgress,
      }),
    );
    const untouched = expectFinished(result, result.properties[0]?.rowsRewrapped, live);
    expect(result.properties[0]?.rowsRewrapped).toBeLessThanOrEqual(ROWS);

    const rows = await expectAsWritten(app, LiveSecret, live);
    for (const row of rows) expectSidecarValue(row, 2);
    /* The rows only the job wrote: the same ciphertext and IV, another wrapped key. */
    const changed = jobOnlyRows(rows, before, untouched).filter(
      ({ now, old }) =>
        !same(now.secret_ciphertext, old.secret_ciphertext) ||
        !same(now.secret_iv, old.secret_iv) ||
        same(now.secret_wrapped_key, old.secret_wrapped_key),
    );
    expect(changed).toEqual([]);
  }, 300_000);

  it('backfillEncryptedColumns (clearPlaintext): every row encrypted, the old column emptied, the writes kept', async () => {
    const schema = await newSchema();
    await rawQuery(
      schema.url,
      `CREATE TABLE "${schema.schema}".live_plain (id serial PRIMARY KEY, secret varchar NOT NULL, n int NOT NULL);
       INSERT INTO "${schema.schema}".live_plain (secret, n)
         SELECT '${MARK} ' || i, i FROM generate_series(0, ${ROWS - 1}) AS i`,
    );
    const app = await instance(schema, LivePlain, 2);
    const job = await instance(schema, LivePlain, 2);
    const { result, live } = await whileWriting(app, LivePlain, (onProgress) =>
      backfillEncryptedColumns(job.dataSource, job.encryption, {
        workers: 2,
        batchSize: BATCH,
        clearPlaintext: true,
        onProgress,
      }),
    );
    expectFinished(result, result.properties[0]?.rowsEncrypted, live);

    const rows = await expectAsWritten(app, LivePlain, live);
    for (const row of rows) {
      expect(row.secret).toBeNull();
      expectSidecarValue(row, 2);
    }
  }, 300_000);

  it.skipIf(onPglite)(
    'migrateLayout (sidecars to compact): every value compact, naming a stored key row, the writes kept',
    async () => {
      const schema = await newSchema();
      await seed(await instance(schema, LiveSecret), LiveSecret);
      const app = await instance(schema, LayoutMigrating);
      const job = await instance(schema, LayoutMigrating);
      const { result, live } = await whileWriting(app, LayoutMigrating, (onProgress) =>
        migrateLayout(job.dataSource, job.encryption, { workers: 2, batchSize: BATCH, onProgress }),
      );
      expectFinished(result, result.properties[0]?.rowsMigrated, live);
      expect(result.properties[0]).toMatchObject({ from: 'sidecars', to: 'compact' });

      const rows = await expectAsWritten(app, LayoutMigrating, live);
      const keyRowsById = new Map((await keyRows(app)).map((k) => [k.id, k]));
      for (const row of rows) {
        const value = row.secret_ciphertext as Buffer;
        expect(value[0]).toBe(0x02);
        expect([row.secret_iv, row.secret_wrapped_key, row.secret_key_version]).toEqual([null, null, null]);
        expect(keyRowsById.get(dataKeyIdOf(value))?.key_version).toBe(1);
      }
    },
    300_000,
  );
});
