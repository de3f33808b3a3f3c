import { gcmOpen, gcmSeal } from './crypto/aes-gcm';
import {
  associatedData,
  FLAG_PRIMARY_KEY_BOUND,
  FLAG_SCHEMA_BOUND,
  FLAG_TENANT_BOUND,
  FORMAT_V1,
  HEADER_BYTES,
  type ValueBinding,
} from './crypto/associated-data';
import { decodeValue, encodeValue, type ValueType } from './crypto/codec';
import { IvPool } from './crypto/iv-pool';
import { type ErrorContext, IntegrityError, withErrorContext } from './errors';
import { type CachedDataKey, type DataKeyCache, NOT_CACHED } from './keys/data-key-cache';
import type { KeyScope } from './keys/key-scope';

/**
 * The key scope of a value's tenant (`undefined`: the value is not a tenant's): which master keys
 * seal and open it. Without one, every value uses the cache's keyring.
 */
export type KeyScopeResolver = (tenant: string | undefined) => KeyScope | undefined;

/** The four stored parts of one encrypted value. */
export interface SealedValue {
  /** `[format][flags][AES-256-GCM ciphertext][tag]`. */
  ciphertext: Buffer;
  /** The 96-bit IV, unique per value. */
  iv: Buffer;
  /** The data key, wrapped by master-key version `keyVersion`. */
  wrappedKey: Buffer;
  /** The master-key version that wrapped the data key. */
  keyVersion: number;
}

/**
 * Encrypts and decrypts single values: codec, associated data and AES-256-GCM under data keys
 * from the cache. Knows nothing of any ORM.
 */
export class FieldEncryptor {
  readonly #ivs = new IvPool();

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
   * Decrypts a sealed value. Any altered byte, or a value moved to another table, column or row,
   * is an `IntegrityError` carrying `context`.
   */
  async open(sealed: SealedValue, binding: ValueBinding, context: ErrorContext = {}): Promise<unknown> {
    const { body, aad } = this.#parse(sealed, binding, context);
    let plaintext: Buffer | undefined;
    try {
      plaintext = await this.cache.withDecryptionKey(
        sealed.keyVersion,
        sealed.wrappedKey,
        (key) => this.#gcmOpen(key, sealed, body, aad, binding),
        this.scopeOf(binding.tenant),
      );
    } catch (error) {
      throw withErrorContext(error, { ...context, keyVersion: sealed.keyVersion, ...tenantOf(binding) });
    }
    return this.#decode(plaintext, sealed, { ...context, ...tenantOf(binding) });
  }

  /** Like {@link open}, synchronously, when the data key is cached; else `NOT_CACHED`. */
  tryOpen(sealed: SealedValue, binding: ValueBinding, context: ErrorContext = {}): unknown {
    const { body, aad } = this.#parse(sealed, binding, context);
    const plaintext = this.cache.tryWithDecryptionKey(
      sealed.keyVersion,
      sealed.wrappedKey,
      (key) => this.#gcmOpen(key, sealed, body, aad, binding),
      this.scopeOf(binding.tenant),
    );
    return plaintext === NOT_CACHED
      ? NOT_CACHED
      : this.#decode(plaintext, sealed, { ...context, ...tenantOf(binding) });
  }

  /**
   * Opens under the binding's column, then under each of its former columns (a renamed
   * property), so that rows written before the rename still read until they are re-encrypted.
   */
  #gcmOpen(key: Buffer, sealed: SealedValue, body: Buffer, aad: Buffer, binding: ValueBinding) {
    const opened = gcmOpen(key, sealed.iv, body, aad);
    if (opened !== undefined || !binding.formerColumns?.length) return opened;
    const header = sealed.ciphertext.subarray(0, HEADER_BYTES);
    for (const column of binding.formerColumns) {
      const former = gcmOpen(key, sealed.iv, body, associatedData(header, { ...binding, column }));
      if (former !== undefined) return former;
    }
    return undefined;
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
    const flags =
      (binding.primaryKey === undefined ? 0 : FLAG_PRIMARY_KEY_BOUND) |
      (binding.schema === undefined ? 0 : FLAG_SCHEMA_BOUND) |
      (binding.tenant === undefined ? 0 : FLAG_TENANT_BOUND);
    const header = Buffer.of(FORMAT_V1, flags);
    const iv = this.#ivs.next();
    return {
      ciphertext: Buffer.concat([header, gcmSeal(key, iv, plaintext, associatedData(header, binding))]),
      iv,
      wrappedKey: dataKey.wrappedKey,
      keyVersion: dataKey.version,
    };
  }

  #parse(sealed: SealedValue, binding: ValueBinding, context: ErrorContext) {
    const header = sealed.ciphertext.subarray(0, HEADER_BYTES);
    const knownFlags = FLAG_PRIMARY_KEY_BOUND | FLAG_SCHEMA_BOUND | FLAG_TENANT_BOUND;
    if (
      sealed.ciphertext.length < HEADER_BYTES ||
      header[0] !== FORMAT_V1 ||
      ((header[1] ?? 0) & ~knownFlags) !== 0
    ) {
      throw new IntegrityError('ciphertext has an unknown format', {
        ...context,
        keyVersion: sealed.keyVersion,
      });
    }
    if (binding.tenant !== undefined && ((header[1] ?? 0) & FLAG_TENANT_BOUND) === 0) {
      /* A tenant's row holds only values bound to its tenant: any other was put there from elsewhere. */
      throw new IntegrityError('encrypted value is not bound to the tenant of its row', {
        ...context,
        tenant: binding.tenant,
        keyVersion: sealed.keyVersion,
      });
    }
    return { body: sealed.ciphertext.subarray(HEADER_BYTES), aad: associatedData(header, binding) };
  }

  #decode(plaintext: Buffer | undefined, sealed: SealedValue, context: ErrorContext): unknown {
    if (plaintext === undefined) {
      throw new IntegrityError('encrypted value failed authentication', {
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

function tenantOf(binding: ValueBinding): { tenant?: string } {
  return binding.tenant === undefined ? {} : { tenant: binding.tenant };
}
