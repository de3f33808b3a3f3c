import { LRUCache } from 'lru-cache';
import { gcmForgetKey } from '../crypto/aes-gcm';
import { ConfigError, withErrorContext } from '../errors';
import type { KeyScope } from './key-scope';
import type { Keyring } from './keyring';

/** Bounds of the in-memory data-key cache. */
export interface DataKeyCacheOptions {
  /**
   * How long one data key encrypts new values before a fresh one is generated, in ms.
   * Default 30 minutes. Must be finite (a key cannot be cached forever) and at most 2^31 - 1 ms
   * (about 24.8 days), the longest a timer can wait.
   */
  dataKeyMaxAge?: number;
  /**
   * How long before `dataKeyMaxAge` the active data key is renewed in the background, by one
   * request, so that writes do not all wait on the key provider when it expires. Default: a tenth
   * of `dataKeyMaxAge`, at most one minute.
   */
  refreshAhead?: number;
  /** How many values one data key encrypts before a fresh one is generated. Default 1,000,000. */
  dataKeyMaxUses?: number;
  /**
   * How long an unwrapped data key stays in memory after it was unwrapped, in ms. Default 30 minutes,
   * at most 2^31 - 1 ms (about 24.8 days), the longest a timer can wait. This bounds how long a
   * revoked master key can still decrypt: `purgeCache()` ends it at once.
   */
  unwrappedKeyTtl?: number;
  /**
   * How many unwrapped data keys are kept at most. Default 1,000, at most 1,000,000 (the cache
   * allocates its index for this many up front).
   */
  maxUnwrappedKeys?: number;
  /**
   * How many encrypting data keys are kept at most: one per tenant that is writing (and per key
   * version). Default 1,000, at most 1,000,000. The least recently used tenant's key leaves first,
   * zeroed; its next write generates a fresh one.
   */
  maxEncryptingKeys?: number;
  /** The clock the cache ages entries by (ms). For tests; defaults to `performance`. */
  clock?: { now(): number };
}

const MINUTE = 60_000;
/** The longest delay `setTimeout` takes (2^31 - 1 ms); a longer TTL would fire at once, warning each time. */
export const MAX_TIMER_DELAY = 2 ** 31 - 1;
/** The largest `maxUnwrappedKeys`: lru-cache allocates its index for `max` entries at construction. */
export const MAX_UNWRAPPED_KEYS = 1_000_000;
/** Returned by the `try…` methods when the key is not in the cache. */
export const NOT_CACHED: unique symbol = Symbol('not cached');

const DEFAULTS = {
  dataKeyMaxAge: 30 * MINUTE,
  dataKeyMaxUses: 1_000_000,
  unwrappedKeyTtl: 30 * MINUTE,
  maxUnwrappedKeys: 1_000,
  maxEncryptingKeys: 1_000,
};

/**
 * A plaintext data key held by the cache. Its bytes are zeroed when it leaves the cache, or, if
 * callers that were waiting for it still hold it then, as soon as the last of them is done.
 */
export class CachedDataKey {
  #plaintext: Buffer;
  /** Left the cache (evicted, expired, purged) or never entered it: no new user may take it. */
  #released = false;
  #zeroed = false;
  /** Callers handed this key that have not used it yet. */
  #holders = 0;
  uses = 0;

  constructor(
    readonly version: number,
    readonly wrappedKey: Buffer,
    plaintext: Buffer,
    /** When the key was generated or unwrapped, on the cache's clock. */
    readonly createdAt = 0,
    /** The cache partition (keyring and tenant) the key belongs to. */
    readonly scopeId = '',
  ) {
    this.#plaintext = plaintext;
  }

  /** Whether the key is out of the cache (or zeroed): nobody may start using it. */
  get destroyed(): boolean {
    return this.#released || this.#zeroed;
  }

