import { inspect } from 'node:util';
import { LRUCache } from 'lru-cache';
import { blindIndex, deriveColumnKey, type IndexPlace, MAX_INDEX_KEY_VERSION } from '../crypto/blind-index';
import { ConfigError, IntegrityError, withErrorContext } from '../errors';
import type { EncryptionContext } from './key-provider';
import type { KeyScope } from './key-scope';

/**
 * Index keys: the keys blind indexes are computed under. One per keyring and per tenant (a row's
 * scope), 32 random bytes made by the scope's master key (`generateDataKey`), stored only wrapped
 * by it, with an encryption context that names the purpose, so a wrapped index key is never
 * accepted as a data key, nor a data key as an index key. Versioned: a rotation adds a version
 * that queries match first (`next`), then writes use (`active`) while queries still match the
 * `previous` one, until every row is recomputed. Knows nothing of any ORM: the records are read and written through an
 * {@link IndexKeyStore}.
 */

/** The encryption-context entry naming what a wrapped key is for. */
export const PURPOSE_CONTEXT_KEY = 'typeorm-envelope:purpose';
/** Its value for index keys. */
export const INDEX_KEY_PURPOSE = 'blind-index';

/**
 * `active`: writes and queries use it; `next`: a rotation's new version, which queries match
 * already (so no instance misses rows written under it once it becomes active) and writes do
 * not yet use; `previous`: queries still match it while a rotation recomputes the rows;
 * `retired`: no row uses it any more and its wrapped key is erased.
 */
export type IndexKeyState = 'active' | 'next' | 'previous' | 'retired';

/** One index-key version of one scope, as stored (never the key in the clear). */
export interface IndexKeyRecord {
  /** 1, 2, … within its scope (at most 65,535: stored indexes carry it in two bytes). */
  version: number;
  state: IndexKeyState;
  /** The master-key version that wraps it now. */
  keyVersion: number;
  /** The key wrapped by that master key; `null` once retired. */
  wrappedKey: Buffer | null;
}

/** Where index-key records live (the `TypeormEnvelopeIndexKeys` migration's table). */
export interface IndexKeyStore {
  /** The records of one scope (`tenant` undefined: the application keyring's own), newest first. */
  read(tenant: string | undefined): Promise<IndexKeyRecord[]>;
  /** Stores `record` unless its version, or an active version, exists already; whether it did. */
  insert(tenant: string | undefined, record: IndexKeyRecord): Promise<boolean>;
}

/** Bounds of the index keys held in memory. */
export interface IndexKeysOptions {
  /** How long an unwrapped index key stays in memory, in ms (the data-key cache's `unwrappedKeyTtl`). */
  ttl: number;
  /** How many unwrapped index keys are held at most (least recently used leave first, zeroed). */
  max: number;
  /**
   * How long the list of a scope's versions is trusted before it is read again, in ms: a rotation
   * started by another instance is followed within this time.
   */
  refreshInterval: number;
}

/** The context an index key of `scope` is wrapped under. */
export function indexKeyContext(scope: KeyScope): EncryptionContext {
  return Object.freeze({ ...scope.context, [PURPOSE_CONTEXT_KEY]: INDEX_KEY_PURPOSE });
}

/**
 * One unwrapped index key and the column keys derived from it. Its bytes (and the derived ones)
 * are zeroed when it leaves the cache; it never prints them.
 */
export class IndexKey {
  readonly #key: Buffer;
  readonly #columnKeys = new Map<string, Buffer>();
  #destroyed = false;

  constructor(
    readonly version: number,
    key: Buffer,
  ) {
    this.#key = key;
  }

  /** Whether the key left memory (zeroed): it must not be used. */
  get destroyed(): boolean {
    return this.#destroyed;
  }

