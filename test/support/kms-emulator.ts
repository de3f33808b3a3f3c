import { createCipheriv, createDecipheriv, randomBytes, randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

/** Options for {@link startKmsEmulator}. */
export interface KmsEmulatorOptions {
  /** Region used in ARNs and in {@link KmsEmulator.clientConfig}. Default `us-east-1`. */
  region?: string;
  /** Account id used in ARNs. Default `111122223333`. */
  accountId?: string;
  /**
   * Who signed a request, from the access key id of its SigV4 `Authorization` header (the STS
   * emulator's `principalOf` fits). When set, unknown keys are refused (`UnrecognizedClientException`),
   * expired ones too (`ExpiredTokenException`), and every key's policy is enforced. When not set,
   * any signed request is accepted and policies are ignored (as before policies existed).
   */
  principalOf?: (accessKeyId: string) => KmsPrincipal | undefined;
}

/** The caller of a request, as {@link KmsEmulatorOptions.principalOf} reports it. */
export interface KmsPrincipal {
  /** The account the credentials act in. */
  account: string;
  /** The caller's ARN (an IAM user, or an STS assumed-role session). */
  arn: string;
  /** For an assumed-role session: the role's ARN, which a key policy names. */
  roleArn?: string;
  /** For temporary credentials: when they stop working. */
  expiration?: Date;
}

/**
 * One statement of a key policy: `principals` (account ids, `arn:aws:iam::<account>:root`, role or
 * user ARNs, `*`) may call `actions` (`kms:Decrypt`, `kms:ReEncryptFrom`, `kms:*`, `*`) on the key.
 * Only `Allow` statements exist: what no statement allows is denied.
 */
export interface KeyPolicyStatement {
  principals: string[];
  actions: string[];
  /**
   * AWS's `StringEquals` on `kms:EncryptionContext:<key>`: the statement applies only to requests
   * whose encryption context has every one of these entries (ReEncrypt: the source context for
   * `kms:ReEncryptFrom`, the destination context for `kms:ReEncryptTo`). As in AWS, a request
   * without the entry (DescribeKey has no context at all) is not allowed by this statement.
   */
  encryptionContextEquals?: Record<string, string>;
}

/** Key metadata exactly as the emulator puts it on the wire (dates are epoch seconds). */
export interface EmulatedKeyMetadata {
  AWSAccountId: string;
  KeyId: string;
  Arn: string;
  CreationDate: number;
  Enabled: boolean;
  Description: string;
  KeyUsage: string;
  KeyState: 'Enabled' | 'Disabled' | 'PendingDeletion';
  DeletionDate?: number;
  PendingDeletionWindowInDays?: number;
  Origin: 'AWS_KMS';
  KeyManager: 'CUSTOMER';
  KeySpec: string;
  CustomerMasterKeySpec: string;
  EncryptionAlgorithms?: string[];
  SigningAlgorithms?: string[];
  MultiRegion: false;
}

/** Options for {@link KmsEmulator.createKey} (mirrors the CreateKey request fields). */
export interface CreateKeyOptions {
  /** `SYMMETRIC_DEFAULT` (default), `RSA_2048|3072|4096`, `ECC_NIST_P256|P384`. */
  keySpec?: string;
  /** `ENCRYPT_DECRYPT` (default, as in real KMS) or `SIGN_VERIFY`. */
  keyUsage?: string;
  description?: string;
  /** Account that owns the key (its ARN names it). Default: the emulator's `accountId`. */
  accountId?: string;
  /**
   * The key policy. Default, as KMS's default key policy: the owning account (any of its
   * principals) may do everything. Enforced only with {@link KmsEmulatorOptions.principalOf}.
   */
  policy?: KeyPolicyStatement[];
}

/** One request seen by the emulator. */
export interface KmsCall {
  operation: string;
  /** Key identifier as sent (`KeyId`, `DestinationKeyId` or `TargetKeyId`); for Decrypt without `KeyId`, the key id inside the blob. */
  keyId?: string;
  /** `EncryptionContext` (or `DestinationEncryptionContext` for ReEncrypt) as sent. */
  encryptionContext?: Record<string, string>;
  /** The caller's ARN, when {@link KmsEmulatorOptions.principalOf} identified it. */
  principal?: string;
}

/** A fault to inject: the next `times` calls (of `operation`, or of any operation) fail with `error`. */
export interface FaultSpec {
  operation?: string;
  error: 'ThrottlingException' | 'KMSInternalException' | 'AccessDeniedException' | (string & {});
  times: number;
}

/** Subset of `KMSClientConfig` pointing a real `KMSClient` at the emulator. */
export interface KmsEmulatorClientConfig {
  endpoint: string;
  region: string;
  credentials: { accessKeyId: string; secretAccessKey: string };
}

/** An AWS-style error; the server sends it as `{"__type": name, "message": message}`. */
export class KmsEmulatorError extends Error {
  constructor(name: string, message: string) {
    super(message);
    this.name = name;
  }

  /** HTTP status real KMS uses for this error name. */
  get status(): number {
    return SERVER_ERRORS[this.name] ?? 400;
  }
}

const SERVER_ERRORS: Record<string, number> = { KMSInternalException: 500, DependencyTimeoutException: 503 };
const OPERATIONS = (
  'CreateKey CreateAlias ListAliases DescribeKey EnableKey DisableKey ScheduleKeyDeletion CancelKeyDeletion ' +
  'GenerateDataKey Encrypt Decrypt ReEncrypt'
).split(' ');
const RSA = {
  encrypt: ['RSAES_OAEP_SHA_1', 'RSAES_OAEP_SHA_256'],
  sign: ['256', '384', '512'].flatMap((n) => [`RSASSA_PSS_SHA_${n}`, `RSASSA_PKCS1_V1_5_SHA_${n}`]),
};
const KEY_SPECS: Record<string, { encrypt?: string[]; sign?: string[] }> = {
  SYMMETRIC_DEFAULT: { encrypt: ['SYMMETRIC_DEFAULT'] },
  RSA_2048: RSA,
  RSA_3072: RSA,
  RSA_4096: RSA,
  ECC_NIST_P256: { sign: ['ECDSA_SHA_256'] },
  ECC_NIST_P384: { sign: ['ECDSA_SHA_384'] },
};
const KMS_ARN = /^arn:aws[a-z-]*:kms:([^:]+):(\d{12}):((?:key|alias)\/.+)$/;
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const BLOB_VERSION = 1;
const HEADER_LEN = 1 + 36;
const IV_LEN = 12;
const TAG_LEN = 16;
const DATA_KEY_SPECS: Record<string, number> = { AES_256: 32, AES_128: 16 };

type Body = Record<string, unknown>;
interface KeyRecord {
  meta: EmulatedKeyMetadata;
  /** 32 bytes for symmetric keys; asymmetric keys are metadata only. */
  material?: Buffer;
  policy: KeyPolicyStatement[];
}
interface AliasRecord {
  target: string;
  created: number;
}

function fail(name: string, message: string): never {
  throw new KmsEmulatorError(name, message);
}
const empty = (_result: unknown): object => ({});
const nowSeconds = (): number => Date.now() / 1000;
const b64 = (buf: Buffer): string => buf.toString('base64');

function optStr(body: Body, field: string): string | undefined {
  const value = body[field];
  if (value === undefined || value === null) return undefined;
  return typeof value === 'string' ? value : fail('ValidationException', `${field} must be a string`);
}

function reqStr(body: Body, field: string): string {
  return optStr(body, field) || fail('ValidationException', `${field} is required`);
}

function reqBlob(body: Body, field: string): Buffer {
  const value = reqStr(body, field);
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(value)) fail('SerializationException', `${field} is not valid base64`);
  return Buffer.from(value, 'base64');
}

