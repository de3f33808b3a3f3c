import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { inspect } from 'node:util';
/* Used only inside this file: the published declarations never name this optional package. */
import type { CryptographyClient, KeyClient, KeyVaultKey } from '@azure/keyvault-keys';
import {
  ConfigError,
  EnvelopeError,
  type ErrorContext,
  IntegrityError,
  KeyAccessDeniedError,
  KeyProviderError,
} from '../errors';
import {
  canonicalContext,
  type EncryptionContext,
  type GeneratedDataKey,
  type KeyDescription,
  KeyProvider,
} from './key-provider';
import { loadOptionalDependency } from './optional-dependency';

/**
 * A `TokenCredential` of `@azure/core-auth` (what every `@azure/identity` credential is), declared
 * structurally so that the type declarations compile without the Azure packages.
 */
export interface AzureTokenCredential {
  getToken(
    scopes: string | string[],
    // biome-ignore lint/suspicious/noExplicitAny: the SDK's GetTokenOptions
    options?: { readonly [option: string]: any },
  ): Promise<{ token: string; expiresOnTimestamp: number } | null>;
}

/**
 * `KeyClientOptions` / `CryptographyClientOptions` of `@azure/keyvault-keys` (proxy, agent,
 * `serviceVersion`, `additionalPolicies`, `allowInsecureConnection`…), declared structurally so
 * that the type declarations compile without that optional package.
 */
// biome-ignore lint/suspicious/noExplicitAny: accepts every KeyClientOptions, which is an interface (no index signature)
export type AzureKeyVaultClientOptions = { readonly [option: string]: any };

/** The SDK's own retry options (`PipelineRetryOptions` of `@azure/core-rest-pipeline`). */
export interface AzureKeyVaultRetryOptions {
  /** Retries after the first attempt. Default here 4 (five attempts); the SDK's own default is 3. */
  maxRetries?: number;
  /** Base of the exponential backoff, in ms (SDK default 1,000). */
  retryDelayInMs?: number;
  /** Longest backoff, in ms (SDK default 64,000). A 429's `Retry-After` is honoured as sent. */
  maxRetryDelayInMs?: number;
}

/** Options of {@link AzureKeyVaultKeyProvider}. */
export interface AzureKeyVaultKeyProviderOptions {
  /**
   * The key id: `https://<vault>.vault.azure.net/keys/<name>/<version>` (or a Managed HSM's
   * `https://<hsm>.managedhsm.azure.net/keys/…`). Give the version: it is what the key registry
   * records. Without one, the provider uses the version the key registry recorded for its keyring
   * version, else the key's current version, looked up (GET) once at first use.
   */
  keyId: string;
  /**
   * How the application authenticates: any `TokenCredential` (a managed identity, a workload
   * identity, a service principal…). Default: `DefaultAzureCredential` of `@azure/identity` (an
   * optional peer dependency). The vault's challenge names its Entra tenant, and the credential is
   * asked for a token of that tenant: a key in a customer's tenant needs a multi-tenant application
   * and a credential allowing that tenant (`additionallyAllowedTenants`).
   */
  credential?: AzureTokenCredential;
  /**
   * How long one attempt may wait for Key Vault to answer, in ms. Default 10,000. An attempt that
   * gets no answer is abandoned and retried like a network error, so a call fails with a
   * `KeyProviderError` after at most `maxRetries + 1` such attempts instead of waiting forever.
   */
  requestTimeout?: number;
  /** The SDK's retry policy (429 with `Retry-After`, 408, 5xx, network errors, timeouts). */
  retryOptions?: AzureKeyVaultRetryOptions;
  /** Further SDK client options; `retryOptions` above takes the place of theirs. */
  clientOptions?: AzureKeyVaultClientOptions;
}

/** What {@link AzureKeyVaultKeyProvider.getKeyMetadata} reports about the key version. */
export interface AzureKeyVaultKeyMetadata {
  /** The versioned key id. */
  keyId: string;
  /** `RSA`, `RSA-HSM`, `oct-HSM`, `EC`… */
  keyType: string;
  /** RSA modulus bits; undefined for other key types (Key Vault does not report an `oct-HSM` key's size). */
  keySize: number | undefined;
  /** The key's `key_ops`. */
  keyOps: string[];
  enabled: boolean;
  notBefore?: Date;
  expiresOn?: Date;
}

