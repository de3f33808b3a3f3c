import { randomBytes } from 'node:crypto';
import { inspect } from 'node:util';
/* Used only inside this file: the published declarations never name this optional package. */
import type { KeyManagementServiceClient, protos } from '@google-cloud/kms';
import {
  ConfigError,
  type ErrorContext,
  IntegrityError,
  KeyAccessDeniedError,
  KeyProviderError,
} from '../errors';
import { crc32c } from './crc32c';
import {
  canonicalContext,
  type EncryptionContext,
  type GeneratedDataKey,
  type KeyDescription,
  KeyProvider,
} from './key-provider';
import { loadOptionalDependency } from './optional-dependency';

/**
 * A `KeyManagementServiceClient` of `@google-cloud/kms`, as far as this library's types need one.
 * Declared here so that the type declarations compile without that optional package; every
 * `KeyManagementServiceClient` is one. Cast it back to use the rest of its API:
 * `provider.client as KeyManagementServiceClient`.
 */
export interface GcpKmsClient {
  /** `Encrypt` (a crypto key or one of its versions). */
  encrypt(request: never, options?: never): Promise<unknown>;
  /** `Decrypt` (a crypto key). */
  decrypt(request: never, options?: never): Promise<unknown>;
  /** `GetCryptoKey`. */
  getCryptoKey(request: never, options?: never): Promise<unknown>;
  /** `GetCryptoKeyVersion`. */
  getCryptoKeyVersion(request: never, options?: never): Promise<unknown>;
  /** Ends the client's use. */
  close(): Promise<void>;
}

/**
 * An auth client of `google-auth-library` (an `OAuth2Client`, `JWT`, `Impersonated`,
 * `ExternalAccountClient`…: its `AuthClient`), declared structurally so that the type
 * declarations compile without that optional package. It refreshes its own tokens.
 */
// biome-ignore lint/suspicious/noExplicitAny: any AuthClient of google-auth-library, a class without index signature
export type GcpAuthClient = { readonly [member: string]: any };

/**
 * Further `ClientOptions` of `@google-cloud/kms` (`projectId`, `keyFilename`, `credentials`,
 * `universeDomain`…), declared structurally so that the type declarations compile without it.
 */
// biome-ignore lint/suspicious/noExplicitAny: accepts every ClientOptions, which is an interface (no index signature)
export type GcpKmsClientOptions = { readonly [option: string]: any };

/** Options of {@link GcpKmsKeyProvider}. */
export interface GcpKmsKeyProviderOptions {
  /**
   * The key: a crypto key, `projects/P/locations/L/keyRings/R/cryptoKeys/K` (data keys are wrapped
   * by its primary version, which Cloud KMS rotation moves), or one of its versions,
   * `…/cryptoKeys/K/cryptoKeyVersions/N` (data keys are wrapped by that version only, and only
   * data keys it wrapped are unwrapped). The key's purpose must be `ENCRYPT_DECRYPT`.
   */
  keyName: string;
  /**
   * A `KeyManagementServiceClient` to reuse (best in `fallback: 'rest'` mode, whose errors this
   * provider reads; its own retries do not fire there). When set, the options that configure a
   * client (`authClient`, `apiEndpoint`, `port`, `protocol`, `clientOptions`) are refused, and its
   * logging is left as configured: with `GOOGLE_SDK_NODE_LOGGING` enabled for `kms`, that client
   * logs every request and response, data keys included.
   */
  client?: GcpKmsClient;
  /**
   * The credentials: an `AuthClient` of `google-auth-library` (for example an `Impersonated` client
   * acting as a service account the customer granted the key to). Default: application default
   * credentials (`GOOGLE_APPLICATION_CREDENTIALS`, the attached service account, workload identity…).
   */
  authClient?: GcpAuthClient;
  /** The API host. Default `cloudkms.googleapis.com` (or the universe's). */
  apiEndpoint?: string;
  /** The API port. Default 443. */
  port?: number;
  /** `https` (default), or `http` for an emulator. */
  protocol?: 'http' | 'https';
  /**
   * Attempts per call, the first included: a call answered with `UNAVAILABLE`, 429 / `RESOURCE_EXHAUSTED`,
   * another 5xx, a checksum mismatch, a network failure or a timeout is tried again after an
   * exponential backoff with full jitter. Default 5.
   */
  maxAttempts?: number;
  /**
   * How long one attempt may take, in ms, before it is abandoned (and retried while attempts
   * remain). Default 10,000. The client's own deadline does not apply in REST mode.
   */
  requestTimeout?: number;
  /** The backoff before the first retry, in ms, doubled at each further one (with full jitter). Default 100. */
  retryDelay?: number;
  /** The longest backoff between two attempts, in ms. Default 5,000. */
  maxRetryDelay?: number;
  /** Further `ClientOptions` for the client this provider builds; the options above take precedence. */
  clientOptions?: GcpKmsClientOptions;
}

