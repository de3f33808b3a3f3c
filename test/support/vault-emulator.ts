import {
  type CipherGCM,
  createCipheriv,
  createDecipheriv,
  type DecipherGCM,
  hkdfSync,
  randomBytes,
  randomUUID,
} from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';

/**
 * In-process HashiCorp Vault / OpenBao emulator: the Transit secrets engine, AppRole login and
 * token renewal, over Vault's HTTP API (`/v1/...`, `X-Vault-Token`, `X-Vault-Namespace`,
 * `{ data: … }` and `{ auth: … }` envelopes, `{ errors: [...] }` bodies). Tokens carry policies
 * that are enforced on every request; policies can be replaced or deleted (revocation) at any time.
 *
 * Transit keys are versioned (`rotate`, `min_decryption_version`), derived keys derive one key per
 * `context` with HKDF-SHA256 as Vault's `hkdf_sha256` KDF does, and ciphertexts are
 * `vault:v<N>:base64(nonce ‖ ciphertext ‖ tag)`, as Vault writes them.
 *
 * Simplifications: the capabilities of every policy rule matching a path are united (`deny`
 * wins), where Vault picks the most specific rule; tokens and policies live in one namespace
 * each; no batch input, no convergent encryption, no signing keys (other key types exist as
 * metadata, to be refused).
 */

/** A clock, so token TTLs can expire without waiting. */
export interface VaultClock {
  now(): number;
}

/** Options of {@link startVaultEmulator}. */
export interface VaultEmulatorOptions {
  /** The clock token TTLs are measured with. Default `Date`. */
  clock?: VaultClock;
}

/** Transit key types the emulator knows. Only the AEAD ones encrypt. */
export type TransitKeyType =
  | 'aes256-gcm96'
  | 'aes128-gcm96'
  | 'chacha20-poly1305'
  | 'rsa-2048'
  | 'rsa-4096'
  | 'ed25519'
  | 'hmac';

/** Options of {@link VaultEmulator.createKey}, as `vault write transit/keys/<name>` takes them. */
export interface CreateTransitKeyOptions {
  /** Default `aes256-gcm96`. */
  type?: TransitKeyType;
  /** Default `true`: every operation needs a `context`, from which the key is derived. */
  derived?: boolean;
  /** Default `false`. */
  exportable?: boolean;
  /** Default `false`. */
  allowPlaintextBackup?: boolean;
  /** Default `transit`. */
  mount?: string;
  /** Default: the root namespace. */
  namespace?: string;
}

/** Where a key lives. */
export interface TransitKeyLocation {
  mount?: string;
  namespace?: string;
}

/** What `GET /v1/<mount>/keys/<name>` answers in `data`. */
export interface TransitKeyInfo {
  name: string;
  type: string;
  derived: boolean;
  exportable: boolean;
  allow_plaintext_backup: boolean;
  deletion_allowed: boolean;
  latest_version: number;
  min_decryption_version: number;
  min_encryption_version: number;
  min_available_version: number;
  supports_encryption: boolean;
  supports_decryption: boolean;
  supports_derivation: boolean;
  supports_signing: boolean;
  auto_rotate_period: number;
  imported_key: boolean;
  keys: Record<string, number>;
  kdf?: string;
  convergent_encryption?: boolean;
}

/** A Vault capability. */
export type VaultCapability = 'create' | 'read' | 'update' | 'delete' | 'list' | 'sudo' | 'deny';

/** One `path "<glob>" { capabilities = [...] }` rule of a policy. */
export interface VaultPolicyRule {
  /** A path relative to the namespace; `+` matches one segment, a final `*` any suffix. */
  path: string;
  capabilities: VaultCapability[];
}

/** Options of {@link VaultEmulator.createToken}. */
export interface CreateTokenOptions {
  /** Policy names (`root` allows everything). */
  policies: string[];
  /** Time to live in seconds. Default: none (never expires). */
  ttl?: number;
  /** Upper bound of renewals, in seconds from creation. Default: `ttl` renewals are unbounded. */
  maxTtl?: number;
  /** Default `true` when the token has a TTL. */
  renewable?: boolean;
  /** The namespace the token belongs to. Default: the root namespace. */
  namespace?: string;
  /** A name recorded in the call log. */
  displayName?: string;
}

/** Options of {@link VaultEmulator.createAppRole}. */
export interface CreateAppRoleOptions {
  /** The policies of the tokens a login issues. */
  policies: string[];
  /** Token TTL in seconds. Default 3,600. */
  tokenTtl?: number;
  /** Token max TTL in seconds (bounds renewals). Default 86,400. */
  tokenMaxTtl?: number;
  /** The AppRole auth mount. Default `approle`. */
  mount?: string;
  namespace?: string;
}

/** The credentials of an AppRole. */
export interface AppRoleCredentials {
  roleId: string;
  secretId: string;
}