type KeysModule = typeof import('@azure/keyvault-keys');

/** The algorithms this provider wraps with, and their id in a wrapped key's header. */
type WrapAlgorithm = 'RSA-OAEP-256' | 'A256KW';
const ALGORITHM_IDS: Record<WrapAlgorithm, number> = { 'RSA-OAEP-256': 1, A256KW: 2 };

const KIND = 'azure-key-vault';
const KEYS_PACKAGE = '@azure/keyvault-keys';
const IDENTITY_PACKAGE = '@azure/identity';
const DATA_KEY_BYTES = 32;
const DIGEST_BYTES = 32;
/** The only format so far of a wrapped key: `[1][algorithm id][version length][version][wrapped envelope]`. */
const FORMAT = 1;
/** Domain of the context digest: no other use of SHA-256 in this library can produce the same bytes. */
const DIGEST_DOMAIN = Buffer.from('typeorm-envelope:azure-key-vault:wrapped-key:v1\0', 'ascii');
const MIN_RSA_BITS = 3072;
const DEFAULT_REQUEST_TIMEOUT = 10_000;
const DEFAULT_MAX_RETRIES = 4;
const KEY_NAME = /^[0-9a-zA-Z-]{1,127}$/;
const KEY_VERSION = /^[0-9a-zA-Z]{1,64}$/;
const REQUIRED_OPS = ['wrapKey', 'unwrapKey'] as const;
const REQUIRED_KEY = `an RSA key of at least ${MIN_RSA_BITS} bits (wrapped with RSA-OAEP-256) or a Managed HSM oct-HSM key (A256KW) is required`;

/** A key id taken apart: vault URL, key name, version (undefined: none given). */
interface KeyIdParts {
  vaultUrl: string;
  name: string;
  version: string | undefined;
}

/** The key version this provider wraps under, once known. */
interface Pinned {
  version: string;
  kid: string;
}

/**
 * Master key in Azure Key Vault or Managed HSM. Data keys are generated here (256 random bits),
 * wrapped by Key Vault's `wrapKey` (RSA-OAEP-256 for RSA keys of at least 3072 bits, always
 * performed by the service; A256KW for Managed HSM `oct-HSM` keys) and unwrapped by `unwrapKey`,
 * each call attributable to the application's identity in the vault's logs.
 *
 * Key Vault's wrapping takes no associated data, so what Key Vault wraps is an authenticated
 * envelope: the 32-byte data key followed by SHA-256 over a domain string, the wrapped key's
 * header (format, algorithm, key version) and the canonical encryption context (the keyring id
 * and, for a tenant, the tenant id). After `unwrapKey` the digest is recomputed from the context
 * the caller expects and compared in constant time; a mismatch is an `IntegrityError`. This
 * suffices to keep a wrapped key in its keyring and tenant: RSA-OAEP ciphertexts cannot be altered
 * into another valid one, nor A256KW ones (RFC 3394 integrity check), so changing the bound
 * context needs the plaintext data key, hence the right to unwrap with this key. It does not
 * authenticate who wrapped: RSA wrapping is public-key encryption, and whoever holds the public
 * key can wrap a data key of its own choosing for any context (and so plant values the
 * application will decrypt, not read existing ones); with an `oct-HSM` key wrapping needs the HSM.
 *
 * A wrapped key names the key version that wrapped it (in clear, and bound by the digest). This
 * provider is pinned to one key version, its key reference (what the key registry records) being
 * that versioned key id; a wrapped key of another version is refused before any call. Rotation
 * in Key Vault creates a new version: give it a new keyring version and re-wrap
 * (`rewrapDataKeys`), data untouched. There is no server-side re-wrap: re-wrapping unwraps here
 * and wraps there.
 *
 * Needs the optional peer dependency `@azure/keyvault-keys` (and `@azure/identity` when no
 * `credential` is given). Calls are retried by the SDK's retry policy (`retryOptions`); each
 * attempt has a `requestTimeout`. Key Vault refusing (403 `ForbiddenByRbac`: no role assignment;
 * 403 `KeyDisabled`; 401; 404 `KeyNotFound`; an expired key version) raises
 * `KeyAccessDeniedError`; a wrapped key that does not open here raises `IntegrityError`; anything
 * else (throttling after retries, 5xx, timeouts, network) raises `KeyProviderError` with the
 * original error, stripped of its HTTP request and response, as `cause`.
 *
 * Permissions: the role `Key Vault Crypto Service Encryption User` on the key (data actions
 * `keys/read`, `keys/wrap/action`, `keys/unwrap/action`), or an access policy with get, wrapKey
 * and unwrapKey.
 *
 * @example
 * ```ts
 * new AzureKeyVaultKeyProvider({
 *   keyId: 'https://contoso-keys.vault.azure.net/keys/app-data/6a1f2b9c0d3e4f5a6b7c8d9e0f1a2b3c',
 * });
 *
 * // A key in a customer's tenant, reached by a multi-tenant application.
 * new AzureKeyVaultKeyProvider({
 *   keyId: process.env.CUSTOMER_KEY_ID,
 *   credential: new DefaultAzureCredential({ additionallyAllowedTenants: ['*'] }),
 * });
 * ```
 */
