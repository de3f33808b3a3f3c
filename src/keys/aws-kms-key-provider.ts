import { createRequire } from 'node:module';
import { inspect } from 'node:util';
/* Used only inside this file: the published declarations never name this optional package. */
import type { KMSClient, KMSClientConfig } from '@aws-sdk/client-kms';
import {
  ConfigError,
  type ErrorContext,
  IntegrityError,
  KeyAccessDeniedError,
  KeyProviderError,
} from '../errors';
import {
  type EncryptionContext,
  type GeneratedDataKey,
  type KeyDescription,
  KeyProvider,
} from './key-provider';
import { loadOptionalDependency } from './optional-dependency';

/**
 * A `KMSClient` of `@aws-sdk/client-kms`, as far as this library's types need one. Declared here so
 * that the type declarations compile without that optional package; every `KMSClient` is one.
 * Cast it back to use the rest of its API: `provider.client as KMSClient`.
 */
export interface KmsClient {
  /** Sends a KMS command. */
  send(command: never, options?: never): Promise<unknown>;
  /** Closes the client's connections. */
  destroy(): void;
  /** The client's resolved configuration (`KMSClientResolvedConfig`). */
  // biome-ignore lint/suspicious/noExplicitAny: any SDK configuration value; typed by the SDK, not here
  readonly config: { readonly [option: string]: any };
  /** The client's middleware stack, e.g. to count or log the calls it sends. */
  readonly middlewareStack: { add(middleware: KmsMiddleware, options?: KmsMiddlewareOptions): void };
}

/** A middleware of the SDK's stack (`InitializeMiddleware` and its siblings), structurally. */
export type KmsMiddleware = (
  // biome-ignore lint/suspicious/noExplicitAny: the SDK's handler arguments and output
  next: (args: any) => Promise<any>,
  // biome-ignore lint/suspicious/noExplicitAny: the SDK's HandlerExecutionContext
  context: { readonly [field: string]: any },
  // biome-ignore lint/suspicious/noExplicitAny: the SDK's handler arguments and output
) => (args: any) => Promise<any>;

/** Where a {@link KmsMiddleware} goes in the stack (`step`, `name`, …), structurally. */
// biome-ignore lint/suspicious/noExplicitAny: the SDK's HandlerOptions
export type KmsMiddlewareOptions = { readonly [option: string]: any };

/**
 * A `KMSClientConfig` of `@aws-sdk/client-kms` (credentials, request handler, logger…), declared
 * structurally so that the type declarations compile without that optional package.
 */
// biome-ignore lint/suspicious/noExplicitAny: accepts every KMSClientConfig, which is an interface (no index signature)
export type KmsClientConfig = { readonly [option: string]: any };

