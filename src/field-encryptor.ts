import { gcmOpen, gcmSeal, IV_BYTES, TAG_BYTES } from './crypto/aes-gcm';
import {
  associatedData,
  FLAG_PRIMARY_KEY_BOUND,
  FLAG_SCHEMA_BOUND,
  FLAG_TENANT_BOUND,
  FORMAT_V1,
  HEADER_BYTES,
  type ValueBinding,
} from './crypto/associated-data';
import { decodeValue, decodeValueAt, encodeValue, type ValueType } from './crypto/codec';
import {
  COMPACT_BODY_OFFSET,
  COMPACT_IV_OFFSET,
  checkCompact,
  compactHeader,
  encodeCompact,
  FORMAT_V2,
  frameCompact,
} from './crypto/compact-value';
import { GcmOpenBatch, GcmSealBatch } from './crypto/gcm-batch';
import { IvPool } from './crypto/iv-pool';
import { type ErrorContext, IntegrityError, withErrorContext } from './errors';
import { type CachedDataKey, type DataKeyCache, NOT_CACHED } from './keys/data-key-cache';
import type { KeyScope } from './keys/key-scope';

/** The encryption-context entry naming a wrapped data key's keyring. */
const KEYRING_CONTEXT_KEY = 'typeorm-envelope:keyring';

/**
 * The key scope of a value's tenant (`undefined`: the value is not a tenant's): which master keys
 * seal and open it. Without one, every value uses the cache's keyring.
 */
export type KeyScopeResolver = (tenant: string | undefined) => KeyScope | undefined;

/**
 * One encrypted value. In the sidecar layout (format 1) these are its four stored columns; in the
 * compact layout (format 2) `ciphertext` is the whole stored value, `dataKeyId` names its data key's
 * row in the data-key table, and `wrappedKey` and `keyVersion` are that row's (not stored with it).
 */
export interface SealedValue {
  /** Format 1: `[format][flags][AES-256-GCM ciphertext][tag]`. Format 2: the whole compact value. */
  ciphertext: Buffer;
  /** The 96-bit IV, unique per value (for format 2, a view into `ciphertext`). */
  iv: Buffer;
  /** The data key, wrapped by master-key version `keyVersion`. */
  wrappedKey: Buffer;
  /** The master-key version that wrapped the data key. */
  keyVersion: number;
  /** Format 2 only: the id of the data key's row in the data-key table. */
  dataKeyId?: bigint;
}

/**
 * The data-key table as the field encryptor needs it to seal compact values: the id of a data
 * key's row, registering the key (committed) first when it has none yet.
 */
export interface DataKeyRegistrar {
  /** The id of `dataKey`'s row, when it is known without asking the database. */
  knownId(dataKey: CachedDataKey): bigint | undefined;
  /**
   * Registers `dataKey` of `scope` (idempotently; one registration however many callers) and
   * resolves to its row's id once the row is committed.
   */
  register(dataKey: CachedDataKey, scope: KeyScope): Promise<bigint>;
}

/** A row of the data-key table, as read. */
export interface DataKeyRecord {
  id: bigint;
  /** The keyring id the data key was wrapped for. */
  keyring: string;
  /** The tenant the data key serves (`null`: the application's own). */
  tenant: string | null;
  /** The master-key version wrapping it now. */
  keyVersion: number;
  wrappedKey: Buffer;
}

/**
 * What {@link FieldEncryptor.tryOpenMany} gives for each value, by index: its plaintext value, or
 * `NOT_CACHED` where its data key is not cached (open it with `open()`), or an error in `failures`
 * (where one is set, the value is to be ignored).
 */
export interface OpenedValues {
  values: unknown[];
  /** Sparse: the error of each value that could not be opened, as `tryOpen` would throw it. */
  failures: unknown[];
}

/**
 * What {@link FieldEncryptor.trySealMany} gives for each value, by index: its sealed form; for a
 * compact value whose data key's row is being registered, a promise of it; `NOT_CACHED` where no
 * encrypting data key is cached (seal it with `seal()` or `sealCompact()`); or an error in `failures`.
 */