export class AzureKeyVaultKeyProvider extends KeyProvider {
  readonly #configured: KeyIdParts;
  readonly #keyClient: KeyClient;
  readonly #credential: AzureTokenCredential;
  readonly #requestTimeout: number;
  /** Attempts per HTTP request object (the SDK resends the same object), 401 handshakes left out. */
  readonly #attempts = new WeakMap<object, number>();
  #pinned: Pinned | undefined;
  #pinning: Promise<Pinned> | undefined;
  #algorithm: WrapAlgorithm | undefined;
  /** The metadata the GET that resolved a version-less key id returned, for the call that caused it. */
  #fresh: AzureKeyVaultKeyMetadata | undefined;
  #crypto: CryptographyClient | undefined;

  constructor(options: AzureKeyVaultKeyProviderOptions) {
    super();
    const clientOptions = options?.clientOptions ?? {};
    this.#configured = parseKeyId(options?.keyId, clientOptions.allowInsecureConnection === true);
    this.#requestTimeout = positiveMs('requestTimeout', options.requestTimeout ?? DEFAULT_REQUEST_TIMEOUT);
    const sdk = loadOptionalDependency<KeysModule>(KEYS_PACKAGE, 'AzureKeyVaultKeyProvider');
    this.#credential = options.credential ?? defaultAzureCredential();
    if (typeof this.#credential?.getToken !== 'function') {
      throw new ConfigError('credential must be a TokenCredential (an object with getToken())');
    }
    this.#keyClient = new sdk.KeyClient(
      this.#configured.vaultUrl,
      this.#credential as ConstructorParameters<typeof sdk.KeyClient>[1],
      this.#clientOptionsOf(options, clientOptions),
    );
    if (this.#configured.version) {
      const { vaultUrl, name, version } = this.#configured;
      this.#pinned = { version, kid: `${vaultUrl}/keys/${name}/${version}` };
    }
  }

  /** The key id as configured (normalized; version-less if it was given so). */
  get keyId(): string {
    return formatKeyId(this.#configured);
  }

  /** The versioned key id, or the configured one until a version-less id was resolved. */
  describe(): KeyDescription {
    return { kind: KIND, keyReference: this.#pinned?.kid ?? this.keyId };
  }

  /** The versioned key id: as configured, or the current version's, looked up once (GET). */
  override async resolveKeyReference(): Promise<string> {
    return (await this.#pin()).kid;
  }

  /**
   * Whether `reference` (a versioned key id, as a key registry recorded it) names this provider's
   * key version. A provider configured without a version and not used yet takes the version so
   * recorded, if it is a version of the same key in the same vault: the registry's record then
   * decides which version a keyring version means, even after the key was rotated in Key Vault.
   */
  override async hasKeyReference(reference: string): Promise<boolean> {
    const recorded = tryParseKeyId(reference);
    if (!recorded?.version) return false;
    const { vaultUrl, name } = this.#configured;
    if (recorded.vaultUrl !== vaultUrl || recorded.name !== name) return false;
    if (!this.#pinned && !this.#pinning) {
      this.#pinned = { version: recorded.version, kid: formatKeyId(recorded) };
    }
    return (await this.#pin()).version === recorded.version;
  }

  /** GETs the key version and reports its type, size, `key_ops` and state. */
  async getKeyMetadata(): Promise<AzureKeyVaultKeyMetadata> {
    if (!this.#pinned) {
      /* Resolving a version-less key id GETs the current version: that answer serves this call too. */
      await this.#pin();
      const fresh = this.#fresh;
      this.#fresh = undefined;
      if (fresh) return fresh;
    }
    const pinned = await this.#pin();
    const key = await this.#send('get', () =>
      this.#keyClient.getKey(this.#configured.name, { version: pinned.version }),
    );
    return this.#remember(metadataOf(key));
  }

  /**
   * Checks, in order and naming the check that failed: `exists` (the key version can be read),
   * `enabled` (enabled, and within its activation and expiry dates), `key type and size` (RSA of
   * at least 3072 bits, or `oct-HSM`), `key_ops` (`wrapKey` and `unwrapKey` allowed).
   * `validate()` then adds the `round trip`.
   */
  override async checkKey(): Promise<void> {
    let meta: AzureKeyVaultKeyMetadata;
    try {
      meta = await this.getKeyMetadata();
    } catch (error) {
      throw failedCheck('exists', error);
    }
    const context = this.errorContext();
    const now = Date.now();
    if (!meta.enabled) {
      throw new KeyAccessDeniedError(
        'key check "enabled" failed: the key version is disabled; an enabled key is required',
        context,
      );
    }
    if (meta.notBefore && meta.notBefore.getTime() > now) {
      throw new KeyAccessDeniedError(
        `key check "enabled" failed: the key version is not valid before ${meta.notBefore.toISOString()}`,
        context,
      );
    }
    if (meta.expiresOn && meta.expiresOn.getTime() <= now) {
      throw new KeyAccessDeniedError(
        `key check "enabled" failed: the key version expired at ${meta.expiresOn.toISOString()}`,
        context,
      );
    }
    if (algorithmOf(meta) === undefined) {
      const size = meta.keySize === undefined ? '' : ` of ${meta.keySize} bits`;
      throw new KeyProviderError(
        `key check "key type and size" failed: the key is ${meta.keyType}${size}; ${REQUIRED_KEY}`,
        context,
      );
    }
    const missing = REQUIRED_OPS.filter((op) => !meta.keyOps.includes(op));
    if (missing.length > 0) {
      throw new KeyProviderError(
        `key check "key_ops" failed: the key's key_ops lack ${missing.join(' and ')}; wrapKey and unwrapKey are required`,
        context,
      );
    }
  }

  /** `checkKey()`, then a generate → unwrap round trip under `context` (the check `round trip`). */
  override async validate(context: EncryptionContext): Promise<void> {
    await this.checkKey();
    try {
      const { plaintextKey, wrappedKey } = await this.generateDataKey(context);
      try {
        const unwrapped = await this.unwrapDataKey(wrappedKey, context);
        const same = unwrapped.equals(plaintextKey);
        unwrapped.fill(0);
        if (!same) throw new KeyProviderError('the unwrapped data key differs', this.errorContext());
      } finally {
        plaintextKey.fill(0);
      }
    } catch (error) {
      throw failedCheck('round trip', error);
    }
  }

  protected async _generateDataKey(context: EncryptionContext): Promise<GeneratedDataKey> {
    const plaintextKey = randomBytes(DATA_KEY_BYTES);
    try {
      return { plaintextKey, wrappedKey: await this._wrapDataKey(plaintextKey, context) };
    } catch (error) {
      plaintextKey.fill(0);
      throw error;
    }
  }

  protected async _wrapDataKey(plaintextKey: Buffer, context: EncryptionContext): Promise<Buffer> {
    const pinned = await this.#pin();
    const algorithm = await this.#wrapAlgorithm();
    const header = headerOf(algorithm, pinned.version);
    const envelope = Buffer.concat([plaintextKey, contextDigest(header, context)]);
    try {
      const crypto = this.#cryptoClient(pinned);
      const { result } = await this.#send('wrapKey', () => crypto.wrapKey(algorithm, envelope));
      if (!result?.length)
        throw new KeyProviderError('Key Vault wrapKey returned no result', this.errorContext());
      return Buffer.concat([header, Buffer.from(result)]);
    } finally {
      envelope.fill(0);
    }
  }

  protected async _unwrapDataKey(wrappedKey: Buffer, context: EncryptionContext): Promise<Buffer> {
    const parsed = parseWrappedKey(wrappedKey);
    if (!parsed) {
      throw new IntegrityError(
        'the wrapped data key is not one this Azure Key Vault provider made (malformed header)',
        this.errorContext(),
      );
    }
    const pinned = await this.#pin();
    if (parsed.version !== pinned.version) {
      throw new IntegrityError(
        `the data key was wrapped by key version ${parsed.version}, not by this provider's version ` +
          `${pinned.version}: configure the versioned key id that wrapped it for its keyring version`,
        this.errorContext(),
      );
    }
    const crypto = this.#cryptoClient(pinned);
    const { result } = await this.#send('unwrapKey', () =>
      crypto.unwrapKey(parsed.algorithm, parsed.wrapped),
    );
    const envelope = Buffer.from(result ?? []);
    result?.fill(0);
    try {
      const expected = contextDigest(parsed.header, context);
      const digest = envelope.subarray(DATA_KEY_BYTES);
      /* Constant time, and only once the length is right (timingSafeEqual needs equal lengths). */
      if (envelope.length !== DATA_KEY_BYTES + DIGEST_BYTES || !timingSafeEqual(digest, expected)) {
        throw new IntegrityError(
          'the data key was wrapped for another keyring or tenant (its encryption context differs), ' +
            'or the wrapped key was altered',
          this.errorContext(),
        );
      }
      return Buffer.from(envelope.subarray(0, DATA_KEY_BYTES));
    } finally {
      envelope.fill(0);
    }
  }

  /** Errors name the key version in use, else the key id as configured. */
  protected override errorContext(): { keyId: string } {
    return { keyId: this.describe().keyReference };
  }

  /** Never prints the credential, the clients or a token. */
  [inspect.custom](): string {
    return `AzureKeyVaultKeyProvider { kind: '${KIND}', keyId: '${this.describe().keyReference}' }`;
  }

  toJSON(): { kind: string; keyId: string } {
    return { kind: KIND, keyId: this.describe().keyReference };
  }

  /** The version in use: as configured or recorded, else the current one (one GET, shared by concurrent callers). */
  async #pin(): Promise<Pinned> {
    if (this.#pinned) return this.#pinned;
    this.#pinning ??= (async () => {
      const key = await this.#send('get', () => this.#keyClient.getKey(this.#configured.name));
      const meta = metadataOf(key);
      const kid = tryParseKeyId(meta.keyId);
      if (!kid?.version || kid.name !== this.#configured.name) {
        throw new KeyProviderError(
          'Key Vault returned a key without a versioned key id',
          this.errorContext(),
        );
      }
      /* Recorded (hasKeyReference) while this GET was in flight: the record wins. */
      this.#pinned ??= {
        version: kid.version,
        kid: formatKeyId({ ...this.#configured, version: kid.version }),
      };
      if (this.#pinned.version === kid.version) this.#fresh = this.#remember(meta);
      return this.#pinned;
    })().finally(() => {
      this.#pinning = undefined;
    });
    return this.#pinning;
  }

  /** The wrapping algorithm of the pinned key version's type (a GET the first time). */
  async #wrapAlgorithm(): Promise<WrapAlgorithm> {
    if (!this.#algorithm) await this.getKeyMetadata();
    if (this.#algorithm) return this.#algorithm;
    throw new KeyProviderError(`the key cannot wrap data keys: ${REQUIRED_KEY}`, this.errorContext());
  }

  #remember(meta: AzureKeyVaultKeyMetadata): AzureKeyVaultKeyMetadata {
    this.#algorithm = algorithmOf(meta);
    return meta;
  }

  /** One CryptographyClient for the pinned version, on the KeyClient's pipeline (one token cache, one handshake). */
  #cryptoClient(pinned: Pinned): CryptographyClient {
    this.#crypto ??= this.#keyClient.getCryptographyClient(this.#configured.name, {
      keyVersion: pinned.version,
    });
    return this.#crypto;
  }

  /** Runs an SDK call and maps its failure to this library's errors. */
  async #send<T>(operation: 'get' | 'wrapKey' | 'unwrapKey', call: () => Promise<T>): Promise<T> {
    try {
      return await call();
    } catch (error) {
      throw mapAzureError(
        error,
        operation,
        this.errorContext(),
        this.#attemptsOf(error),
        this.#requestTimeout,
      );
    }
  }

  #attemptsOf(error: unknown): number | undefined {
    const request = (error as { request?: unknown })?.request;
    return request && typeof request === 'object' ? this.#attempts.get(request) : undefined;
  }

  #clientOptionsOf(
    options: AzureKeyVaultKeyProviderOptions,
    clientOptions: AzureKeyVaultClientOptions,
  ): AzureKeyVaultClientOptions {
    if (options.retryOptions !== undefined && clientOptions.retryOptions !== undefined) {
      throw new ConfigError('Cannot set both retryOptions and clientOptions.retryOptions');
    }
    const retryOptions = {
      maxRetries: DEFAULT_MAX_RETRIES,
      ...(options.retryOptions ?? clientOptions.retryOptions),
    };
    const { maxRetries } = retryOptions;
    if (!Number.isInteger(maxRetries) || maxRetries < 0) {
      throw new ConfigError(
        `retryOptions.maxRetries must be a non-negative integer, got ${String(maxRetries)}`,
      );
    }
    const timeout = this.#requestTimeout;
    const attempts = this.#attempts;
    /* Inside the SDK's retry policy, once per attempt: sets the attempt's timeout, counts attempts,
       and turns an attempt that timed out into the network error the retry policy retries. */
    const attemptPolicy = {
      name: 'typeormEnvelopeAttempt',
      // biome-ignore lint/suspicious/noExplicitAny: the SDK's PipelineRequest and SendRequest
      async sendRequest(request: any, next: (request: any) => Promise<{ status: number }>) {
        if (!(request.timeout > 0)) request.timeout = timeout;
        try {
          const response = await next(request);
          if (response.status !== 401) attempts.set(request, (attempts.get(request) ?? 0) + 1);
          return response;
        } catch (error) {
          attempts.set(request, (attempts.get(request) ?? 0) + 1);
          if ((error as Error)?.name === 'AbortError' && !request.abortSignal?.aborted) {
            /* Not the caller's abort: the attempt's own timeout. A RestError with a system error
               code is what the SDK's exponential retry strategy retries. */
            throw Object.assign(new Error(`no answer within ${timeout} ms`), {
              name: 'RestError',
              code: 'ETIMEDOUT',
              request,
            });
          }
          throw error;
        }
      },
    };
    return {
      ...clientOptions,
      retryOptions,
      additionalPolicies: [
        ...(clientOptions.additionalPolicies ?? []),
        { policy: attemptPolicy, position: 'perRetry' },
      ],
    };
  }
}