function optContext(body: Body, field: string): Record<string, string> | undefined {
  const value = body[field];
  if (value === undefined || value === null) return undefined;
  const ok = typeof value === 'object' && Object.values(value).every((v) => typeof v === 'string');
  return ok ? (value as Record<string, string>) : fail('ValidationException', `${field} must map strings`);
}

/** Canonical AAD form of an encryption context: `[[key, value], ...]` sorted by key, as JSON. */
function canonicalContext(context: Record<string, string> | undefined): Buffer {
  const entries = Object.entries(context ?? {}).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return Buffer.from(JSON.stringify(entries), 'utf8');
}

/** Blob layout: `[1 byte version][36 bytes key uuid ascii][12 byte iv][16 byte tag][ciphertext]`. */
function seal(keyId: string, material: Buffer, plaintext: Buffer, context?: Record<string, string>): Buffer {
  const header = Buffer.concat([Buffer.of(BLOB_VERSION), Buffer.from(keyId, 'ascii')]);
  const iv = randomBytes(IV_LEN);
  const cipher = createCipheriv('aes-256-gcm', material, iv);
  cipher.setAAD(Buffer.concat([header, canonicalContext(context)]));
  const body = Buffer.concat([cipher.update(plaintext), cipher.final()]);
  return Buffer.concat([header, iv, cipher.getAuthTag(), body]);
}

