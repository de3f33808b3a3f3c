import { type RunningServer, startPglite } from '../../test/support/postgres-servers';

/** An in-memory PostgreSQL (PGlite, WASM) served over TCP so that the `pg` driver can reach it. */
export type PgliteServer = Pick<RunningServer, 'url' | 'stop'>;

/**
 * Starts PGlite in memory and serves it on 127.0.0.1 on a free port chosen by the OS. PGlite runs
 * one session at a time; the socket server accepts several connections (TypeORM uses a pool) and
 * queues their queries. `stop()` stops the socket server and closes the database; it is safe to
 * call more than once.
 */
export function startPgliteServer(): Promise<PgliteServer> {
  return startPglite({ maxConnections: 20 });
}