/** `DefaultAzureCredential` of the optional `@azure/identity`, loaded when first needed. */
export function defaultAzureCredential(): AzureTokenCredential {
  const { DefaultAzureCredential } = loadOptionalDependency<{
    DefaultAzureCredential: new () => AzureTokenCredential;
  }>(IDENTITY_PACKAGE, 'AzureKeyVaultKeyProvider without a credential');
  return new DefaultAzureCredential();
}

function parseKeyId(keyId: unknown, allowInsecure: boolean): KeyIdParts {
  const expected =
    'AzureKeyVaultKeyProvider needs keyId: https://<vault>.vault.azure.net/keys/<name>/<version> (the version may be left out)';
  if (typeof keyId !== 'string' || keyId.trim() === '') throw new ConfigError(expected);
  if (keyId !== keyId.trim() || /\s/.test(keyId)) {
    throw new ConfigError('AzureKeyVaultKeyProvider keyId must not contain whitespace', {
      keyId: keyId.trim(),
    });
  }
  const parts = tryParseKeyId(keyId);
  if (!parts) throw new ConfigError(expected, { keyId });
  if (!parts.vaultUrl.startsWith('https://') && !allowInsecure) {
    throw new ConfigError(
      'keyId must be an https:// URL (plain HTTP needs clientOptions.allowInsecureConnection)',
      {
        keyId,
      },
    );
  }
  return parts;
}

