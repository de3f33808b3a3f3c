import { createHash } from 'node:crypto';
import { LRUCache } from 'lru-cache';
import type { DataSource } from 'typeorm';
import { DATA_KEYS_TABLE } from '../../migrations/1764500000000-TypeormEnvelopeDataKeys';
import { ConfigError, IntegrityError } from '../errors';
import type { DataKeyRecord, DataKeyRegistrar } from '../field-encryptor';
import type { CachedDataKey, DataKeyCache } from '../keys/data-key-cache';
import type { KeyScope } from '../keys/key-scope';

/** The encryption-context entry naming a wrapped data key's keyring. */
const KEYRING_CONTEXT_KEY = 'typeorm-envelope:keyring';
/** Connections of the table's own pool: registrations and look-ups are rare and short. */
const POOL_SIZE = 2;
/** Bounds of the rows held (each about 200 bytes). */
const MIN_RECORDS = 10_000;
const MAX_RECORDS = 1_000_000;

interface Waiter {
  resolve(record: DataKeyRecord | undefined): void;
  reject(error: unknown): void;
}

interface QueryablePool {
  query(sql: string, params: unknown[]): Promise<{ rows: Record<string, unknown>[] }>;
  end(): Promise<void>;
}

/**
 * The data-key table of one DataSource (the `TypeormEnvelopeDataKeys` migration's), as the compact
 * layout uses it:
 * - registration: the first value sealed under a data key registers the key's row, on a connection
 *   of the table's own (outside any transaction of the caller, so committed at once) before any
 *   value naming it can be written; one registration per data key however many values are sealed
 *   meanwhile; idempotent (by the fingerprint of the wrapped key), so instances sharing a key never
 *   duplicate its row. The id is remembered beside the cached data key while it is cached.
 * - resolution: the ids a result set needs and this instance does not hold are read in one query
 *   (`WHERE id = ANY($1)`); rows read are kept for at most the data-key cache's TTL (so a re-wrap by
 *   another instance is seen within that time) and dropped by `purgeCache()`.
 *
 * The table's own pool (two connections, opened on first use and closed with the DataSource)
 * means a registration never waits for a connection held by the application's transactions.
 */
export class DataKeyTable implements DataKeyRegistrar {
  readonly #dataSource: DataSource;
  /** Ids of encrypting data keys: known, or being registered. Weak: gone with the cached key. */
  readonly #ids = new WeakMap<CachedDataKey, bigint | Promise<bigint>>();
  readonly #records: LRUCache<string, DataKeyRecord>;
  /** Ids wanted by reads since the last flush, and the reads waiting on each. */
  #wanted = new Map<string, Waiter[]>();
  #flushScheduled = false;
  /** Look-ups under way, by id: a read arriving meanwhile joins them. */
  readonly #inFlight = new Map<string, Promise<DataKeyRecord | undefined>>();
  /** Incremented by purge(): a look-up that started before it caches nothing. */
  #epoch = 0;
  #pool: Promise<QueryablePool> | undefined;
  readonly #stopListening: () => void;
  readonly #clock: { now(): number };
  /** The row peeked last, and until when it may be used (its expiry in the LRU). */
  #last: { record: DataKeyRecord; until: number } | undefined;

