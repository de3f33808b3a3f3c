import { randomBytes } from 'node:crypto';
import 'reflect-metadata';
import type { QueryRunner, Repository } from 'typeorm';
import { afterEach, describe, expect, it } from 'vitest';
import { backfillEncryptedColumns, reencryptColumns, verifyEncryptedColumns } from '../../../src';
import type { EncryptionContext, GeneratedDataKey } from '../../../src/keys/key-provider';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';
import { LivePlain, LiveSecret } from '../../support/live-entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/**
 * A local key provider that can stop once, at its next call, until the test lets it go on: a job
 * calls its key provider only after it has read a batch, so the application's writes made during
 * the stop land exactly between the job's read of a row and its write.
 */
class PausingKeyProvider extends CountingKeyProvider {
  #pause?: () => Promise<void>;

  /** Runs `during` at the next key-provider call, before that call goes on. */
  pauseOnce(during: () => Promise<void>): void {
    this.#pause = during;
  }

  async #maybePause(): Promise<void> {
    const pause = this.#pause;
    this.#pause = undefined;
    if (pause) await pause();
  }

  protected override async _generateDataKey(context: EncryptionContext): Promise<GeneratedDataKey> {
    await this.#maybePause();
    return super._generateDataKey(context);
  }

  protected override async _unwrapDataKey(wrappedKey: Buffer, context: EncryptionContext): Promise<Buffer> {
    await this.#maybePause();
    return super._unwrapDataKey(wrappedKey, context);
  }
}

const ROWS = 40;
/** Concurrent writers in the random tests; each owns every WRITERS-th row, so its last write is the row's. */
const WRITERS = 3;
const open: Array<{ close(): Promise<void> }> = [];
let schemaToDrop: TestSchema | undefined;

afterEach(async () => {
  for (const db of open.splice(0).reverse()) await db.close();
  await schemaToDrop?.drop();
  schemaToDrop = undefined;
});

/**
 * Two instances of one application on the same tables and master key: `app` serves requests,
 * `job` runs the rotation job (its key provider can pause).
 */
async function twoInstances(
  entity: typeof LiveSecret | typeof LivePlain,
  seed: (schema: TestSchema) => Promise<void>,
  /** Run-time settings for the job instance's sessions (the pg `options` connection parameter). */
  jobSessionOptions?: string,
) {
  const schema = await createTestSchema('live');
  schemaToDrop = schema;
  await seed(schema);
  const masterKey = randomBytes(32).toString('base64');
  const instance = async (
    provider: CountingKeyProvider,
    options?: string,
  ): Promise<EncryptedTestDatabase> => {
    /* pg sends `options` to the server as run-time settings of every session it opens. */
    const url = new URL(schema.url);
    if (options) url.searchParams.set('options', options);
    const db = await encryptedDatabase([entity], {
      schema: { ...schema, url: url.toString() },
      encryption: { keys: [{ version: 1, provider }], activeVersion: 1 },
    });
    open.push(db);
    return db;
  };
  const app = await instance(new CountingKeyProvider(masterKey));
  const jobProvider = new PausingKeyProvider(masterKey);
  const job = await instance(jobProvider, jobSessionOptions);
  return { schema, app, job, jobProvider };
}

type Row = Record<string, unknown>;
const rowsOf = (schema: TestSchema, table: string) =>
  rawQuery<Row>(schema.url, `SELECT * FROM "${schema.schema}".${table} ORDER BY id`);

/** Every row reads back through TypeORM as the application last wrote it, and is whole in SQL. */
async function expectAsWritten(
  db: EncryptedTestDatabase,
  repo: Repository<LiveSecret> | Repository<LivePlain>,
  expected: Map<number, string>,
  table: string,
) {
  db.encryption.purgeCache();
  const read = await repo.find({ order: { id: 'ASC' } });
  expect(new Map(read.map((r) => [r.id, r.secret]))).toEqual(expected);
  const raw = await rowsOf(db.schema, table);
  expect(raw).toHaveLength(expected.size);
  for (const row of raw) {
    /* All four columns of one value, never a mix: each is present and the value authenticates. */
    expect([row.secret_ciphertext, row.secret_iv, row.secret_wrapped_key].every(Buffer.isBuffer)).toBe(true);
    expect(row.secret_key_version).toBe(1);
    expect((row.secret_ciphertext as Buffer).toString('latin1')).not.toContain('@example.com');
  }
  const verified = await verifyEncryptedColumns(db.dataSource, db.encryption);
  expect(verified).toMatchObject({ failed: 0, pendingBackfill: 0, rowsChecked: expected.size });
}

