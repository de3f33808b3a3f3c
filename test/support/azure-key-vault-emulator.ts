import {
  createCipheriv,
  createDecipheriv,
  generateKeyPair,
  type KeyObject,
  privateDecrypt,
  publicEncrypt,
  randomBytes,
  randomUUID,
  constants as rsa,
} from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { promisify } from 'node:util';

/**
 * The operations the emulator serves, named as they appear in the REST path (`get` for a key GET,
 * `update` for its PATCH).
 */
export type KeyVaultOperation = 'get' | 'create' | 'rotate' | 'update' | 'wrapkey' | 'unwrapkey';

const OPERATIONS: readonly KeyVaultOperation[] = [
  'get',
  'create',
  'rotate',
  'update',
  'wrapkey',
  'unwrapkey',
];

/** The RBAC data action each operation needs, as Key Vault names it in a `ForbiddenByRbac` message. */
const DATA_ACTIONS: Record<KeyVaultOperation, string> = {
  get: 'Microsoft.KeyVault/vaults/keys/read',
  create: 'Microsoft.KeyVault/vaults/keys/create/action',
  rotate: 'Microsoft.KeyVault/vaults/keys/rotate/action',
  update: 'Microsoft.KeyVault/vaults/keys/update/action',
  wrapkey: 'Microsoft.KeyVault/vaults/keys/wrap/action',
  unwrapkey: 'Microsoft.KeyVault/vaults/keys/unwrap/action',
};

/** Built-in Key Vault roles, by the operations their data actions allow. */
export const KEY_VAULT_ROLES = {
  /** What a customer grants an application that wraps data keys with its key: read, wrap, unwrap. */
  'Key Vault Crypto Service Encryption User': ['get', 'wrapkey', 'unwrapkey'],
  /** Key management (create, rotate, update) and every cryptographic operation. */
  'Key Vault Crypto Officer': ['get', 'create', 'rotate', 'update', 'wrapkey', 'unwrapkey'],
  /** Key metadata and public parts only. */
  'Key Vault Reader': ['get'],
} as const satisfies Record<string, readonly KeyVaultOperation[]>;

/** A role of {@link KEY_VAULT_ROLES}. */
export type KeyVaultRole = keyof typeof KEY_VAULT_ROLES;

/** The role {@link AzureKeyVaultEmulator.grant} assigns by default. */
export const ENCRYPTION_USER: KeyVaultRole = 'Key Vault Crypto Service Encryption User';

/** Key types the emulator creates. Key Vault proper holds RSA and EC keys; a Managed HSM also `oct-HSM`. */
export type EmulatedKeyType = 'RSA' | 'RSA-HSM' | 'EC' | 'EC-HSM' | 'oct-HSM';

/** Options of {@link AzureKeyVaultEmulator.createKey}. */
export interface EmulatedKeyOptions {
  /** Default `RSA` (`RSA-HSM` on a Managed HSM). */
  kty?: EmulatedKeyType;
  /** RSA modulus bits (default 3072) or `oct-HSM` key bits (default 256). */
  size?: number;
  /** `key_ops`. Default: every operation the key type supports. */
  keyOps?: string[];
  /** Default true. */
  enabled?: boolean;
  /** `exp`: the key cannot be used after this time. */
  expiresOn?: Date;
  /** `nbf`: the key cannot be used before this time. */
  notBefore?: Date;
}

/** A key version as {@link AzureKeyVaultEmulator.createKey} and {@link AzureKeyVaultEmulator.rotateKey} report it. */
export interface EmulatedKey {
  /** The versioned key id, `http://127.0.0.1:PORT/keys/<name>/<version>`. */
  kid: string;
  name: string;
  version: string;
}

/** One request the emulator answered after authenticating it. */
export interface KeyVaultCall {
  operation: KeyVaultOperation | 'unknown';
  method: string;
  /** The key name in the path. */
  name?: string;
  /** The version in the path as sent: `''` for a version-less request (the current version). */
  version?: string;
  /** The `alg` of a wrap or unwrap. */
  alg?: string;
  /** The caller (the `oid` of its token). */
  principal: string;
  /** The `api-version` query parameter. */
  apiVersion?: string;
  /** The HTTP status answered (`0` for a request never answered). */
  status: number;
}

