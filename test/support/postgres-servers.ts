/**
 * Throwaway PostgreSQL servers, shared by the test global setup (test/support/global-setup.ts), the
 * benchmark (bench/database.ts) and the examples (examples/quickstart/pglite-server.ts). Each caller keeps
 * its own policy (which kind to try first, what to print); this module only starts and stops servers.
 *
 *  - {@link startLocalCluster}: a cluster built with locally installed PostgreSQL binaries (`initdb`/`pg_ctl`
 *    on PATH or in `/usr/lib/postgresql/<version>/bin`), run as the `postgres` user when we are root;
 *  - {@link startPglite}: embedded PGlite (PostgreSQL compiled to WASM, in memory) served over TCP by
 *    `@electric-sql/pglite-socket`, so that the `pg` driver can reach it.
 *
 * Both listen on 127.0.0.1 only, trust every connection and hold no credentials, so their URLs can be
 * printed.
 */
import { execFile, execFileSync } from 'node:child_process';
import { constants as fsConstants, rmSync } from 'node:fs';
import { access, chown, mkdir, mkdtemp, readdir, readFile, realpath, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { delimiter, dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { Client } from 'pg';

/** A server started by this module. */
export interface RunningServer {
  /** `postgres://` URL on 127.0.0.1 (no credentials). */
  url: string;
  port: number;
  /** Where it runs, e.g. `/usr/lib/postgresql/16/bin, 127.0.0.1:5433` (never credentials). */
  detail: string;
  /** Stops the server and removes what it left behind. Safe to call more than once. */
  stop(): Promise<void>;
}

/** Settings for a throwaway server: durability off, since a throwaway server never needs crash safety. */
export const DURABILITY_OFF = ['fsync=off', 'synchronous_commit=off', 'full_page_writes=off'];

const run = promisify(execFile);

/** The full `SELECT version()` string of the server at `url`, e.g. `PostgreSQL 16.4 on x86_64-pc-linux-gnu, ...`. */
export async function serverVersion(url: string): Promise<string> {
  const client = new Client({ connectionString: url, connectionTimeoutMillis: 30_000 });
  try {
    await client.connect();
    const { rows } = await client.query<{ version: string }>('SELECT version() AS version');
    return rows[0]?.version ?? 'unknown';
  } finally {
    await client.end().catch(() => undefined);
  }
}

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export async function freePort(): Promise<number> {
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
// local PostgreSQL binaries

/** Thrown by {@link startLocalCluster} when there is nothing to start (as opposed to a failed start). */
export class LocalPostgresUnavailableError extends Error {
  override readonly name = 'LocalPostgresUnavailableError';
}

interface PgBinaries {
  initdb: string;
  pgCtl: string;
}

async function isExecutable(path: string): Promise<boolean> {
  return access(path, fsConstants.X_OK).then(
    () => true,
    () => false,
  );
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
  for (const version of versions.sort((a, b) => b.localeCompare(a, 'en', { numeric: true }))) {
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

/** initdb and postgres refuse to run as root: run them as the `postgres` OS user. */
async function postgresRunAs(): Promise<RunAs | undefined> {
  if (process.getuid?.() !== 0) return { prefix: [] };
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

export interface LocalClusterOptions {
  /** Server settings as `name=value`, passed as `-c name=value` (default {@link DURABILITY_OFF}). */
  settings?: readonly string[];
  /** Prefix of the temporary directory that holds the cluster (default `typeorm-envelope-pg-`). */
  tempPrefix?: string;
}

/**
 * Builds a throwaway cluster with the local PostgreSQL binaries and starts it on a free port of 127.0.0.1.
 * Throws {@link LocalPostgresUnavailableError} when there are no usable binaries (or, as root, no `postgres`
 * user / runuser), another error when the cluster could not be built or started (nothing is left behind).
 * The postmaster is detached from this process: it is also stopped when the process exits.
 */
export async function startLocalCluster(options: LocalClusterOptions = {}): Promise<RunningServer> {
  const settings = options.settings ?? DURABILITY_OFF;
  const bins = await findPgBinaries();
  if (!bins)
    throw new LocalPostgresUnavailableError('no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin');
  const runAs = await postgresRunAs();
  if (!runAs)
    throw new LocalPostgresUnavailableError('running as root but no usable `postgres` user / runuser');

  const base = await mkdtemp(join(tmpdir(), options.tempPrefix ?? 'typeorm-envelope-pg-'));
  const data = join(base, 'data');
  const sockets = join(base, 'sock');
  const logs = join(base, 'log');
  const logFile = join(logs, 'postgres.log');
  const stopArgs = ['-D', data, 'stop', '-m', 'immediate', '-w'];
  let started = false;

  // Safety net if the process dies before `stop()` is called (the postmaster is detached from us).
  const stopSync = (): void => {
    if (started) {
      try {
        const [file, ...rest] = [...runAs.prefix, bins.pgCtl, ...stopArgs];
        execFileSync(file as string, rest, { stdio: 'ignore', timeout: 30_000 });
      } catch {
        // already gone
      }
      started = false;
    }
    rmSync(base, { recursive: true, force: true });
  };
  process.once('exit', stopSync);

  const stop = async (): Promise<void> => {
    process.removeListener('exit', stopSync);
    if (started) {
      await runPg(runAs, bins.pgCtl, stopArgs).catch(() => undefined);
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
    for (let attempt = 0; attempt < 3; attempt++) {
      const port = await freePort();
      const listen = `-k ${sockets} -p ${port} -c listen_addresses=127.0.0.1`;
      const serverOptions = [...settings.flatMap((setting) => ['-c', setting]), listen].join(' ');
      try {
        await runPg(runAs, bins.pgCtl, [
          '-D',
          data,
          '-l',
          logFile,
          '-w',
          '-t',
          '60',
          '-o',
          serverOptions,
          'start',
        ]);
        started = true;
        return {
          url: `postgres://postgres@127.0.0.1:${port}/postgres`,
          port,
          detail: `${dirname(bins.initdb)}, 127.0.0.1:${port}`,
          stop,
        };
      } catch (error) {
        lastError = error;
        // pg_ctl -w can time out while the server is actually up: make sure nothing is left running.
        await runPg(runAs, bins.pgCtl, stopArgs).catch(() => undefined);
      }
    }
    const log = await readFile(logFile, 'utf8').catch(() => '');
    throw new Error(`could not start local PostgreSQL: ${(lastError as Error).message}\n${log}`, {
      cause: lastError,
    });
  } catch (error) {
    await stop();
    throw error;
  }
}

// ---------------------------------------------------------------------------------------------------------
// PGlite

export interface PgliteOptions {
  /** Connections the socket server accepts at once (default 20). */
  maxConnections?: number;
}

/**
 * Starts PGlite in memory and serves it on 127.0.0.1 on a free port chosen by the OS. PGlite runs one
 * session at a time; the socket server accepts several connections (a pool) and queues their queries.
 */
export async function startPglite(options: PgliteOptions = {}): Promise<RunningServer> {
  const { PGlite } = await import('@electric-sql/pglite');
  const { PGLiteSocketServer } = await import('@electric-sql/pglite-socket');
  const db = await PGlite.create();
  // Port 0: the OS picks a free port, which the server reads back once it is listening.
  const server = new PGLiteSocketServer({
    db,
    host: '127.0.0.1',
    port: 0,
    maxConnections: options.maxConnections ?? 20,
  });
  try {
    await server.start();
  } catch (error) {
    await db.close().catch(() => undefined);
    throw error;
  }
  const port = Number(server.getServerConn().split(':').pop());
  let stopped = false;
  return {
    url: `postgres://postgres@127.0.0.1:${port}/postgres`,
    port,
    detail: `127.0.0.1:${port}`,
    async stop() {
      if (stopped) return;
      stopped = true;
      await server.stop().catch(() => undefined);
      await db.close().catch(() => undefined);
    },
  };
}