/** Options of {@link AwsKmsKeyProvider}. */
export interface AwsKmsKeyProviderOptions {
  /**
   * The KMS key: a key id (`1234abcd-…`), a key ARN, an alias name (`alias/app-data`) or an alias
   * ARN. Must be a symmetric `ENCRYPT_DECRYPT` key. Keys in another account need an ARN.
   */
  keyId: string;
  /** AWS region of the key. Default: the SDK's resolution (`AWS_REGION`, profile…). Not with `client`. */
  region?: string;
  /**
   * A `KMSClient` to reuse, already configured with region, credentials and retries. When set, the
   * options that configure a client (`region`, `roleArn`, `endpoint`, …) are refused.
   */
  client?: KmsClient;
  /**
   * Cross-account access: the IAM role to assume (with STS `AssumeRole`) in the account that owns the
   * key. Credentials come from `fromTemporaryCredentials` of `@aws-sdk/credential-providers` (an
   * optional peer dependency), which refreshes them before they expire.
   */
  roleArn?: string;
  /** The `ExternalId` the role's trust policy requires. Only with `roleArn`. */
  externalId?: string;
  /** The assumed-role session name, visible in CloudTrail. Default `typeorm-envelope`. Only with `roleArn`. */
  roleSessionName?: string;
  /**
   * A custom STS endpoint for `AssumeRole`: a regional or VPC interface endpoint, or an emulator in
   * tests. Default: the SDK's resolution (`AWS_ENDPOINT_URL_STS`, the region's endpoint). Only with
   * `roleArn`.
   */
  stsEndpoint?: string;
  /** A custom KMS endpoint: a VPC interface endpoint, or an emulator in tests. */
  endpoint?: string;
  /** Attempts per KMS call, first one included, with the SDK's standard retry strategy. Default 5. */
  maxAttempts?: number;
  /**
   * How long one attempt may take to connect to KMS (TCP and TLS), in ms. Default 5,000.
   * Not with a `requestHandler` in `clientConfig` (configure that handler instead).
   */
  connectTimeout?: number;
  /**
   * How long one attempt may wait for KMS to answer once connected, in ms. Default 10,000. A call
   * fails after at most `maxAttempts` such attempts (plus the SDK's backoff between them), with a
   * `KeyProviderError`, instead of waiting forever on an endpoint that accepts connections and never
   * answers. Not with a `requestHandler` in `clientConfig`.
   */
  requestTimeout?: number;
  /**
   * Extra `KMSClientConfig` (credentials, request handler, logger…); the options above take
   * precedence. A `requestHandler` given here is used as it is, with its own timeouts. With
   * `roleArn`, `credentials` here are the application's own: the ones that call STS `AssumeRole`
   * (default: the SDK's credential chain); KMS is then called with the role's credentials.
   */
  clientConfig?: KmsClientConfig;
}

/** What {@link AwsKmsKeyProvider.describeKey} reports about the KMS key. */
export interface AwsKmsKeyMetadata {
  /** The key ARN (aliases resolved). */
  Arn: string;
  /** `Enabled`, `Disabled`, `PendingDeletion`, … */
  KeyState: string;
  /** `SYMMETRIC_DEFAULT` for the keys this provider can use. */
  KeySpec: string;
  /** `ENCRYPT_DECRYPT` for the keys this provider can use. */
  KeyUsage: string;
}

type KmsModule = typeof import('@aws-sdk/client-kms');
type CredentialProvidersModule = typeof import('@aws-sdk/credential-providers');

const KIND = 'aws-kms';
const DATA_KEY_BYTES = 32;
const DEFAULT_MAX_ATTEMPTS = 5;
const DEFAULT_CONNECT_TIMEOUT = 5_000;
const DEFAULT_REQUEST_TIMEOUT = 10_000;
const HTTP_HANDLER_PACKAGE = '@smithy/node-http-handler';
const DEFAULT_ROLE_SESSION_NAME = 'typeorm-envelope';
const KMS_PACKAGE = '@aws-sdk/client-kms';
const CREDENTIALS_PACKAGE = '@aws-sdk/credential-providers';
/** Options that configure a client of our own, so cannot be combined with `client`. */
const CLIENT_BUILDING_OPTIONS = [
  'region',
  'roleArn',
  'externalId',
  'roleSessionName',
  'stsEndpoint',
  'endpoint',
  'maxAttempts',
  'connectTimeout',
  'requestTimeout',
  'clientConfig',
] as const;

/** KMS errors meaning the key refused access, with what each one says. */
const ACCESS_ERRORS: Record<string, string> = {
  AccessDeniedException: 'access to the KMS key was denied',
  DisabledException: 'the KMS key is disabled',
  KMSInvalidStateException: 'the KMS key is not in a usable state (for example pending deletion)',
  NotFoundException: 'the KMS key was not found',
};

/** Key ARNs (not alias ARNs): the form KMS reports, and the form a key registry records. */
const KEY_ARN = /^arn:aws[a-z-]*:kms:[^:]+:\d{12}:key\/.+$/;

/** KMS errors on Decrypt/ReEncrypt meaning the wrapped key is not one this key and context can open. */
const INTEGRITY_ERRORS = new Set(['InvalidCiphertextException', 'IncorrectKeyException']);

