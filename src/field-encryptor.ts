import { gcmOpen, gcmSeal } from './crypto/aes-gcm';
import {
  associatedData,
  FLAG_PRIMARY_KEY_BOUND,
  FORMAT_V1,
  HEADER_BYTES,
  type ValueBinding,
} from './crypto/associated-data';
import { decodeValue, encodeValue, type ValueType } from './crypto/codec';
import { IvPool } from './crypto/iv-pool';
import { type ErrorContext, IntegrityError, withErrorContext } from './errors';
import type { DataKeyCache } from './keys/data-key-cache';

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

  constructor(private readonly cache: DataKeyCache) {}

  /** Encrypts a non-null value for the place `binding` names. */
  async seal(value: unknown, binding: ValueBinding, declared?: ValueType): Promise<SealedValue> {
    const plaintext = encodeValue(value, declared);
    const header = Buffer.of(FORMAT_V1, binding.primaryKey === undefined ? 0 : FLAG_PRIMARY_KEY_BOUND);
    const aad = associatedData(header, binding);
    const iv = this.#ivs.next();
    try {
      return await this.cache.withEncryptionKey((key, dataKey) => ({
        ciphertext: Buffer.concat([header, gcmSeal(key, iv, plaintext, aad)]),
        iv,
        wrappedKey: dataKey.wrappedKey,
        keyVersion: dataKey.version,
      }));
    } finally {
      plaintext.fill(0);
    }
  }

  /**
   * Decrypts a sealed value. Any altered byte, or a value moved to another table, column or row,
   * is an `IntegrityError` carrying `context`.
   */
  async open(sealed: SealedValue, binding: ValueBinding, context: ErrorContext = {}): Promise<unknown> {
    const where = { ...context, keyVersion: sealed.keyVersion };
    const header = sealed.ciphertext.subarray(0, HEADER_BYTES);
    if (header[0] !== FORMAT_V1 || sealed.ciphertext.length < HEADER_BYTES) {
      throw new IntegrityError('ciphertext has an unknown format', where);
    }
    const aad = associatedData(header, binding);
    const body = sealed.ciphertext.subarray(HEADER_BYTES);
    let plaintext: Buffer | undefined;
    try {
      plaintext = await this.cache.withDecryptionKey(sealed.keyVersion, sealed.wrappedKey, (key) =>
        gcmOpen(key, sealed.iv, body, aad),
      );
    } catch (error) {
      throw withErrorContext(error, where);
    }
    if (plaintext === undefined) throw new IntegrityError('encrypted value failed authentication', where);
    try {
      return decodeValue(plaintext);
    } catch (error) {
      throw withErrorContext(error, where);
    } finally {
      plaintext.fill(0);
    }
  }
}
