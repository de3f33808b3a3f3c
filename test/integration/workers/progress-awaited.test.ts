import 'reflect-metadata';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { reencryptColumns, rewrapDataKeys, TypeormEnvelopeJobRanges1764700000000 } from '../../../src';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';
import { LedgerAccount } from '../../support/worker-entities';
import { expectLedgerReads, generatedKeys, seedLedger } from './worker-support';

/**
 * A job waits for the promise its `onProgress` returns before it writes its next batch, with one
 * worker or several, so a caller that records progress somewhere (a job queue, a status row)
 * never records less than the database holds when it is stopped; a rejection ends the job.
 */
const ROWS = 1_000;
const BATCH = 100;
let schema: TestSchema;
let db: EncryptedTestDatabase;

beforeAll(async () => {
  schema = await createTestSchema('progress_awaited');
  db = await encryptedDatabase([LedgerAccount], {
    schema,
    migrations: [TypeormEnvelopeJobRanges1764700000000],
    encryption: { keys: generatedKeys(), activeVersion: 1 },
  });
  await seedLedger(db, ROWS);
}, 120_000);

afterAll(async () => {
  await db?.close();
  await schema?.drop();
});

/** Values of `property` stored under master-key version `version`. */
async function under(property: 'iban' | 'holder', version: number): Promise<number> {
  const [row] = await rawQuery<{ n: number }>(
    schema.url,
    `SELECT count(*)::int AS n FROM "${schema.schema}".ledger_accounts WHERE ${property}_key_version = $1`,
    [version],
  );
  return row?.n ?? -1;
}

const everyRowReads = () => expectLedgerReads(db, ROWS);

describe('onProgress returning a promise', () => {
  it('one worker: no batch is written until the promise settles, and each report matches the table', async () => {
    await db.encryption.activate(2);
    const seen: Array<{ property: string; told: number; before: number; after: number }> = [];
    const result = await reencryptColumns(db.dataSource, db.encryption, {
      batchSize: BATCH,
      onProgress: async (p) => {
        const property = p.property as 'iban' | 'holder';
        const before = await under(property, 2);
        /* Time for a job that did not wait to write its next batch. */
        await sleep(20);
        seen.push({ property, told: p.rowsDone, before, after: await under(property, 2) });
      },
    });
    expect(result.error).toBeUndefined();
    expect(result.properties.map((p) => [p.property, p.rowsReencrypted])).toEqual([
      ['iban', ROWS],
      ['holder', ROWS],
    ]);
    expect(seen).toHaveLength(2 * (ROWS / BATCH));
    for (const s of seen)
      expect(s).toEqual({ property: s.property, told: s.told, before: s.told, after: s.told });
    expect([await under('iban', 2), await under('holder', 2)]).toEqual([ROWS, ROWS]);
    await everyRowReads();
  });

  it('two workers: each waits for its own report, so no more than two are pending at once', async () => {
    let pending = 0;
    let most = 0;
    const told: number[] = [];
    const result = await rewrapDataKeys(db.dataSource, db.encryption, {
      workers: 2,
      ranges: 4,
      batchSize: BATCH,
      toVersion: 1,
      onProgress: async (p) => {
        pending += 1;
        most = Math.max(most, pending);
        try {
          const written = await under(p.property as 'iban' | 'holder', 1);
          /* What is reported is already in the table (another worker may be ahead of its report). */
          told.push(written - p.rowsDone);
          await sleep(20);
        } finally {
          pending -= 1;
        }
      },
    });
    expect(result.error).toBeUndefined();
    expect(result.properties.map((p) => [p.property, p.rowsRewrapped])).toEqual([
      ['iban', ROWS],
      ['holder', ROWS],
    ]);
    expect(told.length).toBeGreaterThanOrEqual(2 * (ROWS / BATCH));
    expect(told.filter((d) => d < 0)).toEqual([]);
    expect(most).toBeGreaterThanOrEqual(1);
    expect(most).toBeLessThanOrEqual(2);
    expect([await under('iban', 1), await under('holder', 1)]).toEqual([ROWS, ROWS]);
    await everyRowReads();
  });

  it('a rejected report ends the job there, in error, with the rows written so far readable', async () => {
    let calls = 0;
    const result = await rewrapDataKeys(db.dataSource, db.encryption, {
      batchSize: BATCH,
      toVersion: 2,
      onProgress: async () => {
        calls += 1;
        if (calls === 3) throw new Error('progress store unavailable');
      },
    });
    expect(String(result.error)).toContain('progress store unavailable');
    expect(calls).toBe(3);
    expect([await under('iban', 2), await under('holder', 2)]).toEqual([3 * BATCH, 0]);
    await everyRowReads();
    /* Run again, it finishes. */
    const again = await rewrapDataKeys(db.dataSource, db.encryption, { toVersion: 2 });
    expect(again.error).toBeUndefined();
    expect([await under('iban', 2), await under('holder', 2)]).toEqual([ROWS, ROWS]);
  });
});
