import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LocalKeyProvider, verifyEncryptedColumns } from '../../../src';
import { migrateLayout } from '../../../src/rotation/migrate-layout';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';
import { JOB_MIGRATIONS, LayoutSidecars, LayoutToCompact, LayoutToSidecars } from './job-entities';
import { onPglite, tableOf } from './job-support';

/**
 * The layout migration run in a child process and killed with SIGKILL after a number of batches
 * chosen at random, in both directions, then resumed here: no value lost or changed, no row left
 * holding parts of two layouts, every row readable at every point.
 */
const ROWS = 2_000;
const BATCH = 50;
const RUNS = 3;
/** Values in all: every email, and two notes in three. */
const VALUES = ROWS + (ROWS - Math.ceil(ROWS / 3));
/** Progress lines a whole first run prints: one per batch of the table, for each of the two properties. */
const BATCHES = 2 * Math.ceil(ROWS / BATCH);

const root = resolve(__dirname, '../../..');
const masterKey = randomBytes(32).toString('base64');
const keys = () => [{ version: 1, provider: new LocalKeyProvider({ key: masterKey }) }];
let before: EncryptedTestDatabase;
let toCompact: EncryptedTestDatabase;
let toSidecars: EncryptedTestDatabase;
const expected = new Map<number, { email: string; note: string | null }>();

beforeAll(async () => {
  if (onPglite) return;
  before = await encryptedDatabase([LayoutSidecars], {
    prefix: 'cj_layout_kill',
    migrations: JOB_MIGRATIONS,
    encryption: { keys: keys(), cache: { dataKeyMaxUses: 100 } },
  });
  const repo = before.dataSource.getRepository(LayoutSidecars);
  const saved = await repo.save(
    Array.from({ length: ROWS }, (_, i) =>
      repo.create({
        workspaceId: `ws-${i % 4}`,
        email: `k${i}@example.com`,
        note: i % 3 === 0 ? null : `note ${i}`,
      }),
    ),
    { chunk: 500 },
  );
  for (const s of saved) expected.set(s.id, { email: s.email, note: s.note });
  const mapped = (entity: typeof LayoutToCompact | typeof LayoutToSidecars) =>
    encryptedDatabase([entity], {
      schema: before.schema,
      migrations: JOB_MIGRATIONS,
      encryption: { keys: keys(), cache: { dataKeyMaxUses: 100 } },
    });
  toCompact = await mapped(LayoutToCompact);
  toSidecars = await mapped(LayoutToSidecars);
}, 120_000);
afterAll(async () => {
  await toSidecars?.close();
  await toCompact?.close();
  await before?.close();
});