export interface SealedValues {
  sealed: (SealedValue | Promise<SealedValue> | typeof NOT_CACHED | undefined)[];
  /** Sparse: the error of each value that could not be sealed (a `ValueTypeError`). */
  failures: unknown[];
}

/** The values of a batch under one data key. */
interface KeyGroup {
  keyVersion: number;
  wrappedKey: Buffer;
  scope: KeyScope;
  batch: GcmOpenBatch;
  /** The index of each of the batch's values among all values. */
  indices: number[];
}

/** Beyond this many data keys in one batch, groups are found by a lookup string, not by a scan. */
const SCANNED_GROUPS = 8;

/**
 * Encrypts and decrypts single values: codec, associated data and AES-256-GCM under data keys
 * from the cache. Knows nothing of any ORM.
 */
export class FieldEncryptor {
  readonly #ivs = new IvPool();
  /** The data-key row and tenant {@link checkKeyRecord} passed last. */
  #lastChecked: { record: DataKeyRecord; scope: KeyScope; tenant: string | undefined } | undefined;

  constructor(
    private readonly cache: DataKeyCache,
    private readonly scopeOf: KeyScopeResolver = () => undefined,
  ) {}

  /** Encrypts a non-null value for the place `binding` names. */
  async seal(value: unknown, binding: ValueBinding, declared?: ValueType): Promise<SealedValue> {
    return this.#withPlaintext(value, declared, (plaintext) =>
      this.cache.withEncryptionKey(
        (key, dataKey) => this.#seal(key, dataKey, plaintext, binding),
        this.scopeOf(binding.tenant),
      ),
    );
  }

  /** Like {@link seal}, synchronously, when the encrypting data key is cached; else `NOT_CACHED`. */
  trySeal(value: unknown, binding: ValueBinding, declared?: ValueType): SealedValue | typeof NOT_CACHED {
    return this.#withPlaintext(value, declared, (plaintext) =>
      this.cache.tryWithEncryptionKey(
        (key, dataKey) => this.#seal(key, dataKey, plaintext, binding),
        this.scopeOf(binding.tenant),
      ),
    );
  }

  /**
   * Encrypts a non-null value as a compact (format 2) value: its data key's row is registered
   * through `registrar` (committed) before this resolves, so no stored value can name a key row
   * that does not exist. A failed registration rejects: nothing is to be stored.
   */
  async sealCompact(
    value: unknown,
    binding: ValueBinding,
    declared: ValueType | undefined,
    registrar: DataKeyRegistrar,
  ): Promise<SealedValue> {
    const scope = this.#scope(binding);
    return this.#withPlaintext(value, declared, (plaintext) =>
      this.cache.withEncryptionKey(
        (key, dataKey) => this.#sealCompact(key, dataKey, plaintext, binding, registrar, scope),
        scope,
      ),
    );
  }

  /**
   * Like {@link sealCompact}, synchronously when the encrypting data key is cached and its row
   * known; a promise when the key is cached but its row is being registered; else `NOT_CACHED`.
   */
  trySealCompact(
    value: unknown,
    binding: ValueBinding,
    declared: ValueType | undefined,
    registrar: DataKeyRegistrar,
  ): SealedValue | Promise<SealedValue> | typeof NOT_CACHED {
    const scope = this.#scope(binding);
    return this.#withPlaintext(value, declared, (plaintext) =>
      this.cache.tryWithEncryptionKey(
        (key, dataKey) => this.#sealCompact(key, dataKey, plaintext, binding, registrar, scope),
        scope,
      ),
    );
  }

  /**
   * Seals many values, like {@link trySeal} each (or {@link trySealCompact} with `registrar`), with
   * one AES-GCM call per data key: the values of one `save([...])`. Every value gets a fresh IV,
   * its own associated data and its own buffer; the data key's uses are counted value by value.
   */
  trySealMany(
    values: readonly unknown[],
    bindings: readonly ValueBinding[],
    declared: readonly (ValueType | undefined)[],
    registrar?: DataKeyRegistrar,
  ): SealedValues {
    const sealed: SealedValues['sealed'] = new Array(values.length);
    const failures = new Array<unknown>(values.length);
    const plaintexts = new Array<Buffer>(values.length);
    const byScope = new Map<string, { scope: KeyScope; indices: number[] }>();
    try {
      for (let i = 0; i < values.length; i++) {
        try {
          plaintexts[i] = encodeValue(values[i], declared[i]);
        } catch (error) {
          failures[i] = error;
          continue;
        }
        const scope = this.#scope(bindings[i] as ValueBinding);
        let group = byScope.get(scope.cacheId);
        if (!group) {
          group = { scope, indices: [] };
          byScope.set(scope.cacheId, group);
        }
        group.indices.push(i);
      }
      for (const { scope, indices } of byScope.values()) {
        let next = 0;
        while (next < indices.length) {
          const from = next;
          const granted = this.cache.tryWithEncryptionKeyFor(
            indices.length - from,
            (key, dataKey, count) => {
              this.#sealGroup(
                key,
                dataKey,
                indices.slice(from, from + count),
                plaintexts,
                bindings,
                sealed,
                registrar,
                scope,
              );
              return count;
            },
            scope,
          );
          if (granted === NOT_CACHED) {
            for (let j = from; j < indices.length; j++) sealed[indices[j] as number] = NOT_CACHED;
            break;
          }
          next += granted;
        }
      }
    } finally {
      for (const plaintext of plaintexts) plaintext?.fill(0);
    }
    return { sealed, failures };
  }

  /** Seals the values at `indices` under one data key, each framed in its own view of one buffer. */
  #sealGroup(
    key: Buffer,
    dataKey: CachedDataKey,
    indices: readonly number[],
    plaintexts: readonly Buffer[],
    bindings: readonly ValueBinding[],
    sealed: SealedValues['sealed'],
    registrar: DataKeyRegistrar | undefined,
    scope: KeyScope,
  ): void {
    const batch = new GcmSealBatch();
    const ivs: Buffer[] = [];
    const flags: number[] = [];
    for (const i of indices) {
      const binding = bindings[i] as ValueBinding;
      const f = flagsOf(binding);
      const iv = this.#ivs.next();
      batch.add(iv, plaintexts[i] as Buffer, associatedData(registrar ? v2Header(f) : v1Header(f), binding));
      ivs.push(iv);
      flags.push(f);
    }
    const out = batch.seal(key, registrar ? COMPACT_BODY_OFFSET : HEADER_BYTES);
    const { wrappedKey, version } = dataKey;
    const views = indices.map((_, j) => out.sealed.subarray(out.start(j), out.end(j)));
    if (!registrar) {
      indices.forEach((i, j) => {
        const ciphertext = views[j] as Buffer;
        ciphertext[0] = FORMAT_V1;
        ciphertext[1] = flags[j] as number;
        sealed[i] = { ciphertext, iv: ivs[j] as Buffer, wrappedKey, keyVersion: version };
      });
      return;
    }
    const frame = (dataKeyId: bigint, j: number): SealedValue =>
      compactSealedValue(
        frameCompact(views[j] as Buffer, flags[j] as number, dataKeyId, ivs[j] as Buffer),
        dataKeyId,
        wrappedKey,
        version,
      );
    const known = registrar.knownId(dataKey);
    if (known !== undefined) {
      indices.forEach((i, j) => {
        sealed[i] = frame(known, j);
      });
      return;
    }
    /* One registration for every value of the group; none is stored before its row is committed. */
    const registration = registrar.register(dataKey, scope);
    indices.forEach((i, j) => {
      sealed[i] = registration.then((id) => frame(id, j));
    });
  }

  /**
   * Checks that a row of the data-key table may open a value of `binding`'s row: the same keyring
   * and the same tenant. Anything else is an `IntegrityError` naming the data-key id, raised before
   * any key is used.
   */
  checkKeyRecord(record: DataKeyRecord, binding: ValueBinding, context: ErrorContext = {}): void {
    /* The values of a result set mostly share one row and tenant: the last ones checked pass. */
    const scope = this.#scope(binding);
    const last = this.#lastChecked;
    if (last && last.record === record && last.scope === scope && last.tenant === binding.tenant) return;
    if (record.keyring !== scope.context[KEYRING_CONTEXT_KEY]) {
      throw new IntegrityError(
        `data key ${record.id} of the data-key table belongs to another keyring than this one`,
        { ...context, ...tenantOf(binding) },
      );
    }
    if (record.tenant !== (binding.tenant ?? null)) {
      throw new IntegrityError(
        `data key ${record.id} of the data-key table belongs to another tenant than the value's row`,
        { ...context, ...tenantOf(binding) },
      );
    }
    this.#lastChecked = { record, scope, tenant: binding.tenant };
  }

  /**
   * Decrypts a sealed value. Any altered byte, or a value moved to another table, column or row,
   * is an `IntegrityError` carrying `context`.
   */
  async open(sealed: SealedValue, binding: ValueBinding, context: ErrorContext = {}): Promise<unknown> {
    const parts = this.#parse(sealed, binding, context);
    let plaintext: Buffer | undefined;
    try {
      plaintext = await this.cache.withDecryptionKey(
        sealed.keyVersion,
        sealed.wrappedKey,
        (key) => this.#gcmOpen(key, parts, binding),
        this.scopeOf(binding.tenant),
      );
    } catch (error) {
      throw withErrorContext(unwrapFailure(error, sealed), {
        ...context,
        keyVersion: sealed.keyVersion,
        ...tenantOf(binding),
      });
    }
    return this.#decode(plaintext, sealed, { ...context, ...tenantOf(binding) });
  }

  /** Like {@link open}, synchronously, when the data key is cached; else `NOT_CACHED`. */
  tryOpen(sealed: SealedValue, binding: ValueBinding, context: ErrorContext = {}): unknown {
    const parts = this.#parse(sealed, binding, context);
    const plaintext = this.cache.tryWithDecryptionKey(
      sealed.keyVersion,
      sealed.wrappedKey,
      (key) => this.#gcmOpen(key, parts, binding),
      this.scopeOf(binding.tenant),
    );
    return plaintext === NOT_CACHED
      ? NOT_CACHED
      : this.#decode(plaintext, sealed, { ...context, ...tenantOf(binding) });
  }

  /**
   * Opens many values, like {@link tryOpen} each, but with one native call per data key (the
   * values of a result set mostly share a few): each value's checks and associated data are its
   * own, and one value's failure is its own (in `failures`), never another's.
   */
  tryOpenMany(sealed: readonly SealedValue[], bindings: readonly ValueBinding[]): OpenedValues {
    const values = new Array<unknown>(sealed.length);
    const failures = new Array<unknown>(sealed.length);
    for (const group of this.#groupsOf(sealed, bindings, failures)) {
      const done = this.cache.tryWithDecryptionKey(
        group.keyVersion,
        group.wrappedKey,
        (key) => this.#openGroup(key, group, sealed, bindings, values, failures),
        group.scope,
      );
      if (done === NOT_CACHED) for (const i of group.indices) values[i] = NOT_CACHED;
    }
    return { values, failures };
  }

  /**
   * Like {@link tryOpenMany}, also for data keys that are not cached: each key is unwrapped once
   * (shared with every other caller, as {@link open} does) and its values opened in one call while
   * it is held, so a result set under more data keys than the cache holds unwraps each only once.
   * A key that cannot be unwrapped fails its values with the error {@link open} would give, after
   * one provider call.
   */
  async openMany(sealed: readonly SealedValue[], bindings: readonly ValueBinding[]): Promise<OpenedValues> {
    const values = new Array<unknown>(sealed.length);
    const failures = new Array<unknown>(sealed.length);
    await Promise.all(
      this.#groupsOf(sealed, bindings, failures).map((group) =>
        this.cache
          .withDecryptionKey(
            group.keyVersion,
            group.wrappedKey,
            (key) => this.#openGroup(key, group, sealed, bindings, values, failures),
            group.scope,
          )
          .catch((error: unknown) => {
            for (const i of group.indices) {
              const value = sealed[i] as SealedValue;
              failures[i] = withErrorContext(unwrapFailure(error, value), {
                keyVersion: value.keyVersion,
                ...tenantOf(bindings[i] as ValueBinding),
              });
            }
          }),
      ),
    );
    return { values, failures };
  }

  /**
   * The values of a batch by data key, each added to its key's batch with its associated data;
   * a value failing its checks gets its error in `failures` and joins no group.
   */
  #groupsOf(
    sealed: readonly SealedValue[],
    bindings: readonly ValueBinding[],
    failures: unknown[],
  ): KeyGroup[] {
    const groups: KeyGroup[] = [];
    const byLookup = new Map<string, KeyGroup>();
    let last: KeyGroup | undefined;
    for (let i = 0; i < sealed.length; i++) {
      const value = sealed[i] as SealedValue;
      const binding = bindings[i] as ValueBinding;
      let aad: Buffer;
      try {
        aad = this.#checkedAssociatedData(value, binding);
      } catch (error) {
        failures[i] = error;
        continue;
      }
      const scope = this.#scope(binding);
      let group = last && sameKey(last, value, scope) ? last : undefined;
      if (!group && groups.length <= SCANNED_GROUPS) group = groups.find((g) => sameKey(g, value, scope));
      const lookup =
        group || groups.length < SCANNED_GROUPS
          ? undefined
          : `${scope.cacheId}\0${value.keyVersion}\0${value.wrappedKey.toString('base64')}`;
      if (!group && lookup !== undefined) group = byLookup.get(lookup);
      if (!group) {
        group = {
          keyVersion: value.keyVersion,
          wrappedKey: value.wrappedKey,
          scope,
          batch: new GcmOpenBatch(),
          indices: [],
        };
        groups.push(group);
        if (lookup !== undefined) byLookup.set(lookup, group);
      }
      last = group;
      if (value.ciphertext[0] === FORMAT_V2)
        group.batch.addContiguous(value.ciphertext, COMPACT_IV_OFFSET, aad);
      else group.batch.add(value.iv, value.ciphertext, HEADER_BYTES, aad);
      group.indices.push(i);
    }
    return groups;
  }

  /** Opens one data key's values in one call, then decodes each from the shared plaintext buffer. */
  #openGroup(
    key: Buffer,
    group: KeyGroup,
    sealed: readonly SealedValue[],
    bindings: readonly ValueBinding[],
    values: unknown[],
    failures: unknown[],
  ): true {
    const opened = group.batch.open(key);
    try {
      for (let j = 0; j < group.indices.length; j++) {
        const i = group.indices[j] as number;
        const value = sealed[i] as SealedValue;
        const binding = bindings[i] as ValueBinding;
        if (opened.opened[j] === 1) {
          try {
            values[i] = decodeValueAt(opened.plaintexts, opened.start(j), opened.end(j));
          } catch (error) {
            failures[i] = withErrorContext(error, { ...tenantOf(binding), keyVersion: value.keyVersion });
          }
          continue;
        }
        /* Not under the column's own associated data: under a former name, or not at all. */
        const former = binding.formerColumns?.length
          ? this.#gcmOpen(key, this.#parse(value, binding, {}), binding)
          : undefined;
        try {
          values[i] = this.#decode(former, value, tenantOf(binding));
        } catch (error) {
          failures[i] = error;
        }
      }
    } finally {
      opened.plaintexts.fill(0);
    }
    return true;
  }

  /**
   * The checks {@link tryOpen} makes before it decrypts (format, flags, tenant binding), and the
   * value's associated data, without splitting the value into views.
   */
  #checkedAssociatedData(sealed: SealedValue, binding: ValueBinding, context: ErrorContext = {}): Buffer {
    const { ciphertext } = sealed;
    if (ciphertext[0] === FORMAT_V2) {
      try {
        checkCompact(ciphertext);
      } catch (error) {
        throw withErrorContext(error, whereOf(context, sealed));
      }
    } else {
      const knownFlags = FLAG_PRIMARY_KEY_BOUND | FLAG_SCHEMA_BOUND | FLAG_TENANT_BOUND;
      if (
        ciphertext.length < HEADER_BYTES ||
        ciphertext[0] !== FORMAT_V1 ||
        ((ciphertext[1] ?? 0) & ~knownFlags) !== 0
      ) {
        throw new IntegrityError('ciphertext has an unknown format', whereOf(context, sealed));
      }
    }
    if (binding.tenant !== undefined && ((ciphertext[1] ?? 0) & FLAG_TENANT_BOUND) === 0) {
      /* A tenant's row holds only values bound to its tenant: any other was put there from elsewhere. */
      throw new IntegrityError('encrypted value is not bound to the tenant of its row', {
        ...whereOf(context, sealed),
        tenant: binding.tenant,
      });
    }
    /* What gcmOpen refuses as failing authentication: an IV of another length, a body shorter than a tag. */
    if (
      ciphertext[0] !== FORMAT_V2 &&
      (sealed.iv.length !== IV_BYTES || ciphertext.length - HEADER_BYTES < TAG_BYTES)
    ) {
      this.#decode(undefined, sealed, { ...context, ...tenantOf(binding) });
    }
    /* The associated data takes the header from the first two bytes: the value itself serves. */
    return associatedData(ciphertext, binding);
  }

  /**
   * Opens under the binding's column, then under each of its former columns (a renamed
   * property), so that rows written before the rename still read until they are re-encrypted.
   */
  #gcmOpen(key: Buffer, parts: OpenParts, binding: ValueBinding) {
    const opened = gcmOpen(key, parts.iv, parts.body, parts.aad);
    if (opened !== undefined || !binding.formerColumns?.length) return opened;
    for (const column of binding.formerColumns) {
      const former = gcmOpen(key, parts.iv, parts.body, associatedData(parts.header, { ...binding, column }));
      if (former !== undefined) return former;
    }
    return undefined;
  }

  /** The scope a value of `binding` is sealed and opened in. */
  #scope(binding: ValueBinding): KeyScope {
    return this.scopeOf(binding.tenant) ?? this.cache.defaultScope;
  }

  /**
   * Seals the body synchronously (the data-key id is not in the associated data), then frames it
   * with the id of the key's row: at once when known, else once the row is registered.
   */
  #sealCompact(
    key: Buffer,
    dataKey: CachedDataKey,
    plaintext: Buffer,
    binding: ValueBinding,
    registrar: DataKeyRegistrar,
    scope: KeyScope,
  ): SealedValue | Promise<SealedValue> {
    const flags = flagsOf(binding);
    const iv = this.#ivs.next();
    const body = gcmSeal(key, iv, plaintext, associatedData(compactHeader(flags), binding));
    const { wrappedKey, version } = dataKey;
    const frame = (dataKeyId: bigint): SealedValue =>
      compactSealedValue(encodeCompact({ flags, dataKeyId, iv, body }), dataKeyId, wrappedKey, version);
    const known = registrar.knownId(dataKey);
    return known !== undefined ? frame(known) : registrar.register(dataKey, scope).then(frame);
  }

  #withPlaintext<T>(value: unknown, declared: ValueType | undefined, fn: (plaintext: Buffer) => T): T {
    const plaintext = encodeValue(value, declared);
    let result: T;
    try {
      result = fn(plaintext);
    } catch (error) {
      plaintext.fill(0);
      throw error;
    }
    if (result instanceof Promise) {
      return result.finally(() => plaintext.fill(0)) as T;
    }
    plaintext.fill(0);
    return result;
  }

  #seal(key: Buffer, dataKey: CachedDataKey, plaintext: Buffer, binding: ValueBinding): SealedValue {
    const header = v1Header(flagsOf(binding));
    const iv = this.#ivs.next();
    return {
      ciphertext: Buffer.concat([header, gcmSeal(key, iv, plaintext, associatedData(header, binding))]),
      iv,
      wrappedKey: dataKey.wrappedKey,
      keyVersion: dataKey.version,
    };
  }

  /** The parts to authenticate: format 1 (the sidecar layout's) or format 2 (compact), by byte 0. */
  #parse(sealed: SealedValue, binding: ValueBinding, context: ErrorContext): OpenParts {
    const aad = this.#checkedAssociatedData(sealed, binding, context);
    const { ciphertext } = sealed;
    if (ciphertext[0] === FORMAT_V2) {
      return {
        header: ciphertext.subarray(0, HEADER_BYTES),
        iv: ciphertext.subarray(COMPACT_IV_OFFSET, COMPACT_BODY_OFFSET),
        body: ciphertext.subarray(COMPACT_BODY_OFFSET),
        aad,
      };
    }
    return {
      header: ciphertext.subarray(0, HEADER_BYTES),
      iv: sealed.iv,
      body: ciphertext.subarray(HEADER_BYTES),
      aad,
    };
  }

  #decode(plaintext: Buffer | undefined, sealed: SealedValue, context: ErrorContext): unknown {
    if (plaintext === undefined) {
      const under = sealed.dataKeyId === undefined ? '' : ` under data key ${sealed.dataKeyId}`;
      throw new IntegrityError(`encrypted value failed authentication${under}`, {
        ...context,
        keyVersion: sealed.keyVersion,
      });
    }
    try {
      return decodeValue(plaintext);
    } catch (error) {
      throw withErrorContext(error, { ...context, keyVersion: sealed.keyVersion });
    } finally {
      plaintext.fill(0);
    }
  }
}