/** Takes a key id apart, or undefined when it is not `<vault URL>/keys/<name>[/<version>]`. */
function tryParseKeyId(keyId: string): KeyIdParts | undefined {
  let url: URL;
  try {
    url = new URL(keyId);
  } catch {
    return undefined;
  }
  if (!['https:', 'http:'].includes(url.protocol) || url.username || url.password || url.search || url.hash) {
    return undefined;
  }
  const segments = url.pathname.replace(/\/$/, '').split('/');
  const [, collection, name, version, ...rest] = segments;
  if (collection !== 'keys' || !name || !KEY_NAME.test(name) || rest.length > 0) return undefined;
  if (version !== undefined && !KEY_VERSION.test(version)) return undefined;
  return { vaultUrl: `${url.protocol}//${url.host}`, name, version };
}

function formatKeyId({ vaultUrl, name, version }: KeyIdParts): string {
  return `${vaultUrl}/keys/${name}${version ? `/${version}` : ''}`;
}

function metadataOf(key: KeyVaultKey): AzureKeyVaultKeyMetadata {
  const { properties } = key;
  return {
    keyId: String(key.id ?? properties.id ?? ''),
    keyType: String(key.keyType ?? key.key?.kty ?? 'unknown'),
    keySize: rsaBits(key.key?.n),
    keyOps: [...(key.keyOperations ?? key.key?.keyOps ?? [])].map(String),
    enabled: properties.enabled === true,
    ...(properties.notBefore ? { notBefore: properties.notBefore } : {}),
    ...(properties.expiresOn ? { expiresOn: properties.expiresOn } : {}),
  };
}