  constructor(dataSource: DataSource, cache: DataKeyCache) {
    this.#dataSource = dataSource;
    const { ttl, max, clock } = cache.unwrappedKeyLimits;
    this.#records = new LRUCache<string, DataKeyRecord>({
      /* Rows hold no secret and are small: more of them than of unwrapped keys, so a key evicted
         from the data-key cache is unwrapped again without asking the table for its row. */
      max: Math.min(Math.max(max * 4, MIN_RECORDS), MAX_RECORDS),
      ttl,
      ...(clock === performance ? {} : { perf: clock, ttlResolution: 0 }),
    });
    this.#clock = clock;
    this.#stopListening = cache.onPurge(() => this.purge());
  }

  /** The table's path in the DataSource's schema, quoted. */
  get path(): string {
    const { driver, options } = this.#dataSource;
    const schema = (options as { schema?: string }).schema;
    return (schema ? [schema, DATA_KEYS_TABLE] : [DATA_KEYS_TABLE]).map((p) => driver.escape(p)).join('.');
  }

  knownId(dataKey: CachedDataKey): bigint | undefined {
    const id = this.#ids.get(dataKey);
    return typeof id === 'bigint' ? id : undefined;
  }

  register(dataKey: CachedDataKey, scope: KeyScope): Promise<bigint> {
    const known = this.#ids.get(dataKey);
    if (known !== undefined) return typeof known === 'bigint' ? Promise.resolve(known) : known;
    const registration = this.#register(dataKey, scope).then(
      (id) => {
        this.#ids.set(dataKey, id);
        return id;
      },
      (error: unknown) => {
        /* The next value sealed under this key tries again. */
        if (this.#ids.get(dataKey) === registration) this.#ids.delete(dataKey);
        throw error;
      },
    );
    this.#ids.set(dataKey, registration);
    return registration;
  }

  async #register(dataKey: CachedDataKey, scope: KeyScope): Promise<bigint> {
    const keyring = scope.context[KEYRING_CONTEXT_KEY] ?? '';
    const tenant = scope.tenant ?? null;
    const fingerprint = createHash('sha256').update(dataKey.wrappedKey).digest();
    const epoch = this.#epoch;
    /* The no-op update makes RETURNING give the id of a row another instance registered first. */
    const [row] = await this.#query(
      `INSERT INTO ${this.path} ("keyring", "tenant_id", "key_version", "wrapped_key", "fingerprint") ` +
        'VALUES ($1, $2, $3, $4, $5) ON CONFLICT ("fingerprint") DO UPDATE SET "fingerprint" = EXCLUDED."fingerprint" ' +
        'RETURNING "id"::text AS "id", "keyring", "tenant_id"',
      [keyring, tenant, dataKey.version, dataKey.wrappedKey, fingerprint],
    );
    if (!row) throw new IntegrityError('registering a data key in the data-key table returned no row');
    const id = BigInt(String(row.id));
    if (row.keyring !== keyring || (row.tenant_id ?? null) !== tenant) {
      /* Same wrapped bytes under another keyring or tenant: that row was copied, not registered. */
      throw new IntegrityError(
        `data key ${id} of the data-key table holds this data key for another keyring or tenant`,
        tenant === null ? {} : { tenant },
      );
    }
    if (epoch === this.#epoch) {
      this.#records.set(String(id), {
        id,
        keyring,
        tenant,
        keyVersion: dataKey.version,
        wrappedKey: dataKey.wrappedKey,
      });
    }
    return id;
  }

  /**
   * Refuses servers that run one session at a time (PGlite): a data key first used inside a
   * transaction (`save()` runs in one) is registered on another connection, which such a server
   * would only serve after the transaction, so the write would wait forever. Called at
   * `initialize()` when an entity uses the compact layout.
   */
  async checkServer(): Promise<void> {
    const runner = this.#dataSource.createQueryRunner('master');
    let version: string;
    try {
      const [row] = (await runner.query('SELECT version() AS "version"')) as Array<{ version?: unknown }>;
      version = String(row?.version ?? '');
    } finally {
      await runner.release();
    }
    if (/\bPGlite\b/i.test(version)) {
      throw new ConfigError(
        'the compact layout registers each new data key on a connection of its own while the write that ' +
          'needs it waits in its transaction, and PGlite serves one session at a time, so that write would ' +
          "never finish; use layout: 'sidecars' with PGlite (or a PostgreSQL server)",
      );
    }
  }

  /** The row of `id`, when this instance holds it (read or registered within the TTL). */
  peek(id: bigint): DataKeyRecord | undefined {
    /* Rows of one result set mostly share a data key: skip the look-up by text for the last one. */
    const last = this.#last;
    if (last && last.record.id === id && this.#clock.now() < last.until) return last.record;
    const key = String(id);
    const record = this.#records.get(key);
    if (record) {
      const remaining = this.#records.getRemainingTTL(key);
      this.#last = { record, until: this.#clock.now() + remaining };
    }
    return record;
  }

  /**
   * The row of `id`, read with every other id wanted in the same turn of the event loop (TypeORM
   * starts `afterLoad` for every row of a result set before awaiting any): one query per result
   * set. `undefined` when the table has no such row.
   */
  resolve(id: bigint): Promise<DataKeyRecord | undefined> {
    const key = String(id);
    const cached = this.#records.get(key);
    if (cached) return Promise.resolve(cached);
    const inFlight = this.#inFlight.get(key);
    if (inFlight) return inFlight;
    return new Promise((resolve, reject) => {
      let waiters = this.#wanted.get(key);
      if (!waiters) {
        waiters = [];
        this.#wanted.set(key, waiters);
      }
      waiters.push({ resolve, reject });
      if (!this.#flushScheduled) {
        this.#flushScheduled = true;
        queueMicrotask(() => this.#flush());
      }
    });
  }

  /** Drops the row of `id` (or every row), so the next read asks the table again. */
  forget(id?: bigint): void {
    this.#last = undefined;
    if (id === undefined) this.#records.clear();
    else this.#records.delete(String(id));
  }

  /** Drops every row read or registered (with `purgeCache()`); registered ids go with their keys. */
  purge(): void {
    this.#epoch += 1;
    this.#last = undefined;
    this.#records.clear();
  }

  /** Closes the table's own connections (with the DataSource). */
  async close(): Promise<void> {
    this.#stopListening();
    const pool = this.#pool;
    this.#pool = undefined;
    if (pool) await pool.then((p) => p.end()).catch(() => undefined);
  }

  #flush(): void {
    this.#flushScheduled = false;
    const wanted = this.#wanted;
    this.#wanted = new Map();
    const ids = [...wanted.keys()];
    const epoch = this.#epoch;
    const lookup = this.#query(
      `SELECT "id"::text AS "id", "keyring", "tenant_id", "key_version", "wrapped_key" FROM ${this.path} WHERE "id" = ANY($1::bigint[])`,
      [ids],
    ).then((rows) => {
      const found = new Map<string, DataKeyRecord>();
      for (const row of rows) {
        const record: DataKeyRecord = {
          id: BigInt(String(row.id)),
          keyring: String(row.keyring),
          tenant: row.tenant_id === null || row.tenant_id === undefined ? null : String(row.tenant_id),
          keyVersion: Number(row.key_version),
          wrappedKey: row.wrapped_key as Buffer,
        };
        found.set(String(row.id), record);
        if (epoch === this.#epoch) this.#records.set(String(row.id), record);
      }
      return found;
    });
    for (const [key, waiters] of wanted) {
      const one = lookup.then((found) => found.get(key));
      this.#inFlight.set(key, one);
      one.then(
        (record) => {
          if (this.#inFlight.get(key) === one) this.#inFlight.delete(key);
          for (const w of waiters) w.resolve(record);
        },
        (error: unknown) => {
          if (this.#inFlight.get(key) === one) this.#inFlight.delete(key);
          for (const w of waiters) w.reject(error);
        },
      );
    }
  }

  /** Runs one statement on the table's own pool (autocommit), logged like TypeORM's own queries. */
  async #query(sql: string, params: unknown[]): Promise<Record<string, unknown>[]> {
    const logger = this.#dataSource.logger;
    logger.logQuery(sql, params.map(printable));
    try {
      const pool = await this.#connect();
      return (await pool.query(sql, params)).rows;
    } catch (error) {
      logger.logQueryError(error instanceof Error ? error : String(error), sql, params.map(printable));
      throw describeFailure(error);
    }
  }

  #connect(): Promise<QueryablePool> {
    if (!this.#pool) {
      const pool = this.#createPool();
      this.#pool = pool;
      /* A pool that could not be made is made again by the next query. */
      pool.catch(() => {
        if (this.#pool === pool) this.#pool = undefined;
      });
    }
    return this.#pool;
  }

  async #createPool(): Promise<QueryablePool> {
    if (!this.#dataSource.isInitialized) {
      throw new ConfigError('the data-key table is used before its DataSource is initialized');
    }
    const driver = this.#dataSource.driver as unknown as {
      options: Record<string, unknown> & { replication?: { master?: Record<string, unknown> } };
      createPool?: (options: unknown, credentials: unknown) => Promise<QueryablePool>;
    };
    if (typeof driver.createPool === 'function') {
      const options = driver.options;
      const extra = (options.extra as Record<string, unknown> | undefined) ?? {};
      return driver.createPool.call(
        driver,
        { ...options, poolSize: POOL_SIZE, extra: { ...extra, max: POOL_SIZE, allowExitOnIdle: true } },
        options.replication?.master ?? options,
      );
    }
    /* Other drivers: a connection of the DataSource's own pool for each statement. */
    const dataSource = this.#dataSource;
    return {
      async query(sql: string, params: unknown[]) {
        const runner = dataSource.createQueryRunner('master');
        try {
          return { rows: (await runner.query(sql, params)) as Record<string, unknown>[] };
        } finally {
          await runner.release();
        }
      },
      end: async () => undefined,
    };
  }
}

/** Parameters as logged: wrapped keys and fingerprints are not secret, but are shown by length only. */
function printable(value: unknown): unknown {
  return Buffer.isBuffer(value) ? `<${value.length} bytes>` : value;
}

/** A missing table says which migration creates it; other failures keep their cause. */
function describeFailure(error: unknown): unknown {
  const code = (error as { code?: unknown })?.code;
  if (code === '42P01') {
    return new ConfigError(
      'the data-key table of the compact layout does not exist: add TypeormEnvelopeDataKeys1764500000000 ' +
        "to the DataSource's migrations and run them",
      {},
      { cause: error },
    );
  }
  return error;
}