/** The parts of a stored value that are authenticated, and its associated data. */
interface OpenParts {
  header: Buffer;
  iv: Buffer;
  body: Buffer;
  aad: Buffer;
}

/** The two header bytes of a format-1 value with these flags, shared (read-only). */
const V1_HEADERS = Array.from({ length: 8 }, (_, flags) => Buffer.of(FORMAT_V1, flags));

function v1Header(flags: number): Buffer {
  return V1_HEADERS[flags] ?? Buffer.of(FORMAT_V1, flags);
}

/** The same for format 2 (compact values), as their associated data takes it. */
const V2_HEADERS = Array.from({ length: 8 }, (_, flags) => compactHeader(flags));

function v2Header(flags: number): Buffer {
  return V2_HEADERS[flags] ?? compactHeader(flags);
}

/**
 * A compact (format 2) value as the field encryptor opens it: the stored bytes, with its data
 * key's wrapped key and version from the key's row.
 */
export function compactSealedValue(
  ciphertext: Buffer,
  dataKeyId: bigint,
  wrappedKey: Buffer,
  keyVersion: number,
): SealedValue {
  return {
    ciphertext,
    iv: ciphertext.subarray(COMPACT_IV_OFFSET, COMPACT_BODY_OFFSET),
    wrappedKey,
    keyVersion,
    dataKeyId,
  };
}

