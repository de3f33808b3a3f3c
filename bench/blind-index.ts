/**
 * The blind-index section of `npm run bench`: `findOneBy({ email })` among BENCH_LOGIN_ROWS
 * (100,000) rows, through a searchable encrypted property (its keyed HMAC index) against a
 * plaintext column with a B-tree index, BENCH_LOGIN_LOOKUPS (1,000) lookups per round over
 * BENCH_LOGIN_ROUNDS (5) rounds in alternating order, medians; and what the index adds to a write:
 * `save` of BENCH_LOGIN_WRITES (10,000) rows with and without `searchable`.
 */
import 'reflect-metadata';
import type { Repository } from 'typeorm';
import { type BenchDatabase, randomLocalKey, withBenchSchema } from './database';
import { EncryptedLogin, PlainLogin, SearchableLogin } from './entities';
import { TypeormEnvelopeIndexKeys1764600000000 } from './library';
import { collectGarbage, fmtInt, intEnv, median, round1, round2 } from './stats';

const ROWS = intEnv('BENCH_LOGIN_ROWS', 100_000);
const LOOKUPS = intEnv('BENCH_LOGIN_LOOKUPS', 1_000);
const ROUNDS = intEnv('BENCH_LOGIN_ROUNDS', 5);
const WRITES = intEnv('BENCH_LOGIN_WRITES', 10_000);
const CHUNK = 500;

/** What the section adds to bench/results.json. */
export interface BlindIndexBenchResult {
  rows: number;
  lookups: number;
  rounds: number;
  lookupMs: { plaintext: number; searchable: number; ratio: number; goal: number };
  writeMs: { encrypted: number; searchable: number; ratio: number; rows: number };
  usesIndex: boolean;
}

type Login = { id: number; email: string; fullName: string };

const emailOf = (n: number) => `member${n}@example.com`;

function check(condition: unknown, message: string): asserts condition {
  if (!condition) throw new Error(`verification failed (blind index): ${message}`);
}