/** What a request did, in arrival order. */
export type VaultOperation =
  | 'datakey'
  | 'encrypt'
  | 'decrypt'
  | 'rewrap'
  | 'readKey'
  | 'createKey'
  | 'rotate'
  | 'config'
  | 'login'
  | 'renewSelf'
  | 'lookupSelf'
  | 'unknown';

const OPERATIONS: readonly VaultOperation[] = [
  'datakey',
  'encrypt',
  'decrypt',
  'rewrap',
  'readKey',
  'createKey',
  'rotate',
  'config',
  'login',
  'renewSelf',
  'lookupSelf',
  'unknown',
];

/** One request seen by the emulator. */
export interface VaultCall {
  operation: VaultOperation;
  method: string;
  /** The logical path (after `/v1/`), without the namespace. */
  path: string;
  /** `X-Vault-Namespace`, if any. */
  namespace?: string;
  /** The Transit key named by the path. */
  keyName?: string;
  /** The derivation context as sent, parsed back from the canonical form (`[[k, v], …]` JSON). */
  context?: Record<string, string>;
  /** The raw derivation context (base64), when it is not in the canonical form. */
  rawContext?: string;
  /** Key version of the ciphertext sent (decrypt, rewrap). */
  ciphertextVersion?: number;
  /** Key version the answer was sealed with (datakey, encrypt, rewrap). */
  keyVersion?: number;
  /** The accessor of the token that made the call (never the token), if it was a known token. */
  accessor?: string;
  /** The token's display name. */
  displayName?: string;
  /** HTTP status answered; undefined while the request is unanswered (hanging). */
  status?: number;
  /** The first error message answered, if any. */
  error?: string;
}

/** Faults to inject: what Vault answers when it refuses or fails. */
export type VaultFault = 'forbidden' | 'throttled' | 'internal' | 'sealed';

/** The next `times` calls (of `operation`, or of any) fail with `fault`. */
export interface VaultFaultSpec {
  operation?: VaultOperation;
  fault: VaultFault;
  times: number;
}

const FAULT_RESPONSES: Record<VaultFault, { status: number; error: string }> = {
  forbidden: { status: 403, error: '1 error occurred:\n\t* permission denied\n\n' },
  throttled: { status: 429, error: 'request path "{path}": rate limit quota exceeded' },
  internal: { status: 500, error: 'internal error' },
  sealed: { status: 503, error: 'Vault is sealed' },
};

const AEAD_TYPES = new Set<string>(['aes256-gcm96', 'aes128-gcm96', 'chacha20-poly1305']);
const NONCE_BYTES = 12;
const TAG_BYTES = 16;
const CIPHERTEXT = /^vault:v(\d+):(.*)$/s;
const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;

interface TransitKey {
  name: string;
  type: TransitKeyType;
  derived: boolean;
  exportable: boolean;
  allowPlaintextBackup: boolean;
  /** Material per version (index 0 = version 1). */
  versions: Buffer[];
  created: number[];
  minDecryptionVersion: number;
}

interface TokenRecord {
  accessor: string;
  policies: string[];
  namespace: string;
  displayName: string;
  renewable: boolean;
  /** Milliseconds; undefined: never expires. */
  expiresAt?: number;
  /** Bound on renewals, milliseconds. */
  maxExpiresAt?: number;
  /** Seconds a renewal grants. */
  ttl?: number;
}

interface AppRole {
  name: string;
  roleId: string;
  secretIds: Set<string>;
  policies: string[];
  tokenTtl: number;
  tokenMaxTtl: number;
  namespace: string;
  mount: string;
}

/** A Vault error response. */
class VaultHttpError extends Error {
  constructor(
    readonly status: number,
    readonly errors: string[],
  ) {
    super(errors[0] ?? `HTTP ${status}`);
  }
}

const fail = (status: number, ...errors: string[]): never => {
  throw new VaultHttpError(status, errors);
};
const userError = (message: string): never => fail(400, message);
const trimSlashes = (path: string): string => path.replace(/^\/+|\/+$/g, '');
const keyId = (namespace: string, mount: string, name: string) => `${namespace}\0${mount}\0${name}`;

function globToRegExp(glob: string): RegExp {
  const prefix = glob.endsWith('*');
  const body = (prefix ? glob.slice(0, -1) : glob)
    .split('+')
    .map((part) => part.replace(/[.*?^${}()|[\]\\]/g, '\\$&'))
    .join('[^/]+');
  return new RegExp(`^${body}${prefix ? '.*' : ''}$`);
}

/**
 * Parses the subset of HCL Vault policies are written in: `path "<glob>" { capabilities = [..] }`
 * blocks, `#` comments. Anything else is refused, so a policy in the docs that the emulator cannot
 * read fails loudly.
 */