/** An error's context: the caller's, with the value's key version (built only when a check fails). */
function whereOf(context: ErrorContext, sealed: SealedValue): ErrorContext {
  return { ...context, keyVersion: sealed.keyVersion };
}

/** Whether `sealed` is under the data key of `group`. */
function sameKey(group: KeyGroup, sealed: SealedValue, scope: KeyScope): boolean {
  return (
    group.keyVersion === sealed.keyVersion &&
    group.scope.cacheId === scope.cacheId &&
    (group.wrappedKey === sealed.wrappedKey || group.wrappedKey.equals(sealed.wrappedKey))
  );
}

function flagsOf(binding: ValueBinding): number {
  return (
    (binding.primaryKey === undefined ? 0 : FLAG_PRIMARY_KEY_BOUND) |
    (binding.schema === undefined ? 0 : FLAG_SCHEMA_BOUND) |
    (binding.tenant === undefined ? 0 : FLAG_TENANT_BOUND)
  );
}

/**
 * A compact value's wrapped key lives in the data-key table: an integrity failure unwrapping it
 * names the row, so that it can be restored from the backup taken with the data.
 */
function unwrapFailure(error: unknown, sealed: SealedValue): unknown {
  if (sealed.dataKeyId === undefined || !(error instanceof IntegrityError)) return error;
  return new IntegrityError(
    `data key ${sealed.dataKeyId} of the data-key table does not unwrap (its wrapped key was altered, or ` +
      `is not the one registered; restore the row from the backup taken with the data): ${error.detail}`,
    error.context,
    { cause: error },
  );
}

function tenantOf(binding: ValueBinding): { tenant?: string } {
  return binding.tenant === undefined ? {} : { tenant: binding.tenant };
}
