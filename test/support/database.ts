import { randomBytes } from 'node:crypto';
import { Client } from 'pg';
import { inject } from 'vitest';

/** A schema created for one test file (or test) in the shared test database. */
export interface TestSchema {
  /** `postgres://` URL of the test database (the schema is not part of it: pass `schema` explicitly). */
  url: string;
  /** Name of the freshly created schema, e.g. `t_harness_1a2b3c4d5e6f`. Safe to interpolate unquoted. */
  schema: string;
  /** Drops the schema and everything in it (`DROP SCHEMA ... CASCADE`). Safe to call more than once. */
  drop(): Promise<void>;
}

/**
 * Creates a uniquely named, empty schema in the database chosen by the global setup
 * (`inject('databaseUrl')`), so test files can run in parallel against one server without clashing.
 *
 * @param prefix - Short label included in the schema name (lower-cased; characters other than
 *   `[a-z0-9_]` are replaced by `_`). Defaults to `x`.
 * @returns The database URL, the schema name and a `drop()` function to call in `afterAll`.
 *
 * @example
 * ```ts
 * let db: TestSchema;
 * beforeAll(async () => { db = await createTestSchema('roundtrip'); });
 * afterAll(() => db.drop());
 * // new DataSource({ type: 'postgres', url: db.url, schema: db.schema, ... })
 * ```
 */
export async function createTestSchema(prefix = 'x'): Promise<TestSchema> {
  const url = inject('databaseUrl');
  const label =
    prefix
      .toLowerCase()
      .replace(/[^a-z0-9_]/g, '_')
      .slice(0, 40) || 'x';
  const schema = `t_${label}_${randomBytes(6).toString('hex')}`;
  await rawQuery(url, `CREATE SCHEMA "${schema}"`);
  let dropped = false;
  return {
    url,
    schema,
    async drop() {
      if (dropped) return;
      await rawQuery(url, `DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
      dropped = true;
    },
  };
}

/**
 * Runs one SQL statement on a short-lived `pg` connection and returns its rows: for tests that inspect
 * what is stored at rest (e.g. `bytea` columns come back as `Buffer`s), bypassing TypeORM.
 *
 * @param url - Connection URL, usually `TestSchema.url` or `inject('databaseUrl')`.
 * @param sql - The statement; qualify table names with the test schema (`"${schema}".my_table`).
 * @param params - Positional parameters for `$1`, `$2`, ...
 * @returns The result rows (empty for statements that return none).
 */
export async function rawQuery<T = Record<string, unknown>>(
  url: string,
  sql: string,
  params?: unknown[],
): Promise<T[]> {
  const client = new Client({ connectionString: url });
  await client.connect();
  try {
    const result = await client.query(sql, params);
    return result.rows as T[];
  } finally {
    await client.end();
  }
}