/** Bits of an RSA modulus (big-endian bytes, leading zeros ignored). */
function rsaBits(modulus: Uint8Array | undefined): number | undefined {
  if (!modulus?.length) return undefined;
  let i = 0;
  while (i < modulus.length && modulus[i] === 0) i++;
  if (i === modulus.length) return 0;
  return (modulus.length - i - 1) * 8 + (32 - Math.clz32(modulus[i] as number));
}

function algorithmOf(meta: AzureKeyVaultKeyMetadata): WrapAlgorithm | undefined {
  if ((meta.keyType === 'RSA' || meta.keyType === 'RSA-HSM') && (meta.keySize ?? 0) >= MIN_RSA_BITS) {
    return 'RSA-OAEP-256';
  }
  return meta.keyType === 'oct-HSM' ? 'A256KW' : undefined;
}

function headerOf(algorithm: WrapAlgorithm, version: string): Buffer {
  const name = Buffer.from(version, 'ascii');
  return Buffer.concat([Buffer.of(FORMAT, ALGORITHM_IDS[algorithm], name.length), name]);
}

function parseWrappedKey(
  wrappedKey: Buffer,
): { header: Buffer; algorithm: WrapAlgorithm; version: string; wrapped: Buffer } | undefined {
  if (wrappedKey.length < 4 || wrappedKey[0] !== FORMAT) return undefined;
  const algorithm = (Object.keys(ALGORITHM_IDS) as WrapAlgorithm[]).find(
    (a) => ALGORITHM_IDS[a] === wrappedKey[1],
  );
  const length = wrappedKey[2] as number;
  const end = 3 + length;
  if (!algorithm || length === 0 || wrappedKey.length <= end) return undefined;
  const version = wrappedKey.subarray(3, end).toString('ascii');
  if (!KEY_VERSION.test(version)) return undefined;
  return { header: wrappedKey.subarray(0, end), algorithm, version, wrapped: wrappedKey.subarray(end) };
}

