import { PGlite } from '@electric-sql/pglite';
import { PGLiteSocketServer } from '@electric-sql/pglite-socket';

/** An in-memory PostgreSQL (PGlite, WASM) served over TCP so that the `pg` driver can reach it. */
export interface PgliteServer {
  /** `postgres://` URL of the server, on 127.0.0.1. */
  url: string;
  /** Stops the socket server and closes the database. Safe to call more than once. */
  stop(): Promise<void>;
}

/**
 * Starts PGlite in memory and serves it on 127.0.0.1 on a free port chosen by the OS. PGlite runs
 * one session at a time; the socket server accepts several connections (TypeORM uses a pool) and
 * queues their queries.
 */
export async function startPgliteServer(): Promise<PgliteServer> {
  const db = await PGlite.create();
  // Port 0: the OS picks a free port, which the server reads back once it is listening.
  const server = new PGLiteSocketServer({ db, host: '127.0.0.1', port: 0, maxConnections: 20 });
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
    async stop() {
      if (stopped) return;
      stopped = true;
      await server.stop().catch(() => undefined);
      await db.close().catch(() => undefined);
    },
  };
}