/**
 * Master key in AWS KMS. Data keys are generated by KMS (`GenerateDataKey`, `AES_256`) and stored
 * wrapped; unwrapping calls `Decrypt` pinned to the configured key. The keyring's encryption context
 * is sent on every call, so a wrapped key only opens for the keyring it was made for (and appears in
 * CloudTrail). `rewrapDataKey` to another KMS key uses `ReEncrypt`, so the plaintext key never leaves
 * KMS.
 *
 * Needs the optional peer dependency `@aws-sdk/client-kms` (and `@aws-sdk/credential-providers` for
 * `roleArn`). Calls are retried by the SDK's standard retry strategy (`maxAttempts`, default 5).
 * KMS refusing the key (`AccessDeniedException`, `DisabledException`, `KMSInvalidStateException`,
 * `NotFoundException`) raises `KeyAccessDeniedError`, and so does STS refusing to let the
 * application assume `roleArn` (`AccessDenied`: a trust policy without the application's account,
 * or a wrong or missing external id); a wrapped key that KMS cannot open
 * (`InvalidCiphertextException`, `IncorrectKeyException`) raises `IntegrityError`; anything else
 * (throttling after retries, internal errors, network) raises `KeyProviderError` with the original
 * error as `cause`.
 *
 * IAM permissions: `kms:GenerateDataKey`, `kms:Decrypt` and `kms:DescribeKey` on the key;
 * `kms:Encrypt` to migrate keys into it; `kms:ReEncryptFrom` / `kms:ReEncryptTo` to rewrap
 * between KMS keys (both keys in the same region).
 *
 * @example
 * ```ts
 * // Same account: credentials and region from the environment.
 * new AwsKmsKeyProvider({ keyId: 'alias/app-data', region: 'eu-west-1' });
 *
 * // Cross-account: assume a role in the account that owns the key.
 * new AwsKmsKeyProvider({
 *   keyId: 'arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab',
 *   region: 'eu-west-1',
 *   roleArn: 'arn:aws:iam::111122223333:role/app-data-encryption',
 *   externalId: process.env.KMS_EXTERNAL_ID,
 * });
 *
 * // Reusing a client you already have.
 * new AwsKmsKeyProvider({ keyId: 'alias/app-data', client: new KMSClient({ region: 'eu-west-1' }) });
 * ```
 */
export class AwsKmsKeyProvider extends KeyProvider {
  readonly #kms: KmsModule;
  readonly #client: KMSClient;
  readonly #ownsClient: boolean;
  readonly #keyId: string;
  /** The role (and External ID) KMS is called as; `undefined`: the client's own credentials. */
  readonly #assumedRole: string | undefined;
  #resolvedArn: string | undefined;

  constructor(options: AwsKmsKeyProviderOptions) {
    super();
    this.#keyId = parseKeyId(options?.keyId);
    this.#assumedRole = options.roleArn && `${options.roleArn}\0${options.externalId ?? ''}`;
    this.#kms = loadOptionalDependency<KmsModule>(KMS_PACKAGE, 'AwsKmsKeyProvider');
    if (options.client !== undefined) {
      const conflict = CLIENT_BUILDING_OPTIONS.find((name) => options[name] !== undefined);
      if (conflict) throw new ConfigError(`Cannot set both client and ${conflict}`);
      this.#client = options.client as unknown as KMSClient;
      this.#ownsClient = false;
    } else {
      this.#client = new this.#kms.KMSClient(clientConfigOf(options));
      this.#ownsClient = true;
    }
  }

  /** The key as configured (key id, key ARN, alias name or alias ARN). */
  get keyId(): string {
    return this.#keyId;
  }

  /** The `KMSClient` in use (the one passed as `client`, or the one this provider built). */
  get client(): KmsClient {
    return this.#client as unknown as KmsClient;
  }

