import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { In } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LocalKeyProvider, rotateIndexKey } from '../../../src';
import { BLIND_INDEX_MIGRATIONS, Member } from '../../support/blind-index-entities';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/**
 * A tenant's index-key rotation run in a child process and killed with SIGKILL after a number of
 * batches chosen at random, several times, then run to its end here. Every row is found by its
 * email throughout (this instance queries while the child works, and between the kills) and
 * after; at the end every index is under the new key, the old key is retired, and no ciphertext
 * changed.
 */
const ROWS = 3_000;
const BATCH = 10;
const KILLS = 3;
const TENANT = 'ws-kill';
const REFRESH = 1_000;
const root = resolve(__dirname, '../../..');
const masterKey = randomBytes(32).toString('base64');
let db: EncryptedTestDatabase;
const emails = Array.from({ length: ROWS }, (_, i) => `kill-${i}@example.com`);

const members = () => db.dataSource.getRepository(Member);
const table = () => `"${db.schema.schema}".bidx_members`;

beforeAll(async () => {
  db = await encryptedDatabase([Member], {
    prefix: 'bidx_kill',
    migrations: BLIND_INDEX_MIGRATIONS,
    encryption: {
      keys: [{ version: 1, provider: new LocalKeyProvider({ key: masterKey }) }],
      /* Both processes follow index-key versions within a second; the child waits that long after activating. */
      tenantKeys: { refreshInterval: REFRESH },
    },
  });
  await members().save(
    emails.map((email) => members().create({ workspaceId: TENANT, email, phone: null, note: null })),
    { chunk: 500 },
  );
  await rawQuery(db.schema.url, `CREATE TABLE "${db.schema.schema}".original AS SELECT * FROM ${table()}`);
}, 120_000);
afterAll(() => db?.close());

function startJob(): ChildProcess {
  return spawn(
    process.execPath,
    [
      '-r',
      resolve(root, 'test/support/register-ts.cjs'),
      resolve(root, 'test/support/index-key-job-child.ts'),
    ],
    {
      cwd: root,
      env: {
        ...process.env,
        INDEX_JOB_DATABASE_URL: db.schema.url,
        INDEX_JOB_SCHEMA: db.schema.schema,
        INDEX_JOB_MASTER_KEY: masterKey,
        INDEX_JOB_TENANT: TENANT,
        INDEX_JOB_BATCH_SIZE: String(BATCH),
        INDEX_JOB_REFRESH_INTERVAL: String(REFRESH),
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
}

/** Every row found by its email (written differently), in a few IN lists. */
async function expectEveryRowFound(): Promise<void> {
  for (let start = 0; start < ROWS; start += 400) {
    const chunk = emails.slice(start, start + 400);
    const found = await members().findBy({
      workspaceId: TENANT,
      email: In(chunk.map((e) => ` ${e.toUpperCase()}`)),
    });
    expect(found.length).toBe(chunk.length);
  }
}

/** Rows by index-key version (the first two bytes of each index). */
async function versions(): Promise<Record<string, number>> {
  const rows = await rawQuery<{ v: number; n: number }>(
    db.schema.url,
    `SELECT get_byte(email_bidx, 0) * 256 + get_byte(email_bidx, 1) AS v, count(*)::int AS n FROM ${table()} GROUP BY 1`,
  );
  return Object.fromEntries(rows.map((r) => [String(r.v), r.n]));
}

/** Runs the job in a child, querying here meanwhile, and kills it once it printed `batches` batches. */
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
  const lookups: Promise<void>[] = [];
  for await (const line of createInterface({ input: child.stdout as NodeJS.ReadableStream })) {
    const event = JSON.parse(line) as { event: string };
    if (event.event !== 'batch') continue;
    seen += 1;
    if (seen % 7 === 0) lookups.push(expectEveryRowFound());
    if (seen >= batches) {
      child.kill('SIGKILL');
      break;
    }
  }
  await Promise.all(lookups);
  return { seen, signal: await exited, stderr };
}

describe('an index-key rotation killed with SIGKILL and resumed', () => {
  it(`finds every row throughout, and finishes correctly after ${KILLS} kills at random points`, async () => {
    const total = Math.ceil(ROWS / BATCH) + 1;
    let before = 0;
    for (let kill = 0; kill < KILLS; kill++) {
      /* Each run picks up after the rows the previous ones did: stop within what is left. */
      /* The child runs on while the kill is on its way: stop it early enough in what is left. */
      const left = Math.ceil((ROWS - before) / BATCH);
      const at = 1 + Math.floor(Math.random() * Math.floor(left / 2));
      const { seen, signal, stderr } = await killAfter(at);
      expect(signal, `killed after ${at} of ${total} batches; stderr: ${stderr}`).toBe('SIGKILL');
      expect(seen).toBe(at);
      expect(stderr).toBe('');
      const partial = await versions();
      expect(partial['1'] ?? 0).toBeGreaterThan(0); // not finished
      expect(partial['2'] ?? 0).toBeGreaterThan(before); // went on from where the last run stopped
      expect((partial['1'] ?? 0) + (partial['2'] ?? 0)).toBe(ROWS);
      before = partial['2'] ?? 0;
      const keys = await rawQuery<{ version: number; state: string }>(
        db.schema.url,
        `SELECT version, state FROM "${db.schema.schema}".typeorm_envelope_index_keys WHERE tenant_id = $1 ORDER BY version`,
        [TENANT],
      );
      expect(keys).toEqual([
        { version: 1, state: 'previous' },
        { version: 2, state: 'active' },
      ]);
      db.encryption.purgeCache();
      await expectEveryRowFound();
    }

    const result = await rotateIndexKey(db.dataSource, db.encryption, { tenant: TENANT, batchSize: 200 });
    expect(result.error).toBeUndefined();
    expect(result).toMatchObject({
      resumed: true,
      toVersion: 2,
      fromVersion: 1,
      rowsLeft: 0,
      previousRetired: true,
    });
    expect(result.properties.find((p) => p.property === 'email')?.rowsIndexed).toBe(ROWS - before);
    expect(await versions()).toEqual({ '2': ROWS });
    const [check] = await rawQuery<Record<string, number>>(
      db.schema.url,
      `SELECT count(*)::int AS total,
              count(*) FILTER (WHERE c.email_ciphertext = o.email_ciphertext AND c.email_iv = o.email_iv)::int AS unchanged,
              count(*) FILTER (WHERE c.email_bidx <> o.email_bidx)::int AS reindexed
       FROM "${db.schema.schema}".original o JOIN ${table()} c USING (id)`,
    );
    expect(check).toEqual({ total: ROWS, unchanged: ROWS, reindexed: ROWS });
    const [retired] = await rawQuery<{ state: string; wrapped_key: Buffer | null }>(
      db.schema.url,
      `SELECT state, wrapped_key FROM "${db.schema.schema}".typeorm_envelope_index_keys WHERE tenant_id = $1 AND version = 1`,
      [TENANT],
    );
    expect(retired).toEqual({ state: 'retired', wrapped_key: null });
    db.encryption.purgeCache();
    await expectEveryRowFound();
    const sample = await members().findOneByOrFail({ workspaceId: TENANT, email: emails[17] as string });
    expect(sample.email).toBe(emails[17]);
  }, 300_000);
});
