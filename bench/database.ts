/**
 * The PostgreSQL the benchmark runs against, first that works:
 *  1. `DATABASE_URL` when set;
 *  2. a throwaway cluster from locally installed binaries (`initdb`/`pg_ctl` on PATH or in
 *     `/usr/lib/postgresql/<version>/bin`), run as the `postgres` user when we are root, with
 *     durability off (fsync=off, synchronous_commit=off, full_page_writes=off);
 *  3. embedded PGlite (PostgreSQL compiled to WASM) served over TCP.
 * `BENCH_DB=DATABASE_URL|local-binaries|pglite` forces one of them.
 */
import { randomBytes } from 'node:crypto';
import { DataSource, type DataSourceOptions } from 'typeorm';
import {
  DURABILITY_OFF,
  LocalPostgresUnavailableError,
  serverVersion,
  startLocalCluster,
  startPglite,
} from '../test/support/postgres-servers';
import { EnvelopeEncryption, type KeyProvider, LocalKeyProvider } from './library';

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

/** A local master key with a random key, made at run time. */
export function randomLocalKey(): LocalKeyProvider {
  return new LocalKeyProvider({ key: randomBytes(32).toString('base64') });
}

export interface BenchSchemaOptions {
  /** The schema's name is this prefix and a random suffix, so that runs never meet. */
  prefix: string;
  /** The entities of the encrypted DataSource; their tables are created by `synchronize`. */
  entities: NonNullable<DataSourceOptions['entities']>;
  /**
   * The library's migrations the section needs (data-key, index-key or job-range tables). Omitted:
   * none are run, so the schema holds only the entities' tables (not even TypeORM's `migrations`).
   */
  migrations?: NonNullable<DataSourceOptions['migrations']>;
  /**
   * The master keys, as versions 1, 2, … in this order; version 1 is active. Default: two
   * random local keys, so that a section can rotate from version 1 to 2.
   */
  keys?: readonly KeyProvider[];
  /** Connections in the DataSource's pool, when a section needs more than pg's default 10. */
  poolSize?: number;
}

export interface BenchSchema {
  /** The schema's name, unquoted. */
  schema: string;
  /** A DataSource on the database without a schema: the one that creates and drops it. */
  admin: DataSource;
  /** The encryption attached to `dataSource`. */
  encryption: EnvelopeEncryption;
  /** The DataSource on the schema with `encryption` attached, initialized (migrations, if any, run). */
  dataSource: DataSource;
  /** Opens another DataSource on the schema, without encryption, for plaintext baselines. */
  openPlain(entities: NonNullable<DataSourceOptions['entities']>): Promise<DataSource>;
}

/**
 * Runs `run` in a schema of its own on `db`: creates the schema, an `EnvelopeEncryption` over
 * `options.keys` and a DataSource on the schema with it attached (`synchronize`, and
 * `migrationsRun` when `options.migrations` is given), and afterwards, whether `run` succeeded
 * or threw, destroys every DataSource it opened and drops the schema. Resolves with what `run`
 * resolves with.
 */
export async function withBenchSchema<T>(
  db: BenchDatabase,
  options: BenchSchemaOptions,
  run: (bench: BenchSchema) => Promise<T>,
): Promise<T> {
  const schema = `${options.prefix}_${randomBytes(4).toString('hex')}`;
  const admin = new DataSource({ type: 'postgres', url: db.url, logging: false });
  const opened: DataSource[] = [];
  const open = async (dataSource: DataSource) => {
    opened.push(dataSource);
    return dataSource.initialize();
  };
  await admin.initialize();
  try {
    await admin.query(`CREATE SCHEMA "${schema}"`);
    const encryption = new EnvelopeEncryption({
      keys: (options.keys ?? [randomLocalKey(), randomLocalKey()]).map((provider, i) => ({
        version: i + 1,
        provider,
      })),
      activeVersion: 1,
    });
    const common = { type: 'postgres' as const, url: db.url, schema, synchronize: true, logging: false };
    const dataSource = new DataSource({
      ...common,
      entities: options.entities,
      ...(options.migrations === undefined ? {} : { migrations: options.migrations, migrationsRun: true }),
      ...(options.poolSize === undefined ? {} : { extra: { max: options.poolSize } }),
    });
    encryption.attach(dataSource);
    await open(dataSource);
    return await run({
      schema,
      admin,
      encryption,
      dataSource,
      openPlain: (entities) => open(new DataSource({ ...common, entities })),
    });
  } finally {
    /* Teardown errors must not hide the section's own. */
    for (const ds of opened) if (ds.isInitialized) await ds.destroy().catch(() => undefined);
    await admin.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`).catch(() => undefined);
    await admin.destroy().catch(() => undefined);
  }
}