export function parseVaultPolicy(hcl: string): VaultPolicyRule[] {
  const text = hcl.replace(/#[^\n]*/g, '').trim();
  const block = /path\s+"([^"]+)"\s*\{\s*capabilities\s*=\s*\[([^\]]*)\]\s*\}/gy;
  const rules: VaultPolicyRule[] = [];
  let rest = text;
  while (rest.length > 0) {
    block.lastIndex = 0;
    const match = block.exec(rest);
    if (!match) throw new Error(`cannot parse the policy near: ${rest.slice(0, 60)}`);
    const capabilities = [...(match[2] ?? '').matchAll(/"([a-z]+)"/g)].map((m) => m[1] as VaultCapability);
    rules.push({ path: match[1] as string, capabilities });
    rest = rest.slice(match[0].length).trim();
  }
  return rules;
}

/**
 * A Vault server on 127.0.0.1. Create it with {@link startVaultEmulator}; `address` is its
 * `VAULT_ADDR` and `rootToken` a token with the `root` policy.
 */
export class VaultEmulator {
  /** `http://127.0.0.1:PORT`. */
  address = '';
  /** A token with the `root` policy (allowed everything), for setting up. */
  readonly rootToken = `hvs.root-${randomBytes(12).toString('hex')}`;
  /** Requests per operation (fault-injected and refused ones included). */
  readonly calls: Record<VaultOperation, number> = Object.fromEntries(
    OPERATIONS.map((o) => [o, 0]),
  ) as Record<VaultOperation, number>;
  /** Fault-injected responses per operation. */
  readonly faults: Record<VaultOperation, number> = Object.fromEntries(
    OPERATIONS.map((o) => [o, 0]),
  ) as Record<VaultOperation, number>;
  /** Every request, in arrival order. */
  readonly callLog: VaultCall[] = [];

  private readonly keys = new Map<string, TransitKey>();
  private readonly mounts = new Set<string>([keyId('', 'transit', '')]);
  private readonly tokens = new Map<string, TokenRecord>();
  private readonly policies = new Map<string, VaultPolicyRule[]>();
  private readonly appRoles = new Map<string, AppRole>();
  private readonly faultQueue: VaultFaultSpec[] = [];
  private outage: VaultFault | null = null;
  private latencyMs = 0;
  private hanging = false;
  private readonly sockets = new Set<Socket>();
  private readonly server: Server = createServer((req, res) => {
    this.handle(req, res).catch(() => res.destroy());
  });

  private constructor(private readonly clock: VaultClock) {
    this.tokens.set(this.rootToken, {
      accessor: 'root-accessor',
      policies: ['root'],
      namespace: '',
      displayName: 'root',
      renewable: false,
    });
  }

  /** @internal Use {@link startVaultEmulator}. */
  static async start(options: VaultEmulatorOptions = {}): Promise<VaultEmulator> {
    const emulator = new VaultEmulator(options.clock ?? Date);
    emulator.server.on('connection', (socket) => {
      emulator.sockets.add(socket);
      socket.on('close', () => emulator.sockets.delete(socket));
    });
    await new Promise<void>((resolve, reject) => {
      emulator.server.once('error', reject);
      emulator.server.listen(0, '127.0.0.1', resolve);
    });
    emulator.address = `http://127.0.0.1:${(emulator.server.address() as AddressInfo).port}`;
    return emulator;
  }