  /** The configured key, or its ARN once KMS has reported it. */
  describe(): KeyDescription {
    return { kind: KIND, keyReference: this.#resolvedArn ?? this.#keyId };
  }

  /** The key ARN: as configured, as KMS reported it, or else from `DescribeKey`. */
  override async resolveKeyReference(): Promise<string> {
    if (this.#resolvedArn) return this.#resolvedArn;
    if (KEY_ARN.test(this.#keyId)) return this.#keyId;
    return (await this.describeKey()).Arn;
  }

  /** Whether `reference` is this key's ARN, or (as recorded before ARNs were resolved) the configured key id. */
  override async hasKeyReference(reference: string): Promise<boolean> {
    return reference === this.#keyId || reference === (await this.resolveKeyReference());
  }

  /** Calls `DescribeKey` and reports the key's ARN, state, spec and usage. */
  async describeKey(): Promise<AwsKmsKeyMetadata> {
    const { KeyMetadata: meta } = await this.#send('DescribeKey', (c) =>
      c.send(new this.#kms.DescribeKeyCommand({ KeyId: this.#keyId })),
    );
    if (!meta?.Arn) {
      throw new KeyProviderError('KMS DescribeKey returned no key metadata', this.errorContext());
    }
    this.#resolvedArn = meta.Arn;
    return {
      Arn: meta.Arn,
      KeyState: String(meta.KeyState ?? 'Unknown'),
      KeySpec: String(meta.KeySpec ?? meta.CustomerMasterKeySpec ?? 'Unknown'),
      KeyUsage: String(meta.KeyUsage ?? 'Unknown'),
    };
  }

  /**
   * Checks, in order, that the key is `Enabled`, symmetric (`SYMMETRIC_DEFAULT`) and for
   * `ENCRYPT_DECRYPT` (`validate()` then adds a generate/unwrap round trip). Each failure names what
   * is wrong.
   */
  override async checkKey(): Promise<void> {
    const { KeyState, KeySpec, KeyUsage } = await this.describeKey();
    const required = 'a symmetric ENCRYPT_DECRYPT key is required';
    if (KeyState !== 'Enabled') {
      throw new KeyAccessDeniedError(`key is ${KeyState}; an Enabled key is required`, this.errorContext());
    }
    if (KeySpec !== 'SYMMETRIC_DEFAULT') {
      const what = /^(RSA|ECC|SM2)/.test(KeySpec) ? 'asymmetric' : 'not a symmetric encryption key';
      throw new KeyProviderError(`key is ${what} (${KeySpec}); ${required}`, this.errorContext());
    }
    if (KeyUsage !== 'ENCRYPT_DECRYPT') {
      throw new KeyProviderError(`key usage is ${KeyUsage}; ${required}`, this.errorContext());
    }
  }

  /**
   * Re-wraps under `destination`. When it is another KMS key reached as the same principal (the
   * same `roleArn` and External ID, or neither), `ReEncrypt` does it inside KMS (with this
   * provider's client and credentials), so the plaintext key never leaves KMS; otherwise the key is
   * unwrapped here and wrapped there, each side with its own credentials.
   */
  override async rewrapDataKey(
    wrappedKey: Buffer,
    context: EncryptionContext,
    destination: KeyProvider,
  ): Promise<Buffer> {
    /* ReEncrypt is one call by one principal: a destination reached through another role (a key in
       another account) may not let this provider's principal encrypt under it. */
    if (!(destination instanceof AwsKmsKeyProvider) || destination.#assumedRole !== this.#assumedRole)
      return super.rewrapDataKey(wrappedKey, context, destination);
    const out = await this.#send('ReEncrypt', (c) =>
      c.send(
        new this.#kms.ReEncryptCommand({
          CiphertextBlob: wrappedKey,
          SourceKeyId: this.#keyId,
          SourceEncryptionContext: { ...context },
          DestinationKeyId: destination.keyId,
          DestinationEncryptionContext: { ...context },
        }),
      ),
    );
    if (!out.CiphertextBlob?.length) {
      throw new KeyProviderError('KMS ReEncrypt returned no ciphertext', this.errorContext());
    }
    return Buffer.from(out.CiphertextBlob);
  }

  /** Destroys the client if this provider built it (a `client` passed in is left to its owner). */
  destroy(): void {
    if (this.#ownsClient) this.#client.destroy();
  }

  protected async _generateDataKey(context: EncryptionContext): Promise<GeneratedDataKey> {
    const out = await this.#send('GenerateDataKey', (c) =>
      c.send(
        new this.#kms.GenerateDataKeyCommand({
          KeyId: this.#keyId,
          KeySpec: 'AES_256',
          EncryptionContext: { ...context },
        }),
      ),
    );
    const plaintextKey = this.#copyKey(out.Plaintext, 'GenerateDataKey');
    if (!out.CiphertextBlob?.length) {
      plaintextKey.fill(0);
      throw new KeyProviderError('KMS GenerateDataKey returned no ciphertext', this.errorContext());
    }
    if (out.KeyId) this.#resolvedArn = out.KeyId;
    return { plaintextKey, wrappedKey: Buffer.from(out.CiphertextBlob) };
  }