  /** The index of `input` (see `indexInput`) in the column at `place`, known by `placeId`. */
  index(place: IndexPlace, placeId: string, input: Buffer): Buffer {
    /* Precondition: a zeroed key would give an index that matches nothing, silently. */
    if (this.#destroyed) throw new Error('internal error: index key used after it left memory');
    let columnKey = this.#columnKeys.get(placeId);
    if (!columnKey) {
      columnKey = deriveColumnKey(this.#key, place);
      this.#columnKeys.set(placeId, columnKey);
    }
    return blindIndex(columnKey, this.version, input);
  }

  /** Whether `other` holds the same key bytes (a re-wrap check). */
  equals(other: Buffer): boolean {
    return !this.#destroyed && this.#key.equals(other);
  }

  destroy(): void {
    if (this.#destroyed) return;
    this.#destroyed = true;
    this.#key.fill(0);
    for (const columnKey of this.#columnKeys.values()) columnKey.fill(0);
    this.#columnKeys.clear();
  }

  [inspect.custom](): string {
    return `IndexKey { version: ${this.version}, destroyed: ${this.#destroyed} }`;
  }

  toJSON(): undefined {
    return undefined;
  }
}

/** The index keys of one scope in use now. */
export interface ScopeIndexKeys {
  /** The key writes use (the active version); `undefined` while the scope has none. */
  readonly write: IndexKey | undefined;
  /** The keys queries match: the active version, then the next or previous one during a rotation. */
  readonly query: readonly IndexKey[];
  /** Every version of the scope, as stored (retired ones included). */
  readonly versions: readonly IndexKeyRecord[];
}

interface ScopeEntry {
  records: IndexKeyRecord[];
  assembled?: ScopeIndexKeys;
}

/**
 * The index keys in memory, by scope: each scope's records (re-read after `refreshInterval`) and
 * the unwrapped keys (dropped and zeroed after `ttl`, or when the least recently used leave).
 * Concurrent loads of one scope make one read and one unwrap per key.
 */
export class IndexKeys {
  readonly #records: LRUCache<string, ScopeEntry>;
  readonly #keys: LRUCache<string, IndexKey>;
  readonly #loading = new Map<string, Promise<ScopeIndexKeys>>();
  /** Incremented by `purge()`: a load that started before it caches nothing. */
  #epoch = 0;
  /** Key-provider calls made for index keys. */
  readonly stats = { generated: 0, unwrapped: 0 };
  readonly #refreshInterval: number;

  constructor(options: IndexKeysOptions) {
    for (const [name, value] of Object.entries(options)) {
      if (!Number.isFinite(value) || value < 1) {
        throw new ConfigError(`index-key option ${name} must be a positive number, got ${String(value)}`);
      }
    }
    this.#refreshInterval = options.refreshInterval;
    this.#records = new LRUCache<string, ScopeEntry>({
      max: 100_000,
      ttl: options.refreshInterval,
    });
    this.#keys = new LRUCache<string, IndexKey>({
      max: options.max,
      ttl: options.ttl,
      ttlAutopurge: true,
      dispose: (key) => key.destroy(),
    });
  }

  /** The scope's keys, when everything they need is in memory (no I/O); otherwise `undefined`. */
  peek(scope: KeyScope): ScopeIndexKeys | undefined {
    if (scope.readRefusal) return undefined; // load() throws it
    const entry = this.#records.get(scope.cacheId);
    if (!entry) return undefined;
    const assembled = entry.assembled;
    if (assembled && !assembled.query.some((k) => k.destroyed)) return assembled;
    entry.assembled = undefined;
    const query: IndexKey[] = [];
    let write: IndexKey | undefined;
    for (const record of entry.records) {
      if (record.state === 'retired' || !record.wrappedKey) continue;
      const key = this.#keys.get(keyId(scope, record));
      if (!key || key.destroyed) return undefined;
      if (record.state === 'active') {
        write = key;
        query.unshift(key);
      } else query.push(key);
    }
    entry.assembled = { write, query, versions: entry.records };
    return entry.assembled;
  }

  /**
   * The scope's keys, read from `store` and unwrapped where needed. With `create`, a scope
   * without an active key gets one (version 1, or the next): generated by the scope's active
   * master key and stored before it is used, so no index is ever written under a key that is
   * not stored.
   */
  async load(scope: KeyScope, store: IndexKeyStore, create: boolean): Promise<ScopeIndexKeys> {
    /* An offboarded tenant's values are not searched, even where no key would match them. */
    const refusal = scope.readRefusal;
    if (refusal) throw refusal;
    const known = this.peek(scope);
    if (known && (known.write || !create)) return known;
    const id = `${scope.cacheId}\0${create ? 'w' : 'r'}`;
    let loading = this.#loading.get(id);
    if (!loading) {
      loading = this.#load(scope, store, create).finally(() => this.#loading.delete(id));
      this.#loading.set(id, loading);
    }
    return loading;
  }

  /** Forgets the scope's records, so the next use reads them again (after a rotation step here). */
  refresh(scope: KeyScope): void {
    this.#records.delete(scope.cacheId);
  }