/** A fault to inject: the next `times` authenticated requests (of `operation`, or any) fail with `status`. */
export interface KeyVaultFault {
  operation?: KeyVaultOperation;
  /** 429 (throttled), 500, 502, 503, … */
  status: number;
  times: number;
  /** For 429 and 503: the `Retry-After` header in seconds. Default 0 (retry at once). */
  retryAfter?: number;
}

/** Options of {@link startAzureKeyVaultEmulator}. */
export interface AzureKeyVaultEmulatorOptions {
  /** The Microsoft Entra tenant (directory) the vault belongs to, named in its challenge. Default: a random GUID. */
  tenantId?: string;
  /** `vault` (default: resource `https://vault.azure.net`) or `managedHsm` (`https://managedhsm.azure.net`, `oct-HSM` keys). */
  kind?: 'vault' | 'managedHsm';
}

/** The subset of `KeyClientOptions` / `CryptographyClientOptions` that points the real SDK at the emulator. */
export interface KeyVaultEmulatorClientOptions {
  allowInsecureConnection: true;
  disableChallengeResourceVerification: true;
}

/** A `TokenCredential` of `@azure/core-auth`, structurally (the shape `@azure/identity` credentials have). */
export interface EmulatorTokenCredential {
  getToken(
    scopes: string | string[],
    options?: { tenantId?: string; claims?: string; enableCae?: boolean },
  ): Promise<{ token: string; expiresOnTimestamp: number } | null>;
}

/** A {@link EmulatorTokenCredential} for one principal, recording what it was asked for. */
export interface TestTokenCredential extends EmulatorTokenCredential {
  readonly principal: string;
  /** Every `getToken` call: the scopes, the tenant the challenge named, the CAE claims if any. */
  readonly requests: Array<{ scopes: string[]; tenantId?: string; claims?: string }>;
  /** Every token issued (secrets: none may appear in errors or logs). */
  readonly tokens: string[];
  /** Makes `getToken` throw an error of this name (as `@azure/identity` does), or work again with `null`. */
  failWith(name: string | null): void;
}

interface KeyVersion {
  version: string;
  kty: EmulatedKeyType;
  size: number;
  keyOps: string[];
  enabled: boolean;
  nbf?: number;
  exp?: number;
  created: number;
  updated: number;
  rsa?: { publicKey: KeyObject; privateKey: KeyObject; n: string; e: string };
  oct?: Buffer;
}

interface KeyEntry {
  name: string;
  versions: KeyVersion[];
}

interface Assignment {
  principal: string;
  /** A built-in role, or the operations of a custom role. */
  role: KeyVaultRole | readonly KeyVaultOperation[];
  /** A key name: the assignment's scope is that key; undefined: the whole vault. */
  key?: string;
}

interface TokenClaims {
  oid: string;
  tid: string;
  aud: string;
  uti: string;
}

/** A Key Vault error: status, `error.code`, `error.innererror.code`. */
class VaultError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly inner?: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

const generateRsa = promisify(generateKeyPair);
const RSA_ALGORITHMS = new Set(['RSA-OAEP', 'RSA-OAEP-256', 'RSA1_5']);
const KW_BITS: Record<string, number> = { A128KW: 128, A192KW: 192, A256KW: 256 };
const RSA_OPS = ['encrypt', 'decrypt', 'sign', 'verify', 'wrapKey', 'unwrapKey'];
const EC_OPS = ['sign', 'verify'];
const OCT_OPS = ['encrypt', 'decrypt', 'wrapKey', 'unwrapKey'];
const KEY_OP_OF: Partial<Record<KeyVaultOperation, string>> = { wrapkey: 'wrapKey', unwrapkey: 'unwrapKey' };
const NAME = /^[0-9a-zA-Z-]{1,127}$/;
const nowSeconds = (): number => Math.floor(Date.now() / 1000);
const b64u = (bytes: Buffer): string => bytes.toString('base64url');

/** An unsigned JWT: Key Vault's emulator reads its claims, never checks a signature. */
function fakeJwt(claims: Record<string, unknown>): string {
  const part = (value: object) => Buffer.from(JSON.stringify(value)).toString('base64url');
  return `${part({ typ: 'JWT', alg: 'none' })}.${part(claims)}.`;
}