describe('reencryptColumns beside live writers', () => {
  async function accounts(jobSessionOptions?: string) {
    const setup = await twoInstances(LiveSecret, async () => undefined, jobSessionOptions);
    const repo = setup.app.dataSource.getRepository(LiveSecret);
    const saved = await repo.save(
      Array.from({ length: ROWS }, (_, i) => repo.create({ secret: `a${i}@example.com`, n: 0 })),
    );
    const expected = new Map(saved.map((a) => [a.id, a.secret]));
    return { ...setup, repo, saved, expected };
  }

  it('skips the rows the application wrote between the read of a batch and its write', async () => {
    const { app, job, jobProvider, repo, saved, expected, schema } = await accounts();
    const before = new Map((await rowsOf(schema, 'live_secrets')).map((r) => [r.id, r]));
    const [first, second, third, fourth] = saved as [LiveSecret, LiveSecret, LiveSecret, LiveSecret];
    jobProvider.pauseOnce(async () => {
      // A loaded entity changed and saved, an update(), a delete, and a save of another column only.
      const loaded = await repo.findOneByOrFail({ id: first.id });
      loaded.secret = 'saved-meanwhile@example.com';
      await repo.save(loaded);
      await repo.update({ id: second.id }, { secret: 'updated-meanwhile@example.com' });
      await repo.delete({ id: third.id });
      await repo.update({ id: fourth.id }, { n: 5 });
    });
    expected.set(first.id, 'saved-meanwhile@example.com');
    expected.set(second.id, 'updated-meanwhile@example.com');
    expected.delete(third.id);

    const result = await reencryptColumns(job.dataSource, job.encryption, { batchSize: 10 });
    expect(result.error).toBeUndefined();
    expect(result.properties[0]).toMatchObject({ rowsReencrypted: ROWS - 3, rowsSkipped: 3, failures: [] });
    await expectAsWritten(app, repo, expected, 'live_secrets');
    const after = new Map((await rowsOf(schema, 'live_secrets')).map((r) => [r.id, r]));
    // The rows the job wrote hold new data keys; the other column, written meanwhile, is kept.
    const untouched = [...after.values()].filter((r) => r.id !== first.id && r.id !== second.id);
    for (const row of untouched) {
      expect(
        (row.secret_wrapped_key as Buffer).equals(before.get(row.id)?.secret_wrapped_key as Buffer),
      ).toBe(false);
    }
    expect(after.get(fourth.id)?.n).toBe(5);
  });

  it("waits for an application transaction that holds the row, then leaves the application's value", async () => {
    const { app, job, repo, saved, expected } = await accounts();
    const target = saved[0] as LiveSecret;
    const runner = app.dataSource.createQueryRunner();
    await runner.connect();
    await runner.startTransaction();
    let jobDone = false;
    try {
      const inTransaction = runner.manager.getRepository(LiveSecret);
      const loaded = await inTransaction.findOneByOrFail({ id: target.id });
      loaded.secret = 'in-transaction@example.com';
      await inTransaction.save(loaded); // row locked, not committed: the job reads the old value
      const running = reencryptColumns(job.dataSource, job.encryption, { batchSize: 100 }).finally(() => {
        jobDone = true;
      });
      // The job's write of that row waits for the lock; commit once it does.
      const holder = await backendPid(runner);
      await waitUntil(async () => (await waitingFor(app, holder)) > 0 || jobDone);
      expect(jobDone).toBe(false);
      await runner.commitTransaction();
      const result = await running;
      expect(result.error).toBeUndefined();
      expect(result.properties[0]).toMatchObject({ rowsReencrypted: ROWS - 1, rowsSkipped: 1 });
    } finally {
      if (runner.isTransactionActive) await runner.rollbackTransaction();
      await runner.release();
    }
    expected.set(target.id, 'in-transaction@example.com');
    await expectAsWritten(app, repo, expected, 'live_secrets');
  });

  it('runs a batch again when PostgreSQL breaks a deadlock with an application transaction by aborting it', async () => {
    /*
     * PostgreSQL checks for a deadlock once per lock wait, deadlock_timeout after the wait begins.
     * The job's session waits first; its check must come after the application closes the cycle
     * (5 s leaves room on a loaded machine, where 1 s did not) and before the application's own.
     */
    const { app, job, repo, saved, expected } = await accounts('-c deadlock_timeout=5s');
    const [, second, , , fifth] = saved as LiveSecret[];
    const runner = app.dataSource.createQueryRunner();
    await runner.connect();
    await runner.startTransaction();
    try {
      /* So the job's session is the one that detects the deadlock, and is aborted. */
      await runner.query(`SET LOCAL deadlock_timeout = '60s'`);
      const inTransaction = runner.manager.getRepository(LiveSecret);
      await inTransaction.update({ id: (fifth as LiveSecret).id }, { n: 1 }); // the job will wait here
      const running = reencryptColumns(job.dataSource, job.encryption, { batchSize: 100 });
      const holder = await backendPid(runner);
      await waitUntil(async () => (await waitingFor(app, holder)) > 0);
      // The job holds the rows before the fifth; taking one of them closes the cycle.
      await inTransaction.update({ id: (second as LiveSecret).id }, { secret: 'deadlock@example.com' });
      await runner.commitTransaction();
      const result = await running;
      expect(result.error).toBeUndefined();
      expect(result.properties[0]).toMatchObject({ rowsReencrypted: ROWS - 1, rowsSkipped: 1, failures: [] });
    } finally {
      if (runner.isTransactionActive) await runner.rollbackTransaction();
      await runner.release();
    }
    expected.set((second as LiveSecret).id, 'deadlock@example.com');
    await expectAsWritten(app, repo, expected, 'live_secrets');
  });

  it('an entity loaded before the job and saved after it keeps its value', async () => {
    const { app, job, repo, saved, expected, schema } = await accounts();
    const stale = await repo.findOneByOrFail({ id: (saved[0] as LiveSecret).id });
    const staleEdited = await repo.findOneByOrFail({ id: (saved[1] as LiveSecret).id });
    const result = await reencryptColumns(job.dataSource, job.encryption, { batchSize: 7 });
    expect(result.properties[0]).toMatchObject({ rowsReencrypted: ROWS, rowsSkipped: 0 });
    const [jobRow] = await rawQuery<Row>(
      schema.url,
      `SELECT * FROM "${schema.schema}".live_secrets WHERE id = $1`,
      [stale.id],
    );
    stale.n += 1;
    await repo.save(stale);
    staleEdited.secret = 'edited-after@example.com';
    await repo.save(staleEdited);
    expected.set(staleEdited.id, 'edited-after@example.com');
    await expectAsWritten(app, repo, expected, 'live_secrets');
    const [row] = await rawQuery<Row>(
      schema.url,
      `SELECT * FROM "${schema.schema}".live_secrets WHERE id = $1`,
      [stale.id],
    );
    expect(row?.n).toBe(1);
    // Saving the other column does not put back the value under the data key the job replaced.
    expect(row?.secret_ciphertext).toEqual(jobRow?.secret_ciphertext);
    expect(row?.secret_wrapped_key).toEqual(jobRow?.secret_wrapped_key);
  });

  it('loses nothing while several writers update random rows throughout the job', async () => {
    const { app, job, repo, saved, expected } = await accounts();
    const ids = saved.map((a) => a.id);
    let running = true;
    const writer = async (w: number) => {
      for (let n = 0; running || n < 5; n++) {
        const id = ids[w + WRITERS * ((n * 7) % Math.floor(ids.length / WRITERS))] as number;
        const email = `w${w}-${n}@example.com`;
        if (n % 2 === 0) {
          const loaded = await repo.findOneByOrFail({ id });
          loaded.secret = email;
          loaded.n += 1;
          await repo.save(loaded);
        } else {
          await repo.update({ id }, { secret: email });
        }
        expected.set(id, email);
      }
    };
    const writers = Array.from({ length: WRITERS }, (_, w) => writer(w));
    const result = await reencryptColumns(job.dataSource, job.encryption, { batchSize: 3 });
    running = false;
    await Promise.all(writers);
    expect(result.error).toBeUndefined();
    const outcome = result.properties[0];
    expect((outcome?.rowsReencrypted ?? 0) + (outcome?.rowsSkipped ?? 0)).toBe(ROWS);
    await expectAsWritten(app, repo, expected, 'live_secrets');
  });
});

