import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { OAuth2Client } from 'google-auth-library';
import { crc32c } from '../../src/keys/crc32c';

/**
 * An in-process Google Cloud KMS emulator speaking the REST (HTTP/JSON) protocol of
 * `@google-cloud/kms` in `fallback: 'rest'` mode: `POST /v1/{name}:encrypt`, `:decrypt`,
 * `GET /v1/{cryptoKey}`, `GET /v1/{version}`, `POST /v1/{cryptoKey}/cryptoKeyVersions`,
 * `:updatePrimaryVersion`, `PATCH /v1/{version}?updateMask=state` and `:destroy`; camelCase fields,
 * bytes as base64, int64 as strings, enums as numbers when the request asks
 * `$alt=json;enum-encoding=int` (names otherwise). CRC32C checksums sent with a request are
 * checked (a mismatch is refused with `INVALID_ARGUMENT`, as the service does) and every response
 * carries its own. Callers are identified by their bearer token and each crypto key has an IAM
 * policy (role bindings) that is enforced. Drive it with a real `KeyManagementServiceClient`
 * through {@link GcpKmsEmulator.connection}.
 */

/** The application's service account: what {@link GcpKmsEmulator.connection} authenticates as by default (so does the token `test`). */
export const APP_MEMBER = 'serviceAccount:app@typeorm-envelope-test.iam.gserviceaccount.com';
/** A member holding `roles/cloudkms.admin` on every key the emulator creates: the customer's key administrator. */
export const ADMIN_MEMBER = 'user:key-admin@customer.example';
/** The role the application needs to wrap and unwrap data keys. */
export const ENCRYPTER_DECRYPTER = 'roles/cloudkms.cryptoKeyEncrypterDecrypter';
/** The role that lets the application read the key's metadata (validation). */
export const VIEWER = 'roles/cloudkms.viewer';

/** Permissions of the predefined Cloud KMS roles the tests use. */
const ROLE_PERMISSIONS: Record<string, readonly string[]> = {
  [ENCRYPTER_DECRYPTER]: [
    'cloudkms.cryptoKeyVersions.useToEncrypt',
    'cloudkms.cryptoKeyVersions.useToDecrypt',
  ],
  'roles/cloudkms.cryptoKeyEncrypter': ['cloudkms.cryptoKeyVersions.useToEncrypt'],
  'roles/cloudkms.cryptoKeyDecrypter': ['cloudkms.cryptoKeyVersions.useToDecrypt'],
  [VIEWER]: ['cloudkms.cryptoKeys.get', 'cloudkms.cryptoKeyVersions.get'],
  'roles/cloudkms.admin': [
    'cloudkms.cryptoKeys.get',
    'cloudkms.cryptoKeys.update',
    'cloudkms.cryptoKeyVersions.get',
    'cloudkms.cryptoKeyVersions.create',
    'cloudkms.cryptoKeyVersions.update',
    'cloudkms.cryptoKeyVersions.destroy',
  ],
};

const PURPOSES = {
  ENCRYPT_DECRYPT: 1,
  ASYMMETRIC_SIGN: 5,
  ASYMMETRIC_DECRYPT: 6,
  RAW_ENCRYPT_DECRYPT: 7,
  MAC: 9,
} as const;
const STATES = {
  ENABLED: 1,
  DISABLED: 2,
  DESTROYED: 3,
  DESTROY_SCHEDULED: 4,
  PENDING_GENERATION: 5,
} as const;
const ALGORITHMS: Record<Purpose, { name: string; value: number }> = {
  ENCRYPT_DECRYPT: { name: 'GOOGLE_SYMMETRIC_ENCRYPTION', value: 1 },
  ASYMMETRIC_SIGN: { name: 'EC_SIGN_P256_SHA256', value: 12 },
  ASYMMETRIC_DECRYPT: { name: 'RSA_DECRYPT_OAEP_3072_SHA256', value: 9 },
  RAW_ENCRYPT_DECRYPT: { name: 'AES_256_GCM', value: 19 },
  MAC: { name: 'HMAC_SHA256', value: 32 },
};
const PROTECTION_SOFTWARE = 1;

/** A crypto key's purpose, as the API names it. */
export type Purpose = keyof typeof PURPOSES;
/** A crypto key version's state, as the API names it. */
export type VersionState = keyof typeof STATES;

/** The RPCs the emulator serves, counted by {@link GcpKmsEmulator.calls}. */
export const OPERATIONS = [
  'Encrypt',
  'Decrypt',
  'GetCryptoKey',
  'GetCryptoKeyVersion',
  'CreateCryptoKeyVersion',
  'UpdateCryptoKeyPrimaryVersion',
  'UpdateCryptoKeyVersion',
  'DestroyCryptoKeyVersion',
] as const;
export type Operation = (typeof OPERATIONS)[number];

