/**
 * Vitest `globalSetup`: finds a real PostgreSQL server for the whole test run and hands its URL to the
 * tests through `provide` / `inject('databaseUrl')`.
 *
 * Selection order (the first that works wins):
 *  1. `DATABASE_URL` when set (CI sets it; with `TYPEORM_ENVELOPE_REQUIRE_DATABASE_URL=1` it is mandatory);
 *  2. a `@testcontainers/postgresql` container when a container runtime (Docker, Podman, ...) answers;
 *  3. a throwaway cluster built with locally installed PostgreSQL binaries (`initdb`/`pg_ctl` on PATH or in
 *     `/usr/lib/postgresql/<version>/bin`), run as the `postgres` user when we are root;
 *  4. embedded PGlite (PostgreSQL compiled to WASM) served over TCP by `@electric-sql/pglite-socket`.
 *
 * Environment:
 *  - `DATABASE_URL`: use this server (a `postgres://` URL); tests create and drop their own schemas in it.
 *  - `TYPEORM_ENVELOPE_REQUIRE_DATABASE_URL=1`: fail instead of falling back when `DATABASE_URL` is unset.
 *  - `TYPEORM_ENVELOPE_DB_REPORT=<file>`: write the kind that was used into this file.
 *  - `TYPEORM_ENVELOPE_TEST_DB=<kind>`: force one kind (`DATABASE_URL`, `testcontainers`, `local-binaries`
 *    or `pglite`) and fail if it is unavailable, e.g. `TYPEORM_ENVELOPE_TEST_DB=pglite npx vitest run`.
 *  - `TYPEORM_ENVELOPE_PG_IMAGE`: container image for the testcontainers path (default `postgres:16-alpine`).
 */
import { execFile, execFileSync } from 'node:child_process';
import { constants as fsConstants, rmSync } from 'node:fs';
import { access, chown, mkdir, mkdtemp, readdir, readFile, realpath, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { delimiter, dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { Client } from 'pg';
import type { TestProject } from 'vitest/node';

declare module 'vitest' {
  export interface ProvidedContext {
    /** `postgres://` URL of the server chosen by the global setup. */
    databaseUrl: string;
    /** Which source provided it: one of {@link DATABASE_KINDS}. */
    databaseKind: string;
  }
}

/** The kinds of database the global setup can provide, in the order it tries them. */
export const DATABASE_KINDS = ['DATABASE_URL', 'testcontainers', 'local-binaries', 'pglite'] as const;

/** One of {@link DATABASE_KINDS}. */
export type DatabaseKind = (typeof DATABASE_KINDS)[number];

interface ProvisionedDatabase {
  kind: DatabaseKind;
  url: string;
  /** Extra words for the `[db] using ...` line (never contains credentials). */
  detail?: string;
  teardown(): Promise<void>;
}

const run = promisify(execFile);

/** Throwaway-server settings: durability off (tests never need crash safety), room for parallel pools. */
const SERVER_SETTINGS = [
  'fsync=off',
  'synchronous_commit=off',
  'full_page_writes=off',
  'max_connections=200',
].flatMap((setting) => ['-c', setting]);

/** Vitest global setup entry point; the returned function is the global teardown. */
export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const db = await provisionDatabase();
  try {
    const version = await serverVersion(db.url);
    console.log(`[db] using ${db.kind} (${[version, db.detail].filter(Boolean).join('; ')})`);
    project.provide('databaseUrl', db.url);
    project.provide('databaseKind', db.kind);
    const reportFile = process.env.TYPEORM_ENVELOPE_DB_REPORT;
    if (reportFile) await writeFile(reportFile, `${db.kind}\n`);
  } catch (error) {
    await db.teardown().catch(() => undefined);
    throw error;
  }
  return () => db.teardown();
}

async function provisionDatabase(): Promise<ProvisionedDatabase> {
  const databaseUrl = process.env.DATABASE_URL?.trim();
  const forced = readForcedKind();

  if (process.env.TYPEORM_ENVELOPE_REQUIRE_DATABASE_URL === '1') {
    if (!databaseUrl) {
      throw new Error('[db] TYPEORM_ENVELOPE_REQUIRE_DATABASE_URL=1 but DATABASE_URL is not set');
    }
    if (forced && forced !== 'DATABASE_URL') {
      throw new Error(
        `[db] TYPEORM_ENVELOPE_TEST_DB=${forced} conflicts with TYPEORM_ENVELOPE_REQUIRE_DATABASE_URL=1`,
      );
    }
  }

  if (forced === 'DATABASE_URL' || (!forced && databaseUrl)) {
    if (!databaseUrl)
      throw new Error('[db] TYPEORM_ENVELOPE_TEST_DB=DATABASE_URL but DATABASE_URL is not set');
    return { kind: 'DATABASE_URL', url: databaseUrl, teardown: async () => undefined };
  }

  if (!forced || forced === 'testcontainers') {
    const db = await tryTestcontainers(forced === 'testcontainers');
    if (db) return db;
  }

  if (!forced || forced === 'local-binaries') {
    const db = await tryLocalBinaries(forced === 'local-binaries');
    if (db) return db;
  }

  return startPglite();
}

function readForcedKind(): DatabaseKind | undefined {
  const value = process.env.TYPEORM_ENVELOPE_TEST_DB?.trim();
  if (!value) return undefined;
  if (!(DATABASE_KINDS as readonly string[]).includes(value)) {
    throw new Error(
      `[db] TYPEORM_ENVELOPE_TEST_DB must be one of ${DATABASE_KINDS.join(', ')}; got '${value}'`,
    );
  }
  return value as DatabaseKind;
}

async function serverVersion(url: string): Promise<string> {
  const client = new Client({ connectionString: url, connectionTimeoutMillis: 30_000 });
  try {
    await client.connect();
    const { rows } = await client.query<{ version: string }>('SELECT version() AS version');
    const full = rows[0]?.version ?? 'unknown';
    const match = /^PostgreSQL (\S+)/.exec(full);
    return match ? `postgres ${match[1]}` : full;
  } catch (error) {
    throw new Error(`[db] cannot query the test database: ${(error as Error).message}`, { cause: error });
  } finally {
    await client.end().catch(() => undefined);
  }
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      server.close(() => (port ? resolve(port) : reject(new Error('could not allocate a port'))));
    });
  });
}

