/**
 * The re-wrap section of `npm run bench`: `rewrapDataKeys` (master-key version 1 → 2) against a plain
 * SQL `UPDATE` of the same columns, on BENCH_REWRAP_ROWS (100,000) rows of the envelope entity
 * (three encrypted properties) under a few data keys, over BENCH_REWRAP_ROUNDS (3) rounds that
 * alternate the order of the two. The table is restored from a copy before every measurement.
 */
import 'reflect-metadata';
import { type DataSource, In } from 'typeorm';
import { type BenchDatabase, withBenchSchema } from './database';
import { EnvelopePerson } from './entities';
import { type EnvelopeEncryption, type RewrapResult, rewrapDataKeys } from './library';
import { collectGarbage, fmtInt, intEnv, median, round1 } from './stats';

const ROWS = intEnv('BENCH_REWRAP_ROWS', 100_000);
const ROUNDS = intEnv('BENCH_REWRAP_ROUNDS', 3);
const DATA_KEYS = 5;
const VALUES_PER_KEY = 20;
const BATCH_SIZE = 1_000; // rewrapDataKeys' default, passed explicitly for the report
const SAMPLE_ROWS = 100;

const METHODS = ['plain', 'rewrap'] as const;
type Method = (typeof METHODS)[number];

/** What the re-wrap section adds to bench/results.json. */
export interface RewrapBenchResult {
  rows: number;
  encryptedProperties: number;
  rounds: number;
  batchSize: number;
  distinctDataKeys: number;
  unit: string;
  plainUpdate: { medianMs: number; rowsPerSecond: number; samples: number[]; statements: string };
  rewrap: {
    medianMs: number;
    rowsPerSecond: number;
    samples: number[];
    rewrapCalls: number;
    verificationCalls: number;
    distinctDataKeysPerProperty: Record<string, number>;
  };
  ratio: number;
  targetRatio: number;
  verified: string;
}

function check(condition: unknown, message: string): asserts condition {
  if (!condition) throw new Error(`verification failed (re-wrap): ${message}`);
}

/** One encrypted property's table and columns, quoted for SQL. */
export interface EncryptedColumnSql {
  property: string;
  table: string;
  ciphertext: string;
  iv: string;
  wrappedKey: string;
  keyVersion: string;
}

/**
 * The encrypted properties' tables and columns, from the public `encryptedEntities()`: the
 * four-sidecar properties (the re-wrap section's entity has no others).
 */
export function encryptedColumnsSql(
  dataSource: DataSource,
  encryption: EnvelopeEncryption,
): EncryptedColumnSql[] {
  const quote = (name: string) => dataSource.driver.escape(name);
  return encryption.encryptedEntities(dataSource).flatMap(({ metadata, columns }) =>
    columns.flatMap(({ main, sidecars }) =>
      sidecars
        ? [
            {
              property: main.propertyPath,
              table: metadata.tablePath.split('.').map(quote).join('.'),
              ciphertext: quote(main.databaseName),
              iv: quote(sidecars.iv.databaseName),
              wrappedKey: quote(sidecars.wrappedKey.databaseName),
              keyVersion: quote(sidecars.keyVersion.databaseName),
            },
          ]
        : [],
    ),
  );
}

export interface Triple {
  email: string;
  fullName: string;
  phone: string;
  country: string;
}

/**
 * Fills the envelope table with `rows` rows: DATA_KEYS data keys under version 1, VALUES_PER_KEY
 * people each, bound to table and column only (as rows with database-generated ids are), sealed
 * once and replicated, interleaved, by one INSERT … SELECT on the server (so the client's memory
 * does not grow with `rows`).
 */