  /** Runs `fn` with the key bytes; `fn` must be synchronous and must not keep them. */
  use<T>(fn: (key: Buffer) => T): T {
    /* Precondition: a zeroed key is never used. */
    if (this.#zeroed) throw new Error('internal error: data key used after eviction');
    return fn(this.#plaintext);
  }

  /** Keeps the bytes for `count` more holders, even if the key leaves the cache meanwhile. */
  hold(count: number): void {
    this.#holders += count;
  }

  /** One holder is done; the last one zeroes a key that has left the cache. */
  unhold(): void {
    this.#holders -= 1;
    if (this.#holders <= 0 && this.#released) this.#zero();
  }

  /** The key leaves the cache: zeroed now, or when its last holder is done. */
  destroy(): void {
    this.#released = true;
    if (this.#holders <= 0) this.#zero();
  }

  #zero(): void {
    if (this.#zeroed) return;
    this.#zeroed = true;
    gcmForgetKey(this.#plaintext);
    this.#plaintext.fill(0);
  }

  /** Never prints key bytes. */
  [Symbol.for('nodejs.util.inspect.custom')](): string {
    return `CachedDataKey { version: ${this.version}, uses: ${this.uses}, destroyed: ${this.destroyed} }`;
  }
}

/** One unwrap in flight, shared by every caller of that wrapped key that arrives meanwhile. */
interface PendingUnwrap {
  promise: Promise<CachedDataKey>;
  callers: number;
}

/**
 * Caches data keys in memory, bounded in age, uses and count:
 * - the encrypting data key of the active version is reused for many values, until its maximum
 *   age or uses, then a fresh one is generated;
 * - unwrapped data keys are cached by their wrapped bytes, with a TTL and a maximum count;
 * - concurrent misses for the same key make one provider call, and every caller gets the key even
 *   when one result needs more distinct keys than the cache holds (a key evicted before its waiting
 *   callers used it stays readable for them only, then is zeroed);
 * - key bytes are zeroed when an entry leaves; purge timers never keep the process alive.
 */
export class DataKeyCache {
  readonly #keyring: Keyring;
  readonly #maxUses: number;
  readonly #renewAfter: number;
  readonly #clock: { now(): number };
  readonly #unwrappedTtl: number;
  readonly #maxUnwrapped: number;
  /** The unwrapped key used last (it is also in the cache; never kept past its TTL or eviction). */
  #lastUnwrapped: CachedDataKey | undefined;
  /** The encrypting-key id built last, reused while writes stay in one scope and version (the common case). */
  #lastId: { scope: KeyScope; version: number; id: string } | undefined;
  /** Background renewals of encrypting data keys, by scope and version, while they run. */
  readonly #renewing = new Map<string, Promise<void>>();
  readonly #encrypting: LRUCache<string, CachedDataKey>;
  readonly #unwrapped: LRUCache<string, CachedDataKey>;
  readonly #pending = new Map<string, PendingUnwrap>();
  /** The encrypting-key generation in flight, by scope and version (dropped by `purge()` and renewal). */
  readonly #generating = new Map<string, Promise<CachedDataKey | undefined>>();
  /** Incremented by `purge()`: a provider call that started before it caches nothing. */
  #epoch = 0;
  /** Provider calls made through this cache, by kind. */
  readonly stats = { generated: 0, unwrapped: 0 };
  /** Called by every `purge()`, with its scope prefix (caches kept beside this one drop theirs too). */
  readonly #purgeListeners = new Set<(scopePrefix?: string) => void>();

  constructor(keyring: Keyring, options: DataKeyCacheOptions = {}) {
    const o = { ...DEFAULTS, ...definedOptions(options) };
    /* Precondition: You can not cache something forever. */
    requirePositive('dataKeyMaxAge', o.dataKeyMaxAge);
    requireAtMost(
      'dataKeyMaxAge',
      o.dataKeyMaxAge,
      MAX_TIMER_DELAY,
      '2147483647 ms (2^31 - 1, the longest a timer waits)',
    );
    requirePositive('unwrappedKeyTtl', o.unwrappedKeyTtl);
    requireAtMost(
      'unwrappedKeyTtl',
      o.unwrappedKeyTtl,
      MAX_TIMER_DELAY,
      '2147483647 ms (2^31 - 1, the longest a timer waits)',
    );
    requirePositiveInteger('dataKeyMaxUses', o.dataKeyMaxUses);
    requirePositiveInteger('maxUnwrappedKeys', o.maxUnwrappedKeys);
    requireAtMost('maxUnwrappedKeys', o.maxUnwrappedKeys, MAX_UNWRAPPED_KEYS, '1,000,000');
    requirePositiveInteger('maxEncryptingKeys', o.maxEncryptingKeys);
    requireAtMost('maxEncryptingKeys', o.maxEncryptingKeys, MAX_UNWRAPPED_KEYS, '1,000,000');
    this.#keyring = keyring;
    this.#maxUses = o.dataKeyMaxUses;
    const refreshAhead = options.refreshAhead ?? Math.min(MINUTE, o.dataKeyMaxAge / 10);
    if (!(refreshAhead >= 0 && refreshAhead < o.dataKeyMaxAge)) {
      throw new ConfigError('cache option refreshAhead must be at least 0 and less than dataKeyMaxAge');
    }
    this.#renewAfter = o.dataKeyMaxAge - refreshAhead;
    this.#clock = options.clock ?? performance;
    this.#unwrappedTtl = o.unwrappedKeyTtl;
    this.#maxUnwrapped = o.maxUnwrappedKeys;
    /* lru-cache reuses a clock reading for `ttlResolution` ms of real time (default 1): with a
       given clock, every reading must come from it, or an advance is ignored for that long. */
    const perf = options.clock ? { perf: options.clock, ttlResolution: 0 } : {};
    const dispose = (value: CachedDataKey) => value.destroy();
    this.#encrypting = new LRUCache<string, CachedDataKey>({
      max: o.maxEncryptingKeys,
      ttl: o.dataKeyMaxAge,
      ttlAutopurge: true,
      dispose,
      ...perf,
    });
    this.#unwrapped = new LRUCache<string, CachedDataKey>({
      max: o.maxUnwrappedKeys,
      ttl: o.unwrappedKeyTtl,
      ttlAutopurge: true,
      dispose,
      ...perf,
    });
  }

  /**
   * Runs `fn` synchronously with the active version's current data key, and counts one use.
   * The key that reaches its maximum uses is evicted (and zeroed) after `fn` returns.
   */
  async withEncryptionKey<T>(
    fn: (key: Buffer, dataKey: CachedDataKey) => T,
    scope: KeyScope = this.#keyring,
  ): Promise<T> {
    /* Each turn either returns or follows an event that made progress or undid it: another caller
       used the key up, or purge()/renewEncryptionKey() dropped the generation this one waited on.
       A caller retries only while such events keep happening, never a fixed number of times. */
    for (;;) {
      const result = this.tryWithEncryptionKey(fn, scope);
      if (result !== NOT_CACHED) return result;
      const refusal = scope.writeRefusal;
      if (refusal) throw refusal;
      const id = encryptingId(scope, scope.activeVersion);
      const dataKey = await this.#sharedGeneration(scope, id);
      if (dataKey && !dataKey.destroyed) return this.#useEncryptionKey(id, dataKey, fn);
    }
  }

  /**
   * The generation of `version`'s encrypting key that callers arriving now share: one provider
   * call for all of them. Resolves to the key once it is cached, or to `undefined` when a purge or
   * renewal dropped this generation meanwhile (its key is zeroed; the caller asks again).
   */
  #sharedGeneration(scope: KeyScope, id: string): Promise<CachedDataKey | undefined> {
    const inFlight = this.#generating.get(id);
    if (inFlight) return inFlight;
    const started: Promise<CachedDataKey | undefined> = this.#generate(scope, scope.activeVersion).then(
      (dataKey) => {
        if (this.#generating.get(id) !== started) {
          dataKey.destroy();
          return undefined;
        }
        this.#generating.delete(id);
        this.#encrypting.set(id, dataKey);
        return dataKey;
      },
      (error: unknown) => {
        if (this.#generating.get(id) === started) this.#generating.delete(id);
        throw error;
      },
    );
    this.#generating.set(id, started);
    return started;
  }

