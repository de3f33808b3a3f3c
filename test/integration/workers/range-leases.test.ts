import 'reflect-metadata';
import { Column, DataSource, Entity, PrimaryColumn, PrimaryGeneratedColumn } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError, TypeormEnvelopeJobRanges1764700000000 } from '../../../src';
import { runInRanges } from '../../../src/rotation/parallel-job';
import { type KeyRange, planRanges, RangeLeases, type RangeTable } from '../../../src/rotation/range-leases';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';

@Entity('numbered')
class Numbered {
  @PrimaryGeneratedColumn() id!: number;
  @Column({ type: 'int' }) n!: number;
}

@Entity('composite')
class Composite {
  @PrimaryColumn({ type: 'varchar' }) region!: string;
  @PrimaryColumn({ type: 'uuid' }) id!: string;
}

let schema: TestSchema;
let dataSource: DataSource;
const ROWS = 10_000;

const numbered: RangeTable = { entity: 'Numbered', table: '', primaryKey: ['"id"'] };
const composite: RangeTable = { entity: 'Composite', table: '', primaryKey: ['"region"', '"id"'] };

beforeAll(async () => {
  schema = await createTestSchema('range_leases');
  dataSource = new DataSource({
    type: 'postgres',
    url: schema.url,
    schema: schema.schema,
    entities: [Numbered, Composite],
    migrations: [TypeormEnvelopeJobRanges1764700000000],
    migrationsRun: true,
    synchronize: true,
  });
  await dataSource.initialize();
  numbered.table = `"${schema.schema}"."numbered"`;
  composite.table = `"${schema.schema}"."composite"`;
  await dataSource.query(`INSERT INTO ${numbered.table} (n) SELECT g FROM generate_series(1, ${ROWS}) AS g`);
  await dataSource.query(
    `INSERT INTO ${composite.table} (region, id)
     SELECT (ARRAY['eu', 'us', 'ap'])[1 + g % 3], gen_random_uuid() FROM generate_series(1, 3000) AS g`,
  );
});

afterAll(async () => {
  await dataSource?.destroy();
  await schema?.drop();
});

const ranges = (jobId: string) =>
  rawQuery<{ range_no: number; after_key: string[] | null; up_to_key: string[] | null; state: string }>(
    schema.url,
    `SELECT range_no, after_key, up_to_key, state FROM "${schema.schema}".typeorm_envelope_job_ranges
     WHERE job_id = $1 ORDER BY range_no`,
    [jobId],
  );

/** How many rows of `table` fall in each range, counted by PostgreSQL with the stored bounds. */
async function rowsPerRange(
  table: RangeTable,
  stored: Array<{ after_key: string[] | null; up_to_key: string[] | null }>,
) {
  const key = table.primaryKey.length === 1 ? table.primaryKey[0] : `(${table.primaryKey.join(', ')})`;
  const tuple = (from: number) =>
    table.primaryKey.length === 1
      ? `$${from}`
      : `(${table.primaryKey.map((_, i) => `$${from + i}`).join(', ')})`;
  const counts: number[] = [];
  for (const range of stored) {
    const params = [...(range.after_key ?? []), ...(range.up_to_key ?? [])];
    const lower = range.after_key ? `${key} > ${tuple(1)}` : 'TRUE';
    const upper = range.up_to_key ? `${key} <= ${tuple(1 + (range.after_key?.length ?? 0))}` : 'TRUE';
    const [row] = await rawQuery<{ n: number }>(
      schema.url,
      `SELECT count(*)::int AS n FROM ${table.table} WHERE ${lower} AND ${upper}`,
      params,
    );
    counts.push(row?.n ?? -1);
  }
  return counts;
}