function readClaims(token: string): TokenClaims | undefined {
  const [, payload] = token.split('.');
  try {
    const claims = JSON.parse(
      Buffer.from(payload ?? '', 'base64url').toString('utf8'),
    ) as Partial<TokenClaims>;
    const ok = ['oid', 'tid', 'aud', 'uti'].every((k) => typeof claims[k as keyof TokenClaims] === 'string');
    return ok ? (claims as TokenClaims) : undefined;
  } catch {
    return undefined;
  }
}

/**
 * A credential issuing tokens for `principal` (its object id): for the tenant and the resource the
 * vault's challenge asks for, a new one after a CAE claims challenge. Works with any number of
 * emulators, as one application identity reaches several customers' vaults.
 */
export function testCredential(principal = 'app'): TestTokenCredential {
  const requests: TestTokenCredential['requests'] = [];
  const tokens: string[] = [];
  let failure: string | null = null;
  return {
    principal,
    requests,
    tokens,
    failWith(name) {
      failure = name;
    },
    async getToken(scopes, options = {}) {
      const list = Array.isArray(scopes) ? scopes : [scopes];
      requests.push({
        scopes: list,
        ...(options.tenantId ? { tenantId: options.tenantId } : {}),
        ...(options.claims ? { claims: options.claims } : {}),
      });
      if (failure)
        throw Object.assign(new Error(`${failure}: the credential was refused`), { name: failure });
      const token = fakeJwt({
        oid: principal,
        tid: options.tenantId ?? 'common',
        aud: (list[0] ?? '').replace(/\/\.default$/, ''),
        uti: randomUUID(),
        iat: nowSeconds(),
      });
      tokens.push(token);
      return { token, expiresOnTimestamp: Date.now() + 3_600_000 };
    },
  };
}