  /** Like {@link withEncryptionKey}, but only when the key is cached: never calls a provider. */
  tryWithEncryptionKey<T>(
    fn: (key: Buffer, dataKey: CachedDataKey) => T,
    scope: KeyScope = this.#keyring,
  ): T | typeof NOT_CACHED {
    return this.tryWithEncryptionKeyFor(1, fn, scope);
  }

  /**
   * Like {@link tryWithEncryptionKey}, for up to `wanted` values sealed in one call: `fn` is told
   * how many it may seal under this key (at least 1, at most what the key has left before
   * `dataKeyMaxUses`), and exactly that many uses are counted. The caller seals the rest with the
   * next key (or the asynchronous path, once this one is used up).
   */
  tryWithEncryptionKeyFor<T>(
    wanted: number,
    fn: (key: Buffer, dataKey: CachedDataKey, granted: number) => T,
    scope: KeyScope = this.#keyring,
  ): T | typeof NOT_CACHED {
    if (scope.writeRefusal) return NOT_CACHED; // the asynchronous path throws it
    const id = this.#encryptingIdOf(scope);
    const dataKey = this.#encrypting.get(id);
    if (!dataKey || dataKey.destroyed) return NOT_CACHED;
    if (this.#clock.now() - dataKey.createdAt >= this.#renewAfter) this.#renew(scope, id, dataKey);
    const granted = Math.max(1, Math.min(wanted, this.#maxUses - dataKey.uses));
    return this.#useEncryptionKey(id, dataKey, (key) => fn(key, dataKey, granted), granted);
  }

  /**
   * Runs `fn` synchronously with the plaintext of `wrappedKey`, unwrapping it once per TTL.
   * Concurrent callers of one wrapped key share one provider call; each gets the key, whatever
   * the number of distinct keys in flight.
   */
  async withDecryptionKey<T>(
    version: number,
    wrappedKey: Buffer,
    fn: (key: Buffer) => T,
    scope: KeyScope = this.#keyring,
  ): Promise<T> {
    const cached = this.tryWithDecryptionKey(version, wrappedKey, fn, scope);
    if (cached !== NOT_CACHED) return cached;
    const id = cacheId(scope, version, wrappedKey);
    let pending = this.#pending.get(id);
    if (!pending) {
      const started: PendingUnwrap = { callers: 0, promise: Promise.resolve() as never };
      started.promise = this.#unwrapShared(id, scope, version, wrappedKey, started);
      this.#pending.set(id, started);
      pending = started;
    }
    /* Counted before any await: the unwrap holds the key for exactly this many callers. */
    pending.callers += 1;
    const dataKey = await pending.promise;
    try {
      return dataKey.use(fn);
    } finally {
      dataKey.unhold();
    }
  }

  /**
   * One provider call for every caller waiting on `id`. The key is held for all of them before it
   * enters the cache, so evictions caused by other keys cannot zero it before they have used it.
   */
  async #unwrapShared(
    id: string,
    scope: KeyScope,
    version: number,
    wrappedKey: Buffer,
    pending: PendingUnwrap,
  ): Promise<CachedDataKey> {
    const epoch = this.#epoch;
    try {
      const dataKey = await this.#unwrap(scope, version, wrappedKey);
      dataKey.hold(pending.callers);
      /* After a purge, serve the callers that asked before it, but cache nothing. */
      if (epoch === this.#epoch) this.#unwrapped.set(id, dataKey);
      else dataKey.destroy();
      return dataKey;
    } finally {
      if (this.#pending.get(id) === pending) this.#pending.delete(id);
    }
  }

  /** Like {@link withDecryptionKey}, but only when the key is cached: never calls a provider. */
  tryWithDecryptionKey<T>(
    version: number,
    wrappedKey: Buffer,
    fn: (key: Buffer) => T,
    scope: KeyScope = this.#keyring,
  ): T | typeof NOT_CACHED {
    /* Rows of one result mostly share a data key: compare bytes before building a lookup string. */
    const last = this.#lastUnwrapped;
    if (
      last &&
      !last.destroyed &&
      last.version === version &&
      last.scopeId === scope.cacheId &&
      last.wrappedKey.equals(wrappedKey) &&
      this.#clock.now() - last.createdAt < this.#unwrappedTtl
    ) {
      return last.use(fn);
    }
    const dataKey = this.#unwrapped.get(cacheId(scope, version, wrappedKey));
    if (!dataKey || dataKey.destroyed) return NOT_CACHED;
    this.#lastUnwrapped = dataKey;
    return dataKey.use(fn);
  }

  /**
   * Generates the next data key while the current one still serves. A failure is left for the
   * next fetch to report: the current key keeps working until its maximum age.
   */
  #encryptingIdOf(scope: KeyScope): string {
    const version = scope.activeVersion;
    const last = this.#lastId;
    if (last && last.scope === scope && last.version === version) return last.id;
    const id = encryptingId(scope, version);
    this.#lastId = { scope, version, id };
    return id;
  }

  #renew(scope: KeyScope, id: string, current: CachedDataKey): void {
    if (this.#renewing.has(id)) return;
    const renewal = this.#generate(scope, current.version)
      .then((next) => {
        if (this.#encrypting.peek(id) === current) this.#encrypting.set(id, next);
        else next.destroy();
      })
      .catch(() => undefined)
      .finally(() => {
        if (this.#renewing.get(id) === renewal) this.#renewing.delete(id);
      });
    this.#renewing.set(id, renewal);
  }

  /** Runs `fn` with the key and counts `uses` values sealed under it (it leaves the cache at the limit). */
  #useEncryptionKey<T>(
    id: string,
    dataKey: CachedDataKey,
    fn: (key: Buffer, dataKey: CachedDataKey) => T,
    uses = 1,
  ): T {
    const result = dataKey.use((key) => fn(key, dataKey));
    dataKey.uses += uses;
    if (dataKey.uses >= this.#maxUses && this.#encrypting.peek(id) === dataKey) {
      this.#encrypting.delete(id);
    }
    return result;
  }

  /**
   * Drops the encrypting data key of `scope` (default: of every scope, tenants included), so the
   * next value is sealed under a fresh one.
   */
  renewEncryptionKey(scope?: KeyScope): void {
    if (!scope) {
      this.#generating.clear();
      this.#encrypting.clear();
      return;
    }
    const id = encryptingId(scope, scope.activeVersion);
    /* A generation already in flight may predate the renewal: its callers ask again. */
    this.#generating.delete(id);
    this.#encrypting.delete(id);
  }

  /**
   * Drops and zeroes cached keys: every key, or with `scopePrefix` only those of the scopes whose
   * `cacheId` starts with it (one tenant's). The next use asks the key provider again.
   */
  purge(scopePrefix?: string): void {
    this.#epoch += 1;
    for (const listener of this.#purgeListeners) listener(scopePrefix);
    if (scopePrefix === undefined) {
      this.#pending.clear();
      this.#generating.clear();
      this.#lastUnwrapped = undefined;
      this.#encrypting.clear();
      this.#unwrapped.clear();
      return;
    }
    const matches = (id: string) => id.startsWith(scopePrefix);
    for (const map of [this.#pending, this.#generating]) {
      for (const id of [...map.keys()]) if (matches(id)) map.delete(id);
    }
    if (this.#lastUnwrapped?.scopeId.startsWith(scopePrefix)) this.#lastUnwrapped = undefined;
    for (const cache of [this.#encrypting, this.#unwrapped] as LRUCache<string, CachedDataKey>[]) {
      for (const id of [...cache.keys()]) if (matches(id)) cache.delete(id);
    }
  }

  /**
   * Runs `listener` at every `purge()` (with its scope prefix), so that what is cached beside the
   * data keys (such as rows of the data-key table) is dropped with them. Returns its removal.
   */
  onPurge(listener: (scopePrefix?: string) => void): () => void {
    this.#purgeListeners.add(listener);
    return () => this.#purgeListeners.delete(listener);
  }

  /** The scope used when none is given: the application's keyring. */
  get defaultScope(): KeyScope {
    return this.#keyring;
  }

  /** The bounds of unwrapped keys (TTL in ms and count), which caches kept beside this one share. */
  get unwrappedKeyLimits(): { ttl: number; max: number; clock: { now(): number } } {
    return { ttl: this.#unwrappedTtl, max: this.#maxUnwrapped, clock: this.#clock };
  }

  /** Number of encrypting data keys currently held (one per writing scope and version). */
  get encryptingKeyCount(): number {
    return this.#encrypting.size;
  }

  /** Number of unwrapped keys currently held. */
  get unwrappedKeyCount(): number {
    return this.#unwrapped.size;
  }

  async #generate(scope: KeyScope, version: number): Promise<CachedDataKey> {
    const epoch = this.#epoch;
    const context = errorContextOf(scope, version);
    const provider = await this.#checkedProvider(scope, version);
    this.stats.generated += 1;
    const { plaintextKey, wrappedKey } = await provider
      .generateDataKey(scope.context)
      .catch((error: unknown) => Promise.reject(withErrorContext(error, context)));
    const now = this.#clock.now();
    /* A key this instance generated also decrypts what it wrote, without an unwrap call. */
    if (epoch === this.#epoch) {
      this.#unwrapped.set(
        cacheId(scope, version, wrappedKey),
        new CachedDataKey(version, wrappedKey, copyOf(plaintextKey), now, scope.cacheId),
      );
    }
    return new CachedDataKey(version, wrappedKey, plaintextKey, now, scope.cacheId);
  }

  async #unwrap(scope: KeyScope, version: number, wrappedKey: Buffer): Promise<CachedDataKey> {
    const provider = await this.#checkedProvider(scope, version);
    this.stats.unwrapped += 1;
    const plaintext = await provider
      .unwrapDataKey(wrappedKey, scope.context)
      .catch((error: unknown) => Promise.reject(withErrorContext(error, errorContextOf(scope, version))));
    return new CachedDataKey(version, Buffer.from(wrappedKey), plaintext, this.#clock.now(), scope.cacheId);
  }

  /** The provider of `version` in `scope`, once its key is known to be the right one. */
  #checkedProvider(scope: KeyScope, version: number) {
    return scope
      .checkedProvider(version)
      .catch((error: unknown) => Promise.reject(withErrorContext(error, errorContextOf(scope, version))));
  }
}

function errorContextOf(scope: KeyScope, version: number) {
  return scope.tenant === undefined ? { keyVersion: version } : { keyVersion: version, tenant: scope.tenant };
}

function encryptingId(scope: KeyScope, version: number): string {
  return `${scope.cacheId}\0${version}`;
}

/** A copy in its own memory (not a slice of Node's shared pool), so zeroing it touches nothing else. */
function copyOf(key: Buffer): Buffer {
  const copy = Buffer.alloc(key.length);
  key.copy(copy);
  return copy;
}

function cacheId(scope: KeyScope, version: number, wrappedKey: Buffer): string {
  return `${scope.cacheId}\0${version}:${wrappedKey.toString('latin1')}`;
}

function requirePositive(name: string, value: number): void {
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) {
    throw new ConfigError(`cache option ${name} must be a positive finite number, got ${String(value)}`);
  }
}

function requirePositiveInteger(name: string, value: number): void {
  requirePositive(name, value);
  if (!Number.isSafeInteger(value)) {
    throw new ConfigError(`cache option ${name} must be a positive integer (a count), got ${String(value)}`);
  }
}

function requireAtMost(name: string, value: number, max: number, shown: string): void {
  if (value > max)
    throw new ConfigError(`cache option ${name} must be at most ${shown}, got ${String(value)}`);
}

function definedOptions(options: DataKeyCacheOptions): Partial<typeof DEFAULTS> {
  const { clock: _clock, refreshAhead: _refreshAhead, ...rest } = options;
  return Object.fromEntries(Object.entries(rest).filter(([, v]) => v !== undefined));
}