function unsealWith(material: Buffer, blob: Buffer, context?: Record<string, string>): Buffer {
  const ivEnd = HEADER_LEN + IV_LEN;
  try {
    const decipher = createDecipheriv('aes-256-gcm', material, blob.subarray(HEADER_LEN, ivEnd));
    decipher.setAAD(Buffer.concat([blob.subarray(0, HEADER_LEN), canonicalContext(context)]));
    decipher.setAuthTag(blob.subarray(ivEnd, ivEnd + TAG_LEN));
    return Buffer.concat([decipher.update(blob.subarray(ivEnd + TAG_LEN)), decipher.final()]);
  } catch {
    return fail('InvalidCiphertextException', 'Ciphertext or encryption context is invalid');
  }
}

/** Key uuid carried by a blob, or undefined when the blob is not one of ours. */
function blobKeyId(blob: Buffer): string | undefined {
  if (blob.length < HEADER_LEN + IV_LEN + TAG_LEN || blob[0] !== BLOB_VERSION) return undefined;
  const id = blob.subarray(1, HEADER_LEN).toString('ascii');
  return UUID_RE.test(id) ? id : undefined;
}

async function readBody(req: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

function parseBody(raw: string): Body {
  try {
    const parsed: unknown = raw.trim() === '' ? {} : JSON.parse(raw);
    if (parsed && typeof parsed === 'object' && !Array.isArray(parsed)) return parsed as Body;
  } catch {}
  return fail('SerializationException', 'Request body is not a JSON object');
}

/**
 * In-process AWS KMS emulator speaking the AWS JSON 1.1 protocol used by `@aws-sdk/client-kms`.
 * Create it with {@link startKmsEmulator}; drive it with a real `KMSClient` via {@link KmsEmulator.clientConfig}.
 */
export class KmsEmulator {
  /** Base URL, `http://127.0.0.1:PORT`. */
  endpoint = '';
  /** Requests per operation (fault-injected and failed calls included). */
  readonly calls: Record<string, number> = Object.fromEntries(OPERATIONS.map((op) => [op, 0]));
  /** Fault-injected (injectFaults / failAll) responses per operation. */
  readonly faults: Record<string, number> = Object.fromEntries(OPERATIONS.map((op) => [op, 0]));
  /** Every request in arrival order. */
  readonly callLog: KmsCall[] = [];
  /**
   * The delay (ms) each response held back by {@link setLatency} waited out, added once its timer
   * has fired, just before it is sent: a client that has an answer already listed got it after the delay.
   */
  readonly delayedResponses: number[] = [];

  private readonly keys = new Map<string, KeyRecord>();
  private readonly aliases = new Map<string, AliasRecord>();
  private readonly denied = new Set<string>();
  private readonly faultQueue: FaultSpec[] = [];
  private outage: string | null = null;
  private latencyMs = 0;
  /** The caller, operation and body of the request being handled (handlers run synchronously, one at a time). */
  private caller: KmsPrincipal | undefined;
  private operation = '';
  private body: Body = {};
  private readonly server: Server = createServer((req, res) => {
    this.handle(req, res).catch(() => res.destroy());
  });

  private constructor(
    /** Region used in ARNs and {@link clientConfig}. */
    readonly region: string,
    /** Account id used in ARNs. */
    readonly accountId: string,
    private readonly principalOf?: (accessKeyId: string) => KmsPrincipal | undefined,
  ) {}

  /** @internal Use {@link startKmsEmulator}. */
  static async start(options: KmsEmulatorOptions = {}): Promise<KmsEmulator> {
    const emulator = new KmsEmulator(
      options.region ?? 'us-east-1',
      options.accountId ?? '111122223333',
      options.principalOf,
    );
    await new Promise<void>((resolve, reject) => {
      emulator.server.once('error', reject);
      emulator.server.listen(0, '127.0.0.1', resolve);
    });
    emulator.endpoint = `http://127.0.0.1:${(emulator.server.address() as AddressInfo).port}`;
    return emulator;
  }

  /** Config for `new KMSClient(...)`: endpoint, region and obviously fake credentials. */
  clientConfig(): KmsEmulatorClientConfig {
    const credentials = { accessKeyId: 'test', secretAccessKey: 'test' };
    return { endpoint: this.endpoint, region: this.region, credentials };
  }

  /** Stops the server and drops open connections. */
  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }

  /** Zeroes {@link calls} and {@link faults} (in place) and empties {@link callLog}. */
  resetCalls(): void {
    for (const counts of [this.calls, this.faults]) for (const op of Object.keys(counts)) counts[op] = 0;
    this.callLog.length = 0;
  }

  /** Creates a key directly (no HTTP), with the same validation as CreateKey. */
  createKey(options: CreateKeyOptions = {}): EmulatedKeyMetadata {
    const keySpec = options.keySpec ?? 'SYMMETRIC_DEFAULT';
    const keyUsage = options.keyUsage ?? 'ENCRYPT_DECRYPT';
    const algorithms = KEY_SPECS[keySpec] ?? fail('ValidationException', `Unsupported KeySpec ${keySpec}`);
    const encrypt = keyUsage === 'ENCRYPT_DECRYPT';
    if (!(encrypt ? algorithms.encrypt : keyUsage === 'SIGN_VERIFY' && algorithms.sign)) {
      fail('ValidationException', `KeyUsage ${keyUsage} does not fit KeySpec ${keySpec}`);
    }
    const account = options.accountId ?? this.accountId;
    if (!/^\d{12}$/.test(account)) fail('ValidationException', `accountId must be 12 digits, got ${account}`);
    const keyId = randomUUID();
    const meta: EmulatedKeyMetadata = {
      AWSAccountId: account,
      KeyId: keyId,
      Arn: `${this.arnPrefix(account)}key/${keyId}`,
      CreationDate: nowSeconds(),
      Enabled: true,
      Description: options.description ?? '',
      KeyUsage: keyUsage,
      KeyState: 'Enabled',
      Origin: 'AWS_KMS',
      KeyManager: 'CUSTOMER',
      KeySpec: keySpec,
      CustomerMasterKeySpec: keySpec,
      ...(encrypt ? { EncryptionAlgorithms: algorithms.encrypt } : { SigningAlgorithms: algorithms.sign }),
      MultiRegion: false,
    };
    const policy = structuredClone(options.policy ?? [{ principals: [account], actions: ['kms:*'] }]);
    const material = keySpec === 'SYMMETRIC_DEFAULT' ? { material: randomBytes(32) } : {};
    this.keys.set(keyId, { meta, policy, ...material });
    return structuredClone(meta);
  }

  /** Replaces a key's policy (PutKeyPolicy); takes effect on the next request. */
  putKeyPolicy(keyId: string, policy: KeyPolicyStatement[]): EmulatedKeyMetadata {
    const key = this.resolve(keyId);
    key.policy = structuredClone(policy);
    return structuredClone(key.meta);
  }

  /** A copy of a key's policy. */
  keyPolicy(keyId: string): KeyPolicyStatement[] {
    return structuredClone(this.resolve(keyId).policy);
  }

  /** Points `alias` (must start with `alias/`) at a key; returns the key's metadata. */
  createAlias(alias: string, keyId: string): EmulatedKeyMetadata {
    return this.addAlias(alias, this.resolve(keyId));
  }

  /** Disables a key directly (state `Disabled`). */
  disableKey(keyId: string): EmulatedKeyMetadata {
    return this.setEnabled(this.resolve(keyId), false);
  }

  /** Enables a key directly (state `Enabled`). */
  enableKey(keyId: string): EmulatedKeyMetadata {
    return this.setEnabled(this.resolve(keyId), true);
  }

  /** Schedules deletion directly (state `PendingDeletion`, window 7..30 days, default 30). */
  scheduleDeletion(keyId: string, pendingWindowInDays = 30): EmulatedKeyMetadata {
    return this.schedule(this.resolve(keyId), pendingWindowInDays);
  }

  /** While `deny` is true, every operation naming or using this key returns AccessDeniedException. */
  denyAccess(keyId: string, deny = true): EmulatedKeyMetadata {
    const key = this.resolve(keyId);
    if (deny) this.denied.add(key.meta.KeyId);
    else this.denied.delete(key.meta.KeyId);
    return structuredClone(key.meta);
  }

  /** Makes the next `times` matching calls fail with `error`; queued specs are consumed in order. */
  injectFaults(fault: FaultSpec): void {
    if (fault.times > 0) this.faultQueue.push({ ...fault });
  }

  /** Delays every response by `ms` milliseconds (0 to disable). */
  setLatency(ms: number): void {
    this.latencyMs = Math.max(0, ms);
  }

  /** Makes every call fail with `error` until called with `null` (a KMS outage). */
  failAll(error: string | null): void {
    this.outage = error;
  }

  private readonly handlers: Record<string, (body: Body) => object> = {
    CreateKey: (b) => ({
      KeyMetadata: this.createKey({
        ...(this.caller ? { accountId: this.caller.account } : {}),
        keySpec: optStr(b, 'KeySpec') ?? optStr(b, 'CustomerMasterKeySpec'),
        keyUsage: optStr(b, 'KeyUsage'),
        description: optStr(b, 'Description'),
      }),
    }),
    CreateAlias: (b) => empty(this.addAlias(reqStr(b, 'AliasName'), this.useKey(reqStr(b, 'TargetKeyId')))),
    ListAliases: (b) => this.listAliases(optStr(b, 'KeyId')),
    DescribeKey: (b) => ({ KeyMetadata: structuredClone(this.useKey(reqStr(b, 'KeyId')).meta) }),
    EnableKey: (b) => empty(this.setEnabled(this.useKey(reqStr(b, 'KeyId')), true)),
    DisableKey: (b) => empty(this.setEnabled(this.useKey(reqStr(b, 'KeyId')), false)),
    ScheduleKeyDeletion: (b) => {
      const meta = this.schedule(this.useKey(reqStr(b, 'KeyId')), (b.PendingWindowInDays as number) ?? 30);
      const { Arn, DeletionDate, KeyState, PendingDeletionWindowInDays } = meta;
      return { KeyId: Arn, DeletionDate, KeyState, PendingWindowInDays: PendingDeletionWindowInDays };
    },
    CancelKeyDeletion: (b) => ({ KeyId: this.cancelDeletion(this.useKey(reqStr(b, 'KeyId'))).Arn }),
    GenerateDataKey: (b) => this.generateDataKey(b),
    Encrypt: (b) => {
      const key = this.useKey(reqStr(b, 'KeyId'));
      const material = this.material(key, 'Encrypt', optStr(b, 'EncryptionAlgorithm'));
      const plaintext = reqBlob(b, 'Plaintext');
      if (plaintext.length > 4096) fail('ValidationException', 'Plaintext must be at most 4096 bytes');
      const blob = seal(key.meta.KeyId, material, plaintext, optContext(b, 'EncryptionContext'));
      return { CiphertextBlob: b64(blob), KeyId: key.meta.Arn, EncryptionAlgorithm: 'SYMMETRIC_DEFAULT' };
    },
    Decrypt: (b) => {
      const algorithm = optStr(b, 'EncryptionAlgorithm');
      const { key, plaintext } = this.open(b, 'CiphertextBlob', 'EncryptionContext', 'KeyId', algorithm);
      return { KeyId: key.meta.Arn, Plaintext: b64(plaintext), EncryptionAlgorithm: 'SYMMETRIC_DEFAULT' };
    },
    ReEncrypt: (b) => {
      const algorithm = optStr(b, 'SourceEncryptionAlgorithm');
      const source = this.open(b, 'CiphertextBlob', 'SourceEncryptionContext', 'SourceKeyId', algorithm);
      const dest = this.useKey(reqStr(b, 'DestinationKeyId'), 'kms:ReEncryptTo');
      const material = this.material(dest, 'ReEncrypt', optStr(b, 'DestinationEncryptionAlgorithm'));
      const context = optContext(b, 'DestinationEncryptionContext');
      const blob = seal(dest.meta.KeyId, material, source.plaintext, context);
      source.plaintext.fill(0);
      return {
        CiphertextBlob: b64(blob),
        SourceKeyId: source.key.meta.Arn,
        KeyId: dest.meta.Arn,
        SourceEncryptionAlgorithm: 'SYMMETRIC_DEFAULT',
        DestinationEncryptionAlgorithm: 'SYMMETRIC_DEFAULT',
      };
    },
  };

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const raw = await readBody(req);
    let status = 200;
    let payload: object;
    let errorType: string | undefined;
    try {
      payload = this.dispatch(req, raw);
    } catch (error) {
      const known = error instanceof KmsEmulatorError;
      errorType = known ? error.name : 'KMSInternalException';
      status = known ? error.status : 500;
      payload = { __type: errorType, message: known ? error.message : 'Internal error' };
    }
    const latency = this.latencyMs;
    if (latency > 0) {
      await new Promise((resolve) => setTimeout(resolve, latency));
      this.delayedResponses.push(latency);
    }
    const text = JSON.stringify(payload);
    res.writeHead(status, {
      'Content-Type': 'application/x-amz-json-1.1',
      'Content-Length': Buffer.byteLength(text),
      'x-amzn-RequestId': randomUUID(),
      ...(errorType ? { 'x-amzn-ErrorType': errorType } : {}),
    });
    res.end(text);
  }

  private dispatch(req: IncomingMessage, raw: string): object {
    const target = String(req.headers['x-amz-target'] ?? '');
    if (req.method !== 'POST' || req.url !== '/' || !target.startsWith('TrentService.')) {
      fail('UnknownOperationException', 'Expected POST / with X-Amz-Target: TrentService.<Operation>');
    }
    if (!req.headers.authorization) {
      fail('UnrecognizedClientException', 'The security token included in the request is invalid.');
    }
    if (!String(req.headers['content-type']).startsWith('application/x-amz-json-1.1')) {
      fail('SerializationException', 'Content-Type must be application/x-amz-json-1.1');
    }
    const operation = target.slice('TrentService.'.length);
    const body = parseBody(raw);
    this.caller = this.principalOf && this.identify(String(req.headers.authorization));
    this.operation = operation;
    this.body = body;
    try {
      this.record(operation, body);
      const fault = this.takeFault(operation);
      if (fault) {
        this.faults[operation] = (this.faults[operation] ?? 0) + 1;
        fail(fault, `Injected ${fault} (kms-emulator)`);
      }
      if (this.principalOf) this.checkCredentials(this.caller);
      return (this.handlers[operation] ?? fail('UnknownOperationException', `Unknown ${operation}`))(body);
    } finally {
      this.caller = undefined;
      this.body = {};
    }
  }

  /** The principal of the SigV4 `Credential=<access key id>/…` of the request, if known. */
  private identify(authorization: string): KmsPrincipal | undefined {
    const accessKeyId = /Credential=([^/,\s]+)\//.exec(authorization)?.[1];
    return accessKeyId === undefined ? undefined : this.principalOf?.(accessKeyId);
  }

  private checkCredentials(caller: KmsPrincipal | undefined): void {
    if (!caller)
      fail('UnrecognizedClientException', 'The security token included in the request is invalid.');
    if (caller.expiration && caller.expiration.getTime() <= Date.now()) {
      fail('ExpiredTokenException', 'The security token included in the request is expired');
    }
  }

  private record(operation: string, body: Body): void {
    this.calls[operation] = (this.calls[operation] ?? 0) + 1;
    const blob =
      typeof body.CiphertextBlob === 'string' ? Buffer.from(body.CiphertextBlob, 'base64') : undefined;
    const keyId = body.KeyId ?? body.DestinationKeyId ?? body.TargetKeyId ?? (blob && blobKeyId(blob));
    const context = body.EncryptionContext ?? body.DestinationEncryptionContext;
    this.callLog.push({
      operation,
      ...(typeof keyId === 'string' ? { keyId } : {}),
      ...(context && typeof context === 'object' ? { encryptionContext: { ...context } } : {}),
      ...(this.caller ? { principal: this.caller.arn } : {}),
    });
  }

  private takeFault(operation: string): string | undefined {
    if (this.outage) return this.outage;
    const index = this.faultQueue.findIndex((f) => !f.operation || f.operation === operation);
    if (index < 0) return undefined;
    const fault = this.faultQueue[index];
    if (--fault.times <= 0) this.faultQueue.splice(index, 1);
    return fault.error;
  }

  private arnPrefix(account = this.accountId): string {
    return `arn:aws:kms:${this.region}:${account}:`;
  }

  /**
   * Resolves a key id, key ARN (of any account), alias name or alias ARN (aliases live in the
   * emulator's own account); unknown → NotFoundException.
   */
  private resolve(identifier: string): KeyRecord {
    const arn = KMS_ARN.exec(identifier);
    const [, region, account, local] = arn ?? [undefined, this.region, undefined, identifier];
    const keyId =
      region !== this.region
        ? undefined
        : local?.startsWith('alias/')
          ? account === undefined || account === this.accountId
            ? this.aliases.get(local)?.target
            : undefined
          : arn && local?.startsWith('key/')
            ? local.slice('key/'.length)
            : identifier;
    const key = keyId === undefined ? undefined : this.keys.get(keyId);
    const owned = key && (account === undefined || key.meta.AWSAccountId === account);
    return (owned && key) || fail('NotFoundException', `Key '${identifier}' does not exist`);
  }

  /** {@link resolve} plus the access checks, for requests arriving over HTTP. */
  private useKey(identifier: string, action?: string): KeyRecord {
    return this.checkAccess(this.resolve(identifier), action);
  }

  /** The {@link denyAccess} switch, then (with `principalOf`) the key policy for `action`. */
  private checkAccess(key: KeyRecord, action = `kms:${this.operation}`): KeyRecord {
    if (this.denied.has(key.meta.KeyId)) {
      fail('AccessDeniedException', `User is not authorized to use key ${key.meta.Arn}`);
    }
    const caller = this.caller;
    if (!this.principalOf || !caller) return key;
    const context = this.requestContext(action);
    const allowed = key.policy.some(
      (statement) =>
        statement.actions.some((a) => a === '*' || a === 'kms:*' || a === action) &&
        statement.principals.some((entry) => principalMatches(entry, caller)) &&
        contextMatches(statement.encryptionContextEquals, context),
    );
    if (allowed) return key;
    return fail(
      'AccessDeniedException',
      `User: ${caller.arn} is not authorized to perform: ${action} on resource: ${key.meta.Arn} ` +
        `because no resource-based policy allows the ${action} action`,
    );
  }

  /** The encryption context a policy condition on `action` looks at, as the request sent it. */
  private requestContext(action: string): Record<string, string> | undefined {
    const field =
      action === 'kms:ReEncryptFrom'
        ? 'SourceEncryptionContext'
        : action === 'kms:ReEncryptTo'
          ? 'DestinationEncryptionContext'
          : 'EncryptionContext';
    return optContext(this.body, field);
  }

  /** Checks state and usage for a cryptographic operation and returns the key material. */
  private material(key: KeyRecord, operation: string, algorithm?: string): Buffer {
    const { KeyState, Arn } = key.meta;
    if (KeyState === 'Disabled') fail('DisabledException', `${Arn} is disabled.`);
    if (KeyState === 'PendingDeletion') fail('KMSInvalidStateException', `${Arn} is pending deletion.`);
    if (!key.material || (algorithm !== undefined && algorithm !== 'SYMMETRIC_DEFAULT')) {
      fail('InvalidKeyUsageException', `${operation} is not supported for ${Arn} with this algorithm`);
    }
    return key.material;
  }

  private open(body: Body, blobField: string, contextField: string, pinField: string, algorithm?: string) {
    const action = pinField === 'SourceKeyId' ? 'kms:ReEncryptFrom' : 'kms:Decrypt';
    const blob = reqBlob(body, blobField);
    const pinnedId = optStr(body, pinField);
    const pinned = pinnedId === undefined ? undefined : this.useKey(pinnedId, action);
    const blobKey = blobKeyId(blob);
    const key = (blobKey && this.keys.get(blobKey)) || fail('InvalidCiphertextException', 'Bad ciphertext');
    if (pinned && pinned !== key) fail('IncorrectKeyException', 'The KeyId does not match the ciphertext');
    const material = this.material(this.checkAccess(key, action), 'Decrypt', algorithm);
    return { key, plaintext: unsealWith(material, blob, optContext(body, contextField)) };
  }

  private generateDataKey(body: Body): object {
    const key = this.useKey(reqStr(body, 'KeyId'));
    const material = this.material(key, 'GenerateDataKey');
    const spec = optStr(body, 'KeySpec');
    const count = body.NumberOfBytes;
    const size = spec === undefined ? count : count === undefined ? DATA_KEY_SPECS[spec] : undefined;
    if (typeof size !== 'number' || !Number.isInteger(size) || size < 1 || size > 1024) {
      fail('ValidationException', 'Give KeySpec AES_128/AES_256 or NumberOfBytes 1..1024, not both');
    }
    const plaintext = randomBytes(size);
    const blob = seal(key.meta.KeyId, material, plaintext, optContext(body, 'EncryptionContext'));
    return { CiphertextBlob: b64(blob), Plaintext: b64(plaintext), KeyId: key.meta.Arn };
  }

  private addAlias(alias: string, key: KeyRecord): EmulatedKeyMetadata {
    if (!/^alias\/[a-zA-Z0-9/_-]+$/.test(alias) || alias.startsWith('alias/aws/')) {
      fail('InvalidAliasNameException', 'Alias must start with alias/ and not with alias/aws/');
    }
    if (this.aliases.has(alias)) fail('AlreadyExistsException', `Alias ${alias} already exists`);
    this.notPending(key);
    this.aliases.set(alias, { target: key.meta.KeyId, created: nowSeconds() });
    return structuredClone(key.meta);
  }

  private listAliases(keyIdentifier?: string): object {
    const only = keyIdentifier === undefined ? undefined : this.useKey(keyIdentifier).meta.KeyId;
    const aliases = [...this.aliases]
      .filter(([, alias]) => only === undefined || alias.target === only)
      .map(([name, alias]) => ({
        AliasName: name,
        AliasArn: `${this.arnPrefix()}${name}`,
        TargetKeyId: alias.target,
        CreationDate: alias.created,
        LastUpdatedDate: alias.created,
      }));
    return { Aliases: aliases, Truncated: false };
  }

  private notPending(key: KeyRecord): void {
    if (key.meta.KeyState === 'PendingDeletion')
      fail('KMSInvalidStateException', `${key.meta.Arn} is pending`);
  }

  private setEnabled(key: KeyRecord, enabled: boolean): EmulatedKeyMetadata {
    this.notPending(key);
    key.meta.Enabled = enabled;
    key.meta.KeyState = enabled ? 'Enabled' : 'Disabled';
    return structuredClone(key.meta);
  }

  private schedule(key: KeyRecord, days: number): EmulatedKeyMetadata {
    if (!Number.isInteger(days) || days < 7 || days > 30) fail('ValidationException', 'Window is 7..30 days');
    this.notPending(key);
    const meta = key.meta;
    Object.assign(meta, { Enabled: false, KeyState: 'PendingDeletion', PendingDeletionWindowInDays: days });
    meta.DeletionDate = nowSeconds() + days * 86_400;
    return structuredClone(key.meta);
  }

  private cancelDeletion(key: KeyRecord): EmulatedKeyMetadata {
    if (key.meta.KeyState !== 'PendingDeletion')
      fail('KMSInvalidStateException', `${key.meta.Arn} not pending`);
    key.meta.KeyState = 'Disabled';
    delete key.meta.DeletionDate;
    delete key.meta.PendingDeletionWindowInDays;
    return structuredClone(key.meta);
  }
}

/** Whether `entry` of a key policy (`*`, an account id or root ARN, a role or user ARN) names `principal`. */
function principalMatches(entry: string, principal: KmsPrincipal): boolean {
  if (entry === '*') return true;
  const root = /^(?:arn:aws[a-z-]*:iam::)?(\d{12})(?::root)?$/.exec(entry);
  if (root) return root[1] === principal.account;
  return entry === principal.arn || entry === principal.roleArn;
}

/** Whether a request's encryption context has every entry a statement's condition requires. */
function contextMatches(
  required: Record<string, string> | undefined,
  context: Record<string, string> | undefined,
): boolean {
  if (!required) return true;
  return Object.entries(required).every(([name, value]) => context !== undefined && context[name] === value);
}

/**
 * Starts a KMS emulator on `127.0.0.1` (random port). SigV4 signatures are not verified, but an
 * `Authorization` header is required; with `principalOf`, its access key id identifies the caller
 * and key policies apply. Call {@link KmsEmulator.close} when done.
 */
export async function startKmsEmulator(options?: KmsEmulatorOptions): Promise<KmsEmulator> {
  return KmsEmulator.start(options);
}