async function readBody(req: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

/**
 * In-process Azure Key Vault (or Managed HSM) speaking the REST protocol `@azure/keyvault-keys`
 * uses: the bearer-challenge handshake, `kid` URLs on its own `http://127.0.0.1:PORT`, the
 * `api-version` parameter, key GET / create / rotate / update, `wrapkey` / `unwrapkey` (RSA-OAEP,
 * RSA-OAEP-256, RSA1_5 on RSA keys; A128KW…A256KW on `oct-HSM` keys), RBAC role assignments
 * (`ForbiddenByRbac`), disabled keys (`KeyDisabled`), `KeyNotFound`, CAE token revocation
 * (`insufficient_claims`), and injected throttling, 5xx, latency and requests never answered.
 * Start it with {@link startAzureKeyVaultEmulator}.
 */
export class AzureKeyVaultEmulator {
  /** `http://127.0.0.1:PORT`: the vault URL, and the start of every `kid`. */
  vaultUrl = '';
  /** Authenticated requests per operation (fault-injected and refused ones included). */
  readonly calls: Record<KeyVaultOperation, number> = Object.fromEntries(
    OPERATIONS.map((op) => [op, 0]),
  ) as Record<KeyVaultOperation, number>;
  /** Fault-injected responses per operation. */
  readonly faults: Record<KeyVaultOperation, number> = Object.fromEntries(
    OPERATIONS.map((op) => [op, 0]),
  ) as Record<KeyVaultOperation, number>;
  /** Every authenticated request, in arrival order. */
  readonly callLog: KeyVaultCall[] = [];
  /** 401 answers: challenges to unauthenticated requests, refused and revoked tokens. */
  challenges = 0;

  private readonly keys = new Map<string, KeyEntry>();
  private readonly assignments: Assignment[] = [];
  private readonly revokedTokens = new Set<string>();
  /** Tokens presented so far, with their principal (for {@link revokeTokens}). */
  private readonly seenTokens = new Map<string, string>();
  private readonly faultQueue: KeyVaultFault[] = [];
  private readonly hung = new Set<ServerResponse>();
  private hangSpec: { operation?: KeyVaultOperation; times: number } | null = null;
  private outage: number | null = null;
  private latencyMs = 0;
  private readonly server: Server = createServer((req, res) => {
    this.handle(req, res).catch(() => res.destroy());
  });

  private constructor(
    /** The Entra tenant named in this vault's challenge. */
    readonly tenantId: string,
    /** `vault` or `managedHsm`. */
    readonly kind: 'vault' | 'managedHsm',
  ) {}

  /** @internal Use {@link startAzureKeyVaultEmulator}. */
  static async start(options: AzureKeyVaultEmulatorOptions = {}): Promise<AzureKeyVaultEmulator> {
    const emulator = new AzureKeyVaultEmulator(options.tenantId ?? randomUUID(), options.kind ?? 'vault');
    await new Promise<void>((resolve, reject) => {
      emulator.server.once('error', reject);
      emulator.server.listen(0, '127.0.0.1', resolve);
    });
    emulator.vaultUrl = `http://127.0.0.1:${(emulator.server.address() as AddressInfo).port}`;
    return emulator;
  }

  /** The resource tokens must be issued for (the challenge's `resource`). */
  get resource(): string {
    return this.kind === 'managedHsm' ? 'https://managedhsm.azure.net' : 'https://vault.azure.net';
  }

  /** Client options the real SDK needs to talk to a plain-HTTP vault on 127.0.0.1. */
  clientOptions(): KeyVaultEmulatorClientOptions {
    return { allowInsecureConnection: true, disableChallengeResourceVerification: true };
  }

  /** The key id of `name` (version-less unless `version` is given). */
  kid(name: string, version?: string): string {
    return `${this.vaultUrl}/keys/${name}${version === undefined ? '' : `/${version}`}`;
  }

  /** Stops the server, dropping open connections (requests left unanswered included). */
  close(): Promise<void> {
    for (const res of this.hung) res.destroy();
    this.hung.clear();
    return new Promise((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }

  /** Zeroes {@link calls}, {@link faults} and {@link challenges}, and empties {@link callLog}. */
  resetCalls(): void {
    for (const counts of [this.calls, this.faults]) for (const op of OPERATIONS) counts[op] = 0;
    this.callLog.length = 0;
    this.challenges = 0;
  }

  /** Creates a key (or, if `name` exists, a new version of it, as Key Vault does). */
  async createKey(name: string, options: EmulatedKeyOptions = {}): Promise<EmulatedKey> {
    if (!NAME.test(name)) throw new Error(`invalid key name ${name}`);
    const version = await this.newVersion(options);
    const entry = this.keys.get(name) ?? { name, versions: [] };
    entry.versions.push(version);
    this.keys.set(name, entry);
    return { kid: this.kid(name, version.version), name, version: version.version };
  }

  /** A new version of `name` with the current version's type, size and `key_ops` (Key Vault's rotate). */
  async rotateKey(name: string): Promise<EmulatedKey> {
    const current = this.current(name);
    return this.createKey(name, { kty: current.kty, size: current.size, keyOps: [...current.keyOps] });
  }

  /** Enables or disables a key version (a versioned kid) or the current version (a name or version-less kid). */
  setEnabled(kidOrName: string, enabled: boolean): void {
    const version = this.versionOf(kidOrName);
    version.enabled = enabled;
    version.updated = nowSeconds();
  }

  /** Replaces the `key_ops` of a key version (a versioned kid) or of the current version. */
  setKeyOps(kidOrName: string, keyOps: string[]): void {
    this.versionOf(kidOrName).keyOps = [...keyOps];
  }

  /** Deletes a key and all its versions: requests for it answer 404 `KeyNotFound`. */
  deleteKey(name: string): void {
    this.keys.delete(name);
  }

  /**
   * Assigns `role` (a built-in role, or a custom role given as the operations it allows) to
   * `principal`, on the whole vault or on one key.
   */
  grant(
    principal: string,
    role: KeyVaultRole | readonly KeyVaultOperation[] = ENCRYPTION_USER,
    scope: { key?: string } = {},
  ): void {
    this.assignments.push({ principal, role, ...(scope.key ? { key: scope.key } : {}) });
  }

  /** Removes `principal`'s role assignments (only those on `scope.key`, when given): its requests then answer 403 `ForbiddenByRbac`. */
  removeRoleAssignment(principal: string, scope: { key?: string } = {}): void {
    for (let i = this.assignments.length - 1; i >= 0; i--) {
      const a = this.assignments[i] as Assignment;
      if (a.principal === principal && (scope.key === undefined || a.key === scope.key)) {
        this.assignments.splice(i, 1);
      }
    }
  }

  /**
   * Continuous access evaluation: every token `principal` holds now is refused with a 401
   * `insufficient_claims` challenge, after which the client must get a new token.
   */
  revokeTokens(principal: string): void {
    for (const [token, oid] of this.seenTokens) if (oid === principal) this.revokedTokens.add(token);
  }

  /** Makes the next `times` matching authenticated requests fail with `status`; queued faults are used in order. */
  injectFaults(fault: KeyVaultFault): void {
    if (fault.times > 0) this.faultQueue.push({ ...fault });
  }

  /** Makes every authenticated request fail with `status` (an outage) until called with `null`. */
  failAll(status: number | null): void {
    this.outage = status;
  }

  /** Delays every answer by `ms` (0: no delay). */
  setLatency(ms: number): void {
    this.latencyMs = Math.max(0, ms);
  }

  /**
   * Never answers the next `times` authenticated requests (of `operation`, or any; default: all until
   * `hang(null)`): the connection stays open, no status line is sent.
   */
  hang(spec: { operation?: KeyVaultOperation; times?: number } | null): void {
    this.hangSpec = spec === null ? null : { ...spec, times: spec.times ?? Number.POSITIVE_INFINITY };
  }

  private versionOf(kidOrName: string): KeyVersion {
    const path = kidOrName.startsWith('http') ? new URL(kidOrName).pathname : `/keys/${kidOrName}`;
    const [, , name = '', version = ''] = path.split('/');
    return version ? this.find(name, version) : this.current(name);
  }

  private current(name: string): KeyVersion {
    const entry = this.keys.get(name);
    const version = entry?.versions.at(-1);
    if (!version) throw new VaultError(404, 'KeyNotFound', notFound(name));
    return version;
  }

  private find(name: string, version: string): KeyVersion {
    if (version === '') return this.current(name);
    const found = this.keys.get(name)?.versions.find((v) => v.version === version);
    if (!found) throw new VaultError(404, 'KeyNotFound', notFound(`${name}/${version}`));
    return found;
  }

  private async newVersion(options: EmulatedKeyOptions): Promise<KeyVersion> {
    const hsm = this.kind === 'managedHsm';
    const kty = options.kty ?? (hsm ? 'RSA-HSM' : 'RSA');
    if (kty === 'oct-HSM' && !hsm) {
      throw new VaultError(400, 'BadParameter', 'Key type oct-HSM is supported by Managed HSM only.');
    }
    if (hsm && (kty === 'RSA' || kty === 'EC')) {
      throw new VaultError(400, 'BadParameter', `Key type ${kty} is not supported by Managed HSM.`);
    }
    const created = nowSeconds();
    const base = {
      version: randomBytes(16).toString('hex'),
      kty,
      enabled: options.enabled ?? true,
      created,
      updated: created,
      ...(options.notBefore ? { nbf: Math.floor(options.notBefore.getTime() / 1000) } : {}),
      ...(options.expiresOn ? { exp: Math.floor(options.expiresOn.getTime() / 1000) } : {}),
    };
    if (kty === 'RSA' || kty === 'RSA-HSM') {
      const size = options.size ?? 3072;
      if (![2048, 3072, 4096].includes(size))
        throw new VaultError(400, 'BadParameter', `Invalid key size ${size}`);
      const { publicKey, privateKey } = await generateRsa('rsa', {
        modulusLength: size,
        publicExponent: 65537,
      });
      const jwk = publicKey.export({ format: 'jwk' }) as { n: string; e: string };
      return {
        ...base,
        size,
        keyOps: [...(options.keyOps ?? RSA_OPS)],
        rsa: { publicKey, privateKey, n: jwk.n, e: jwk.e },
      };
    }
    if (kty === 'oct-HSM') {
      const size = options.size ?? 256;
      if (![128, 192, 256].includes(size))
        throw new VaultError(400, 'BadParameter', `Invalid key size ${size}`);
      return { ...base, size, keyOps: [...(options.keyOps ?? OCT_OPS)], oct: randomBytes(size / 8) };
    }
    return { ...base, size: 256, keyOps: [...(options.keyOps ?? EC_OPS)] };
  }

  private bundle(name: string, key: KeyVersion): object {
    return {
      key: {
        kid: this.kid(name, key.version),
        kty: key.kty,
        key_ops: [...key.keyOps],
        ...(key.rsa ? { n: key.rsa.n, e: key.rsa.e } : {}),
        ...(key.kty.startsWith('EC') ? { crv: 'P-256' } : {}),
      },
      attributes: {
        enabled: key.enabled,
        created: key.created,
        updated: key.updated,
        recoveryLevel: 'Recoverable+Purgeable',
        recoverableDays: 90,
        ...(key.nbf !== undefined ? { nbf: key.nbf } : {}),
        ...(key.exp !== undefined ? { exp: key.exp } : {}),
      },
    };
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const raw = await readBody(req);
    const url = new URL(req.url ?? '/', this.vaultUrl);
    const principal = this.authenticate(req, res);
    if (principal === undefined) return;
    const route = parseRoute(req.method ?? 'GET', url.pathname);
    const call: KeyVaultCall = {
      operation: route?.operation ?? 'unknown',
      method: req.method ?? 'GET',
      principal,
      status: 0,
      ...(route?.name !== undefined ? { name: route.name } : {}),
      ...(route?.version !== undefined ? { version: route.version } : {}),
      ...(url.searchParams.has('api-version')
        ? { apiVersion: url.searchParams.get('api-version') as string }
        : {}),
    };
    this.callLog.push(call);
    if (route) this.calls[route.operation]++;
    let status = 200;
    let payload: object;
    let headers: Record<string, string> = {};
    try {
      if (!url.searchParams.get('api-version')) {
        throw new VaultError(
          400,
          'BadParameter',
          'The request URI contains an invalid or missing api-version.',
        );
      }
      if (!route)
        throw new VaultError(400, 'BadParameter', `Unsupported request ${req.method} ${url.pathname}`);
      const fault = this.takeFault(route.operation);
      if (fault) {
        this.faults[route.operation]++;
        throw faultError(fault);
      }
      if (this.takeHang(route.operation)) {
        this.hung.add(res);
        res.on('close', () => this.hung.delete(res));
        return;
      }
      this.authorize(principal, route.operation, route.name);
      const body = parseBody(raw);
      if (body.alg !== undefined) call.alg = String(body.alg);
      payload = await this.dispatch(route, body);
    } catch (error) {
      const known = error instanceof VaultError;
      status = known ? error.status : 500;
      headers = known ? error.headers : {};
      const code = known ? error.code : 'InternalServerError';
      const message = known ? error.message : 'An unexpected error occurred.';
      payload = {
        error: { code, message, ...(known && error.inner ? { innererror: { code: error.inner } } : {}) },
      };
    }
    if (this.latencyMs > 0) await new Promise((resolve) => setTimeout(resolve, this.latencyMs));
    call.status = status;
    send(res, status, payload, headers);
  }

  /** The caller's object id, or undefined once a 401 challenge was sent. */
  private authenticate(req: IncomingMessage, res: ServerResponse): string | undefined {
    const challenge = `Bearer authorization="https://login.microsoftonline.com/${this.tenantId}", resource="${this.resource}"`;
    const header = String(req.headers.authorization ?? '');
    const token = /^Bearer (\S+)$/.exec(header)?.[1];
    const unauthorized = (wwwAuthenticate: string, message: string) => {
      this.challenges++;
      send(res, 401, { error: { code: 'Unauthorized', message } }, { 'WWW-Authenticate': wwwAuthenticate });
      return undefined;
    };
    if (!token) return unauthorized(challenge, 'AKV10000: Request is missing a Bearer or PoP token.');
    if (this.revokedTokens.has(token)) {
      const claims = Buffer.from(
        JSON.stringify({ access_token: { nbf: { essential: true, value: String(nowSeconds()) } } }),
      ).toString('base64');
      return unauthorized(
        `Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", ` +
          `error="insufficient_claims", claims="${claims}"`,
        'AKV10049: The access token has been revoked.',
      );
    }
    const claims = readClaims(token);
    if (!claims || claims.tid !== this.tenantId || claims.aud !== this.resource) {
      return unauthorized(`${challenge}, error="invalid_token"`, 'AKV10032: Invalid issuer or audience.');
    }
    this.seenTokens.set(token, claims.oid);
    return claims.oid;
  }

  private authorize(principal: string, operation: KeyVaultOperation, key: string): void {
    const allowed = this.assignments.some(
      (a) =>
        a.principal === principal &&
        (a.key === undefined || a.key === key) &&
        (typeof a.role === 'string' ? KEY_VAULT_ROLES[a.role] : a.role).includes(operation),
    );
    if (allowed) return;
    throw new VaultError(
      403,
      'Forbidden',
      `Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments or ` +
        `role definitions were changed recently, please observe propagation time.\r\n` +
        `Caller: oid=${principal}\r\nAction: '${DATA_ACTIONS[operation]}'\r\n` +
        `Resource: '${this.vaultUrl}/keys/${key}'\r\nAssignment: (not found)\r\nVault: emulated;location=local`,
      'ForbiddenByRbac',
    );
  }

  private dispatch(route: Route, body: Record<string, unknown>): object | Promise<object> {
    const { name, version = '' } = route;
    switch (route.operation) {
      case 'get':
        return this.bundle(name, this.find(name, version));
      case 'create': {
        const attributes = (body.attributes ?? {}) as { enabled?: boolean; exp?: number; nbf?: number };
        return this.createKey(name, {
          kty: body.kty as EmulatedKeyType,
          ...(typeof body.key_size === 'number' ? { size: body.key_size } : {}),
          ...(Array.isArray(body.key_ops) ? { keyOps: body.key_ops as string[] } : {}),
          ...(attributes.enabled === false ? { enabled: false } : {}),
          ...(attributes.exp ? { expiresOn: new Date(attributes.exp * 1000) } : {}),
          ...(attributes.nbf ? { notBefore: new Date(attributes.nbf * 1000) } : {}),
        }).then((k) => this.bundle(k.name, this.find(k.name, k.version)));
      }
      case 'rotate':
        return this.rotateKey(name).then((k) => this.bundle(k.name, this.find(k.name, k.version)));
      case 'update': {
        const key = this.find(name, version);
        const attributes = (body.attributes ?? {}) as { enabled?: boolean };
        if (typeof attributes.enabled === 'boolean') key.enabled = attributes.enabled;
        if (Array.isArray(body.key_ops)) key.keyOps = body.key_ops.map(String);
        key.updated = nowSeconds();
        return this.bundle(name, key);
      }
      case 'wrapkey':
      case 'unwrapkey':
        return this.keyOperation(route.operation, name, this.find(name, version), body);
    }
  }

  private keyOperation(
    operation: 'wrapkey' | 'unwrapkey',
    name: string,
    key: KeyVersion,
    body: Record<string, unknown>,
  ): object {
    const keyOp = KEY_OP_OF[operation] as string;
    if (!key.enabled) {
      throw new VaultError(
        403,
        'Forbidden',
        `Operation ${keyOp} is not allowed on a disabled key.`,
        'KeyDisabled',
      );
    }
    if (!key.keyOps.includes(keyOp)) {
      throw new VaultError(
        403,
        'Forbidden',
        `Operation ${keyOp} is not permitted on this key.`,
        'KeyOperationForbidden',
      );
    }
    const alg = String(body.alg ?? '');
    if (typeof body.value !== 'string' || !/^[A-Za-z0-9_-]*$/.test(body.value)) {
      throw new VaultError(400, 'BadParameter', 'Property value must be base64url encoded.');
    }
    const value = Buffer.from(body.value, 'base64url');
    let result: Buffer;
    if (key.rsa && RSA_ALGORITHMS.has(alg)) {
      const padding = alg === 'RSA1_5' ? rsa.RSA_PKCS1_PADDING : rsa.RSA_PKCS1_OAEP_PADDING;
      const oaepHash = alg === 'RSA-OAEP-256' ? 'sha256' : 'sha1';
      try {
        result =
          operation === 'wrapkey'
            ? publicEncrypt({ key: key.rsa.publicKey, padding, oaepHash }, value)
            : privateDecrypt({ key: key.rsa.privateKey, padding, oaepHash }, value);
      } catch {
        throw new VaultError(
          400,
          'BadParameter',
          operation === 'wrapkey' ? 'Invalid value length.' : 'Invalid ciphertext.',
        );
      }
    } else if (key.oct && KW_BITS[alg] === key.size) {
      const cipher = `id-aes${key.size}-wrap`;
      const iv = Buffer.from('A6A6A6A6A6A6A6A6', 'hex');
      if (value.length < 16 || value.length % 8 !== 0) {
        throw new VaultError(400, 'BadParameter', 'Value must be a multiple of 8 bytes, at least 16.');
      }
      try {
        const c =
          operation === 'wrapkey'
            ? createCipheriv(cipher, key.oct, iv)
            : createDecipheriv(cipher, key.oct, iv);
        result = Buffer.concat([c.update(value), c.final()]);
      } catch {
        throw new VaultError(400, 'BadParameter', 'Invalid ciphertext.');
      }
    } else {
      throw new VaultError(
        400,
        'BadParameter',
        `Algorithm ${alg || '(none)'} is not supported for key type ${key.kty}.`,
      );
    }
    return { kid: this.kid(name, key.version), value: b64u(result) };
  }

  private takeFault(operation: KeyVaultOperation): KeyVaultFault | undefined {
    if (this.outage !== null) return { status: this.outage, times: 1 };
    const index = this.faultQueue.findIndex((f) => !f.operation || f.operation === operation);
    if (index < 0) return undefined;
    const fault = this.faultQueue[index] as KeyVaultFault;
    if (--fault.times <= 0) this.faultQueue.splice(index, 1);
    return fault;
  }

  private takeHang(operation: KeyVaultOperation): boolean {
    const spec = this.hangSpec;
    if (!spec || (spec.operation && spec.operation !== operation)) return false;
    if (--spec.times <= 0) this.hangSpec = null;
    return true;
  }
}

interface Route {
  operation: KeyVaultOperation;
  name: string;
  version?: string;
}

/** `/keys/{name}[/{version}][/{op}]`, `/keys/{name}/create`, `/keys/{name}/rotate` by method. */
function parseRoute(method: string, pathname: string): Route | undefined {
  const parts = pathname.split('/');
  if (parts[1] !== 'keys' || !parts[2] || parts.length > 5) return undefined;
  const name = decodeURIComponent(parts[2]);
  const third = parts[3];
  if (method === 'POST' && parts.length === 4 && (third === 'create' || third === 'rotate')) {
    return { operation: third, name };
  }
  if (parts.length === 5 && method === 'POST' && (parts[4] === 'wrapkey' || parts[4] === 'unwrapkey')) {
    return { operation: parts[4], name, version: third ?? '' };
  }
  if (parts.length <= 4 && method === 'GET') return { operation: 'get', name, version: third ?? '' };
  if (parts.length === 4 && method === 'PATCH' && third) return { operation: 'update', name, version: third };
  return undefined;
}

function parseBody(raw: string): Record<string, unknown> {
  if (raw.trim() === '') return {};
  try {
    const parsed: unknown = JSON.parse(raw);
    if (parsed && typeof parsed === 'object' && !Array.isArray(parsed))
      return parsed as Record<string, unknown>;
  } catch {}
  throw new VaultError(400, 'BadParameter', 'The request body is not a JSON object.');
}

function notFound(what: string): string {
  return (
    `A key with (name/id) ${what} was not found in this key vault. If you recently deleted this key ` +
    'you may be able to recover it using the correct recovery command.'
  );
}

function faultError(fault: KeyVaultFault): VaultError {
  const retryAfter = { 'Retry-After': String(fault.retryAfter ?? 0) };
  if (fault.status === 429) {
    return new VaultError(
      429,
      'Throttled',
      'Request was not processed because too many requests were received. Reason: injected (emulator).',
      undefined,
      retryAfter,
    );
  }
  if (fault.status === 503) {
    return new VaultError(
      503,
      'ServiceUnavailable',
      'The service is unavailable (injected).',
      undefined,
      retryAfter,
    );
  }
  return new VaultError(fault.status, 'InternalServerError', 'An unexpected error occurred (injected).');
}

function send(
  res: ServerResponse,
  status: number,
  payload: object,
  headers: Record<string, string> = {},
): void {
  const text = JSON.stringify(payload);
  res.writeHead(status, {
    'Content-Type': 'application/json; charset=utf-8',
    'Content-Length': Buffer.byteLength(text),
    'x-ms-request-id': randomUUID(),
    'x-ms-keyvault-service-version': '1.9.0.0',
    ...headers,
  });
  res.end(text);
}

/**
 * Starts an Azure Key Vault emulator on `127.0.0.1` (random port). Point the SDK at it with
 * {@link AzureKeyVaultEmulator.clientOptions} and a {@link testCredential}; grant that credential's
 * principal a role with {@link AzureKeyVaultEmulator.grant}. Call {@link AzureKeyVaultEmulator.close} when done.
 */
export async function startAzureKeyVaultEmulator(
  options?: AzureKeyVaultEmulatorOptions,
): Promise<AzureKeyVaultEmulator> {
  return AzureKeyVaultEmulator.start(options);
}