  protected async _wrapDataKey(plaintextKey: Buffer, context: EncryptionContext): Promise<Buffer> {
    const out = await this.#send('Encrypt', (c) =>
      c.send(
        new this.#kms.EncryptCommand({
          KeyId: this.#keyId,
          Plaintext: plaintextKey,
          EncryptionContext: { ...context },
        }),
      ),
    );
    if (!out.CiphertextBlob?.length) {
      throw new KeyProviderError('KMS Encrypt returned no ciphertext', this.errorContext());
    }
    if (out.KeyId) this.#resolvedArn = out.KeyId;
    return Buffer.from(out.CiphertextBlob);
  }

  protected async _unwrapDataKey(wrappedKey: Buffer, context: EncryptionContext): Promise<Buffer> {
    const out = await this.#send('Decrypt', (c) =>
      c.send(
        new this.#kms.DecryptCommand({
          KeyId: this.#keyId,
          CiphertextBlob: wrappedKey,
          EncryptionContext: { ...context },
        }),
      ),
    );
    return this.#copyKey(out.Plaintext, 'Decrypt');
  }

  /** Errors name the key as configured. */
  protected override errorContext(): { keyId: string } {
    return { keyId: this.#keyId };
  }

  /** Copies the SDK's plaintext into a Buffer of our own and zeroes the SDK's bytes. */
  #copyKey(plaintext: Uint8Array | undefined, operation: string): Buffer {
    if (plaintext?.length !== DATA_KEY_BYTES) {
      plaintext?.fill(0);
      throw new KeyProviderError(`KMS ${operation} returned a malformed data key`, this.errorContext());
    }
    const key = Buffer.alloc(DATA_KEY_BYTES);
    key.set(plaintext);
    plaintext.fill(0);
    return key;
  }

  /** Sends a command and maps its failure to this library's errors. */
  async #send<Output>(operation: string, call: (client: KMSClient) => Promise<Output>): Promise<Output> {
    try {
      return await call(this.#client);
    } catch (error) {
      throw mapKmsError(error, operation, this.errorContext());
    }
  }

  /** Never prints the client or credentials. */
  [inspect.custom](): string {
    return `AwsKmsKeyProvider { kind: '${KIND}', keyId: '${this.#keyId}' }`;
  }

  toJSON(): { kind: string; keyId: string } {
    return { kind: KIND, keyId: this.#keyId };
  }
}

function parseKeyId(keyId: unknown): string {
  if (typeof keyId !== 'string' || keyId.trim() === '') {
    throw new ConfigError(
      'AwsKmsKeyProvider needs keyId: a KMS key id, key ARN, alias name (alias/…) or alias ARN',
    );
  }
  if (keyId !== keyId.trim() || /\s/.test(keyId)) {
    throw new ConfigError('AwsKmsKeyProvider keyId must not contain whitespace', { keyId: keyId.trim() });
  }
  return keyId;
}