export async function fillSealedRows(
  dataSource: DataSource,
  encryption: EnvelopeEncryption,
  columns: EncryptedColumnSql[],
  rows: number,
): Promise<{ triples: Triple[]; distinctDataKeys: number }> {
  const q = (sql: string, params: unknown[] = []) => dataSource.query(sql, params);
  const table = (columns[0] as EncryptedColumnSql).table;
  const { tableName } = dataSource.getMetadata(EnvelopePerson);
  const triples: Triple[] = [];
  const sealedHex: string[][] = columns.flatMap(() => [[], [], []]);
  const wrappedKeys = new Set<string>();
  for (let key = 0; key < DATA_KEYS; key++) {
    encryption.cache.renewEncryptionKey();
    for (let value = 0; value < VALUES_PER_KEY; value++) {
      const n = key * VALUES_PER_KEY + value;
      const triple: Triple = {
        email: `rewrap${n}.k${key}@example.com`,
        fullName: `Person ${n} Under Data Key ${key}`,
        phone: `+1 (555) ${String(100 + n).padStart(3, '0')}-${String(1000 + key)} x${n}`,
        country: `country-${n}`,
      };
      triples.push(triple);
      for (const [c, column] of columns.entries()) {
        const sealed = await encryption.encryptValue(triple[column.property as keyof Triple], {
          table: tableName,
          column: column.property,
        });
        check(sealed.keyVersion === 1, 'sealed under version 1');
        wrappedKeys.add(sealed.wrappedKey.toString('hex'));
        (sealedHex[3 * c] as string[]).push(sealed.ciphertext.toString('hex'));
        (sealedHex[3 * c + 1] as string[]).push(sealed.iv.toString('hex'));
        (sealedHex[3 * c + 2] as string[]).push(sealed.wrappedKey.toString('hex'));
      }
    }
  }
  const distinctDataKeys = wrappedKeys.size;
  check(distinctDataKeys === DATA_KEYS, `${distinctDataKeys} data keys sealed the values`);
  const targets = columns.flatMap((c) => [c.ciphertext, c.iv, c.wrappedKey, c.keyVersion]);
  const sources = columns.flatMap((_, c) => [
    `decode(v.c${3 * c}, 'hex')`,
    `decode(v.c${3 * c + 1}, 'hex')`,
    `decode(v.c${3 * c + 2}, 'hex')`,
    '1',
  ]);
  const arrays = sealedHex.map((_, i) => `$${i + 3}::text[]`).join(', ');
  const names = sealedHex.map((_, i) => `c${i}`).join(', ');
  await q(
    `INSERT INTO ${table} (${targets.join(', ')}, country)
     SELECT ${sources.join(', ')}, v.country
     FROM generate_series(0, $1::int - 1) AS g
     JOIN unnest($2::text[], ${arrays}) WITH ORDINALITY AS v(country, ${names}, ord)
       ON v.ord = g % ${triples.length} + 1
     ORDER BY g`,
    [rows, triples.map((t) => t.country), ...sealedHex],
  );
  return { triples, distinctDataKeys };
}