describe('planning a job', () => {
  it('splits a table into contiguous ranges that hold every row exactly once, of equal sizes', async () => {
    const runner = dataSource.createQueryRunner();
    try {
      const { planned, progress } = await planRanges(runner, 'split-1', 'reencryption', [numbered], 8);
      expect(planned).toBe(true);
      expect(progress).toEqual({ total: 8, pending: 8, running: 0, done: 0, failed: 0 });
    } finally {
      await runner.release();
    }
    const stored = await ranges('split-1');
    expect(stored[0]?.after_key).toBeNull();
    expect(stored.at(-1)?.up_to_key).toBeNull();
    for (let i = 1; i < stored.length; i++) expect(stored[i]?.after_key).toEqual(stored[i - 1]?.up_to_key);
    const counts = await rowsPerRange(numbered, stored);
    expect(counts.reduce((a, b) => a + b, 0)).toBe(ROWS);
    expect(counts).toEqual(Array(8).fill(ROWS / 8));
  });

  it('splits a composite key (text and uuid) the same way', async () => {
    const runner = dataSource.createQueryRunner();
    try {
      await planRanges(runner, 'split-composite', 'backfill', [composite], 5);
    } finally {
      await runner.release();
    }
    const stored = await ranges('split-composite');
    expect(stored).toHaveLength(5);
    expect(stored[1]?.after_key).toHaveLength(2);
    const counts = await rowsPerRange(composite, stored);
    expect(counts.reduce((a, b) => a + b, 0)).toBe(3000);
    expect(counts.every((n) => n === 600)).toBe(true);
  });

  it('is planned once: a second worker joins the plan, and another kind of job cannot take its id', async () => {
    const [a, b] = [dataSource.createQueryRunner(), dataSource.createQueryRunner()];
    try {
      const [first, second] = await Promise.all([
        planRanges(a, 'once', 'rotation', [numbered], 4),
        planRanges(b, 'once', 'rotation', [numbered], 6),
      ]);
      expect([first.planned, second.planned].sort()).toEqual([false, true]);
      /* Whichever got the lock planned; the other joined its split. */
      expect(await ranges('once')).toHaveLength(first.planned ? 4 : 6);
      await expect(planRanges(a, 'once', 'backfill', [numbered], 4)).rejects.toBeInstanceOf(ConfigError);
    } finally {
      await a.release();
      await b.release();
    }
  });

  it('keeps a small table in one open range', async () => {
    const runner = dataSource.createQueryRunner();
    try {
      await runner.query(`CREATE TABLE "${schema.schema}".tiny (id int PRIMARY KEY)`);
      await runner.query(`INSERT INTO "${schema.schema}".tiny VALUES (1), (2)`);
      await planRanges(
        runner,
        'tiny',
        'rotation',
        [{ entity: 'Tiny', table: `"${schema.schema}".tiny`, primaryKey: ['"id"'] }],
        8,
      );
    } finally {
      await runner.release();
    }
    expect(await ranges('tiny')).toEqual([
      { range_no: 0, after_key: null, up_to_key: null, state: 'pending' },
    ]);
  });
});

describe('leases', () => {
  it('hands each range to one worker; a range whose lease ran out is taken over, and its old holder can no longer finish it', async () => {
    const [ra, rb] = [dataSource.createQueryRunner(), dataSource.createQueryRunner()];
    try {
      await planRanges(ra, 'lease-1', 'reencryption', [numbered], 3);
      const a = new RangeLeases(ra, 'worker-a', 60_000);
      const b = new RangeLeases(rb, 'worker-b', 60_000);
      const claimed = await Promise.all([a.claim('lease-1'), b.claim('lease-1'), a.claim('lease-1')]);
      expect(new Set(claimed.map((c) => c?.rangeNo))).toEqual(new Set([0, 1, 2]));
      expect(await b.claim('lease-1')).toBeUndefined();
      const held = claimed.find((c) => c?.rangeNo === 1);
      const holder = held === claimed[1] ? b : a;
      const other = holder === a ? b : a;
      expect(await other.renew(held as NonNullable<typeof held>)).toBe(false);
      /* The holder dies: its lease runs out. */
      await rawQuery(
        schema.url,
        `UPDATE "${schema.schema}".typeorm_envelope_job_ranges SET lease_expires_at = now() - interval '1 second'
         WHERE job_id = 'lease-1' AND range_no = 1`,
      );
      const takenOver = await other.claim('lease-1');
      expect(takenOver).toMatchObject({ rangeNo: 1, attempts: 2 });
      expect(await holder.finish(held as NonNullable<typeof held>, { rows: 1 })).toBe(false);
      expect(await other.finish(takenOver as NonNullable<typeof takenOver>, { rows: 2 })).toBe(true);
      const [row] = await rawQuery<{ state: string; lease_owner: string; result: unknown }>(
        schema.url,
        `SELECT state, lease_owner, result FROM "${schema.schema}".typeorm_envelope_job_ranges
         WHERE job_id = 'lease-1' AND range_no = 1`,
      );
      expect(row).toEqual({ state: 'done', lease_owner: other.owner, result: { rows: 2 } });
    } finally {
      await ra.release();
      await rb.release();
    }
  });

  it('refuses a lease shorter than a second', () => {
    const runner = dataSource.createQueryRunner();
    expect(() => new RangeLeases(runner, 'w', 10)).toThrow(ConfigError);
    void runner.release();
  });
});