/** A crypto key version as {@link GcpKmsKeyProvider.describeKey} reports it. */
export interface GcpKmsKeyVersionMetadata {
  /** `projects/…/cryptoKeys/K/cryptoKeyVersions/N`. */
  name: string;
  /** `ENABLED`, `DISABLED`, `DESTROY_SCHEDULED`, `DESTROYED`, … */
  state: string;
  /** `GOOGLE_SYMMETRIC_ENCRYPTION` for the keys this provider can use. */
  algorithm: string;
  /** `SOFTWARE`, `HSM`, `EXTERNAL`, … */
  protectionLevel: string;
}

/** What {@link GcpKmsKeyProvider.describeKey} reports about the key. */
export interface GcpKmsKeyMetadata {
  /** The crypto key's name. */
  name: string;
  /** `ENCRYPT_DECRYPT` for the keys this provider can use. */
  purpose: string;
  /** The primary version (what Encrypt on the crypto key uses), if the key has one. */
  primary: GcpKmsKeyVersionMetadata | undefined;
  /** The configured version, when the provider is pinned to one. */
  version?: GcpKmsKeyVersionMetadata;
}

type KmsModule = typeof import('@google-cloud/kms');

const KIND = 'gcp-kms';
const DATA_KEY_BYTES = 32;
const KMS_PACKAGE = '@google-cloud/kms';
const DEFAULT_MAX_ATTEMPTS = 5;
const DEFAULT_REQUEST_TIMEOUT = 10_000;
const DEFAULT_RETRY_DELAY = 100;
const DEFAULT_MAX_RETRY_DELAY = 5_000;
/** Options that configure a client of our own, so cannot be combined with `client`. */
const CLIENT_BUILDING_OPTIONS = ['authClient', 'apiEndpoint', 'port', 'protocol', 'clientOptions'] as const;

const SEGMENT = '[^/\\s]+';
const CRYPTO_KEY = new RegExp(
  `^projects/${SEGMENT}/locations/${SEGMENT}/keyRings/${SEGMENT}/cryptoKeys/${SEGMENT}$`,
);
const KEY_VERSION = new RegExp(
  `^(projects/${SEGMENT}/locations/${SEGMENT}/keyRings/${SEGMENT}/cryptoKeys/${SEGMENT})/cryptoKeyVersions/[1-9]\\d*$`,
);

/**
 * A wrapped data key: `[0x47 'G'][format 1][uint16 length][key version name][Cloud KMS ciphertext]`.
 * Decrypt is called on the crypto key, and the service finds the version inside its ciphertext;
 * the version name stored beside it says which version wrapped the key without asking the
 * service, so a data key filed under the wrong key or version is refused before any call.
 */
const WRAP_MAGIC = 0x47;
const WRAP_FORMAT = 1;
const WRAP_HEADER = 4;

/** gRPC status names by code, for errors of a client in gRPC mode. */
const GRPC_STATUS = [
  'OK',
  'CANCELLED',
  'UNKNOWN',
  'INVALID_ARGUMENT',
  'DEADLINE_EXCEEDED',
  'NOT_FOUND',
  'ALREADY_EXISTS',
  'PERMISSION_DENIED',
  'RESOURCE_EXHAUSTED',
  'FAILED_PRECONDITION',
  'ABORTED',
  'OUT_OF_RANGE',
  'UNIMPLEMENTED',
  'INTERNAL',
  'UNAVAILABLE',
  'DATA_LOSS',
  'UNAUTHENTICATED',
];
/** Statuses worth another attempt: the service or the path to it failed, not the request. */
const TRANSIENT_STATUS = new Set([
  'UNAVAILABLE',
  'RESOURCE_EXHAUSTED',
  'INTERNAL',
  'DEADLINE_EXCEEDED',
  'ABORTED',
]);
const NETWORK_ERRORS = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'ETIMEDOUT',
  'EPIPE',
  'EAI_AGAIN',
  'ENOTFOUND',
  'ENETUNREACH',
  'EHOSTUNREACH',
  'UND_ERR_SOCKET',
]);