  /** Stops the server and drops every connection (hanging requests included). */
  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
      for (const socket of this.sockets) socket.destroy();
    });
  }

  /** Zeroes {@link calls} and {@link faults} (in place) and empties {@link callLog}. */
  resetCalls(): void {
    for (const counts of [this.calls, this.faults]) for (const op of OPERATIONS) counts[op] = 0;
    this.callLog.length = 0;
  }

  /** Enables a Transit secrets engine at `mount` (`transit` exists from the start). */
  enableTransit(mount: string, namespace = ''): void {
    this.mounts.add(keyId(trimSlashes(namespace), trimSlashes(mount), ''));
  }

  /** Creates a Transit key (version 1), as `vault write <mount>/keys/<name> type=… derived=…`. */
  createKey(name: string, options: CreateTransitKeyOptions = {}): TransitKeyInfo {
    const namespace = trimSlashes(options.namespace ?? '');
    const mount = trimSlashes(options.mount ?? 'transit');
    if (!this.mounts.has(keyId(namespace, mount, ''))) throw new Error(`no Transit mount ${mount}`);
    const id = keyId(namespace, mount, name);
    if (this.keys.has(id)) throw new Error(`key ${name} exists`);
    const type = options.type ?? 'aes256-gcm96';
    const key: TransitKey = {
      name,
      type,
      derived: options.derived ?? true,
      exportable: options.exportable ?? false,
      allowPlaintextBackup: options.allowPlaintextBackup ?? false,
      versions: [],
      created: [],
      minDecryptionVersion: 1,
    };
    this.keys.set(id, key);
    this.addVersion(key);
    return this.info(key);
  }

  /** `vault write -f <mount>/keys/<name>/rotate`: a new latest version; older ones still decrypt. */
  rotateKey(name: string, where: TransitKeyLocation = {}): TransitKeyInfo {
    const key = this.key(name, where);
    this.addVersion(key);
    return this.info(key);
  }

  /** `vault write <mount>/keys/<name>/config min_decryption_version=N`. */
  setMinDecryptionVersion(name: string, version: number, where: TransitKeyLocation = {}): TransitKeyInfo {
    const key = this.key(name, where);
    if (!Number.isInteger(version) || version < 1 || version > key.versions.length) {
      throw new Error(`min_decryption_version must be 1..${key.versions.length}`);
    }
    key.minDecryptionVersion = version;
    return this.info(key);
  }

  /** Deletes a key (as `deletion_allowed=true` then `vault delete <mount>/keys/<name>`). */
  deleteKey(name: string, where: TransitKeyLocation = {}): void {
    this.key(name, where);
    this.keys.delete(keyId(trimSlashes(where.namespace ?? ''), trimSlashes(where.mount ?? 'transit'), name));
  }

  /** What `GET <mount>/keys/<name>` answers. */
  keyInfo(name: string, where: TransitKeyLocation = {}): TransitKeyInfo {
    return this.info(this.key(name, where));
  }

  /**
   * Writes a policy (`vault policy write`), as rules or as HCL text; takes effect on the next
   * request of every token that has it.
   */
  setPolicy(name: string, rules: VaultPolicyRule[] | string): void {
    if (name === 'root') throw new Error('the root policy cannot be changed');
    this.policies.set(name, typeof rules === 'string' ? parseVaultPolicy(rules) : structuredClone(rules));
  }

  /** Deletes a policy (`vault policy delete`): tokens that had it lose what it allowed, at once. */
  deletePolicy(name: string): void {
    this.policies.delete(name);
  }

  /** A new token (`vault token create -policy=… -ttl=…`); returns the token. */
  createToken(options: CreateTokenOptions): string {
    const token = `hvs.${randomBytes(18).toString('base64url')}`;
    const now = this.clock.now();
    this.tokens.set(token, {
      accessor: randomUUID(),
      policies: [...options.policies],
      namespace: trimSlashes(options.namespace ?? ''),
      displayName: options.displayName ?? 'token',
      renewable: options.renewable ?? options.ttl !== undefined,
      ...(options.ttl !== undefined ? { expiresAt: now + options.ttl * 1000, ttl: options.ttl } : {}),
      ...(options.maxTtl !== undefined ? { maxExpiresAt: now + options.maxTtl * 1000 } : {}),
    });
    return token;
  }

  /** Revokes a token (`vault token revoke`): it is refused from the next request on. */
  revokeToken(token: string): void {
    this.tokens.delete(token);
  }

  /** The accessor of a token (what the call log names), or undefined if it is unknown. */
  accessorOf(token: string): string | undefined {
    return this.tokens.get(token)?.accessor;
  }

  /** Every token the emulator issued or knows (the root token included): what no output may show. */
  issuedTokens(): string[] {
    return [...this.tokens.keys()];
  }

  /** Creates an AppRole and one secret id for it (`vault write auth/approle/role/<name> …`). */
  createAppRole(name: string, options: CreateAppRoleOptions): AppRoleCredentials {
    const role: AppRole = {
      name,
      roleId: randomUUID(),
      secretIds: new Set([randomUUID()]),
      policies: [...options.policies],
      tokenTtl: options.tokenTtl ?? 3_600,
      tokenMaxTtl: options.tokenMaxTtl ?? 86_400,
      namespace: trimSlashes(options.namespace ?? ''),
      mount: trimSlashes(options.mount ?? 'approle'),
    };
    this.appRoles.set(role.roleId, role);
    return { roleId: role.roleId, secretId: [...role.secretIds][0] as string };
  }

  /** Revokes every secret id of a role: new logins fail; tokens already issued keep working. */
  revokeSecretIds(roleId: string): void {
    this.appRoles.get(roleId)?.secretIds.clear();
  }

  /** Makes the next `times` matching calls fail with `fault`; queued specs are used in order. */
  injectFaults(spec: VaultFaultSpec): void {
    if (spec.times > 0) this.faultQueue.push({ ...spec });
  }

  /** Makes every call fail with `fault` until called with `null` (an outage, or a sealed Vault). */
  failAll(fault: VaultFault | null): void {
    this.outage = fault;
  }

  /** Delays every response by `ms` milliseconds (0: none). */
  setLatency(ms: number): void {
    this.latencyMs = Math.max(0, ms);
  }

  /** While true, requests are read and never answered (the connection stays open). */
  setHanging(hanging: boolean): void {
    this.hanging = hanging;
  }

  private key(name: string, where: TransitKeyLocation): TransitKey {
    const id = keyId(trimSlashes(where.namespace ?? ''), trimSlashes(where.mount ?? 'transit'), name);
    const key = this.keys.get(id);
    if (!key) throw new Error(`no key ${name}`);
    return key;
  }

  private addVersion(key: TransitKey): void {
    const bytes = key.type === 'aes128-gcm96' ? 16 : 32;
    key.versions.push(randomBytes(bytes));
    key.created.push(Math.floor(this.clock.now() / 1000));
  }

  private info(key: TransitKey): TransitKeyInfo {
    const aead = AEAD_TYPES.has(key.type);
    return {
      name: key.name,
      type: key.type,
      derived: key.derived,
      exportable: key.exportable,
      allow_plaintext_backup: key.allowPlaintextBackup,
      deletion_allowed: false,
      latest_version: key.versions.length,
      min_decryption_version: key.minDecryptionVersion,
      min_encryption_version: 0,
      min_available_version: 0,
      supports_encryption: aead || key.type.startsWith('rsa'),
      supports_decryption: aead || key.type.startsWith('rsa'),
      supports_derivation: aead || key.type === 'ed25519',
      supports_signing: !aead && key.type !== 'hmac',
      auto_rotate_period: 0,
      imported_key: false,
      keys: Object.fromEntries(
        key.created.map((t, i) => [String(i + 1), t]).filter(([v]) => Number(v) >= key.minDecryptionVersion),
      ),
      ...(key.derived ? { kdf: 'hkdf_sha256', convergent_encryption: false } : {}),
    };
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const raw = await readBody(req);
    const call: VaultCall = { operation: 'unknown', method: req.method ?? 'GET', path: '' };
    this.callLog.push(call);
    let status = 200;
    let payload: object | undefined;
    try {
      payload = this.dispatch(req, raw, call);
      if (payload === undefined) status = 204;
    } catch (error) {
      const known = error instanceof VaultHttpError;
      status = known ? error.status : 500;
      payload = { errors: known ? error.errors : ['internal error'] };
      call.error = known ? error.errors[0] : 'internal error';
    }
    if (this.hanging) return; // read, never answered; close() drops the connection
    if (this.latencyMs > 0) await new Promise((resolve) => setTimeout(resolve, this.latencyMs));
    call.status = status;
    if (payload === undefined) {
      res.writeHead(204).end();
      return;
    }
    const text = JSON.stringify(payload);
    res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text) });
    res.end(text);
  }

  private dispatch(req: IncomingMessage, raw: string, call: VaultCall): object | undefined {
    const url = new URL(req.url ?? '/', 'http://vault');
    if (!url.pathname.startsWith('/v1/')) fail(404, 'not found');
    const namespace = trimSlashes(String(req.headers['x-vault-namespace'] ?? ''));
    const path = trimSlashes(decodeURIComponent(url.pathname.slice('/v1/'.length)));
    call.path = path;
    if (namespace) call.namespace = namespace;
    const route = this.route(req.method ?? 'GET', path, namespace);
    call.operation = route.operation;
    if (route.keyName) call.keyName = route.keyName;
    this.calls[route.operation] += 1;
    const body = parseBody(raw);
    describeBody(call, body);
    const fault = this.takeFault(route.operation);
    if (fault) {
      this.faults[route.operation] += 1;
      const { status, error } = FAULT_RESPONSES[fault];
      fail(status, error.replace('{path}', path));
    }
    if (route.operation === 'login') return this.login(path, namespace, body);
    const token = String(req.headers['x-vault-token'] ?? '');
    const record = this.authenticate(token, namespace);
    call.accessor = record.accessor;
    call.displayName = record.displayName;
    if (route.operation === 'renewSelf') return this.renewSelf(record, body);
    if (route.operation === 'lookupSelf') return { data: this.lookup(record) };
    if (route.operation === 'unknown') {
      this.authorize(record, path, route.capability);
      return fail(404, `no handler for route "${path}". route entry not found.`);
    }
    const existing = this.keys.get(keyId(namespace, route.mount, route.keyName ?? ''));
    /* As Vault's existence check: writing to a key that does not exist is a create. */
    const capability =
      route.capability === 'update' &&
      !existing &&
      (route.operation === 'encrypt' || route.operation === 'createKey')
        ? 'create'
        : route.capability;
    this.authorize(record, path, capability);
    return this.transit(route, namespace, existing, body, call);
  }

  private route(
    method: string,
    path: string,
    namespace: string,
  ): {
    operation: VaultOperation;
    capability: VaultCapability;
    mount: string;
    keyName?: string;
    rest: string[];
  } {
    const write = method === 'POST' || method === 'PUT';
    const capability: VaultCapability = write ? 'update' : method === 'GET' ? 'read' : 'delete';
    if (path === 'auth/token/renew-self' && write)
      return { operation: 'renewSelf', capability, mount: '', rest: [] };
    if (path === 'auth/token/lookup-self' && method === 'GET')
      return { operation: 'lookupSelf', capability, mount: '', rest: [] };
    const login = /^auth\/(.+)\/login$/.exec(path);
    if (login && write) return { operation: 'login', capability, mount: login[1] as string, rest: [] };
    const mount = [...this.mounts]
      .map((m) => m.split('\0'))
      .filter(([ns, m]) => ns === namespace && (path === m || path.startsWith(`${m}/`)))
      .map(([, m]) => m as string)
      .sort((a, b) => b.length - a.length)[0];
    const unknown = { operation: 'unknown' as const, capability, mount: '', rest: [] };
    if (mount === undefined) return unknown;
    const rest = path.slice(mount.length + 1).split('/');
    const [head, a, b, c] = rest;
    const op = (operation: VaultOperation, keyName: string | undefined, allowed: boolean) =>
      allowed && keyName ? { operation, capability, mount, keyName, rest } : unknown;
    switch (head) {
      case 'datakey':
        return op('datakey', b, write && (a === 'plaintext' || a === 'wrapped') && c === undefined);
      case 'encrypt':
      case 'decrypt':
      case 'rewrap':
        return op(head, a, write && b === undefined);
      case 'keys':
        if (b === undefined) return op(write ? 'createKey' : 'readKey', a, write || method === 'GET');
        if (b === 'rotate' || b === 'config') return op(b, a, write && c === undefined);
        return unknown;
      default:
        return unknown;
    }
  }

  private takeFault(operation: VaultOperation): VaultFault | undefined {
    if (this.outage) return this.outage;
    const index = this.faultQueue.findIndex((f) => !f.operation || f.operation === operation);
    if (index < 0) return undefined;
    const spec = this.faultQueue[index] as VaultFaultSpec;
    if (--spec.times <= 0) this.faultQueue.splice(index, 1);
    return spec.fault;
  }

  private authenticate(token: string, namespace: string): TokenRecord {
    const record = token ? this.tokens.get(token) : undefined;
    const expired = record?.expiresAt !== undefined && record.expiresAt <= this.clock.now();
    if (!record || expired || (record.namespace !== namespace && !record.policies.includes('root'))) {
      return fail(403, 'permission denied', ...(token && !record ? ['invalid token'] : []));
    }
    return record;
  }

  private authorize(record: TokenRecord, path: string, capability: VaultCapability): void {
    if (record.policies.includes('root')) return;
    const granted = new Set<VaultCapability>();
    for (const name of record.policies) {
      for (const rule of this.policies.get(name) ?? []) {
        if (globToRegExp(rule.path).test(path)) for (const c of rule.capabilities) granted.add(c);
      }
    }
    if (granted.has('deny') || !granted.has(capability))
      fail(403, '1 error occurred:\n\t* permission denied\n\n');
  }

  private lookup(record: TokenRecord): object {
    const now = this.clock.now();
    return {
      accessor: record.accessor,
      policies: record.policies,
      display_name: record.displayName,
      renewable: record.renewable,
      ttl: record.expiresAt === undefined ? 0 : Math.max(0, Math.floor((record.expiresAt - now) / 1000)),
    };
  }

  private login(path: string, namespace: string, body: Record<string, unknown>): object {
    const mount = path.slice('auth/'.length, -'/login'.length);
    const roleId = typeof body.role_id === 'string' ? body.role_id : '';
    const secretId = typeof body.secret_id === 'string' ? body.secret_id : '';
    if (!roleId) userError('missing role_id');
    const role = this.appRoles.get(roleId);
    if (!role || role.namespace !== namespace || role.mount !== mount || !role.secretIds.has(secretId)) {
      return userError('invalid role or secret ID');
    }
    const token = this.createToken({
      policies: ['default', ...role.policies],
      ttl: role.tokenTtl,
      maxTtl: role.tokenMaxTtl,
      namespace,
      displayName: `approle-${role.name}`,
    });
    const record = this.tokens.get(token) as TokenRecord;
    return {
      request_id: randomUUID(),
      lease_id: '',
      renewable: false,
      lease_duration: 0,
      data: null,
      warnings: null,
      auth: {
        client_token: token,
        accessor: record.accessor,
        policies: record.policies,
        token_policies: record.policies,
        metadata: { role_name: role.name },
        lease_duration: role.tokenTtl,
        renewable: true,
        token_type: 'service',
        orphan: true,
      },
    };
  }

  private renewSelf(record: TokenRecord, body: Record<string, unknown>): object {
    if (!record.renewable || record.ttl === undefined) userError('lease is not renewable');
    const now = this.clock.now();
    const increment = typeof body.increment === 'number' ? body.increment : (record.ttl as number);
    const wanted = now + increment * 1000;
    const capped = record.maxExpiresAt !== undefined && wanted > record.maxExpiresAt;
    record.expiresAt = capped ? (record.maxExpiresAt as number) : wanted;
    const lease = Math.max(0, Math.floor((record.expiresAt - now) / 1000));
    return {
      request_id: randomUUID(),
      data: null,
      warnings: capped
        ? [`TTL of "${increment}s" exceeded the effective max_ttl; TTL value is capped`]
        : null,
      auth: {
        client_token: undefined,
        accessor: record.accessor,
        policies: record.policies,
        token_policies: record.policies,
        lease_duration: lease,
        renewable: record.renewable,
      },
    };
  }

  private transit(
    route: { operation: VaultOperation; mount: string; keyName?: string },
    namespace: string,
    existing: TransitKey | undefined,
    body: Record<string, unknown>,
    call: VaultCall,
  ): object | undefined {
    const name = route.keyName as string;
    switch (route.operation) {
      case 'readKey':
        return existing ? { data: this.info(existing) } : fail(404);
      case 'createKey':
        if (!existing) {
          this.createKey(name, {
            mount: route.mount,
            namespace,
            type: (optional(body, 'type') as TransitKeyType | undefined) ?? 'aes256-gcm96',
            derived: body.derived === true,
            exportable: body.exportable === true,
          });
        }
        return undefined;
      case 'rotate':
        if (!existing) return userError('key not found');
        this.addVersion(existing);
        return undefined;
      case 'config': {
        if (!existing) return userError('no existing key named');
        const min = body.min_decryption_version;
        if (min !== undefined) {
          if (typeof min !== 'number' || min < 1 || min > existing.versions.length) {
            return userError('cannot set min decryption version of 0 or greater than the latest version');
          }
          existing.minDecryptionVersion = min;
        }
        if (body.exportable === true) existing.exportable = true;
        if (body.exportable === false && existing.exportable) return userError('export cannot be disabled');
        return undefined;
      }
      case 'datakey': {
        const key = existing ?? userError('encryption key not found');
        const bits = body.bits === undefined ? 256 : body.bits;
        if (bits !== 128 && bits !== 256 && bits !== 512) return userError('invalid bit length');
        const plaintext = randomBytes((bits as number) / 8);
        const { ciphertext, version } = this.seal(key, contextOf(body), plaintext, keyVersionOf(body));
        call.keyVersion = version;
        const data: Record<string, unknown> = { ciphertext, key_version: version };
        if (call.path.includes('/datakey/plaintext/')) data.plaintext = plaintext.toString('base64');
        return { data };
      }
      case 'encrypt': {
        const context = contextOf(body);
        let key = existing;
        if (!key) {
          /* Vault's upsert: an encrypt to a missing key (allowed `create`) makes one, derived if a context is given. */
          this.createKey(name, { mount: route.mount, namespace, derived: context !== undefined });
          key = this.keys.get(keyId(namespace, route.mount, name)) as TransitKey;
        }
        const plaintext = requiredBase64(body, 'plaintext', 'missing plaintext to encrypt');
        const { ciphertext, version } = this.seal(key, context, plaintext, keyVersionOf(body));
        call.keyVersion = version;
        return { data: { ciphertext, key_version: version } };
      }
      case 'decrypt': {
        const key = existing ?? userError('encryption key not found');
        const ciphertext = typeof body.ciphertext === 'string' ? body.ciphertext : '';
        if (!ciphertext) userError('missing ciphertext to decrypt');
        const plaintext = this.open(key, contextOf(body), ciphertext, call, 400);
        return { data: { plaintext: plaintext.toString('base64') } };
      }
      case 'rewrap': {
        const key = existing ?? userError('encryption key not found');
        const ciphertext = typeof body.ciphertext === 'string' ? body.ciphertext : '';
        if (!ciphertext) userError('missing ciphertext to decrypt');
        const context = contextOf(body);
        /* OpenBao's and Vault's rewrap report an AEAD failure as an internal error (HTTP 500). */
        const plaintext = this.open(key, context, ciphertext, call, 500);
        const sealed = this.seal(key, context, plaintext, keyVersionOf(body));
        plaintext.fill(0);
        call.keyVersion = sealed.version;
        return { data: { ciphertext: sealed.ciphertext, key_version: sealed.version } };
      }
      default:
        return fail(404);
    }
  }

  /** The key of `version` for `context`: the version's own key, or (derived keys) HKDF-SHA256 of it. */
  private encryptionKey(key: TransitKey, context: Buffer | undefined, version: number): Buffer {
    const material = key.versions[version - 1] as Buffer;
    if (!key.derived) return material;
    if (!context || context.length === 0) {
      return userError(
        "missing 'context' for key derivation; the key was created using a derived key, which means additional, per-request information must be included in order to perform operations with the key",
      );
    }
    return Buffer.from(hkdfSync('sha256', material, Buffer.alloc(0), context, material.length));
  }

  private seal(
    key: TransitKey,
    context: Buffer | undefined,
    plaintext: Buffer,
    requested: number | undefined,
  ): { ciphertext: string; version: number } {
    if (!AEAD_TYPES.has(key.type)) userError(`message encryption not supported for key type ${key.type}`);
    const version = requested || key.versions.length;
    if (version < 1 || version > key.versions.length) userError('invalid key version');
    const nonce = randomBytes(NONCE_BYTES);
    /* chacha20-poly1305 takes the same options as GCM; the cast only picks the typing. */
    const cipher = createCipheriv(
      cipherName(key.type) as 'aes-256-gcm',
      this.encryptionKey(key, context, version),
      nonce,
      {
        authTagLength: TAG_BYTES,
      },
    ) as CipherGCM;
    const sealed = Buffer.concat([nonce, cipher.update(plaintext), cipher.final(), cipher.getAuthTag()]);
    return { ciphertext: `vault:v${version}:${sealed.toString('base64')}`, version };
  }

  private open(
    key: TransitKey,
    context: Buffer | undefined,
    ciphertext: string,
    call: VaultCall,
    authFailureStatus: number,
  ): Buffer {
    if (!AEAD_TYPES.has(key.type)) userError(`message decryption not supported for key type ${key.type}`);
    const match = CIPHERTEXT.exec(ciphertext);
    if (!ciphertext.startsWith('vault:')) userError('invalid ciphertext: no prefix');
    if (!match) return userError('invalid ciphertext: wrong number of fields');
    const version = Number(match[1]) || 1;
    call.ciphertextVersion = version;
    if (version > key.versions.length) userError('invalid ciphertext: version is too new');
    if (version < key.minDecryptionVersion) {
      userError('ciphertext or signature version is disallowed by policy (too old)');
    }
    const encoded = match[2] as string;
    if (!BASE64.test(encoded)) userError('invalid ciphertext: could not decode base64');
    const sealed = Buffer.from(encoded, 'base64');
    if (sealed.length < NONCE_BYTES) userError('invalid ciphertext length');
    try {
      const decipher = createDecipheriv(
        cipherName(key.type) as 'aes-256-gcm',
        this.encryptionKey(key, context, version),
        sealed.subarray(0, NONCE_BYTES),
        { authTagLength: TAG_BYTES },
      ) as DecipherGCM;
      decipher.setAuthTag(sealed.subarray(sealed.length - TAG_BYTES));
      return Buffer.concat([
        decipher.update(sealed.subarray(NONCE_BYTES, sealed.length - TAG_BYTES)),
        decipher.final(),
      ]);
    } catch (error) {
      if (error instanceof VaultHttpError) throw error;
      return fail(authFailureStatus, 'cipher: message authentication failed');
    }
  }
}