function startJob(entity: 'LayoutToCompact' | 'LayoutToSidecars'): ChildProcess {
  return spawn(
    process.execPath,
    [
      '-r',
      resolve(root, 'test/support/register-ts.cjs'),
      resolve(root, 'test/integration/compact-jobs/layout-job-child.ts'),
    ],
    {
      cwd: root,
      env: {
        ...process.env,
        LAYOUT_JOB_DATABASE_URL: before.schema.url,
        LAYOUT_JOB_SCHEMA: before.schema.schema,
        LAYOUT_JOB_MASTER_KEY: masterKey,
        LAYOUT_JOB_ENTITY: entity,
        LAYOUT_JOB_BATCH_SIZE: String(BATCH),
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
}

/** Runs the job in a child and kills it (SIGKILL) once it has printed `batches` batches. */
async function killAfter(entity: 'LayoutToCompact' | 'LayoutToSidecars', batches: number) {
  const child = startJob(entity);
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
  return { seen, signal: await exited, stderr };
}

/** Values per stored format, and rows holding parts of two layouts (a compact value beside sidecars, or the reverse). */
async function layoutCounts() {
  const [row] = await rawQuery<{ compact: number; sidecars: number; torn: number }>(
    before.schema.url,
    `SELECT (count(*) FILTER (WHERE get_byte(email_ciphertext, 0) = 2)
              + count(*) FILTER (WHERE get_byte(note_ciphertext, 0) = 2))::int AS compact,
            (count(*) FILTER (WHERE get_byte(email_ciphertext, 0) = 1)
              + count(*) FILTER (WHERE get_byte(note_ciphertext, 0) = 1))::int AS sidecars,
            count(*) FILTER (WHERE
              (get_byte(email_ciphertext, 0) = 2) <> (email_iv IS NULL AND email_wrapped_key IS NULL AND email_key_version IS NULL)
              OR (get_byte(note_ciphertext, 0) = 2) <> (note_iv IS NULL AND note_wrapped_key IS NULL AND note_key_version IS NULL)
              OR (note_ciphertext IS NULL AND note_iv IS NOT NULL))::int AS torn
     FROM ${tableOf(before, 'job_layout')}`,
  );
  return row as { compact: number; sidecars: number; torn: number };
}

async function expectEveryRowReadable(
  db: EncryptedTestDatabase,
  entity: typeof LayoutToCompact,
): Promise<void> {
  db.encryption.purgeCache();
  const rows = await db.dataSource.getRepository(entity).find({ order: { id: 'ASC' } });
  expect(rows.length).toBe(ROWS);
  for (const r of rows) expect({ email: r.email, note: r.note }).toEqual(expected.get(r.id));
}

async function killAndResume(direction: 'LayoutToCompact' | 'LayoutToSidecars'): Promise<void> {
  const db = direction === 'LayoutToCompact' ? toCompact : toSidecars;
  const target = direction === 'LayoutToCompact' ? 'compact' : 'sidecars';
  const at = 5 + Math.floor(Math.random() * (BATCHES - 15));
  const { seen, signal, stderr } = await killAfter(direction, at);
  expect(signal, `killed after ${at} of ${BATCHES} batches; stderr: ${stderr}`).toBe('SIGKILL');
  expect(seen).toBeGreaterThanOrEqual(at);

  // What the kill left: part of the values moved, none torn, every row readable
  const partial = await layoutCounts();
  expect(partial.torn).toBe(0);
  expect(partial.compact + partial.sidecars).toBe(VALUES);
  expect(partial[target]).toBeGreaterThan(0);
  expect(partial[target]).toBeLessThan(VALUES);
  await expectEveryRowReadable(db, direction === 'LayoutToCompact' ? LayoutToCompact : LayoutToSidecars);

  // Resumed here: exactly the rest is converted
  const resumed = await migrateLayout(db.dataSource, db.encryption, { batchSize: 500 });
  expect(resumed.error).toBeUndefined();
  expect(resumed.properties.every((p) => p.failures.length === 0 && p.rowsSkipped === 0)).toBe(true);
  expect(resumed.properties.reduce((n, p) => n + p.rowsMigrated, 0)).toBe(VALUES - partial[target]);
  const end = await layoutCounts();
  expect(end).toEqual({
    torn: 0,
    compact: target === 'compact' ? VALUES : 0,
    sidecars: target === 'sidecars' ? VALUES : 0,
  });
  await expectEveryRowReadable(db, direction === 'LayoutToCompact' ? LayoutToCompact : LayoutToSidecars);
  const verified = await verifyEncryptedColumns(db.dataSource, db.encryption);
  expect(verified).toMatchObject({ rowsChecked: VALUES, failed: 0 });
}

describe.skipIf(onPglite)('layout migration killed with SIGKILL and resumed', () => {
  it(`finishes correctly in both directions after ${RUNS} kills each at random points`, async () => {
    expect(await layoutCounts()).toEqual({ torn: 0, compact: 0, sidecars: VALUES });
    for (let run = 0; run < RUNS; run++) {
      await killAndResume('LayoutToCompact');
      await killAndResume('LayoutToSidecars');
    }
  }, 600_000);
});