/** What a fault makes the emulator do instead of serving a request. */
export type Fault =
  /** 403 `PERMISSION_DENIED`. */
  | 'PERMISSION_DENIED'
  /** 429 `RESOURCE_EXHAUSTED` (quota, throttling). */
  | 'RESOURCE_EXHAUSTED'
  /** 500 `INTERNAL`. */
  | 'INTERNAL'
  /** 503 `UNAVAILABLE`. */
  | 'UNAVAILABLE'
  /** 504 `DEADLINE_EXCEEDED`. */
  | 'DEADLINE_EXCEEDED'
  /** The request's bytes arrive altered (one bit of its plaintext or ciphertext flipped), so its checksum fails. */
  | 'corrupt-request'
  /** The answer's bytes are altered on the way (one bit flipped) while its checksum is the one of the right bytes. */
  | 'corrupt-response'
  /** The request is read and never answered (the connection stays open). */
  | 'hang';

/** A fault for the next `times` requests (of `operation`, or of any operation). */
export interface FaultSpec {
  operation?: Operation;
  fault: Fault;
  times: number;
}

/** One request, as the emulator saw it. */
export interface GcpKmsCall {
  operation: Operation | 'Unknown';
  /** The resource named by the request (`name` or `parent`), as sent. */
  name: string;
  /** The member the bearer token belongs to. */
  principal?: string;
  /** For Encrypt and Decrypt: the additional authenticated data, as UTF-8. */
  aad?: string;
  /** For Encrypt and Decrypt: the request's byte fields that came with a CRC32C checksum. */
  checksummed?: string[];
  /** For Encrypt and Decrypt: the version that encrypted or decrypted. */
  version?: string;
  /** The HTTP status answered (undefined: never answered). */
  status?: number;
  /** The error status (`PERMISSION_DENIED`…) when the request failed. */
  error?: string;
}

/** Options of {@link GcpKmsEmulator.createKey}. */
export interface CreateCryptoKeyOptions {
  /** Key ring id. Default `app`. */
  keyRing?: string;
  /** Crypto key id. Default: `key-` and a random suffix. */
  id?: string;
  /** Default `ENCRYPT_DECRYPT`. */
  purpose?: Purpose;
  /** How many versions to create (the last one primary, for `ENCRYPT_DECRYPT`). Default 1. */
  versions?: number;
  /**
   * The key's IAM policy: role → members. Default: the application ({@link APP_MEMBER}) holds
   * {@link ENCRYPTER_DECRYPTER} and {@link VIEWER}; {@link ADMIN_MEMBER} always holds
   * `roles/cloudkms.admin`.
   */
  bindings?: Record<string, string[]>;
  /** Project of the key. Default: the emulator's. */
  project?: string;
}

/** A crypto key as created. */
export interface EmulatedCryptoKey {
  name: string;
  /** Its versions' names, oldest first. */
  versions: string[];
  /** The primary version's name (`undefined` for keys that have none). */
  primary?: string;
}

/** What a provider needs to reach the emulator: `apiEndpoint`, `port`, `protocol` and an auth client. */
export interface GcpKmsConnection {
  apiEndpoint: string;
  port: number;
  protocol: 'http';
  authClient: OAuth2Client;
}

interface VersionRecord {
  id: number;
  name: string;
  state: VersionState;
  /** 32 bytes; gone once the version is destroyed. */
  material: Buffer | undefined;
  /** Identifies the version inside its ciphertexts. */
  uid: Buffer;
  createTime: string;
}

interface KeyRecord {
  name: string;
  purpose: Purpose;
  versions: VersionRecord[];
  primary: VersionRecord | undefined;
  bindings: Map<string, Set<string>>;
  createTime: string;
}

type Body = Record<string, unknown>;

/** A Google API error: the emulator sends `{ error: { code, message, status } }`. */
class ApiError extends Error {
  constructor(
    readonly httpStatus: number,
    readonly status: string,
    message: string,
  ) {
    super(message);
  }
}

const HTTP_OF: Record<string, number> = {
  INVALID_ARGUMENT: 400,
  FAILED_PRECONDITION: 400,
  UNAUTHENTICATED: 401,
  PERMISSION_DENIED: 403,
  NOT_FOUND: 404,
  RESOURCE_EXHAUSTED: 429,
  INTERNAL: 500,
  UNAVAILABLE: 503,
  DEADLINE_EXCEEDED: 504,
};

function fail(status: keyof typeof HTTP_OF, message: string): never {
  throw new ApiError(HTTP_OF[status] ?? 500, status, message);
}

