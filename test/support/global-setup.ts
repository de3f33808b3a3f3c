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
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestProject } from 'vitest/node';
import {
  DURABILITY_OFF,
  LocalPostgresUnavailableError,
  serverVersion,
  startLocalCluster,
  startPglite,
} from './postgres-servers';

declare module 'vitest' {
  export interface ProvidedContext {
    /** `postgres://` URL of the server chosen by the global setup. */
    databaseUrl: string;
    /** Which source provided it: one of {@link DATABASE_KINDS}. */
    databaseKind: string;
    /** A directory for this run only (removed at teardown) where the packed package is shared. */
    packageDir: string;
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

/** Throwaway-server settings: durability off (tests never need crash safety), room for parallel pools. */
const SERVER_SETTINGS = [...DURABILITY_OFF, 'max_connections=200'];

/** Vitest global setup entry point; the returned function is the global teardown. */
export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const db = await provisionDatabase();
  /* Empty until a test asks for the packed package (test/support/packed-package.ts): a run of
     tests that install none packs nothing. */
  const packageDir = await mkdtemp(join(tmpdir(), 'typeorm-envelope-run-'));
  const teardown = async () => {
    try {
      await rm(packageDir, { recursive: true, force: true });
    } finally {
      await db.teardown();
    }
  };
  try {
    const version = await describeVersion(db.url);
    console.log(`[db] using ${db.kind} (${[version, db.detail].filter(Boolean).join('; ')})`);
    project.provide('databaseUrl', db.url);
    project.provide('databaseKind', db.kind);
    project.provide('packageDir', packageDir);
    const reportFile = process.env.TYPEORM_ENVELOPE_DB_REPORT;
    if (reportFile) await writeFile(reportFile, `${db.kind}\n`);
  } catch (error) {
    await teardown().catch(() => undefined);
    throw error;
  }
  return teardown;
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

  return pgliteDatabase();
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

async function describeVersion(url: string): Promise<string> {
  try {
    const full = await serverVersion(url);
    const match = /^PostgreSQL (\S+)/.exec(full);
    return match ? `postgres ${match[1]}` : full;
  } catch (error) {
    throw new Error(`[db] cannot query the test database: ${(error as Error).message}`, { cause: error });
  }
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
      .withCommand(['postgres', ...SERVER_SETTINGS.flatMap((setting) => ['-c', setting])])
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

async function tryLocalBinaries(required: boolean): Promise<ProvisionedDatabase | undefined> {
  try {
    const cluster = await startLocalCluster({ settings: SERVER_SETTINGS });
    return { kind: 'local-binaries', url: cluster.url, detail: cluster.detail, teardown: cluster.stop };
  } catch (error) {
    const message = (error as Error).message;
    if (required) throw new Error(`[db] ${message}`, { cause: error });
    if (!(error instanceof LocalPostgresUnavailableError)) {
      console.warn(`[db] local PostgreSQL binaries unusable, falling back: ${message}`);
    }
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------------------
// PGlite

async function pgliteDatabase(): Promise<ProvisionedDatabase> {
  // PGlite is single-session; the socket server multiplexes connections and queues their queries.
  const server = await startPglite({ maxConnections: 100 });
  return {
    kind: 'pglite',
    url: server.url,
    detail: `embedded WASM, ${server.detail}`,
    teardown: server.stop,
  };
}