  /**
   * Drops and zeroes the index keys held (with `scopePrefix`, those of the scopes whose cache id
   * starts with it: one tenant's), as `purgeCache()` does with data keys.
   */
  purge(scopePrefix?: string): void {
    this.#epoch += 1;
    for (const cache of [this.#records, this.#keys] as LRUCache<string, object>[]) {
      for (const id of [...cache.keys()])
        if (scopePrefix === undefined || id.startsWith(scopePrefix)) cache.delete(id);
    }
  }

  /**
   * A new index key for `scope`, made by its active master key: the key (for this instance's
   * cache once stored) and the record to store. The caller stores the record, then calls
   * {@link remember} (or destroys the key if it was not stored).
   */
  async generate(scope: KeyScope, version: number): Promise<{ key: IndexKey; record: IndexKeyRecord }> {
    if (!Number.isInteger(version) || version < 1 || version > MAX_INDEX_KEY_VERSION) {
      throw new ConfigError(`index-key version must be from 1 to ${MAX_INDEX_KEY_VERSION}`, context(scope));
    }
    const refusal = scope.writeRefusal;
    if (refusal) throw refusal;
    const keyVersion = scope.activeVersion;
    const provider = await scope.checkedProvider(keyVersion);
    this.stats.generated += 1;
    const generated = await provider
      .generateDataKey(indexKeyContext(scope))
      .catch((error: unknown) => Promise.reject(withErrorContext(error, { ...context(scope), keyVersion })));
    return {
      key: new IndexKey(version, generated.plaintextKey),
      record: { version, state: 'active', keyVersion, wrappedKey: generated.wrappedKey },
    };
  }

  /** Keeps a key this instance generated and stored, so its writes need no unwrap call. */
  remember(scope: KeyScope, record: IndexKeyRecord, key: IndexKey): void {
    this.#keys.set(keyId(scope, record), key);
  }

  /**
   * Re-wraps one stored index key under master-key version `toVersion` of its scope (KMS
   * `ReEncrypt` where the provider can), and checks the new wrap unwraps to the same key before
   * it is returned. The key bytes never leave this function.
   */
  async rewrap(scope: KeyScope, record: IndexKeyRecord, toVersion: number): Promise<Buffer> {
    if (!record.wrappedKey)
      throw new ConfigError('a retired index key has nothing to re-wrap', context(scope));
    const ctx = indexKeyContext(scope);
    const errorContext = { ...context(scope), keyVersion: record.keyVersion };
    try {
      const from = await scope.checkedProvider(record.keyVersion);
      const to = await scope.checkedProvider(toVersion);
      const old = await from.unwrapDataKey(record.wrappedKey, ctx);
      try {
        const rewrapped = await from.rewrapDataKey(record.wrappedKey, ctx, to);
        const fresh = await to.unwrapDataKey(rewrapped, ctx);
        const same = fresh.equals(old);
        fresh.fill(0);
        if (!same) {
          throw new IntegrityError('a re-wrapped index key does not unwrap to the original key', {
            ...context(scope),
            keyVersion: toVersion,
          });
        }
        return rewrapped;
      } finally {
        old.fill(0);
      }
    } catch (error) {
      throw withErrorContext(error, errorContext);
    }
  }

  /** How long a scope's list of versions is trusted before it is read again, in ms. */
  get refreshInterval(): number {
    return this.#refreshInterval;
  }

  /** Number of unwrapped index keys held now. */
  get size(): number {
    return this.#keys.size;
  }

  async #load(scope: KeyScope, store: IndexKeyStore, create: boolean): Promise<ScopeIndexKeys> {
    const epoch = this.#epoch;
    let records = await store.read(scope.tenant);
    if (create && !records.some((r) => r.state === 'active')) {
      const next = Math.max(0, ...records.map((r) => r.version)) + 1;
      const { key, record } = await this.generate(scope, next);
      if (await store.insert(scope.tenant, record)) {
        if (epoch === this.#epoch) this.remember(scope, record, key);
        else key.destroy();
      } else {
        key.destroy(); // another writer stored one first: use that one
      }
      records = await store.read(scope.tenant);
    }
    const query: IndexKey[] = [];
    let write: IndexKey | undefined;
    for (const record of records) {
      if (record.state === 'retired' || !record.wrappedKey) continue;
      const key = await this.#unwrapped(scope, record, epoch);
      if (record.state === 'active') {
        write = key;
        query.unshift(key);
      } else query.push(key);
    }
    const assembled: ScopeIndexKeys = { write, query, versions: records };
    /* A scope without keys is not remembered: another instance may create one at any time. */
    if (epoch === this.#epoch && records.length > 0) this.#records.set(scope.cacheId, { records, assembled });
    if (create && !write) {
      throw new ConfigError('the scope has no active index key', context(scope));
    }
    return assembled;
  }

  async #unwrapped(scope: KeyScope, record: IndexKeyRecord, epoch: number): Promise<IndexKey> {
    const id = keyId(scope, record);
    const cached = this.#keys.get(id);
    if (cached && !cached.destroyed) return cached;
    const errorContext = { ...context(scope), keyVersion: record.keyVersion };
    const provider = await scope
      .checkedProvider(record.keyVersion)
      .catch((error: unknown) => Promise.reject(withErrorContext(error, errorContext)));
    this.stats.unwrapped += 1;
    const bytes = await provider
      .unwrapDataKey(record.wrappedKey as Buffer, indexKeyContext(scope))
      .catch((error: unknown) => Promise.reject(withErrorContext(error, errorContext)));
    const key = new IndexKey(record.version, bytes);
    if (epoch === this.#epoch) this.#keys.set(id, key);
    else destroyLater(key); // purged meanwhile: serve this caller, keep nothing
    return key;
  }
}

/** Long enough for the caller that loaded a key to finish with it; never keeps the process alive. */
const DESTROY_GRACE_MS = 15_000;

function destroyLater(key: IndexKey): void {
  setTimeout(() => key.destroy(), DESTROY_GRACE_MS).unref();
}

function keyId(scope: KeyScope, record: IndexKeyRecord): string {
  return `${scope.cacheId}\0${record.version}\0${(record.wrappedKey as Buffer).toString('latin1')}`;
}

function context(scope: KeyScope): { tenant?: string } {
  return scope.tenant === undefined ? {} : { tenant: scope.tenant };
}