describe('backfillEncryptedColumns beside live writers', () => {
  async function members() {
    const setup = await twoInstances(LivePlain, async (schema) => {
      await rawQuery(
        schema.url,
        `CREATE TABLE "${schema.schema}".live_plain (id serial PRIMARY KEY, secret varchar NOT NULL, n int NOT NULL);
         INSERT INTO "${schema.schema}".live_plain (secret, n)
           SELECT 'm' || i || '@example.com', 0 FROM generate_series(0, ${ROWS - 1}) AS i`,
      );
    });
    const repo = setup.app.dataSource.getRepository(LivePlain);
    const expected = new Map(
      (await rowsOf(setup.schema, 'live_plain')).map((r) => [r.id as number, r.secret as string]),
    );
    return { ...setup, repo, expected };
  }

  it.each([{ clearPlaintext: false }, { clearPlaintext: true }])(
    'skips rows written between its read and its write (clearPlaintext: $clearPlaintext)',
    async ({ clearPlaintext }) => {
      const { app, job, jobProvider, repo, expected, schema } = await members();
      const ids = [...expected.keys()];
      job.encryption.cache.renewEncryptionKey(); // the job's first seal asks the key provider
      jobProvider.pauseOnce(async () => {
        const loaded = await repo.findOneByOrFail({ id: ids[0] as number });
        loaded.secret = 'saved-meanwhile@example.com';
        await repo.save(loaded);
        await repo.update({ id: ids[1] as number }, { secret: 'updated-meanwhile@example.com' });
        await repo.delete({ id: ids[2] as number });
        await repo.update({ id: ids[3] as number }, { n: 9 });
        // An instance still running the previous release writes the old column directly.
        await rawQuery(schema.url, `UPDATE "${schema.schema}".live_plain SET secret = $1 WHERE id = $2`, [
          'old-release@example.com',
          ids[4],
        ]);
      });
      expected.set(ids[0] as number, 'saved-meanwhile@example.com');
      expected.set(ids[1] as number, 'updated-meanwhile@example.com');
      expected.delete(ids[2] as number);
      expected.set(ids[4] as number, 'old-release@example.com');

      const result = await backfillEncryptedColumns(job.dataSource, job.encryption, {
        batchSize: 10,
        clearPlaintext,
      });
      expect(result.error).toBeUndefined();
      // The row written by the old release is skipped in this run and encrypted by the next one.
      expect(result.properties[0]).toMatchObject({ rowsEncrypted: ROWS - 4, failures: [] });
      const again = await backfillEncryptedColumns(job.dataSource, job.encryption, { clearPlaintext });
      expect(again.properties[0]).toMatchObject({ rowsEncrypted: 1 });
      await expectAsWritten(app, repo, expected, 'live_plain');
      const raw = await rowsOf(schema, 'live_plain');
      for (const row of raw) {
        const written = row.id === ids[0] || row.id === ids[1];
        expect(row.secret).toBe(written || clearPlaintext ? null : expected.get(row.id as number));
      }
      expect(raw.find((r) => r.id === ids[3])?.n).toBe(9);
    },
  );

  it("waits for an application transaction that holds the row, then leaves the application's value", async () => {
    const { app, job, repo, expected } = await members();
    const id = [...expected.keys()][0] as number;
    const runner = app.dataSource.createQueryRunner();
    await runner.connect();
    await runner.startTransaction();
    let jobDone = false;
    try {
      await runner.manager.getRepository(LivePlain).update({ id }, { secret: 'in-transaction@example.com' });
      const running = backfillEncryptedColumns(job.dataSource, job.encryption, { batchSize: 100 }).finally(
        () => {
          jobDone = true;
        },
      );
      const holder = await backendPid(runner);
      await waitUntil(async () => (await waitingFor(app, holder)) > 0 || jobDone);
      expect(jobDone).toBe(false);
      await runner.commitTransaction();
      const result = await running;
      expect(result.error).toBeUndefined();
      expect(result.properties[0]).toMatchObject({ rowsEncrypted: ROWS - 1 });
    } finally {
      if (runner.isTransactionActive) await runner.rollbackTransaction();
      await runner.release();
    }
    expected.set(id, 'in-transaction@example.com');
    await expectAsWritten(app, repo, expected, 'live_plain');
  });

  it('an entity loaded before the backfill and saved after it keeps its value, and no plaintext comes back', async () => {
    const { app, job, repo, expected, schema } = await members();
    const [a, b] = [...expected.keys()] as [number, number];
    const stale = await repo.findOneByOrFail({ id: a });
    const staleEdited = await repo.findOneByOrFail({ id: b });
    const result = await backfillEncryptedColumns(job.dataSource, job.encryption, { clearPlaintext: true });
    expect(result.properties[0]).toMatchObject({ rowsEncrypted: ROWS });
    stale.n += 1;
    await repo.save(stale);
    staleEdited.secret = 'edited-after@example.com';
    await repo.save(staleEdited);
    expected.set(b, 'edited-after@example.com');
    await expectAsWritten(app, repo, expected, 'live_plain');
    const raw = await rowsOf(schema, 'live_plain');
    expect(raw.filter((r) => r.secret !== null)).toEqual([]);
    expect(raw.find((r) => r.id === a)?.n).toBe(1);
  });

  it('loses nothing while several writers update random rows throughout the backfill', async () => {
    const { app, job, repo, expected } = await members();
    const ids = [...expected.keys()];
    let running = true;
    const writer = async (w: number) => {
      for (let n = 0; running || n < 5; n++) {
        const id = ids[w + WRITERS * ((n * 7) % Math.floor(ids.length / WRITERS))] as number;
        const email = `w${w}-${n}@example.com`;
        if (n % 2 === 0) {
          const loaded = await repo.findOneByOrFail({ id });
          loaded.secret = email;
          await repo.save(loaded);
        } else {
          await repo.update({ id }, { secret: email });
        }
        expected.set(id, email);
      }
    };
    const writers = Array.from({ length: WRITERS }, (_, w) => writer(w));
    const result = await backfillEncryptedColumns(job.dataSource, job.encryption, { batchSize: 3 });
    running = false;
    await Promise.all(writers);
    expect(result.error).toBeUndefined();
    await expectAsWritten(app, repo, expected, 'live_plain');
  });
});

async function backendPid(runner: QueryRunner): Promise<number> {
  const [row] = (await runner.query('SELECT pg_backend_pid() AS pid')) as Array<{ pid: number }>;
  return row?.pid as number;
}

/** Backends waiting for a lock that backend `pid` holds. */
async function waitingFor(db: EncryptedTestDatabase, pid: number): Promise<number> {
  const [row] = await rawQuery<{ n: number }>(
    db.schema.url,
    'SELECT count(*)::int AS n FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))',
    [pid],
  );
  return row?.n ?? 0;
}

/** Polls `condition` until it holds (no time limit of its own: the test timeout bounds it). */
async function waitUntil(condition: () => Promise<boolean>): Promise<void> {
  while (!(await condition())) await new Promise((resolve) => setTimeout(resolve, 10));
}