/**
 * A failed Cloud KMS call as this provider keeps it (the `cause` of its errors): the status, the
 * HTTP status and the service's message, and nothing of the request (no token, no key bytes).
 */
export class GcpKmsCallError extends Error {
  override name = 'GcpKmsCallError';

  constructor(
    message: string,
    /** `PERMISSION_DENIED`, `UNAVAILABLE`…, or a network code (`ECONNREFUSED`), `TIMEOUT`, `CHECKSUM_MISMATCH`. */
    readonly status: string,
    /** The HTTP status, when the service answered. */
    readonly httpStatus?: number,
  ) {
    super(message);
  }
}

/**
 * Master key in Google Cloud KMS. Data keys are 32 random bytes from `crypto.randomBytes`, wrapped
 * with `Encrypt` and unwrapped with `Decrypt` on the configured crypto key; the keyring's
 * encryption context (its canonical bytes) is sent as `additionalAuthenticatedData` on every call,
 * so a wrapped key only opens for the keyring (and tenant) it was wrapped for. Every request
 * carries CRC32C checksums of its bytes and every answer's checksums are checked (the client checks
 * none): corrupted bytes are retried, never stored or used. Each wrapped key records the key
 * version that wrapped it, from the `Encrypt` answer.
 *
 * Needs the optional peer dependency `@google-cloud/kms` (5.x); the client runs in REST mode
 * (`fallback: 'rest'`), where its retries and deadline do not apply: this provider retries
 * transient failures (`UNAVAILABLE`, 429, 5xx, checksum mismatches, network errors, timeouts) with
 * exponential backoff and jitter, up to `maxAttempts`, each attempt bounded by `requestTimeout`.
 * `PERMISSION_DENIED` (a removed IAM binding), `NOT_FOUND` and `FAILED_PRECONDITION` for a
 * disabled or destroyed version raise `KeyAccessDeniedError`; `INVALID_ARGUMENT` on `Decrypt`
 * (altered bytes, another key's ciphertext, another keyring's or tenant's data) raises
 * `IntegrityError`; anything else raises `KeyProviderError`, with a {@link GcpKmsCallError} as
 * `cause`.
 *
 * IAM: `roles/cloudkms.cryptoKeyEncrypterDecrypter` on the key (`useToEncrypt`, `useToDecrypt`),
 * and `cloudkms.cryptoKeys.get` (`roles/cloudkms.viewer`) for validation; with a pinned version,
 * `cloudkms.cryptoKeyVersions.get` too.
 *
 * @example
 * ```ts
 * // Application default credentials; the key's primary version wraps new data keys.
 * new GcpKmsKeyProvider({ keyName: 'projects/acme/locations/europe-west1/keyRings/app/cryptoKeys/data' });
 *
 * // One keyring version per Cloud KMS key version: rotation moves data keys between them.
 * new GcpKmsKeyProvider({ keyName: 'projects/acme/locations/europe-west1/keyRings/app/cryptoKeys/data/cryptoKeyVersions/2' });
 * ```
 */
export class GcpKmsKeyProvider extends KeyProvider {
  readonly #client: KeyManagementServiceClient;
  readonly #ownsClient: boolean;
  readonly #keyName: string;
  /** The crypto key: `#keyName`, or the key of the pinned version. */
  readonly #cryptoKey: string;
  /** The pinned version, if `keyName` names one. */
  readonly #version: string | undefined;
  readonly #maxAttempts: number;
  readonly #requestTimeout: number;
  readonly #retryDelay: number;
  readonly #maxRetryDelay: number;