describe('runInRanges', () => {
  it('runs every range once over several workers, and reports what it did', async () => {
    const seen: KeyRange[] = [];
    const { results, report } = await runInRanges(
      dataSource,
      'reencryption',
      [numbered],
      { workers: 3, jobId: 'run-1', ranges: 6 },
      async (leased) => {
        seen.push(leased.range);
        const [row] = await rowsPerRange(numbered, [
          {
            after_key: (leased.range.after as string[]) ?? null,
            up_to_key: (leased.range.upTo as string[]) ?? null,
          },
        ]);
        return { rows: row };
      },
    );
    expect(seen).toHaveLength(6);
    expect(results.reduce((n, r) => n + (r.rows ?? 0), 0)).toBe(ROWS);
    expect(report).toMatchObject({
      jobId: 'run-1',
      workers: 3,
      planned: true,
      rangesDone: 6,
      rangesResumed: 0,
    });
    expect(report.progress).toEqual({ total: 6, pending: 0, running: 0, done: 6, failed: 0 });
    const stored = await rawQuery<{ result: { rows: number } }>(
      schema.url,
      `SELECT result FROM "${schema.schema}".typeorm_envelope_job_ranges WHERE job_id = 'run-1'`,
    );
    expect(stored.reduce((n, r) => n + r.result.rows, 0)).toBe(ROWS);
  });

  it('marks a failing range failed and goes on with the others; the next run does only the failed range', async () => {
    let failOnce = true;
    const run = (leased: { rangeNo: number }) => {
      if (leased.rangeNo === 2 && failOnce) {
        failOnce = false;
        return Promise.reject(new Error('provider unavailable'));
      }
      return Promise.resolve({ range: leased.rangeNo });
    };
    const first = await runInRanges(dataSource, 'backfill', [numbered], { jobId: 'run-2', ranges: 4 }, run);
    expect(first.errors.map((e) => (e as Error).message)).toEqual(['provider unavailable']);
    expect(first.results.map((r) => r.range)).toEqual([0, 1, 3]);
    expect((await ranges('run-2')).map((r) => r.state)).toEqual(['done', 'done', 'failed', 'done']);
    const again = await runInRanges(dataSource, 'backfill', [numbered], { jobId: 'run-2', workers: 2 }, run);
    expect(again.results.map((r) => r.range)).toEqual([2]);
    expect(again.errors).toEqual([]);
    expect(again.report).toMatchObject({ planned: false, rangesDone: 1, rangesResumed: 1 });
    expect(again.report.progress).toEqual({ total: 4, pending: 0, running: 0, done: 4, failed: 0 });
  });

  it('a result that reports an error marks its range failed too', async () => {
    const { errors } = await runInRanges(
      dataSource,
      'rotation',
      [numbered],
      { jobId: 'run-errors', ranges: 2 },
      (leased) => Promise.resolve({ error: leased.rangeNo === 1 ? new Error('key disabled') : undefined }),
      (result) => result.error,
    );
    expect(errors.map((e) => (e as Error).message)).toEqual(['key disabled']);
    expect((await ranges('run-errors')).map((r) => r.state)).toEqual(['done', 'failed']);
  });

  it('takes over the ranges a killed worker held, once their leases ran out', async () => {
    const runner = dataSource.createQueryRunner();
    try {
      await planRanges(runner, 'run-3', 'reencryption', [numbered], 4);
      const dead = new RangeLeases(runner, 'dead-worker', 60_000);
      await dead.claim('run-3');
      await dead.claim('run-3');
    } finally {
      await runner.release();
    }
    /* Leases still running are not taken: the other two ranges are done, these two left alone. */
    const meanwhile = await runInRanges(dataSource, 'reencryption', [numbered], { jobId: 'run-3' }, (l) =>
      Promise.resolve(l.rangeNo),
    );
    expect(meanwhile.results).toEqual([2, 3]);
    expect(meanwhile.report.progress).toMatchObject({ running: 2, done: 2 });
    await rawQuery(
      schema.url,
      `UPDATE "${schema.schema}".typeorm_envelope_job_ranges SET lease_expires_at = now() - interval '1 second'
       WHERE job_id = 'run-3' AND state = 'running'`,
    );
    const again = await runInRanges(
      dataSource,
      'reencryption',
      [numbered],
      { jobId: 'run-3', workers: 2 },
      (l) => Promise.resolve(l.rangeNo),
    );
    expect(again.results).toEqual([0, 1]);
    expect(again.report).toMatchObject({ planned: false, rangesDone: 2, rangesResumed: 2 });
    expect(again.report.progress).toEqual({ total: 4, pending: 0, running: 0, done: 4, failed: 0 });
  });
});