function clientConfigOf(options: AwsKmsKeyProviderOptions): KMSClientConfig {
  const { region, roleArn, externalId, roleSessionName, stsEndpoint, endpoint, maxAttempts } = options;
  const requestHandler = requestHandlerOf(options);
  if (roleArn === undefined) {
    const stray = (['externalId', 'roleSessionName', 'stsEndpoint'] as const).find(
      (name) => options[name] !== undefined,
    );
    if (stray) throw new ConfigError(`${stray} needs roleArn`);
  } else if (typeof roleArn !== 'string' || !roleArn.startsWith('arn:')) {
    throw new ConfigError('roleArn must be an IAM role ARN (arn:aws:iam::<account>:role/<name>)');
  }
  const attempts = maxAttempts ?? options.clientConfig?.maxAttempts ?? DEFAULT_MAX_ATTEMPTS;
  if (typeof attempts === 'number' && (!Number.isInteger(attempts) || attempts < 1)) {
    throw new ConfigError(`maxAttempts must be a positive integer, got ${attempts}`);
  }
  const config: KMSClientConfig = {
    retryMode: 'standard',
    ...options.clientConfig,
    maxAttempts: attempts,
  };
  if (requestHandler) config.requestHandler = requestHandler;
  if (region !== undefined) config.region = region;
  if (endpoint !== undefined) config.endpoint = endpoint;
  if (roleArn !== undefined) {
    const { fromTemporaryCredentials } = loadOptionalDependency<CredentialProvidersModule>(
      CREDENTIALS_PACKAGE,
      'AwsKmsKeyProvider with roleArn',
    );
    const ownCredentials = options.clientConfig?.credentials;
    const assumeRole = fromTemporaryCredentials({
      params: {
        RoleArn: roleArn,
        ...(externalId !== undefined ? { ExternalId: externalId } : {}),
        RoleSessionName: roleSessionName ?? DEFAULT_ROLE_SESSION_NAME,
      },
      /* The application's own credentials call STS; the role's credentials call KMS. */
      ...(ownCredentials !== undefined ? { masterCredentials: ownCredentials } : {}),
      clientConfig: {
        ...(region !== undefined ? { region } : {}),
        ...(stsEndpoint !== undefined ? { endpoint: stsEndpoint } : {}),
        /* STS gets the same timeouts: assuming the role is part of the first KMS call. */
        ...(requestHandler ? { requestHandler: requestHandlerOf(options) } : {}),
      },
    });
    const context = { keyId: options.keyId };
    /* The SDK refreshes through this function before the credentials expire; it only maps failures. */
    config.credentials = async (properties?: Record<string, unknown>) => {
      try {
        return await assumeRole(properties);
      } catch (error) {
        throw mapStsError(error, roleArn, context);
      }
    };
  }
  return config;
}

/** STS errors meaning the role cannot be assumed by these credentials: the customer's side refuses. */
const STS_ACCESS_ERRORS = new Set([
  'AccessDenied',
  'AccessDeniedException',
  'InvalidClientTokenId',
  'ExpiredToken',
  'ExpiredTokenException',
  'RegionDisabledException',
]);

/** Maps a failed `AssumeRole` to this library's errors, naming the role and the key (never credentials or the external id). */
function mapStsError(failure: unknown, roleArn: string, context: ErrorContext): Error {
  const error = withoutRawResponse(failure);
  const name = awsErrorName(error);
  if (STS_ACCESS_ERRORS.has(name)) {
    return new KeyAccessDeniedError(
      `STS refused to let the application assume ${roleArn} (${name}): the role's trust policy must ` +
        `allow the application's account or role, with the external id this key was configured with`,
      context,
      { cause: error },
    );
  }
  return new KeyProviderError(`STS AssumeRole of ${roleArn} failed (${name})`, context, { cause: error });
}

/**
 * An HTTP handler with connection and request timeouts (the SDK's default has none: a call to an
 * endpoint that never answers would wait forever). Left out when `clientConfig` brings its own.
 */