/** Runs the section on `db` in a schema of its own; returns the markdown lines and the results. */
export async function runRewrapBench(
  db: BenchDatabase,
): Promise<{ lines: string[]; result: RewrapBenchResult }> {
  /* No migrations: the envelope entity keeps its wrapped keys in its own rows. */
  const schemaOptions = { prefix: 'bench_rewrap', entities: [EnvelopePerson] };
  return withBenchSchema(db, schemaOptions, async ({ schema, encryption, dataSource }) => {
    const sectionStarted = performance.now();
    const columns = encryptedColumnsSql(dataSource, encryption);
    check(columns.length === 3, `${columns.length} encrypted properties`);
    const table = (columns[0] as EncryptedColumnSql).table;
    const copy = `"${schema}"."bench_envelope_v1"`;
    const q = (sql: string, params: unknown[] = []) => dataSource.query(sql, params);

    const filled = performance.now();
    const { triples, distinctDataKeys } = await fillSealedRows(dataSource, encryption, columns, ROWS);
    await q(`CREATE TABLE ${copy} AS SELECT * FROM ${table}`);
    const [{ count } = { count: 0 }] = (await q(`SELECT count(*)::int AS count FROM ${table}`)) as Array<{
      count: number;
    }>;
    check(count === ROWS, `${count} rows written`);
    console.error(
      `bench: re-wrap: ${fmtInt(ROWS)} rows × ${columns.length} properties under ${distinctDataKeys} data keys ` +
        `written in ${Math.round(performance.now() - filled)} ms; ${ROUNDS} rounds`,
    );

    const restore = async () => {
      await q(`TRUNCATE TABLE ${table}`);
      await q(`INSERT INTO ${table} SELECT * FROM ${copy}`);
      await q(`VACUUM (ANALYZE) ${table}`);
      await q('CHECKPOINT').catch(() => undefined); // needs superuser; only evens out the rounds
    };

    await encryption.activate(2);
    /* The baseline's one new wrapped key: a real re-wrapped data key of the right length. */
    const [sample] = (await q(`SELECT ${columns[0]?.wrappedKey} AS wrapped FROM ${table} LIMIT 1`)) as Array<{
      wrapped: Buffer;
    }>;
    const newWrapped = await encryption.keyring
      .provider(1)
      .rewrapDataKey(sample?.wrapped as Buffer, encryption.keyring.context, encryption.keyring.provider(2));

    const samples: Record<Method, number[]> = { plain: [], rewrap: [] };
    let last: RewrapResult | undefined;
    let verified = '';
    const calls = { rewrap: 0, verification: 0 };

    const runners: Record<Method, (round: number) => Promise<number>> = {
      async plain() {
        collectGarbage();
        const started = performance.now();
        for (const c of columns) {
          await q(`UPDATE ${table} SET ${c.wrappedKey} = $1, ${c.keyVersion} = 2`, [newWrapped]);
        }
        return performance.now() - started;
      },

      async rewrap(round) {
        /* Every round starts cold: the old data keys are unwrapped again, as in a fresh process. */
        encryption.purgeCache();
        collectGarbage();
        const started = performance.now();
        const result = await rewrapDataKeys(dataSource, encryption, { toVersion: 2, batchSize: BATCH_SIZE });
        const ms = performance.now() - started; // the whole job, audit-log checks included
        check(result.error === undefined, `rewrapDataKeys failed: ${String(result.error)}`);
        for (const p of result.properties) {
          check(
            p.rowsTotal === ROWS && p.rowsRewrapped === ROWS && p.failures.length === 0,
            `${p.property}: ${p.rowsRewrapped}/${p.rowsTotal} rows re-wrapped, ${p.failures.length} failures`,
          );
        }
        check(result.rewrapCalls === distinctDataKeys, `${result.rewrapCalls} re-wrap calls`);
        calls.rewrap = result.rewrapCalls;
        calls.verification = result.verificationCalls;
        last = result;
        if (round === ROUNDS - 1) verified = await verify();
        return ms;
      },
    };

    /** After the last re-wrap: every value at version 2, data untouched, a sample decrypts. */
    const verify = async (): Promise<string> => {
      const filters = columns.map((c) => `count(*) FILTER (WHERE ${c.keyVersion} = 2)::int`).join(' + ');
      const [versions] = (await q(`SELECT ${filters} AS v2 FROM ${table}`)) as Array<{ v2: number }>;
      check(versions?.v2 === 3 * ROWS, `${versions?.v2} values at version 2`);
      const changed = columns
        .map(
          (c) =>
            `t.${c.ciphertext} IS DISTINCT FROM o.${c.ciphertext} OR t.${c.iv} IS DISTINCT FROM o.${c.iv} ` +
            `OR t.${c.wrappedKey} = o.${c.wrappedKey}`,
        )
        .join(' OR ');
      const [diff] = (await q(
        `SELECT count(*)::int AS n FROM ${table} t JOIN ${copy} o USING (id) WHERE ${changed}`,
      )) as Array<{ n: number }>;
      check(diff?.n === 0, `${diff?.n} rows with changed ciphertext/iv or an unchanged wrapped key`);
      encryption.purgeCache();
      const ids = Array.from(
        { length: SAMPLE_ROWS },
        (_, i) => 1 + Math.floor(((i + 0.5) * ROWS) / SAMPLE_ROWS),
      );
      const loaded = await dataSource.getRepository(EnvelopePerson).findBy({ id: In(ids) });
      const byEmail = new Map(triples.map((t) => [t.email, t]));
      const good = loaded.filter((p) => {
        const t = byEmail.get(p.email);
        return !!t && t.fullName === p.fullName && t.phone === p.phone && t.country === p.country;
      }).length;
      check(good === SAMPLE_ROWS, `${good}/${SAMPLE_ROWS} sampled rows decrypt to what was sealed`);
      return (
        `${fmtInt(3 * ROWS)} values at version 2, ciphertext and IV byte-identical, every wrapped key changed, ` +
        `${SAMPLE_ROWS} sampled rows decrypt (cache purged)`
      );
    };

    for (let round = 0; round < ROUNDS; round++) {
      const order: Method[] = round % 2 ? ['rewrap', 'plain'] : ['plain', 'rewrap'];
      for (const method of order) {
        await restore();
        samples[method].push(await runners[method](round));
      }
      console.error(
        `  re-wrap round ${round + 1}/${ROUNDS} [${order.join(', ')}]: ` +
          `plain UPDATE ${Math.round(samples.plain.at(-1) ?? 0)} ms, rewrap ${Math.round(samples.rewrap.at(-1) ?? 0)} ms`,
      );
    }
    check(verified !== '' && last, 'the last round verified the re-wrap');

    const med = (m: Method) => median(samples[m]);
    const perSecond = (m: Method) => Math.round((ROWS * 1000) / med(m));
    const ratio = Math.round((med('rewrap') / med('plain')) * 100) / 100;
    const perProperty = Object.fromEntries(last.properties.map((p) => [p.property, p.distinctDataKeys]));
    const pairs = last.properties.reduce((n, p) => n + p.distinctDataKeys, 0);
    const result: RewrapBenchResult = {
      rows: ROWS,
      encryptedProperties: columns.length,
      rounds: ROUNDS,
      batchSize: BATCH_SIZE,
      distinctDataKeys,
      unit: 'ms (median of rounds)',
      plainUpdate: {
        medianMs: round1(med('plain')),
        rowsPerSecond: perSecond('plain'),
        samples: samples.plain.map(round1),
        statements: `${columns.length} × UPDATE <table> SET <col>_wrapped_key = $1, <col>_key_version = 2`,
      },
      rewrap: {
        medianMs: round1(med('rewrap')),
        rowsPerSecond: perSecond('rewrap'),
        samples: samples.rewrap.map(round1),
        rewrapCalls: calls.rewrap,
        verificationCalls: calls.verification,
        distinctDataKeysPerProperty: perProperty,
      },
      ratio,
      targetRatio: 2,
      verified,
    };

    const lines = [
      `Re-wrap (master key v1 → v2): ${fmtInt(ROWS)} rows × ${columns.length} encrypted properties, ` +
        `${distinctDataKeys} data keys; ${ROUNDS} rounds (order alternated, table restored before each); ` +
        `median; section wall time ${((performance.now() - sectionStarted) / 1000).toFixed(0)} s`,
      '',
      '| re-wrap | median ms | rows/s | × plain UPDATE | key-provider calls |',
      '| --- | ---: | ---: | ---: | --- |',
      `| plain SQL UPDATE (${columns.length} statements, whole table) | ${med('plain').toFixed(1)} | ` +
        `${fmtInt(perSecond('plain'))} | 1.00 | none |`,
      `| rewrapDataKeys (batches of ${fmtInt(BATCH_SIZE)}) | ${med('rewrap').toFixed(1)} | ` +
        `${fmtInt(perSecond('rewrap'))} | ${ratio.toFixed(2)} (target ≤ 2) | ` +
        `${calls.rewrap} re-wrap + ${calls.verification} verification for ${distinctDataKeys} distinct data keys ` +
        `(${pairs} property × key pairs) |`,
      '',
      `Re-wrap verified after the last round: ${verified}`,
    ];
    return { lines, result };
  });
}
