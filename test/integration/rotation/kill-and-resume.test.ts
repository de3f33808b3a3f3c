import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli, startCli } from '../../support/cli';
import { createCliProject } from '../../support/cli-project';
import { rawQuery, type TestSchema } from '../../support/database';

/**
 * Kills the rotation process (SIGKILL) part-way through, at a point chosen at random from the
 * progress seen in the database, then runs it again: every row must decrypt, all at the new
 * version, with ciphertext and IV unchanged and no row lost.
 */
const ROWS = 3_000;
const RUNS = 5;
let schema: TestSchema;
let env: Record<string, string>;
const table = () => `"${schema.schema}".customer`;

beforeAll(async () => {
  const project = await createCliProject({
    prefix: 'kill',
    rows: ROWS,
    maxUses: 400,
    customer: (i) => ({
      email: `kill${i}@example.com`,
      plan: 'kill',
      address: { street: `${i}`, city: 'K' },
    }),
  });
  schema = project.schema;
  env = { ...project.env, TEST_ACTIVE_VERSION: '2' };
  await rawQuery(schema.url, `CREATE TABLE "${schema.schema}".original AS SELECT * FROM ${table()}`);
});
afterAll(() => schema?.drop());

async function rowsAtVersion2(): Promise<number> {
  const [row] = await rawQuery<{ n: number }>(
    schema.url,
    `SELECT count(*)::int AS n FROM ${table()} WHERE email_key_version = 2`,
  );
  return row?.n ?? 0;
}

/** Starts a rotation and kills it once `threshold` rows are re-wrapped, before it ends. */
async function killPartWay(threshold: number): Promise<void> {
  const child = startCli(['rotate', '--to', '2', '--batch-size', '10'], env);
  const exited = new Promise<NodeJS.Signals | null>((resolve) =>
    child.on('exit', (_code, signal) => resolve(signal)),
  );
  let seen = 0;
  let finished = false;
  void exited.then(() => {
    finished = true;
  });
  while (!finished) {
    seen = await rowsAtVersion2();
    if (seen >= threshold) {
      child.kill('SIGKILL');
      break;
    }
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  const signal = await exited;
  expect(signal).toBe('SIGKILL'); // killed part-way, not finished on its own
  expect(seen).toBeGreaterThanOrEqual(threshold); // at the random point chosen for this run
}

describe('rotation killed with SIGKILL and resumed', () => {
  it(`finishes correctly after ${RUNS} kills at random points`, async () => {
    for (let run = 0; run < RUNS; run++) {
      await rawQuery(schema.url, `DELETE FROM ${table()}`);
      await rawQuery(schema.url, `INSERT INTO ${table()} SELECT * FROM "${schema.schema}".original`);
      const threshold = 1 + Math.floor(Math.random() * (ROWS - 2 * 10));
      await killPartWay(threshold);
      const partial = await rowsAtVersion2();
      expect(partial).toBeGreaterThan(0);

      const resumed = runCli(['--json', 'rotate', '--to', '2'], env);
      expect(resumed.status).toBe(0);
      const [check] = await rawQuery<Record<string, number>>(
        schema.url,
        `SELECT count(*)::int AS total,
                count(*) FILTER (WHERE c.email_key_version = 2 AND c.address_key_version = 2)::int AS at_v2,
                count(*) FILTER (WHERE c.email_ciphertext = o.email_ciphertext AND c.email_iv = o.email_iv
                                   AND c.address_ciphertext = o.address_ciphertext AND c.address_iv = o.address_iv)::int AS unchanged
         FROM ${table()} c JOIN "${schema.schema}".original o USING (id)`,
      );
      expect(check).toEqual({ total: ROWS, at_v2: ROWS, unchanged: ROWS });
      const verified = runCli(['--json', 'verify'], env);
      expect(verified.status).toBe(0);
      expect(JSON.parse(verified.stdout)).toMatchObject({ rowsChecked: 2 * ROWS, failed: 0 });
    }
  }, 300_000);
});