function requestHandlerOf(options: AwsKmsKeyProviderOptions): KMSClientConfig['requestHandler'] {
  const { connectTimeout, requestTimeout } = options;
  const own = options.clientConfig?.requestHandler !== undefined;
  if (own && (connectTimeout !== undefined || requestTimeout !== undefined)) {
    throw new ConfigError(
      `Cannot set both clientConfig.requestHandler and ${connectTimeout !== undefined ? 'connectTimeout' : 'requestTimeout'}: configure the timeouts on that handler`,
    );
  }
  if (own) return undefined;
  const timeouts = {
    connectionTimeout: positiveMs('connectTimeout', connectTimeout ?? DEFAULT_CONNECT_TIMEOUT),
    requestTimeout: positiveMs('requestTimeout', requestTimeout ?? DEFAULT_REQUEST_TIMEOUT),
    /* Recent handlers only warn on a request timeout unless told to fail; older ones ignore this. */
    throwOnRequestTimeout: true,
  };
  /* The handler package comes with the KMS client; resolve it from there (strict installs too). */
  try {
    const fromKms = createRequire(require.resolve(KMS_PACKAGE));
    const { NodeHttpHandler } = fromKms(HTTP_HANDLER_PACKAGE) as typeof import('@smithy/node-http-handler');
    return new NodeHttpHandler(timeouts);
  } catch {
    /* Clients that cannot be reached this way take the handler's options as they are. */
    return timeouts;
  }
}

function positiveMs(name: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) {
    throw new ConfigError(`${name} must be a positive number of milliseconds, got ${String(value)}`);
  }
  return value;
}

/** Maps a failed KMS call to this library's errors. Messages carry error names only, never key bytes or blobs. */
function mapKmsError(failure: unknown, operation: string, context: ErrorContext): Error {
  /* Already mapped where it happened (assuming the role, before KMS was called). */
  if (failure instanceof KeyProviderError) return failure;
  const error = withoutRawResponse(failure);
  const name = awsErrorName(error);
  const access = ACCESS_ERRORS[name];
  if (access) return new KeyAccessDeniedError(`${access} (${name})`, context, { cause: error });
  if (INTEGRITY_ERRORS.has(name) && (operation === 'Decrypt' || operation === 'ReEncrypt')) {
    return new IntegrityError(
      `KMS could not unwrap the data key: it was altered, or wrapped under another key or encryption context; ` +
        `the master key configured for its version may not be the one that wrapped it, ` +
        `or keyringId differs from the one that wrapped it (${name})`,
      context,
      { cause: error },
    );
  }
  if (name === 'InvalidKeyUsageException') {
    return new KeyProviderError(
      `the KMS key cannot be used for ${operation}; a symmetric ENCRYPT_DECRYPT key is required (${name})`,
      context,
      { cause: error },
    );
  }
  const attempts = (error as { $metadata?: { attempts?: number } })?.$metadata?.attempts;
  const after = typeof attempts === 'number' && attempts > 1 ? ` after ${attempts} attempts` : '';
  if (name === 'TimeoutError') {
    return new KeyProviderError(
      `KMS ${operation} timed out${after}: the endpoint did not connect or answer within connectTimeout / requestTimeout (${name})`,
      context,
      { cause: error },
    );
  }
  return new KeyProviderError(`KMS ${operation} failed${after} (${name})`, context, { cause: error });
}

/**
 * The SDK error without the raw HTTP exchange it carries (`$response`, hidden and read-only):
 * through its socket that reaches the signed request's headers, `x-amz-security-token` included,
 * which an `inspect(error, { showHidden: true })` of our error (its `cause`) would print. The copy
 * is of the same class, with the same name, message, stack, `$metadata` and `$fault`.
 */
function withoutRawResponse(error: unknown): unknown {
  if (typeof error !== 'object' || error === null || !Object.hasOwn(error, '$response')) return error;
  const { $response: _dropped, ...rest } = Object.getOwnPropertyDescriptors(error);
  return Object.create(Object.getPrototypeOf(error), rest);
}

/** The AWS error name (`ThrottlingException`…), or a network code (`ECONNREFUSED`), or the class name. */
function awsErrorName(error: unknown): string {
  if (typeof error !== 'object' || error === null) return typeof error;
  const { name, code } = error as { name?: unknown; code?: unknown };
  if (typeof name === 'string' && name !== 'Error') return name;
  if (typeof code === 'string') return code;
  return typeof name === 'string' ? name : 'UnknownError';
}
