/**
 * The PostgreSQL the benchmark runs against, first that works:
 *  1. `DATABASE_URL` when set;
 *  2. a throwaway cluster from locally installed binaries (`initdb`/`pg_ctl` on PATH or in
 *     `/usr/lib/postgresql/<version>/bin`), run as the `postgres` user when we are root, with
 *     durability off (fsync=off, synchronous_commit=off, full_page_writes=off);
 *  3. embedded PGlite (PostgreSQL compiled to WASM) served over TCP.
 * `BENCH_DB=DATABASE_URL|local-binaries|pglite` forces one of them.
 */
import { execFile, execFileSync } from 'node:child_process';
import { constants as fsConstants, rmSync } from 'node:fs';
import { access, chown, mkdir, mkdtemp, readdir, readFile, realpath, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { delimiter, dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { Client } from 'pg';

export type DatabaseKind = 'DATABASE_URL' | 'local-binaries' | 'pglite';

export interface BenchDatabase {
  kind: DatabaseKind;
  /** `postgres://` URL (printed only for the throwaway kinds, which hold no credentials). */
  url: string;
  /** Where it runs, for the report (never credentials). */
  detail: string;
  /** Server version, e.g. `PostgreSQL 15.8`. */
  version: string;
  stop(): Promise<void>;
}

const run = promisify(execFile);

/** Throwaway-server settings: the benchmark never needs crash safety. */
export const SERVER_SETTINGS = ['fsync=off', 'synchronous_commit=off', 'full_page_writes=off'];

export async function openDatabase(): Promise<BenchDatabase> {
  const forced = process.env.BENCH_DB?.trim() || undefined;
  if (forced && !['DATABASE_URL', 'local-binaries', 'pglite'].includes(forced)) {
    throw new Error(`BENCH_DB must be DATABASE_URL, local-binaries or pglite; got '${forced}'`);
  }
  const databaseUrl = process.env.DATABASE_URL?.trim();
  let db: Omit<BenchDatabase, 'version'> | undefined;
  if (forced === 'DATABASE_URL' || (!forced && databaseUrl)) {
    if (!databaseUrl) throw new Error('BENCH_DB=DATABASE_URL but DATABASE_URL is not set');
    db = { kind: 'DATABASE_URL', url: databaseUrl, detail: 'DATABASE_URL', stop: async () => undefined };
  }
  if (!db && (!forced || forced === 'local-binaries'))
    db = await tryLocalBinaries(forced === 'local-binaries');
  if (!db) db = await startPglite();
  try {
    return { ...db, version: await serverVersion(db.url) };
  } catch (error) {
    await db.stop().catch(() => undefined);
    throw error;
  }
}

async function serverVersion(url: string): Promise<string> {
  const client = new Client({ connectionString: url, connectionTimeoutMillis: 30_000 });
  await client.connect();
  try {
    const { rows } = await client.query<{ version: string }>('SELECT version() AS version');
    const full = rows[0]?.version ?? 'unknown';
    return /^PostgreSQL \S+/.exec(full)?.[0] ?? full;
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
// local PostgreSQL binaries

async function isExecutable(path: string): Promise<boolean> {
  return access(path, fsConstants.X_OK).then(
    () => true,
    () => false,
  );
}

async function findPgBinaries(): Promise<{ initdb: string; pgCtl: string } | undefined> {
  for (const dir of (process.env.PATH ?? '').split(delimiter).filter(Boolean)) {
    if ((await isExecutable(join(dir, 'initdb'))) && (await isExecutable(join(dir, 'pg_ctl')))) {
      const initdb = await realpath(join(dir, 'initdb'));
      const sibling = join(dirname(initdb), 'pg_ctl');
      return { initdb, pgCtl: (await isExecutable(sibling)) ? sibling : await realpath(join(dir, 'pg_ctl')) };
    }
  }
  const root = '/usr/lib/postgresql';
  const versions = await readdir(root).catch(() => [] as string[]);
  for (const version of versions.sort((a, b) => b.localeCompare(a, 'en', { numeric: true }))) {
    const initdb = join(root, version, 'bin', 'initdb');
    const pgCtl = join(root, version, 'bin', 'pg_ctl');
    if ((await isExecutable(initdb)) && (await isExecutable(pgCtl))) return { initdb, pgCtl };
  }
  return undefined;
}

interface RunAs {
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

async function tryLocalBinaries(required: boolean): Promise<Omit<BenchDatabase, 'version'> | undefined> {
  const bins = await findPgBinaries();
  const runAs = bins && (await postgresRunAs());
  if (!bins || !runAs) {
    if (required) throw new Error('no usable initdb/pg_ctl (or no `postgres` user / runuser when root)');
    return undefined;
  }
  const base = await mkdtemp(join(tmpdir(), 'typeorm-envelope-bench-'));
  const data = join(base, 'data');
  const sockets = join(base, 'sock');
  const logFile = join(base, 'postgres.log');
  const stopArgs = ['-D', data, 'stop', '-m', 'immediate', '-w'];
  let started = false;

  /* Safety net: the postmaster is detached from us, so stop it even if the run dies. */
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
    if (runAs.uid !== undefined && runAs.gid !== undefined) {
      for (const dir of [base, sockets]) await chown(dir, runAs.uid, runAs.gid);
    }
    await runPg(runAs, bins.initdb, [
      '-D',
      data,
      ...'-A trust -U postgres -E UTF8 --locale=C --no-sync'.split(' '),
    ]);
    let lastError: unknown;
    for (let attempt = 0; attempt < 3 && !started; attempt++) {
      const port = await freePort();
      const options = [
        ...SERVER_SETTINGS.flatMap((s) => ['-c', s]),
        `-k ${sockets} -p ${port} -c listen_addresses=127.0.0.1`,
      ].join(' ');
      try {
        await runPg(runAs, bins.pgCtl, ['-D', data, '-l', logFile, '-w', '-t', '60', '-o', options, 'start']);
        started = true;
        return {
          kind: 'local-binaries',
          url: `postgres://postgres@127.0.0.1:${port}/postgres`,
          detail: `throwaway cluster, ${dirname(bins.initdb)}, 127.0.0.1:${port}, ${SERVER_SETTINGS.join(' ')}`,
          stop,
        };
      } catch (error) {
        lastError = error;
        await runPg(runAs, bins.pgCtl, stopArgs).catch(() => undefined);
      }
    }
    const log = await readFile(logFile, 'utf8').catch(() => '');
    throw new Error(`could not start local PostgreSQL: ${(lastError as Error).message}\n${log}`);
  } catch (error) {
    await stop();
    if (required) throw error;
    console.warn(`local PostgreSQL binaries unusable, falling back to PGlite: ${(error as Error).message}`);
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------------------
// PGlite

async function startPglite(): Promise<Omit<BenchDatabase, 'version'>> {
  const { PGlite } = await import('@electric-sql/pglite');
  const { PGLiteSocketServer } = await import('@electric-sql/pglite-socket');
  const db = await PGlite.create();
  /* PGlite is single-session; the socket server multiplexes the pool's connections. */
  const server = new PGLiteSocketServer({ db, host: '127.0.0.1', port: 0, maxConnections: 20 });
  try {
    await server.start();
  } catch (error) {
    await db.close().catch(() => undefined);
    throw error;
  }
  const port = Number(server.getServerConn().split(':').pop());
  return {
    kind: 'pglite',
    url: `postgres://postgres@127.0.0.1:${port}/postgres`,
    detail: `embedded PGlite (WASM, in memory), 127.0.0.1:${port}`,
    stop: async () => {
      await server.stop().catch(() => undefined);
      await db.close().catch(() => undefined);
    },
  };
}