/** What binds a wrapped key to its header and encryption context (keyring, tenant). */
function contextDigest(header: Buffer, context: EncryptionContext): Buffer {
  return createHash('sha256').update(DIGEST_DOMAIN).update(header).update(canonicalContext(context)).digest();
}

/** `error` restated as the failure of the named validation check, same class and context. */
function failedCheck(check: string, error: unknown): unknown {
  if (!(error instanceof EnvelopeError)) return error;
  const Class = error.constructor as new (
    message: string,
    context: ErrorContext,
    options: { cause?: unknown },
  ) => EnvelopeError;
  return new Class(`key check "${check}" failed: ${error.detail}`, error.context, {
    cause: error.cause ?? error,
  });
}

function positiveMs(name: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) {
    throw new ConfigError(`${name} must be a positive number of milliseconds, got ${String(value)}`);
  }
  return value;
}

/** What each refusal by Key Vault (the inner error code of a 403) means. */
const FORBIDDEN: Record<string, string> = {
  ForbiddenByRbac:
    "the application's identity has no role assignment allowing this on the key " +
    '(Key Vault Crypto Service Encryption User was removed or never granted)',
  ForbiddenByPolicy: "the vault's access policy does not allow the application's identity this operation",
  ForbiddenByFirewall: "the vault's firewall refused the application's network",
  KeyDisabled: 'the key version is disabled',
  KeyOperationForbidden: "the key's key_ops do not allow this operation",
};