  constructor(options: GcpKmsKeyProviderOptions) {
    super();
    this.#keyName = parseKeyName(options?.keyName);
    const pinned = KEY_VERSION.exec(this.#keyName);
    this.#cryptoKey = pinned ? (pinned[1] as string) : this.#keyName;
    this.#version = pinned ? this.#keyName : undefined;
    this.#maxAttempts = positiveInteger('maxAttempts', options.maxAttempts ?? DEFAULT_MAX_ATTEMPTS);
    this.#requestTimeout = positiveMs('requestTimeout', options.requestTimeout ?? DEFAULT_REQUEST_TIMEOUT);
    this.#retryDelay = positiveMs('retryDelay', options.retryDelay ?? DEFAULT_RETRY_DELAY);
    this.#maxRetryDelay = positiveMs('maxRetryDelay', options.maxRetryDelay ?? DEFAULT_MAX_RETRY_DELAY);
    if (options.client !== undefined) {
      const conflict = CLIENT_BUILDING_OPTIONS.find((name) => options[name] !== undefined);
      if (conflict) throw new ConfigError(`Cannot set both client and ${conflict}`);
      this.#client = options.client as unknown as KeyManagementServiceClient;
      this.#ownsClient = false;
    } else {
      this.#client = GcpKmsKeyProvider.createClient(options) as unknown as KeyManagementServiceClient;
      this.#ownsClient = true;
    }
  }

  /**
   * Builds the `KeyManagementServiceClient` a provider would build from these options (REST mode,
   * the given auth client or application default credentials, logging of requests and answers
   * off), for several providers to share: pass it as their `client`.
   */
  static createClient(
    options: Pick<GcpKmsKeyProviderOptions, (typeof CLIENT_BUILDING_OPTIONS)[number]> = {},
  ): GcpKmsClient {
    const { KeyManagementServiceClient } = loadOptionalDependency<KmsModule>(
      KMS_PACKAGE,
      'GcpKmsKeyProvider',
    );
    const { authClient, apiEndpoint, port, protocol } = options;
    if (protocol !== undefined && protocol !== 'http' && protocol !== 'https') {
      throw new ConfigError(`protocol must be 'http' or 'https', got ${String(protocol)}`);
    }
    if (port !== undefined && (!Number.isInteger(port) || port < 1 || port > 65_535)) {
      throw new ConfigError(`port must be an integer from 1 to 65535, got ${String(port)}`);
    }
    const client = new KeyManagementServiceClient({
      ...options.clientOptions,
      /* REST: errors arrive with the service's JSON status, which is what this provider maps. */
      fallback: 'rest',
      ...(authClient !== undefined ? { authClient } : {}),
      ...(apiEndpoint !== undefined ? { apiEndpoint } : {}),
      ...(port !== undefined ? { port } : {}),
      ...(protocol !== undefined ? { protocol } : {}),
    } as ConstructorParameters<typeof KeyManagementServiceClient>[0]);
    /* With GOOGLE_SDK_NODE_LOGGING enabled, the client logs every request and answer in full:
       plaintext data keys included. Its logger is replaced by one that says nothing. */
    (client as unknown as { _log: unknown })._log = SILENT_LOGGER;
    return client as unknown as GcpKmsClient;
  }

  /**
   * The key version that wrapped `wrappedKey` (a data key wrapped by this provider), as the
   * service named it when it encrypted: `…/cryptoKeys/K/cryptoKeyVersions/N`. Throws an
   * `IntegrityError` for bytes that are not such a wrapped key.
   */
  static keyVersionOf(wrappedKey: Buffer): string {
    const parsed = parseWrapped(wrappedKey);
    if (!parsed) throw new IntegrityError(NOT_A_WRAPPED_KEY);
    return parsed.version;
  }

  /** The key as configured: a crypto key, or one of its versions. */
  get keyName(): string {
    return this.#keyName;
  }

  /** The `KeyManagementServiceClient` in use (the one passed as `client`, or the one this provider built). */
  get client(): GcpKmsClient {
    return this.#client as unknown as GcpKmsClient;
  }

  /** The configured key name: the reference a key registry records (a crypto key, or a key version). */
  describe(): KeyDescription {
    return { kind: KIND, keyReference: this.#keyName };
  }

  /**
   * Reads the key (`GetCryptoKey`), and the pinned version (`GetCryptoKeyVersion`) when
   * `keyName` names one, and reports purpose, primary version and states.
   */
  async describeKey(): Promise<GcpKmsKeyMetadata> {
    const [key] = await this.#call('GetCryptoKey', (client, options) =>
      client.getCryptoKey({ name: this.#cryptoKey }, options),
    );
    const metadata: GcpKmsKeyMetadata = {
      name: String(key?.name ?? this.#cryptoKey),
      purpose: String(key?.purpose ?? 'CRYPTO_KEY_PURPOSE_UNSPECIFIED'),
      primary: key?.primary ? versionMetadata(key.primary) : undefined,
    };
    if (this.#version !== undefined) {
      const version = this.#version;
      const [found] = await this.#call('GetCryptoKeyVersion', (client, options) =>
        client.getCryptoKeyVersion({ name: version }, options),
      );
      metadata.version = versionMetadata(found ?? { name: version });
    }
    return metadata;
  }

  /**
   * Checks, in order, that the key exists (`GetCryptoKey`), that its purpose is `ENCRYPT_DECRYPT`,
   * and that the version that wraps new data keys (the primary one, or the pinned one) is
   * `ENABLED`; `validate()` then adds a wrap/unwrap round trip. Each failure names the check.
   */
  override async checkKey(): Promise<void> {
    const { purpose, primary, version } = await this.describeKey();
    if (purpose !== 'ENCRYPT_DECRYPT') {
      throw new KeyProviderError(
        `key purpose is ${purpose}; a symmetric ENCRYPT_DECRYPT key is required`,
        this.errorContext(),
      );
    }
    if (version !== undefined) {
      if (version.state !== 'ENABLED') {
        throw new KeyAccessDeniedError(
          `key version ${version.name} is ${version.state}; an ENABLED key version is required`,
          this.errorContext(),
        );
      }
      return;
    }
    if (!primary) {
      throw new KeyAccessDeniedError(
        'key has no primary version; an ENABLED primary version is required',
        this.errorContext(),
      );
    }
    if (primary.state !== 'ENABLED') {
      throw new KeyAccessDeniedError(
        `primary version ${primary.name} is ${primary.state}; an ENABLED primary version is required`,
        this.errorContext(),
      );
    }
  }

  /** Closes the client if this provider built it (a `client` passed in is left to its owner). */
  destroy(): void {
    if (this.#ownsClient) this.#client.close().catch(() => undefined);
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
    const aad = canonicalContext(context);
    const request = {
      name: this.#keyName,
      plaintext: plaintextKey,
      additionalAuthenticatedData: aad,
      plaintextCrc32c: { value: crc32c(plaintextKey) },
      additionalAuthenticatedDataCrc32c: { value: crc32c(aad) },
    };
    const [out] = await this.#call(
      'Encrypt',
      (client, options) => client.encrypt(request, options),
      ([answer]) => {
        const {
          ciphertext,
          ciphertextCrc32c,
          verifiedPlaintextCrc32c,
          verifiedAdditionalAuthenticatedDataCrc32c,
        } = answer ?? {};
        if (verifiedPlaintextCrc32c !== true || verifiedAdditionalAuthenticatedDataCrc32c !== true) {
          return 'the service did not verify the checksums of the plaintext and additional authenticated data';
        }
        const bytes = toBuffer(ciphertext);
        if (!bytes?.length) return undefined; // refused below: not a corruption to retry
        return sameChecksum(bytes, ciphertextCrc32c)
          ? undefined
          : 'the ciphertext does not match its checksum';
      },
    );
    const ciphertext = toBuffer(out?.ciphertext);
    if (!ciphertext?.length) {
      throw new KeyProviderError('GCP KMS Encrypt returned no ciphertext', this.errorContext());
    }
    const version = String(out?.name ?? '');
    if (KEY_VERSION.exec(version)?.[1] !== this.#cryptoKey || (this.#version && version !== this.#version)) {
      /* Stored, it would name the wrong version as the one that wrapped the key. */
      throw new KeyProviderError(
        `GCP KMS Encrypt answered with key version "${version}", which is not ${this.#version ? 'the configured version' : `a version of ${this.#cryptoKey}`}`,
        this.errorContext(),
      );
    }
    return encodeWrapped(version, ciphertext);
  }

  protected async _unwrapDataKey(wrappedKey: Buffer, context: EncryptionContext): Promise<Buffer> {
    const parsed = parseWrapped(wrappedKey);
    if (!parsed) throw new IntegrityError(NOT_A_WRAPPED_KEY, this.errorContext());
    const { version, ciphertext } = parsed;
    const wrappedBy = KEY_VERSION.exec(version)?.[1];
    if (wrappedBy !== this.#cryptoKey) {
      throw new IntegrityError(
        `the data key was wrapped by ${version}, a version of another key than ${this.#cryptoKey}: ` +
          `the master key configured for its version is not the one that wrapped it`,
        this.errorContext(),
      );
    }
    if (this.#version !== undefined && version !== this.#version) {
      throw new IntegrityError(
        `the data key was wrapped by ${version}; this master-key version is pinned to ${this.#version}`,
        this.errorContext(),
      );
    }
    const aad = canonicalContext(context);
    const request = {
      name: this.#cryptoKey,
      ciphertext,
      additionalAuthenticatedData: aad,
      ciphertextCrc32c: { value: crc32c(ciphertext) },
      additionalAuthenticatedDataCrc32c: { value: crc32c(aad) },
    };
    const [out] = await this.#call(
      'Decrypt',
      (client, options) => client.decrypt(request, options),
      ([answer]) => {
        const { plaintext, plaintextCrc32c } = answer ?? {};
        const bytes = toBuffer(plaintext);
        if (!bytes) return undefined;
        const same = sameChecksum(bytes, plaintextCrc32c);
        if (!same) bytes.fill(0);
        return same ? undefined : 'the plaintext does not match its checksum';
      },
    );
    const plaintext = toBuffer(out?.plaintext);
    if (plaintext?.length !== DATA_KEY_BYTES) {
      plaintext?.fill(0);
      throw new KeyProviderError('GCP KMS Decrypt returned a malformed data key', this.errorContext());
    }
    const key = Buffer.alloc(DATA_KEY_BYTES);
    plaintext.copy(key);
    plaintext.fill(0);
    return key;
  }

  /** Errors name the key as configured. */
  protected override errorContext(): { keyId: string } {
    return { keyId: this.#keyName };
  }

  /**
   * Runs one RPC with this provider's timeout and retries. `corrupted` inspects an answer and
   * returns why its bytes cannot be trusted (a checksum mismatch, retried like a transient fault).
   */
  async #call<Output>(
    operation: string,
    run: (client: KeyManagementServiceClient, options: object) => Promise<Output>,
    corrupted?: (answer: Output) => string | undefined,
  ): Promise<Output> {
    for (let attempt = 1; ; attempt++) {
      let failure: GcpKmsCallError;
      try {
        const answer = await withTimeout(run(this.#client, {}), this.#requestTimeout, operation);
        const why = corrupted?.(answer);
        if (why === undefined) return answer;
        failure = new GcpKmsCallError(`${why} (corrupted in transit)`, 'CHECKSUM_MISMATCH');
      } catch (error) {
        failure = callError(error);
      }
      if (attempt >= this.#maxAttempts || !isTransient(failure)) {
        throw mapFailure(failure, operation, attempt, this.errorContext());
      }
      /* Full jitter: concurrent callers retrying the same outage do not arrive together. */
      const ceiling = Math.min(this.#maxRetryDelay, this.#retryDelay * 2 ** (attempt - 1));
      await new Promise((resolve) => setTimeout(resolve, Math.random() * ceiling));
    }
  }

  /** Never prints the client or credentials. */
  [inspect.custom](): string {
    return `GcpKmsKeyProvider { kind: '${KIND}', keyName: '${this.#keyName}' }`;
  }

  toJSON(): { kind: string; keyName: string } {
    return { kind: KIND, keyName: this.#keyName };
  }
}

type VersionResponse = protos.google.cloud.kms.v1.ICryptoKeyVersion;

const NOT_A_WRAPPED_KEY =
  'the wrapped data key is not one Google Cloud KMS wrapped through this provider (it records no key version)';

/** A logger that says nothing, for the client's request and answer logging (which prints data keys). */
const SILENT_LOGGER: unknown = new Proxy(
  {},
  {
    get: (_target, property) => (property === 'enabled' ? false : () => SILENT_LOGGER),
  },
);

function versionMetadata(version: VersionResponse): GcpKmsKeyVersionMetadata {
  return {
    name: String(version.name ?? ''),
    state: String(version.state ?? 'CRYPTO_KEY_VERSION_STATE_UNSPECIFIED'),
    algorithm: String(version.algorithm ?? 'CRYPTO_KEY_VERSION_ALGORITHM_UNSPECIFIED'),
    protectionLevel: String(version.protectionLevel ?? 'PROTECTION_LEVEL_UNSPECIFIED'),
  };
}

function encodeWrapped(version: string, ciphertext: Buffer): Buffer {
  const name = Buffer.from(version, 'utf8');
  const header = Buffer.alloc(WRAP_HEADER);
  header[0] = WRAP_MAGIC;
  header[1] = WRAP_FORMAT;
  header.writeUInt16BE(name.length, 2);
  return Buffer.concat([header, name, ciphertext]);
}

function parseWrapped(wrapped: Buffer): { version: string; ciphertext: Buffer } | undefined {
  if (!Buffer.isBuffer(wrapped) || wrapped.length < WRAP_HEADER) return undefined;
  if (wrapped[0] !== WRAP_MAGIC || wrapped[1] !== WRAP_FORMAT) return undefined;
  const end = WRAP_HEADER + wrapped.readUInt16BE(2);
  if (end >= wrapped.length) return undefined;
  const version = wrapped.subarray(WRAP_HEADER, end).toString('utf8');
  if (!KEY_VERSION.test(version)) return undefined;
  return { version, ciphertext: wrapped.subarray(end) };
}

/** The bytes of a `bytes` field as the client hands them over (a Buffer; base64 text in some modes). */
function toBuffer(value: Uint8Array | string | null | undefined): Buffer | undefined {
  if (value === null || value === undefined) return undefined;
  if (typeof value === 'string') return Buffer.from(value, 'base64');
  return Buffer.from(value.buffer, value.byteOffset, value.byteLength);
}

/** Whether an `Int64Value` checksum (a string in REST mode, a number or Long otherwise) is the CRC32C of `bytes`. */
function sameChecksum(bytes: Buffer, sum: { value?: unknown } | null | undefined): boolean {
  const value = sum?.value;
  return value !== undefined && value !== null && String(value) === String(crc32c(bytes));
}

function withTimeout<T>(promise: Promise<T>, ms: number, operation: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(
      () => reject(new GcpKmsCallError(`${operation} did not answer within ${ms} ms`, 'TIMEOUT')),
      ms,
    );
  });
  /* A late answer (or failure) of an abandoned attempt is dropped. */
  promise.catch(() => undefined);
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * A failure of the client reduced to what may be kept: the status, the HTTP status and the
 * service's message. The client's error carries the request (its bearer token, and for Encrypt
 * the plaintext data key), so it is never kept as a cause.
 */
function callError(error: unknown): GcpKmsCallError {
  if (error instanceof GcpKmsCallError) return error;
  const { code, status, message, details } = (error ?? {}) as {
    code?: unknown;
    status?: unknown;
    message?: unknown;
    details?: unknown;
  };
  const text = typeof message === 'string' ? message : String(error);
  const body = parseErrorBody(text);
  const httpStatus =
    typeof status === 'number' ? status : typeof code === 'number' && code >= 100 ? code : undefined;
  if (body) {
    return new GcpKmsCallError(
      body.message,
      body.status ?? statusOfHttp(httpStatus ?? body.code),
      httpStatus ?? body.code,
    );
  }
  /* A client in gRPC mode: a GoogleError with the gRPC status code. */
  if (typeof code === 'number' && code >= 0 && code < GRPC_STATUS.length && httpStatus === undefined) {
    return new GcpKmsCallError(
      typeof details === 'string' && details ? details : text,
      GRPC_STATUS[code] as string,
    );
  }
  if (typeof code === 'string') return new GcpKmsCallError(text, code, httpStatus);
  if (httpStatus !== undefined) return new GcpKmsCallError(text, statusOfHttp(httpStatus), httpStatus);
  return new GcpKmsCallError(text, (error as Error)?.name ?? 'UNKNOWN');
}

/** The `{ error: { code, message, status } }` of a Google API error answer, when `text` is one. */
function parseErrorBody(text: string): { code?: number; message: string; status?: string } | undefined {
  if (!text.trimStart().startsWith('{')) return undefined;
  try {
    const parsed = JSON.parse(text) as { error?: { code?: unknown; message?: unknown; status?: unknown } };
    const inner = parsed?.error;
    if (!inner || typeof inner !== 'object') return undefined;
    return {
      ...(typeof inner.code === 'number' ? { code: inner.code } : {}),
      message: typeof inner.message === 'string' ? inner.message : '',
      ...(typeof inner.status === 'string' ? { status: inner.status } : {}),
    };
  } catch {
    return undefined;
  }
}

function statusOfHttp(httpStatus: number | undefined): string {
  switch (httpStatus) {
    case 400:
      return 'INVALID_ARGUMENT';
    case 401:
      return 'UNAUTHENTICATED';
    case 403:
      return 'PERMISSION_DENIED';
    case 404:
      return 'NOT_FOUND';
    case 409:
      return 'ABORTED';
    case 429:
      return 'RESOURCE_EXHAUSTED';
    case 501:
      return 'UNIMPLEMENTED';
    case 503:
      return 'UNAVAILABLE';
    case 504:
      return 'DEADLINE_EXCEEDED';
    default:
      return httpStatus !== undefined && httpStatus >= 500 ? 'INTERNAL' : 'UNKNOWN';
  }
}

function isTransient(failure: GcpKmsCallError): boolean {
  const { status, httpStatus, message } = failure;
  if (status === 'TIMEOUT' || status === 'CHECKSUM_MISMATCH' || NETWORK_ERRORS.has(status)) return true;
  if (TRANSIENT_STATUS.has(status) || httpStatus === 429 || (httpStatus !== undefined && httpStatus >= 500)) {
    return true;
  }
  /* The service refused a checksum we computed over the bytes we sent: they changed on the way. */
  return status === 'INVALID_ARGUMENT' && /checksum|crc32c/i.test(message);
}

/** A version state the service refuses to use: the key holder disabled or destroyed it. */
const UNUSABLE_VERSION =
  /\b(DISABLED|DESTROYED|DESTROY_SCHEDULED)\b|crypto_key_version\.state|no primary version/;

/** Maps a failed call to this library's errors. Messages carry statuses and the service's words, never bytes. */
function mapFailure(
  failure: GcpKmsCallError,
  operation: string,
  attempts: number,
  context: ErrorContext,
): Error {
  const { status } = failure;
  const said = failure.message ? `: ${failure.message.slice(0, 300)}` : '';
  const options = { cause: failure };
  if (status === 'PERMISSION_DENIED') {
    return new KeyAccessDeniedError(
      `access to the GCP KMS key was denied (${status})${said}`,
      context,
      options,
    );
  }
  if (status === 'NOT_FOUND') {
    return new KeyAccessDeniedError(`the GCP KMS key was not found (${status})${said}`, context, options);
  }
  if (status === 'FAILED_PRECONDITION' && UNUSABLE_VERSION.test(failure.message)) {
    return new KeyAccessDeniedError(
      `the GCP KMS key version is disabled or destroyed (${status})${said}`,
      context,
      options,
    );
  }
  if (status === 'INVALID_ARGUMENT' && operation === 'Decrypt' && !isTransient(failure)) {
    return new IntegrityError(
      'GCP KMS could not unwrap the data key: it was altered, or wrapped under another key or encryption context; ' +
        'the master key configured for its version may not be the one that wrapped it, ' +
        `or keyringId differs from the one that wrapped it (${status})`,
      context,
      options,
    );
  }
  const after = attempts > 1 ? ` after ${attempts} attempts` : '';
  if (status === 'TIMEOUT') {
    return new KeyProviderError(
      `GCP KMS ${operation} timed out${after}: the endpoint did not answer within requestTimeout (${status})`,
      context,
      options,
    );
  }
  if (status === 'CHECKSUM_MISMATCH') {
    return new KeyProviderError(
      `GCP KMS ${operation} failed${after}: ${failure.message} (${status})`,
      context,
      options,
    );
  }
  if (status === 'UNAUTHENTICATED') {
    return new KeyProviderError(
      `GCP KMS ${operation} failed: the service did not accept the application's credentials (${status})${said}`,
      context,
      options,
    );
  }
  return new KeyProviderError(`GCP KMS ${operation} failed${after} (${status})${said}`, context, options);
}

function parseKeyName(keyName: unknown): string {
  if (typeof keyName !== 'string' || keyName.trim() === '') {
    throw new ConfigError(
      'GcpKmsKeyProvider needs keyName: projects/P/locations/L/keyRings/R/cryptoKeys/K (or …/cryptoKeyVersions/N)',
    );
  }
  if (!CRYPTO_KEY.test(keyName) && !KEY_VERSION.test(keyName)) {
    throw new ConfigError(
      'GcpKmsKeyProvider keyName must be a crypto key (projects/P/locations/L/keyRings/R/cryptoKeys/K) ' +
        'or one of its versions (…/cryptoKeyVersions/N), without whitespace',
      { keyId: keyName.trim() },
    );
  }
  return keyName;
}

function positiveMs(name: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) {
    throw new ConfigError(`${name} must be a positive number of milliseconds, got ${String(value)}`);
  }
  return value;
}

function positiveInteger(name: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1) {
    throw new ConfigError(`${name} must be a positive integer, got ${String(value)}`);
  }
  return value;
}
