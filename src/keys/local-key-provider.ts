import { createHash, randomBytes } from 'node:crypto';
import { inspect } from 'node:util';
import { gcmForgetKey, gcmOpen, gcmSeal, IV_BYTES, KEY_BYTES } from '../crypto/aes-gcm';
import { ConfigError, IntegrityError, KeyProviderError } from '../errors';
import { canonicalContext, type EncryptionContext, type GeneratedDataKey, KeyProvider } from './key-provider';

/** Options of {@link LocalKeyProvider}. */
export interface LocalKeyProviderOptions {
  /**
   * The customer-provided master key: base64 of exactly 32 random bytes, as printed by
   * `openssl rand -base64 32`.
   */
  key: string;
}

const WRAP_FORMAT = 1;
/** Carries key bytes into the constructor from {@link LocalKeyProvider.fromKeyBytes} only. */
const KEY_BYTES_OPTION = Symbol('key bytes');
const HOW_TO_MAKE_A_KEY = 'generate one with `openssl rand -base64 32`';

/**
 * A customer-provided 256-bit master key held in process memory. Data keys are wrapped with
 * AES-256-GCM under it: `[format 1][iv 12][wrapped key 32][tag 16]`, with the encryption context
 * as associated data.
 *
 * @example
 * ```ts
 * new LocalKeyProvider({ key: process.env.MASTER_KEY! })
 * ```
 */
export class LocalKeyProvider extends KeyProvider {
  readonly #key: Buffer;
  readonly #fingerprint: string;
  #destroyed = false;

  constructor(options: LocalKeyProviderOptions) {
    super();
    const bytes = (options as { [KEY_BYTES_OPTION]?: Buffer } | undefined)?.[KEY_BYTES_OPTION];
    this.#key = bytes ?? parseMasterKey(options?.key);
    this.#fingerprint = fingerprintOf(this.#key);
  }

  /**
   * A provider holding `key` (32 bytes), e.g. a customer-provided key just unwrapped. The bytes are
   * copied into memory of the provider's own, and `key` is zeroed.
   */
  static fromKeyBytes(key: Buffer): LocalKeyProvider {
    if (!Buffer.isBuffer(key) || key.length !== KEY_BYTES) {
      throw new ConfigError(`a master key must be 32 bytes (256 bits): ${HOW_TO_MAKE_A_KEY}`);
    }
    const own = Buffer.alloc(KEY_BYTES);
    key.copy(own);
    key.fill(0);
    return new LocalKeyProvider({ [KEY_BYTES_OPTION]: own } as unknown as LocalKeyProviderOptions);
  }

  /** Runs `fn` with the master key bytes (for wrapping them under another key); `fn` must not keep them. */
  async withKeyBytes<T>(fn: (key: Buffer) => Promise<T>): Promise<T> {
    return fn(this.#usableKey());
  }

  /** Zeroes the master key: every later use fails. For keys that leave the process (an offboarded tenant). */
  destroy(): void {
    if (this.#destroyed) return;
    this.#destroyed = true;
    gcmForgetKey(this.#key);
    this.#key.fill(0);
  }

  #usableKey(): Buffer {
    if (this.#destroyed) {
      throw new KeyProviderError('this master key was destroyed in memory', this.errorContext());
    }
    return this.#key;
  }

  /** A fingerprint (`sha256:` + 16 hex digits of SHA-256 over a label and the key), never the key. */
  get fingerprint(): string {
    return this.#fingerprint;
  }

  describe() {
    return { kind: 'local', keyReference: this.#fingerprint };
  }

  protected async _generateDataKey(context: EncryptionContext): Promise<GeneratedDataKey> {
    const plaintextKey = randomBytes(KEY_BYTES);
    return { plaintextKey, wrappedKey: await this._wrapDataKey(plaintextKey, context) };
  }

  protected async _wrapDataKey(plaintextKey: Buffer, context: EncryptionContext): Promise<Buffer> {
    const header = Buffer.of(WRAP_FORMAT);
    const iv = randomBytes(IV_BYTES);
    const sealed = gcmSeal(
      this.#usableKey(),
      iv,
      plaintextKey,
      Buffer.concat([header, canonicalContext(context)]),
    );
    return Buffer.concat([header, iv, sealed]);
  }

  protected async _unwrapDataKey(wrappedKey: Buffer, context: EncryptionContext): Promise<Buffer> {
    const header = wrappedKey.subarray(0, 1);
    const opened =
      header[0] === WRAP_FORMAT
        ? gcmOpen(
            this.#usableKey(),
            wrappedKey.subarray(1, 1 + IV_BYTES),
            wrappedKey.subarray(1 + IV_BYTES),
            Buffer.concat([header, canonicalContext(context)]),
          )
        : undefined;
    if (opened === undefined) {
      throw new IntegrityError(
        'wrapped data key failed authentication: it was altered, or the master key configured for its ' +
          'version is not the one that wrapped it (the master key of that version may be wrong, ' +
          'or keyringId differs from the one that wrapped it)',
        this.errorContext(),
      );
    }
    return opened;
  }

  /** Never prints the key. */
  [inspect.custom](): string {
    return `LocalKeyProvider { fingerprint: '${this.#fingerprint}' }`;
  }

  toJSON(): { kind: string; fingerprint: string } {
    return { kind: 'local', fingerprint: this.#fingerprint };
  }
}

function parseMasterKey(key: unknown): Buffer {
  if (typeof key !== 'string' || key.length === 0) {
    throw new ConfigError(`LocalKeyProvider needs a master key: ${HOW_TO_MAKE_A_KEY}`);
  }
  const trimmed = key.trim();
  if (!/^[A-Za-z0-9+/]+={0,2}$/.test(trimmed) || trimmed.length % 4 !== 0) {
    throw new ConfigError(`LocalKeyProvider master key is not valid base64: ${HOW_TO_MAKE_A_KEY}`);
  }
  const bytes = Buffer.from(trimmed, 'base64');
  if (bytes.length !== KEY_BYTES) {
    bytes.fill(0);
    throw new ConfigError(
      `LocalKeyProvider master key must be 32 bytes (256 bits), got ${bytes.length}: ${HOW_TO_MAKE_A_KEY}`,
    );
  }
  return bytes;
}

function fingerprintOf(key: Buffer): string {
  const digest = createHash('sha256').update('typeorm-envelope key fingerprint\0').update(key).digest('hex');
  return `sha256:${digest.slice(0, 16)}`;
}
