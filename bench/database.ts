/**
 * The PostgreSQL the benchmark runs against, first that works:
 *  1. `DATABASE_URL` when set;
 *  2. a throwaway cluster from locally installed binaries (`initdb`/`pg_ctl` on PATH or in
 *     `/usr/lib/postgresql/<version>/bin`), run as the `postgres` user when we are root, with
 *     durability off (fsync=off, synchronous_commit=off, full_page_writes=off);
 *  3. embedded PGlite (PostgreSQL compiled to WASM) served over TCP.
 * `BENCH_DB=DATABASE_URL|local-binaries|pglite` forces one of them.
 */
import {
  DURABILITY_OFF,
  LocalPostgresUnavailableError,
  serverVersion,
  startLocalCluster,
  startPglite,
} from '../test/support/postgres-servers';

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

/** Throwaway-server settings: the benchmark never needs crash safety. */
export const SERVER_SETTINGS = DURABILITY_OFF;

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
  if (!db) {
    /* PGlite is single-session; the socket server multiplexes the pool's connections. */
    const server = await startPglite({ maxConnections: 20 });
    db = {
      kind: 'pglite',
      url: server.url,
      detail: `embedded PGlite (WASM, in memory), ${server.detail}`,
      stop: server.stop,
    };
  }
  try {
    const full = await serverVersion(db.url);
    return { ...db, version: /^PostgreSQL \S+/.exec(full)?.[0] ?? full };
  } catch (error) {
    await db.stop().catch(() => undefined);
    throw error;
  }
}

async function tryLocalBinaries(required: boolean): Promise<Omit<BenchDatabase, 'version'> | undefined> {
  try {
    const cluster = await startLocalCluster({
      settings: SERVER_SETTINGS,
      tempPrefix: 'typeorm-envelope-bench-',
    });
    return {
      kind: 'local-binaries',
      url: cluster.url,
      detail: `throwaway cluster, ${cluster.detail}, ${SERVER_SETTINGS.join(' ')}`,
      stop: cluster.stop,
    };
  } catch (error) {
    if (required) throw error;
    if (error instanceof LocalPostgresUnavailableError) return undefined;
    console.warn(`local PostgreSQL binaries unusable, falling back to PGlite: ${(error as Error).message}`);
    return undefined;
  }
}