const SEGMENT = '[a-zA-Z0-9_-]{1,63}';
const KEY_NAME = new RegExp(
  `^projects/${SEGMENT}/locations/${SEGMENT}/keyRings/${SEGMENT}/cryptoKeys/${SEGMENT}$`,
);
const CIPHERTEXT_FORMAT = 0x01;
const UID_BYTES = 8;
const HEADER_BYTES = 1 + UID_BYTES;
const IV_BYTES = 12;
const TAG_BYTES = 16;
const MAX_BYTES = 64 * 1024;

function bytes(body: Body, field: string, required: boolean): Buffer | undefined {
  const value = body[field];
  if (value === undefined || value === null || value === '') {
    return required ? fail('INVALID_ARGUMENT', `${field}: required field is empty`) : undefined;
  }
  if (typeof value !== 'string' || !/^[A-Za-z0-9+/_-]*={0,2}$/.test(value)) {
    fail('INVALID_ARGUMENT', `Invalid value at '${field}' (TYPE_BYTES), Base64 decoding failed`);
  }
  const decoded = Buffer.from(value, 'base64');
  if (decoded.length > MAX_BYTES) fail('INVALID_ARGUMENT', `${field} is larger than 64 KiB`);
  return decoded;
}

/** An `Int64Value` checksum as sent (a string in JSON, a number accepted too), or undefined. */
function checksum(body: Body, field: string): number | undefined {
  const value = body[field];
  if (value === undefined || value === null) return undefined;
  const text = typeof value === 'object' ? (value as { value?: unknown }).value : value;
  const n = typeof text === 'string' && /^\d+$/.test(text) ? Number(text) : text;
  if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0 || n > 0xffffffff) {
    fail('INVALID_ARGUMENT', `Invalid value at '${field}' (TYPE_INT64)`);
  }
  return n;
}

/** The service's refusal of a request whose bytes do not match the checksum sent with them. */
function checkSum(data: Buffer | undefined, sent: number | undefined, dataField: string, sumField: string) {
  if (sent === undefined) return false;
  if (crc32c(data ?? Buffer.alloc(0)) !== sent) {
    fail(
      'INVALID_ARGUMENT',
      `The checksum in field ${sumField} did not match the data in field ${dataField}.`,
    );
  }
  return true;
}

/** The byte fields of a request that came with their `…Crc32c` checksum. */
function withChecksums(body: Body, fields: string[]): string[] {
  return fields.filter((field) => body[`${field}Crc32c`] !== undefined && body[`${field}Crc32c`] !== null);
}

function flipBit(data: Buffer): Buffer {
  const copy = Buffer.from(data);
  if (copy.length > 0) copy[copy.length >> 1] = (copy[copy.length >> 1] as number) ^ 0x10;
  return copy;
}