export async function runBlindIndexBench(
  db: BenchDatabase,
): Promise<{ lines: string[]; result: BlindIndexBenchResult }> {
  const schemaOptions = {
    prefix: 'bench_bidx',
    entities: [SearchableLogin, EncryptedLogin],
    migrations: [TypeormEnvelopeIndexKeys1764600000000],
    keys: [randomLocalKey()],
  };
  return withBenchSchema(db, schemaOptions, async ({ schema, admin, dataSource: envelope, openPlain }) => {
    /* The baseline: the same rows in plaintext, through TypeORM without encryption. */
    const plain = await openPlain([PlainLogin]);
    const repositories = {
      plaintext: plain.getRepository(PlainLogin) as unknown as Repository<Login>,
      searchable: envelope.getRepository(SearchableLogin) as unknown as Repository<Login>,
    };
    const rows = (entity: new () => Login, from: number, count: number) =>
      Array.from({ length: count }, (_, i) =>
        Object.assign(new entity(), { email: emailOf(from + i), fullName: `Member ${from + i}` }),
      );
    console.error(`bench: blind index: ${fmtInt(ROWS)} rows each, ${LOOKUPS} lookups × ${ROUNDS} rounds`);
    await repositories.plaintext.save(rows(PlainLogin, 0, ROWS), { chunk: CHUNK });
    await repositories.searchable.save(rows(SearchableLogin, 0, ROWS), { chunk: CHUNK });
    for (const table of ['bench_login_plaintext', 'bench_login_searchable']) {
      await admin.query(`VACUUM (ANALYZE) "${schema}"."${table}"`);
    }
    /* The searchable lookup must be an index scan on the blind-index column. */
    const plan = (await envelope.query(
      `EXPLAIN SELECT id FROM "${schema}"."bench_login_searchable" WHERE email_bidx = $1`,
      [Buffer.alloc(34)],
    )) as Array<{ 'QUERY PLAN': string }>;
    const usesIndex = plan.some((line) => /Index (Only )?Scan/.test(line['QUERY PLAN']));
    check(usesIndex, `no index scan: ${plan.map((l) => l['QUERY PLAN']).join(' / ')}`);

    const samples: Record<'plaintext' | 'searchable', number[]> = { plaintext: [], searchable: [] };
    for (let round = 0; round < ROUNDS + 1; round++) {
      const picks = Array.from({ length: LOOKUPS }, (_, k) => (k * 7919 + round * 104_729) % ROWS);
      const order =
        round % 2 ? (['searchable', 'plaintext'] as const) : (['plaintext', 'searchable'] as const);
      for (const name of order) {
        collectGarbage();
        const started = performance.now();
        let found = 0;
        for (const n of picks) {
          /* The searchable side is asked as a user types it: normalisation finds the stored form. */
          const email = name === 'searchable' ? ` ${emailOf(n).toUpperCase()} ` : emailOf(n);
          const row = await repositories[name].findOneBy({ email });
          if (row?.fullName === `Member ${n}`) found++;
        }
        const ms = performance.now() - started;
        check(found === LOOKUPS, `${name}: ${found} of ${LOOKUPS} lookups found their row`);
        if (round > 0) samples[name].push(ms);
      }
    }
    const lookup = { plaintext: median(samples.plaintext), searchable: median(samples.searchable) };

    /* Write overhead: the same saves with and without the index, in alternating order. */
    const writeSamples: Record<'encrypted' | 'searchable', number[]> = { encrypted: [], searchable: [] };
    const writers = {
      encrypted: envelope.getRepository(EncryptedLogin) as unknown as Repository<Login>,
      searchable: repositories.searchable,
    };
    for (let round = 0; round < 3; round++) {
      for (const name of round % 2
        ? (['searchable', 'encrypted'] as const)
        : (['encrypted', 'searchable'] as const)) {
        const entity = name === 'searchable' ? SearchableLogin : EncryptedLogin;
        const from = ROWS + (round + 1) * WRITES;
        collectGarbage();
        const started = performance.now();
        await writers[name].save(rows(entity, from, WRITES), { chunk: CHUNK });
        writeSamples[name].push(performance.now() - started);
      }
    }
    const write = { encrypted: median(writeSamples.encrypted), searchable: median(writeSamples.searchable) };
    const result: BlindIndexBenchResult = {
      rows: ROWS,
      lookups: LOOKUPS,
      rounds: ROUNDS,
      lookupMs: {
        plaintext: round1(lookup.plaintext),
        searchable: round1(lookup.searchable),
        ratio: round2(lookup.searchable / lookup.plaintext),
        goal: 1.3,
      },
      writeMs: {
        encrypted: round1(write.encrypted),
        searchable: round1(write.searchable),
        ratio: round2(write.searchable / write.encrypted),
        rows: WRITES,
      },
      usesIndex,
    };
    const lines = [
      `Blind index: findOneBy({ email }) among ${fmtInt(ROWS)} rows, ${fmtInt(LOOKUPS)} lookups per round, ` +
        `median of ${ROUNDS} rounds (order alternated); EXPLAIN shows an index scan on email_bidx`,
      '',
      '| operation | median ms | ratio |',
      '| --- | ---: | ---: |',
      `| plaintext column with a B-tree index | ${result.lookupMs.plaintext.toFixed(1)} | 1.00 |`,
      `| searchable encrypted property (normalised input) | ${result.lookupMs.searchable.toFixed(1)} | ` +
        `${result.lookupMs.ratio.toFixed(2)} (goal ≤ 1.3) |`,
      `| save ${fmtInt(WRITES)} rows, encrypted without index | ${result.writeMs.encrypted.toFixed(1)} | 1.00 |`,
      `| save ${fmtInt(WRITES)} rows, with the blind index (unique) | ${result.writeMs.searchable.toFixed(1)} | ` +
        `${result.writeMs.ratio.toFixed(2)} |`,
    ];
    return { lines, result };
  });
}