function cipherName(type: TransitKeyType): string {
  return type === 'chacha20-poly1305'
    ? 'chacha20-poly1305'
    : type === 'aes128-gcm96'
      ? 'aes-128-gcm'
      : 'aes-256-gcm';
}

async function readBody(req: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

function parseBody(raw: string): Record<string, unknown> {
  if (raw.trim() === '') return {};
  try {
    const parsed: unknown = JSON.parse(raw);
    if (parsed && typeof parsed === 'object' && !Array.isArray(parsed))
      return parsed as Record<string, unknown>;
  } catch {}
  return userError('failed to parse JSON input');
}

function optional(body: Record<string, unknown>, field: string): string | undefined {
  const value = body[field];
  return typeof value === 'string' && value !== '' ? value : undefined;
}

function contextOf(body: Record<string, unknown>): Buffer | undefined {
  const raw = optional(body, 'context');
  if (raw === undefined) return undefined;
  if (!BASE64.test(raw)) return userError('failed to base64-decode context');
  return Buffer.from(raw, 'base64');
}

function requiredBase64(body: Record<string, unknown>, field: string, missing: string): Buffer {
  const raw = body[field];
  if (typeof raw !== 'string') return userError(missing);
  if (!BASE64.test(raw)) return userError(`failed to base64-decode ${field}`);
  return Buffer.from(raw, 'base64');
}

function keyVersionOf(body: Record<string, unknown>): number | undefined {
  const value = body.key_version;
  return typeof value === 'number' && value > 0 ? value : undefined;
}

/** Records what a request said about its key and context (never plaintext or ciphertext). */
function describeBody(call: VaultCall, body: Record<string, unknown>): void {
  const raw = optional(body, 'context');
  if (raw === undefined || !BASE64.test(raw)) return;
  try {
    const entries = JSON.parse(Buffer.from(raw, 'base64').toString('utf8')) as unknown;
    if (Array.isArray(entries) && entries.every((e) => Array.isArray(e) && e.length === 2)) {
      call.context = Object.fromEntries(entries as Array<[string, string]>);
      return;
    }
  } catch {}
  call.rawContext = raw;
}

/**
 * Starts a Vault emulator on `127.0.0.1` (random port) with a `transit` mount and an `approle`
 * auth mount in the root namespace. Call {@link VaultEmulator.close} when done.
 */
export async function startVaultEmulator(options?: VaultEmulatorOptions): Promise<VaultEmulator> {
  return VaultEmulator.start(options);
}

/**
 * The least-privilege policy of examples/vault-transit/policy.hcl for `keyName` (and `mount`):
 * what the provider needs to generate, unwrap, wrap, re-wrap and validate, and nothing more.
 */
export function transitPolicy(keyName: string, mount = 'transit'): VaultPolicyRule[] {
  return [
    { path: `${mount}/datakey/plaintext/${keyName}`, capabilities: ['update'] },
    { path: `${mount}/decrypt/${keyName}`, capabilities: ['update'] },
    { path: `${mount}/encrypt/${keyName}`, capabilities: ['update'] },
    { path: `${mount}/rewrap/${keyName}`, capabilities: ['update'] },
    { path: `${mount}/keys/${keyName}`, capabilities: ['read'] },
  ];
}