async function readBody(req: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

/** A matched route: the operation and the resource it names. */
interface Route {
  operation: Operation;
  name: string;
}

function route(method: string, path: string): Route | undefined {
  const rest = path.startsWith('/v1/') ? decodeURIComponent(path.slice(4)) : undefined;
  if (rest === undefined) return undefined;
  const action = /^(.*):([a-zA-Z]+)$/.exec(rest);
  if (method === 'POST' && action) {
    const [, name, verb] = action as unknown as [string, string, string];
    const operation = (
      {
        encrypt: 'Encrypt',
        decrypt: 'Decrypt',
        updatePrimaryVersion: 'UpdateCryptoKeyPrimaryVersion',
        destroy: 'DestroyCryptoKeyVersion',
      } as const
    )[verb as 'encrypt'];
    return operation && { operation, name };
  }
  if (method === 'POST' && rest.endsWith('/cryptoKeyVersions')) {
    return { operation: 'CreateCryptoKeyVersion', name: rest.slice(0, -'/cryptoKeyVersions'.length) };
  }
  if (method === 'GET') {
    return {
      operation: rest.includes('/cryptoKeyVersions/') ? 'GetCryptoKeyVersion' : 'GetCryptoKey',
      name: rest,
    };
  }
  if (method === 'PATCH') return { operation: 'UpdateCryptoKeyVersion', name: rest };
  return undefined;
}

/** Create it with {@link startGcpKmsEmulator}. */
export class GcpKmsEmulator {
  /** Requests per operation (faulty and refused ones included). */
  readonly calls: Record<Operation, number> = Object.fromEntries(OPERATIONS.map((op) => [op, 0])) as Record<
    Operation,
    number
  >;
  /** Fault-injected answers per operation. */
  readonly faults: Record<Operation, number> = Object.fromEntries(OPERATIONS.map((op) => [op, 0])) as Record<
    Operation,
    number
  >;
  /** Every request in arrival order. */
  readonly callLog: GcpKmsCall[] = [];
  /** `127.0.0.1`. */
  readonly host = '127.0.0.1';
  port = 0;

  private readonly keys = new Map<string, KeyRecord>();
  private readonly byUid = new Map<string, { key: KeyRecord; version: VersionRecord }>();
  /* The application's own token first (what tokenFor() hands out); `test` also authenticates as it. */
  private readonly tokens = new Map<string, string>([
    [`ya29.emulated-${randomBytes(12).toString('hex')}`, APP_MEMBER],
    ['test', APP_MEMBER],
  ]);
  private readonly faultQueue: FaultSpec[] = [];
  private outage: Fault | null = null;
  private latencyMs = 0;
  private readonly sockets = new Set<Socket>();
  private readonly server: Server = createServer((req, res) => {
    this.handle(req, res).catch(() => res.destroy());
  });

  private constructor(
    readonly project: string,
    readonly location: string,
  ) {
    this.server.on('connection', (socket) => {
      this.sockets.add(socket);
      socket.on('close', () => this.sockets.delete(socket));
    });
  }

  /** @internal Use {@link startGcpKmsEmulator}. */
  static async start(project: string, location: string): Promise<GcpKmsEmulator> {
    const emulator = new GcpKmsEmulator(project, location);
    await new Promise<void>((resolve, reject) => {
      emulator.server.once('error', reject);
      emulator.server.listen(0, '127.0.0.1', resolve);
    });
    emulator.port = (emulator.server.address() as AddressInfo).port;
    return emulator;
  }

  /**
   * The endpoint options and an auth client that authenticates as `member` (default: the
   * application's service account): an `OAuth2Client` holding a fixed access token that never
   * expires and is never refreshed.
   */
  connection(member = APP_MEMBER): GcpKmsConnection {
    const authClient = new OAuth2Client();
    authClient.setCredentials({ access_token: this.tokenFor(member) });
    return { apiEndpoint: this.host, port: this.port, protocol: 'http', authClient };
  }

  /** The bearer token that authenticates as `member` (made on first use). */
  tokenFor(member: string): string {
    for (const [token, owner] of this.tokens) if (owner === member) return token;
    const token = `ya29.emulated-${randomBytes(12).toString('hex')}`;
    this.tokens.set(token, member);
    return token;
  }

  /** Every token {@link tokenFor} handed out (for tests that check none is ever printed). */
  issuedTokens(): string[] {
    return [...this.tokens.keys()].filter((token) => token !== 'test');
  }

  /** Stops the server, dropping open connections (hung requests included). */
  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => resolve());
      for (const socket of this.sockets) socket.destroy();
    });
  }

  /** Zeroes {@link calls} and {@link faults} in place and empties {@link callLog}. */
  resetCalls(): void {
    for (const counts of [this.calls, this.faults]) for (const op of OPERATIONS) counts[op] = 0;
    this.callLog.length = 0;
  }

  /** Creates a key ring's crypto key directly (no HTTP). */
  createKey(options: CreateCryptoKeyOptions = {}): EmulatedCryptoKey {
    const ring = options.keyRing ?? 'app';
    const id = options.id ?? `key-${randomBytes(4).toString('hex')}`;
    const name = `projects/${options.project ?? this.project}/locations/${this.location}/keyRings/${ring}/cryptoKeys/${id}`;
    if (!KEY_NAME.test(name)) throw new Error(`not a valid crypto key name: ${name}`);
    if (this.keys.has(name)) throw new Error(`${name} already exists`);
    const bindings = new Map<string, Set<string>>();
    const given = options.bindings ?? { [ENCRYPTER_DECRYPTER]: [APP_MEMBER], [VIEWER]: [APP_MEMBER] };
    for (const [role, members] of Object.entries(given)) bindings.set(role, new Set(members));
    bindings.set(
      'roles/cloudkms.admin',
      new Set([...(bindings.get('roles/cloudkms.admin') ?? []), ADMIN_MEMBER]),
    );
    const key: KeyRecord = {
      name,
      purpose: options.purpose ?? 'ENCRYPT_DECRYPT',
      versions: [],
      primary: undefined,
      bindings,
      createTime: new Date().toISOString(),
    };
    this.keys.set(name, key);
    for (let i = 0; i < (options.versions ?? 1); i++) this.addVersion(key, true);
    return this.describe(key);
  }

  /** Adds a version to a key and (for `ENCRYPT_DECRYPT`) makes it primary: the service's rotation. */
  rotate(keyName: string): string {
    return this.addVersion(this.key(keyName), true).name;
  }

  /** Sets a version's state directly (`ENABLED` ↔ `DISABLED`; `DESTROYED` drops its material for good). */
  setVersionState(versionName: string, state: VersionState): void {
    const { version } = this.version(versionName);
    if (state === 'DESTROYED') version.material?.fill(0);
    if (state === 'DESTROYED') version.material = undefined;
    version.state = state;
  }

  /** Makes a version the key's primary directly. */
  setPrimary(versionName: string): void {
    const { key, version } = this.version(versionName);
    key.primary = version;
  }

  /** Adds `member` to `role` on the key (IAM `setIamPolicy`); takes effect on the next request. */
  grant(keyName: string, member: string, role = ENCRYPTER_DECRYPTER): void {
    const key = this.key(keyName);
    key.bindings.set(role, new Set([...(key.bindings.get(role) ?? []), member]));
  }

  /** Removes `member` from `role` (every role when omitted): the customer revoking access. */
  revoke(keyName: string, member = APP_MEMBER, role?: string): void {
    const key = this.key(keyName);
    for (const [bound, members] of key.bindings)
      if (role === undefined || bound === role) members.delete(member);
  }

  /** A key as it stands: its name, versions and primary. */
  keyInfo(keyName: string): EmulatedCryptoKey {
    return this.describe(this.key(keyName));
  }

  /** The state of a version. */
  versionState(versionName: string): VersionState {
    return this.version(versionName).version.state;
  }

  /** The version that made `ciphertext` (as the service stores it), or undefined for bytes that are none of its ciphertexts. */
  versionOfCiphertext(ciphertext: Buffer): string | undefined {
    if (ciphertext[0] !== CIPHERTEXT_FORMAT || ciphertext.length < HEADER_BYTES) return undefined;
    return this.byUid.get(ciphertext.subarray(1, HEADER_BYTES).toString('hex'))?.version.name;
  }

  /** Makes the next `times` matching requests fail with `fault`; specs are used in order. */
  injectFaults(spec: FaultSpec): void {
    if (spec.times > 0) this.faultQueue.push({ ...spec });
  }

  /** Makes every request fail with `fault` until called with `null` (an outage, or an endpoint that hangs). */
  failAll(fault: Fault | null): void {
    this.outage = fault;
  }

  /** Delays every answer by `ms` (0: none). */
  setLatency(ms: number): void {
    this.latencyMs = Math.max(0, ms);
  }

  private describe(key: KeyRecord): EmulatedCryptoKey {
    return {
      name: key.name,
      versions: key.versions.map((v) => v.name),
      ...(key.primary ? { primary: key.primary.name } : {}),
    };
  }

  private addVersion(key: KeyRecord, makePrimary: boolean, state: VersionState = 'ENABLED'): VersionRecord {
    const id = key.versions.length + 1;
    const version: VersionRecord = {
      id,
      name: `${key.name}/cryptoKeyVersions/${id}`,
      state,
      material: randomBytes(32),
      uid: randomBytes(UID_BYTES),
      createTime: new Date().toISOString(),
    };
    key.versions.push(version);
    this.byUid.set(version.uid.toString('hex'), { key, version });
    if (makePrimary && key.purpose === 'ENCRYPT_DECRYPT') key.primary = version;
    return version;
  }

  private key(name: string): KeyRecord {
    return this.keys.get(name) ?? fail('NOT_FOUND', `CryptoKey ${name} not found.`);
  }

  private version(name: string): { key: KeyRecord; version: VersionRecord } {
    const match = /^(.*)\/cryptoKeyVersions\/(\d+)$/.exec(name);
    const key = match ? this.keys.get(match[1] as string) : undefined;
    const version = key?.versions.find((v) => v.id === Number(match?.[2]));
    return key && version ? { key, version } : fail('NOT_FOUND', `CryptoKeyVersion ${name} not found.`);
  }

  /** The key a request names (a version's key for version names), after the caller's permission on it. */
  private authorized(name: string, permission: string, principal: string): KeyRecord {
    const keyName = name.replace(/\/cryptoKeyVersions\/[^/]+$/, '');
    const key = this.keys.get(keyName);
    const allowed =
      key !== undefined &&
      [...key.bindings].some(
        ([role, members]) => members.has(principal) && ROLE_PERMISSIONS[role]?.includes(permission),
      );
    if (!allowed) {
      if (key === undefined && !KEY_NAME.test(keyName))
        fail('INVALID_ARGUMENT', `Resource name ${name} is invalid.`);
      if (key === undefined) fail('NOT_FOUND', `CryptoKey ${keyName} not found.`);
      fail(
        'PERMISSION_DENIED',
        `Permission '${permission}' denied on resource '${name}' (or it may not exist).`,
      );
    }
    return key;
  }

  private usable(version: VersionRecord): Buffer {
    if (version.state !== 'ENABLED' || !version.material) {
      fail(
        'FAILED_PRECONDITION',
        `The request cannot be fulfilled. Resource ${version.name} has value ${version.state} in field crypto_key_version.state.`,
      );
    }
    return version.material;
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const raw = await readBody(req);
    const url = new URL(req.url ?? '/', 'http://127.0.0.1');
    const matched = route(req.method ?? '', url.pathname);
    const call: GcpKmsCall = {
      operation: matched?.operation ?? 'Unknown',
      name: matched?.name ?? url.pathname,
    };
    this.callLog.push(call);
    const numericEnums = url.searchParams.get('$alt') === 'json;enum-encoding=int';
    let status = 200;
    let payload: object;
    try {
      payload = this.dispatch(req, raw, url, matched, call, numericEnums);
    } catch (error) {
      if (error === HANG) return; // read, never answered
      const known =
        error instanceof ApiError ? error : new ApiError(500, 'INTERNAL', 'Internal error encountered.');
      status = known.httpStatus;
      call.error = known.status;
      payload = { error: { code: known.httpStatus, message: known.message, status: known.status } };
    }
    call.status = status;
    if (this.latencyMs > 0) await new Promise((resolve) => setTimeout(resolve, this.latencyMs));
    const text = JSON.stringify(payload);
    res.writeHead(status, {
      'Content-Type': 'application/json; charset=UTF-8',
      'Content-Length': Buffer.byteLength(text),
    });
    res.end(text);
  }

  private dispatch(
    req: IncomingMessage,
    raw: string,
    url: URL,
    matched: Route | undefined,
    call: GcpKmsCall,
    numericEnums: boolean,
  ): object {
    if (!matched) fail('NOT_FOUND', `The requested URL ${url.pathname} was not found on this server.`);
    const { operation, name } = matched;
    this.calls[operation] += 1;
    const authorization = String(req.headers.authorization ?? '');
    const principal = /^Bearer (.+)$/.exec(authorization)?.[1];
    const member = principal === undefined ? undefined : this.tokens.get(principal);
    if (member) call.principal = member;
    const fault = this.takeFault(operation);
    if (fault && fault !== 'corrupt-request' && fault !== 'corrupt-response') {
      this.faults[operation] += 1;
      if (fault === 'hang') throw HANG;
      fail(fault, `Injected ${fault} (gcp-kms-emulator).`);
    }
    if (!authorization) fail('UNAUTHENTICATED', 'Request is missing required authentication credential.');
    if (!member) fail('UNAUTHENTICATED', 'Request had invalid authentication credentials.');
    let body: Body = {};
    try {
      /* The client sends an empty message (a new version with no fields) as the JSON string "". */
      const parsed: unknown = raw.trim() === '' || raw.trim() === '""' ? {} : JSON.parse(raw);
      if (!parsed || typeof parsed !== 'object' || Array.isArray(parsed)) throw new Error('not an object');
      body = parsed as Body;
    } catch {
      fail('INVALID_ARGUMENT', 'Invalid JSON payload received.');
    }
    if (fault) this.faults[operation] += 1;
    switch (operation) {
      case 'Encrypt':
        return this.encrypt(name, body, member, call, fault);
      case 'Decrypt':
        return this.decrypt(name, body, member, call, fault);
      case 'GetCryptoKey': {
        const key = this.authorized(name, 'cloudkms.cryptoKeys.get', member);
        return this.keyJson(key, numericEnums);
      }
      case 'GetCryptoKeyVersion': {
        this.authorized(name, 'cloudkms.cryptoKeyVersions.get', member);
        return this.versionJson(this.version(name).key, this.version(name).version, numericEnums);
      }
      case 'CreateCryptoKeyVersion': {
        const key = this.authorized(name, 'cloudkms.cryptoKeyVersions.create', member);
        /* As the service: a new version of a symmetric key is not made primary by creating it. */
        return this.versionJson(key, this.addVersion(key, false), numericEnums);
      }
      case 'UpdateCryptoKeyPrimaryVersion': {
        const key = this.authorized(name, 'cloudkms.cryptoKeys.update', member);
        const id = String(body.cryptoKeyVersionId ?? '');
        const version = key.versions.find((v) => String(v.id) === id);
        if (!version) fail('NOT_FOUND', `CryptoKeyVersion ${name}/cryptoKeyVersions/${id} not found.`);
        if (key.purpose !== 'ENCRYPT_DECRYPT')
          fail('FAILED_PRECONDITION', 'Only ENCRYPT_DECRYPT keys have a primary version.');
        this.usable(version);
        key.primary = version;
        return this.keyJson(key, numericEnums);
      }
      case 'UpdateCryptoKeyVersion': {
        const key = this.authorized(name, 'cloudkms.cryptoKeyVersions.update', member);
        const { version } = this.version(name);
        if (url.searchParams.get('updateMask') !== 'state')
          fail('INVALID_ARGUMENT', 'updateMask must be "state".');
        const wanted = stateName(body.state);
        if (wanted !== 'ENABLED' && wanted !== 'DISABLED')
          fail('INVALID_ARGUMENT', `Cannot set state ${String(body.state)}.`);
        if (version.state !== 'ENABLED' && version.state !== 'DISABLED') {
          fail(
            'FAILED_PRECONDITION',
            `The request cannot be fulfilled. Resource ${version.name} has value ${version.state} in field crypto_key_version.state.`,
          );
        }
        version.state = wanted;
        return this.versionJson(key, version, numericEnums);
      }
      case 'DestroyCryptoKeyVersion': {
        const key = this.authorized(name, 'cloudkms.cryptoKeyVersions.destroy', member);
        const { version } = this.version(name);
        if (version.state !== 'ENABLED' && version.state !== 'DISABLED') {
          fail(
            'FAILED_PRECONDITION',
            `The request cannot be fulfilled. Resource ${version.name} has value ${version.state} in field crypto_key_version.state.`,
          );
        }
        version.state = 'DESTROY_SCHEDULED';
        return this.versionJson(key, version, numericEnums);
      }
    }
  }

  private encrypt(
    name: string,
    body: Body,
    member: string,
    call: GcpKmsCall,
    fault: Fault | undefined,
  ): object {
    const key = this.authorized(name, 'cloudkms.cryptoKeyVersions.useToEncrypt', member);
    if (key.purpose !== 'ENCRYPT_DECRYPT') {
      fail('FAILED_PRECONDITION', `Operation not supported for CryptoKey purpose ${key.purpose}.`);
    }
    const version = name === key.name ? key.primary : this.version(name).version;
    if (!version) fail('FAILED_PRECONDITION', `CryptoKey ${key.name} has no primary version.`);
    let plaintext = bytes(body, 'plaintext', true) as Buffer;
    const aad = bytes(body, 'additionalAuthenticatedData', false);
    call.aad = aad?.toString('utf8') ?? '';
    call.checksummed = withChecksums(body, ['plaintext', 'additionalAuthenticatedData']);
    if (fault === 'corrupt-request') plaintext = flipBit(plaintext);
    const verifiedPlaintext = checkSum(
      plaintext,
      checksum(body, 'plaintextCrc32c'),
      'plaintext',
      'plaintext_crc32c',
    );
    const verifiedAad = checkSum(
      aad,
      checksum(body, 'additionalAuthenticatedDataCrc32c'),
      'additional_authenticated_data',
      'additional_authenticated_data_crc32c',
    );
    const material = this.usable(version);
    const header = Buffer.concat([Buffer.of(CIPHERTEXT_FORMAT), version.uid]);
    const iv = randomBytes(IV_BYTES);
    const cipher = createCipheriv('aes-256-gcm', material, iv);
    cipher.setAAD(Buffer.concat([header, aad ?? Buffer.alloc(0)]));
    const sealed = Buffer.concat([cipher.update(plaintext), cipher.final()]);
    const ciphertext = Buffer.concat([header, iv, cipher.getAuthTag(), sealed]);
    call.version = version.name;
    return {
      name: version.name,
      ciphertext: (fault === 'corrupt-response' ? flipBit(ciphertext) : ciphertext).toString('base64'),
      ciphertextCrc32c: String(crc32c(ciphertext)),
      verifiedPlaintextCrc32c: verifiedPlaintext,
      verifiedAdditionalAuthenticatedDataCrc32c: verifiedAad,
      protectionLevel: PROTECTION_SOFTWARE,
    };
  }

  private decrypt(
    name: string,
    body: Body,
    member: string,
    call: GcpKmsCall,
    fault: Fault | undefined,
  ): object {
    const key = this.authorized(name, 'cloudkms.cryptoKeyVersions.useToDecrypt', member);
    if (name !== key.name)
      fail('INVALID_ARGUMENT', 'Decrypt takes a CryptoKey name, not a CryptoKeyVersion name.');
    if (key.purpose !== 'ENCRYPT_DECRYPT') {
      fail('FAILED_PRECONDITION', `Operation not supported for CryptoKey purpose ${key.purpose}.`);
    }
    let ciphertext = bytes(body, 'ciphertext', true) as Buffer;
    const aad = bytes(body, 'additionalAuthenticatedData', false);
    call.aad = aad?.toString('utf8') ?? '';
    call.checksummed = withChecksums(body, ['ciphertext', 'additionalAuthenticatedData']);
    if (fault === 'corrupt-request') ciphertext = flipBit(ciphertext);
    checkSum(ciphertext, checksum(body, 'ciphertextCrc32c'), 'ciphertext', 'ciphertext_crc32c');
    checkSum(
      aad,
      checksum(body, 'additionalAuthenticatedDataCrc32c'),
      'additional_authenticated_data',
      'additional_authenticated_data_crc32c',
    );
    const invalid = () => fail('INVALID_ARGUMENT', 'Decryption failed: the ciphertext is invalid.');
    if (ciphertext.length < HEADER_BYTES + IV_BYTES + TAG_BYTES || ciphertext[0] !== CIPHERTEXT_FORMAT)
      invalid();
    const found = this.byUid.get(ciphertext.subarray(1, HEADER_BYTES).toString('hex'));
    /* A ciphertext of another key is, to this key, just an invalid one. */
    if (!found || found.key !== key) return invalid();
    const material = this.usable(found.version);
    let plaintext: Buffer;
    try {
      const ivEnd = HEADER_BYTES + IV_BYTES;
      const decipher = createDecipheriv('aes-256-gcm', material, ciphertext.subarray(HEADER_BYTES, ivEnd));
      decipher.setAAD(Buffer.concat([ciphertext.subarray(0, HEADER_BYTES), aad ?? Buffer.alloc(0)]));
      decipher.setAuthTag(ciphertext.subarray(ivEnd, ivEnd + TAG_BYTES));
      plaintext = Buffer.concat([decipher.update(ciphertext.subarray(ivEnd + TAG_BYTES)), decipher.final()]);
    } catch {
      return invalid();
    }
    call.version = found.version.name;
    const sum = crc32c(plaintext);
    return {
      plaintext: (fault === 'corrupt-response' ? flipBit(plaintext) : plaintext).toString('base64'),
      plaintextCrc32c: String(sum),
      usedPrimary: key.primary === found.version,
      protectionLevel: PROTECTION_SOFTWARE,
    };
  }

  private keyJson(key: KeyRecord, numeric: boolean): object {
    return {
      name: key.name,
      ...(key.primary ? { primary: this.versionJson(key, key.primary, numeric) } : {}),
      purpose: enumValue(numeric, key.purpose, PURPOSES[key.purpose]),
      createTime: key.createTime,
      versionTemplate: {
        protectionLevel: enumValue(numeric, 'SOFTWARE', PROTECTION_SOFTWARE),
        algorithm: enumValue(numeric, ALGORITHMS[key.purpose].name, ALGORITHMS[key.purpose].value),
      },
      destroyScheduledDuration: '2592000s',
    };
  }

  private versionJson(key: KeyRecord, version: VersionRecord, numeric: boolean): object {
    return {
      name: version.name,
      state: enumValue(numeric, version.state, STATES[version.state]),
      protectionLevel: enumValue(numeric, 'SOFTWARE', PROTECTION_SOFTWARE),
      algorithm: enumValue(numeric, ALGORITHMS[key.purpose].name, ALGORITHMS[key.purpose].value),
      createTime: version.createTime,
      ...(version.state === 'ENABLED' || version.state === 'DISABLED'
        ? { generateTime: version.createTime }
        : {}),
    };
  }

  private takeFault(operation: Operation): Fault | undefined {
    if (this.outage) return this.outage;
    const index = this.faultQueue.findIndex((f) => !f.operation || f.operation === operation);
    if (index < 0) return undefined;
    const spec = this.faultQueue[index] as FaultSpec;
    if (--spec.times <= 0) this.faultQueue.splice(index, 1);
    return spec.fault;
  }
}

/** An enum value as the request asked for it (`enum-encoding=int`: its number; else its name). */
function enumValue(numeric: boolean, name: string, value: number): number | string {
  return numeric ? value : name;
}

function stateName(value: unknown): VersionState | undefined {
  if (typeof value === 'string' && value in STATES) return value as VersionState;
  return (Object.entries(STATES).find(([, n]) => n === value)?.[0] as VersionState | undefined) ?? undefined;
}

/** Thrown by a handler to leave the request unanswered. */
const HANG = Symbol('hang');

/** Starts a Google Cloud KMS emulator on 127.0.0.1 (random port). Call {@link GcpKmsEmulator.close} when done. */
export async function startGcpKmsEmulator(
  options: { project?: string; location?: string } = {},
): Promise<GcpKmsEmulator> {
  return GcpKmsEmulator.start(options.project ?? 'typeorm-envelope-test', options.location ?? 'global');
}