// ---------------------------------------------------------------------------------------------------------
// testcontainers

async function tryTestcontainers(required: boolean): Promise<ProvisionedDatabase | undefined> {
  try {
    const { getContainerRuntimeClient } = await import('testcontainers');
    await getContainerRuntimeClient();
  } catch (error) {
    if (required) throw new Error(`[db] no container runtime: ${(error as Error).message}`, { cause: error });
    return undefined;
  }
  try {
    const { PostgreSqlContainer } = await import('@testcontainers/postgresql');
    const image = process.env.TYPEORM_ENVELOPE_PG_IMAGE || 'postgres:16-alpine';
    const container = await new PostgreSqlContainer(image)
      .withCommand(['postgres', ...SERVER_SETTINGS])
      .start();
    return {
      kind: 'testcontainers',
      url: container.getConnectionUri(),
      detail: image,
      teardown: async () => {
        await container.stop();
      },
    };
  } catch (error) {
    if (required) throw error;
    console.warn(`[db] container runtime found but PostgreSQL container failed: ${(error as Error).message}`);
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------------------
// local PostgreSQL binaries

interface PgBinaries {
  initdb: string;
  pgCtl: string;
}

async function isExecutable(path: string): Promise<boolean> {
  try {
    await access(path, fsConstants.X_OK);
    return true;
  } catch {
    return false;
  }
}

function compareVersionsDescending(a: string, b: string): number {
  return b.localeCompare(a, 'en', { numeric: true });
}

async function findPgBinaries(): Promise<PgBinaries | undefined> {
  // PATH first; resolve symlinks so that initdb finds the matching `postgres` next to it.
  for (const dir of (process.env.PATH ?? '').split(delimiter).filter(Boolean)) {
    const initdb = join(dir, 'initdb');
    const pgCtl = join(dir, 'pg_ctl');
    if ((await isExecutable(initdb)) && (await isExecutable(pgCtl))) {
      const realInitdb = await realpath(initdb);
      const sibling = join(dirname(realInitdb), 'pg_ctl');
      return { initdb: realInitdb, pgCtl: (await isExecutable(sibling)) ? sibling : await realpath(pgCtl) };
    }
  }
  // Debian/Ubuntu layout: /usr/lib/postgresql/<version>/bin, newest version first.
  const root = '/usr/lib/postgresql';
  const versions = await readdir(root).catch(() => [] as string[]);
  for (const version of versions.sort(compareVersionsDescending)) {
    const bin = join(root, version, 'bin');
    const initdb = join(bin, 'initdb');
    const pgCtl = join(bin, 'pg_ctl');
    if ((await isExecutable(initdb)) && (await isExecutable(pgCtl))) return { initdb, pgCtl };
  }
  return undefined;
}

interface RunAs {
  /** Prefix for commands that must not run as root (empty when we are not root). */
  prefix: string[];
  uid?: number;
  gid?: number;
}

async function postgresRunAs(): Promise<RunAs | undefined> {
  if (process.getuid?.() !== 0) return { prefix: [] };
  // initdb/postgres refuse to run as root: run them as the `postgres` OS user.
  try {
    const uid = Number((await run('id', ['-u', 'postgres'])).stdout.trim());
    const gid = Number((await run('id', ['-g', 'postgres'])).stdout.trim());
    if (!Number.isInteger(uid) || !Number.isInteger(gid)) return undefined;
    await run('runuser', ['--version']);
    return { prefix: ['runuser', '-u', 'postgres', '--'], uid, gid };
  } catch {
    return undefined;
  }
}

async function runPg(runAs: RunAs, command: string, args: string[]): Promise<void> {
  const [file, ...rest] = [...runAs.prefix, command, ...args];
  try {
    await run(file as string, rest, { timeout: 120_000 });
  } catch (error) {
    const e = error as Error & { stdout?: string; stderr?: string };
    throw new Error(`${command} ${args.join(' ')} failed: ${e.message}\n${e.stdout ?? ''}${e.stderr ?? ''}`, {
      cause: error,
    });
  }
}

async function tryLocalBinaries(required: boolean): Promise<ProvisionedDatabase | undefined> {
  const bins = await findPgBinaries();
  if (!bins) {
    if (required) throw new Error('[db] no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin');
    return undefined;
  }
  const runAs = await postgresRunAs();
  if (!runAs) {
    if (required) throw new Error('[db] running as root but no usable `postgres` user / runuser');
    return undefined;
  }

  const base = await mkdtemp(join(tmpdir(), 'typeorm-envelope-pg-'));
  const data = join(base, 'data');
  const sockets = join(base, 'sock');
  const logs = join(base, 'log');
  const logFile = join(logs, 'postgres.log');
  let started = false;

  const stopSync = (): void => {
    if (started) {
      try {
        const [file, ...rest] = [...runAs.prefix, bins.pgCtl, '-D', data, 'stop', '-m', 'immediate', '-w'];
        execFileSync(file as string, rest, { stdio: 'ignore', timeout: 30_000 });
      } catch {
        // already gone
      }
      started = false;
    }
    rmSync(base, { recursive: true, force: true });
  };
  // Safety net if the run dies before vitest calls the teardown (the postmaster is detached from us).
  process.once('exit', stopSync);

  const teardown = async (): Promise<void> => {
    process.removeListener('exit', stopSync);
    if (started) {
      await runPg(runAs, bins.pgCtl, ['-D', data, 'stop', '-m', 'immediate', '-w']).catch(() => undefined);
      started = false;
    }
    await rm(base, { recursive: true, force: true });
  };

  try {
    await mkdir(sockets);
    await mkdir(logs);
    if (runAs.uid !== undefined && runAs.gid !== undefined) {
      for (const dir of [base, sockets, logs]) await chown(dir, runAs.uid, runAs.gid);
    }
    const initdbArgs = ['-D', data, ...'-A trust -U postgres -E UTF8 --locale=C --no-sync'.split(' ')];
    await runPg(runAs, bins.initdb, initdbArgs);

    // A free port can be taken between probing and binding: retry a few times.
    let lastError: unknown;
    for (let attempt = 0; attempt < 3 && !started; attempt++) {
      const port = await freePort();
      const listen = `-k ${sockets} -p ${port} -c listen_addresses=127.0.0.1`;
      const options = [...SERVER_SETTINGS, listen].join(' ');
      try {
        await runPg(runAs, bins.pgCtl, ['-D', data, '-l', logFile, '-w', '-t', '60', '-o', options, 'start']);
        started = true;
        return {
          kind: 'local-binaries',
          url: `postgres://postgres@127.0.0.1:${port}/postgres`,
          detail: `${dirname(bins.initdb)}, 127.0.0.1:${port}`,
          teardown,
        };
      } catch (error) {
        lastError = error;
        // pg_ctl -w can time out while the server is actually up: make sure nothing is left running.
        await runPg(runAs, bins.pgCtl, ['-D', data, 'stop', '-m', 'immediate', '-w']).catch(() => undefined);
      }
    }
    const log = await readFile(logFile, 'utf8').catch(() => '');
    throw new Error(`[db] could not start local PostgreSQL: ${(lastError as Error).message}\n${log}`, {
      cause: lastError,
    });
  } catch (error) {
    await teardown();
    if (required) throw error;
    console.warn(`[db] local PostgreSQL binaries unusable, falling back: ${(error as Error).message}`);
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------------------
// PGlite

async function startPglite(): Promise<ProvisionedDatabase> {
  const { PGlite } = await import('@electric-sql/pglite');
  const { PGLiteSocketServer } = await import('@electric-sql/pglite-socket');
  const db = await PGlite.create();
  const port = await freePort();
  // PGlite is single-session; the socket server multiplexes connections and queues their queries.
  const server = new PGLiteSocketServer({ db, host: '127.0.0.1', port, maxConnections: 100 });
  try {
    await server.start();
  } catch (error) {
    await db.close().catch(() => undefined);
    throw error;
  }
  return {
    kind: 'pglite',
    url: `postgres://postgres@127.0.0.1:${port}/postgres`,
    detail: `embedded WASM, 127.0.0.1:${port}`,
    teardown: async () => {
      await server.stop().catch(() => undefined);
      await db.close().catch(() => undefined);
    },
  };
}