/** Names of `@azure/identity` errors meaning Microsoft Entra refused the application a token. */
const REFUSED_CREDENTIALS = new Set(['AuthenticationError', 'AuthenticationRequiredError']);

/**
 * Maps a failed Key Vault call to this library's errors. Messages carry status, codes and the
 * service's error names, never key bytes, wrapped keys or tokens.
 */
function mapAzureError(
  failure: unknown,
  operation: 'get' | 'wrapKey' | 'unwrapKey',
  context: ErrorContext,
  attempts: number | undefined,
  timeout: number,
): Error {
  if (failure instanceof EnvelopeError) return failure;
  const error = withoutHttpExchange(failure);
  const what = `Key Vault ${operation}`;
  const after = attempts !== undefined && attempts > 1 ? ` after ${attempts} attempts` : '';
  const { name, message, code, statusCode, details } = (error ?? {}) as {
    name?: string;
    message?: string;
    code?: string;
    statusCode?: number;
    details?: { error?: { code?: string; innerError?: { code?: string } } };
  };
  if (name === 'RestError') {
    const inner = details?.error?.innerError?.code;
    const label = [statusCode, [code ?? details?.error?.code, inner].filter(Boolean).join('/')]
      .filter((part) => part !== undefined && part !== '')
      .join(' ');
    if (statusCode === 401) {
      return new KeyAccessDeniedError(
        `Key Vault did not accept the application's token (${label})`,
        context,
        {
          cause: error,
        },
      );
    }
    if (statusCode === 403) {
      const reason =
        (inner && FORBIDDEN[inner]) || (code && FORBIDDEN[code]) || 'Key Vault refused access to the key';
      return new KeyAccessDeniedError(`${reason} (${label})`, context, { cause: error });
    }
    if (statusCode === 404) {
      return new KeyAccessDeniedError(`the key or key version was not found (${label})`, context, {
        cause: error,
      });
    }
    if (statusCode === 400 && operation === 'unwrapKey') {
      return new IntegrityError(
        'Key Vault could not unwrap the data key: it was altered, or wrapped by another key ' +
          `(the key configured for its version may not be the one that wrapped it) (${label})`,
        context,
        { cause: error },
      );
    }
    if (code === 'ETIMEDOUT' && statusCode === undefined) {
      return new KeyProviderError(
        `${what} timed out${after}: no answer within requestTimeout (${timeout} ms)`,
        context,
        { cause: error },
      );
    }
    if (statusCode === 429) {
      return new KeyProviderError(`${what} was throttled${after} (${label})`, context, { cause: error });
    }
    return new KeyProviderError(`${what} failed${after} (${label || 'RestError'})`, context, {
      cause: error,
    });
  }
  if (name && REFUSED_CREDENTIALS.has(name)) {
    return new KeyAccessDeniedError(
      `the credential could not get a token for Key Vault: Microsoft Entra refused it (${name})`,
      context,
      { cause: error },
    );
  }
  /* The SDK's own checks of the key it holds, made before any request. */
  if (typeof message === 'string' && / expired at /.test(message)) {
    return new KeyAccessDeniedError('the key version has expired', context, { cause: error });
  }
  if (typeof message === 'string' && /can't be used before/.test(message)) {
    return new KeyAccessDeniedError('the key version is not valid yet', context, { cause: error });
  }
  if (typeof message === 'string' && /is not supported on key/.test(message)) {
    return new KeyProviderError(`the key's key_ops do not include ${operation}`, context, { cause: error });
  }
  return new KeyProviderError(`${what} failed (${name ?? typeof error})`, context, { cause: error });
}

/**
 * The SDK error without its HTTP request and response (non-enumerable, but reachable): the
 * request holds the bearer token and, for `wrapKey`, the body with the envelope being wrapped.
 * The copy has the same class, name, message, stack, code, status and details.
 */
function withoutHttpExchange(error: unknown): unknown {
  if (typeof error !== 'object' || error === null) return error;
  if (!Object.hasOwn(error, 'request') && !Object.hasOwn(error, 'response')) return error;
  const { request: _request, response: _response, ...rest } = Object.getOwnPropertyDescriptors(error);
  return Object.create(Object.getPrototypeOf(error), rest);
}
