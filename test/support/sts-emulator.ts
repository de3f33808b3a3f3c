import { randomBytes, randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

/** Options for {@link startStsEmulator}. */
export interface StsEmulatorOptions {
  /** Region used in {@link StsEmulator.clientConfig}. Default `us-east-1`. */
  region?: string;
}

/**
 * Who may assume a role: `principals` are account ids (`444455556666`), account root ARNs
 * (`arn:aws:iam::444455556666:root`), user or role ARNs, or access key ids; `externalId`, when set,
 * must be sent as `ExternalId` (`sts:ExternalId` condition of a real trust policy).
 */
export interface TrustPolicy {
  principals: string[];
  externalId?: string;
}

/** A role defined by a test. */
export interface EmulatedRole {
  /** `arn:aws:iam::<account>:role/<name>`; the account in it is the role's account. */
  roleArn: string;
  trust: TrustPolicy;
  /**
   * Lifetime of sessions whose request names no `DurationSeconds` (real STS: 3,600 s). A test sets
   * a short one (say 900) and moves the clock to see credentials refreshed before they expire.
   */
  sessionDurationSeconds?: number;
  /** Upper bound of `DurationSeconds` (IAM `MaxSessionDuration`). Default 3,600. */
  maxSessionDuration?: number;
}

/** Who an access key id belongs to, as the KMS emulator's `principalOf` wants it. */
export interface EmulatedPrincipal {
  /** The account the credentials act in. */
  account: string;
  /** `arn:aws:iam::<account>:user/<name>` or `arn:aws:sts::<account>:assumed-role/<role>/<session>`. */
  arn: string;
  /** For temporary credentials: the role they were issued for. */
  roleArn?: string;
  /** For temporary credentials: when they stop working. */
  expiration?: Date;
}

/** Static credentials of an IAM user, as a real SDK client takes them. */
export interface EmulatedUserCredentials {
  accessKeyId: string;
  secretAccessKey: string;
}

/** One AssumeRole (or other) request seen by the emulator. */
export interface StsCall {
  action: string;
  /** The caller's access key id (from the SigV4 `Authorization` header). */
  accessKeyId?: string;
  roleArn?: string;
  roleSessionName?: string;
  externalId?: string;
  durationSeconds?: number;
  /** The error code returned, if any. */
  error?: string;
}

/** A fault to inject: the next `times` calls (of `action`, or of any action) fail with `error`. */
export interface StsFaultSpec {
  action?: string;
  error: 'Throttling' | 'InternalFailure' | 'ServiceUnavailable' | 'AccessDenied' | (string & {});
  times: number;
}

/** Subset of `STSClientConfig` pointing a real STS client at the emulator. */
export interface StsEmulatorClientConfig {
  endpoint: string;
  region: string;
}

/** An AWS Query error; the server sends it as `ErrorResponse/Error/{Type,Code,Message}`. */
export class StsEmulatorError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = code;
  }

  /** HTTP status real STS uses for this error code. */
  get status(): number {
    return STATUS[this.code] ?? 400;
  }
}

const STATUS: Record<string, number> = {
  AccessDenied: 403,
  InvalidClientTokenId: 403,
  SignatureDoesNotMatch: 403,
  RegionDisabledException: 403,
  MissingAuthenticationToken: 403,
  InternalFailure: 500,
  ServiceUnavailable: 503,
};
const ACTIONS = ['AssumeRole'];
const VERSION = '2011-06-15';
const XMLNS = 'https://sts.amazonaws.com/doc/2011-06-15/';
const ROLE_ARN = /^arn:aws[a-z-]*:iam::(\d{12}):role\/(?:[\w+=,.@-]+\/)*([\w+=,.@-]{1,64})$/;
const SESSION_NAME = /^[\w+=,.@-]{2,64}$/;
const EXTERNAL_ID = /^[\w+=,.@:/-]{2,1224}$/;
/** `Credential=<access key id>/<date>/<region>/<service>/aws4_request` of a SigV4 header. */
const SIGV4_CREDENTIAL = /Credential=([^/,\s]+)\//;

function fail(code: string, message: string): never {
  throw new StsEmulatorError(code, message);
}

const xmlEscape = (text: string): string =>
  text.replace(
    /[<>&'"]/g,
    (c) => ({ '<': '&lt;', '>': '&gt;', '&': '&amp;', "'": '&apos;', '"': '&quot;' })[c] ?? c,
  );

/** An access key id in AWS's form: a 4-letter prefix (`AKIA` static, `ASIA` temporary), 16 more. */
function accessKeyIdOf(prefix: 'AKIA' | 'ASIA'): string {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  return prefix + Array.from(randomBytes(16), (b) => alphabet[b % 32]).join('');
}

/** The access key id of a SigV4-signed request, or undefined when the request is not signed. */
export function accessKeyIdOfRequest(req: IncomingMessage): string | undefined {
  return SIGV4_CREDENTIAL.exec(String(req.headers.authorization ?? ''))?.[1];
}

/** Whether `entry` of a trust or key policy names `principal`. */
export function principalMatches(entry: string, principal: EmulatedPrincipal, accessKeyId?: string): boolean {
  if (entry === '*') return true;
  const root = /^(?:arn:aws[a-z-]*:iam::)?(\d{12})(?::root)?$/.exec(entry);
  if (root) return root[1] === principal.account;
  return entry === principal.arn || entry === principal.roleArn || entry === accessKeyId;
}

interface Session {
  principal: EmulatedPrincipal;
  secretAccessKey: string;
  sessionToken?: string;
}

async function readBody(req: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

/**
 * In-process AWS STS emulator speaking the AWS Query protocol used by the SDK's STS client
 * (form-encoded `POST /`, XML responses). It also holds the test's IAM users, so it is the
 * credential registry both emulators share: {@link principalOf} tells the KMS emulator who sent a
 * request. Create it with {@link startStsEmulator}.
 */
export class StsEmulator {
  /** Base URL, `http://127.0.0.1:PORT`. */
  endpoint = '';
  /** Requests per action (fault-injected and refused calls included). */
  readonly calls: Record<string, number> = Object.fromEntries(ACTIONS.map((a) => [a, 0]));
  /** Fault-injected (injectFaults / failAll) responses per action. */
  readonly faults: Record<string, number> = Object.fromEntries(ACTIONS.map((a) => [a, 0]));
  /** Every request in arrival order. */
  readonly callLog: StsCall[] = [];

  private readonly roles = new Map<string, EmulatedRole>();
  private readonly sessions = new Map<string, Session>();
  private readonly faultQueue: StsFaultSpec[] = [];
  private outage: string | null = null;
  private readonly server: Server = createServer((req, res) => {
    this.handle(req, res).catch(() => res.destroy());
  });

  private constructor(
    /** Region used in {@link clientConfig}. */
    readonly region: string,
  ) {}

  /** @internal Use {@link startStsEmulator}. */
  static async start(options: StsEmulatorOptions = {}): Promise<StsEmulator> {
    const emulator = new StsEmulator(options.region ?? 'us-east-1');
    await new Promise<void>((resolve, reject) => {
      emulator.server.once('error', reject);
      emulator.server.listen(0, '127.0.0.1', resolve);
    });
    emulator.endpoint = `http://127.0.0.1:${(emulator.server.address() as AddressInfo).port}`;
    return emulator;
  }

  /** Config for an STS client: endpoint and region (credentials are the caller's own). */
  clientConfig(): StsEmulatorClientConfig {
    return { endpoint: this.endpoint, region: this.region };
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
    for (const counts of [this.calls, this.faults]) for (const a of Object.keys(counts)) counts[a] = 0;
    this.callLog.length = 0;
  }

  /** Creates an IAM user in `account` with a fresh static access key (generated at run time). */
  createUser(account: string, userName: string): EmulatedUserCredentials {
    if (!/^\d{12}$/.test(account)) throw new Error(`account must be 12 digits, got ${account}`);
    const accessKeyId = accessKeyIdOf('AKIA');
    const secretAccessKey = randomBytes(30).toString('base64');
    const principal = { account, arn: `arn:aws:iam::${account}:user/${userName}` };
    this.sessions.set(accessKeyId, { principal, secretAccessKey });
    return { accessKeyId, secretAccessKey };
  }

  /** Defines (or redefines) a role; its account is the one in its ARN. */
  defineRole(role: EmulatedRole): void {
    if (!ROLE_ARN.test(role.roleArn)) throw new Error(`not a role ARN: ${role.roleArn}`);
    this.roles.set(role.roleArn, structuredClone(role));
  }

  /** Replaces a role's trust policy (sessions already issued keep working until they expire). */
  setTrustPolicy(roleArn: string, trust: TrustPolicy): void {
    const role = this.roles.get(roleArn) ?? fail('NoSuchEntity', `Role ${roleArn} not found`);
    role.trust = structuredClone(trust);
  }

  /**
   * Who the access key id belongs to: a user created by {@link createUser}, or a session issued by
   * `AssumeRole` (with its expiration); undefined when unknown. Pass it to the KMS emulator.
   */
  principalOf(accessKeyId: string): EmulatedPrincipal | undefined {
    const principal = this.sessions.get(accessKeyId)?.principal;
    return principal && structuredClone(principal);
  }

  /** The temporary credentials issued so far (access key ids), oldest first. */
  issuedAccessKeyIds(): string[] {
    return [...this.sessions].filter(([, s]) => s.sessionToken !== undefined).map(([id]) => id);
  }

  /** Every secret handed out (users' secret keys, sessions' secret keys and tokens): what must never be printed. */
  issuedSecrets(): string[] {
    return [...this.sessions.values()].flatMap((s) => [
      s.secretAccessKey,
      ...(s.sessionToken ? [s.sessionToken] : []),
    ]);
  }

  /** Makes the next `times` matching calls fail with `error`; queued specs are consumed in order. */
  injectFaults(fault: StsFaultSpec): void {
    if (fault.times > 0) this.faultQueue.push({ ...fault });
  }

  /** Makes every call fail with `error` until called with `null` (an STS outage). */
  failAll(error: string | null): void {
    this.outage = error;
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const raw = await readBody(req);
    const requestId = randomUUID();
    let status = 200;
    let text: string;
    try {
      text = this.dispatch(req, raw, requestId);
    } catch (error) {
      const known = error instanceof StsEmulatorError;
      const code = known ? error.code : 'InternalFailure';
      status = known ? error.status : 500;
      const type = status >= 500 ? 'Receiver' : 'Sender';
      const message = known ? error.message : 'Internal error';
      text =
        `<ErrorResponse xmlns="${XMLNS}"><Error><Type>${type}</Type><Code>${xmlEscape(code)}</Code>` +
        `<Message>${xmlEscape(message)}</Message></Error><RequestId>${requestId}</RequestId></ErrorResponse>`;
    }
    res.writeHead(status, {
      'Content-Type': 'text/xml',
      'Content-Length': Buffer.byteLength(text),
      'x-amzn-RequestId': requestId,
    });
    res.end(text);
  }

  private dispatch(req: IncomingMessage, raw: string, requestId: string): string {
    if (req.method !== 'POST' || (req.url ?? '/').split('?')[0] !== '/') {
      fail('InvalidAction', 'Expected POST / with a form-encoded AWS Query body');
    }
    if (!String(req.headers['content-type']).startsWith('application/x-www-form-urlencoded')) {
      fail('InvalidAction', 'Content-Type must be application/x-www-form-urlencoded');
    }
    const form = new URLSearchParams(raw);
    const action = form.get('Action') ?? '';
    const accessKeyId = accessKeyIdOfRequest(req);
    const call: StsCall = { action, ...(accessKeyId ? { accessKeyId } : {}) };
    if (action === 'AssumeRole') {
      const duration = form.get('DurationSeconds');
      Object.assign(call, {
        ...(form.has('RoleArn') ? { roleArn: form.get('RoleArn') } : {}),
        ...(form.has('RoleSessionName') ? { roleSessionName: form.get('RoleSessionName') } : {}),
        ...(form.has('ExternalId') ? { externalId: form.get('ExternalId') } : {}),
        ...(duration !== null ? { durationSeconds: Number(duration) } : {}),
      });
    }
    this.calls[action] = (this.calls[action] ?? 0) + 1;
    this.callLog.push(call);
    try {
      if (form.get('Version') !== VERSION) fail('InvalidAction', `Version must be ${VERSION}`);
      const fault = this.takeFault(action);
      if (fault) {
        this.faults[action] = (this.faults[action] ?? 0) + 1;
        fail(fault, `Injected ${fault} (sts-emulator)`);
      }
      if (action !== 'AssumeRole')
        fail('InvalidAction', `Could not find operation ${action} for version ${VERSION}`);
      const caller = this.caller(accessKeyId);
      return this.assumeRole(form, caller, accessKeyId as string, requestId);
    } catch (error) {
      if (error instanceof StsEmulatorError) call.error = error.code;
      throw error;
    }
  }

  /** The principal that signed the request; unknown or expired credentials are refused as real STS does. */
  private caller(accessKeyId: string | undefined): EmulatedPrincipal {
    if (!accessKeyId) fail('MissingAuthenticationToken', 'Request is missing Authentication Token');
    const session = this.sessions.get(accessKeyId);
    if (!session) fail('InvalidClientTokenId', 'The security token included in the request is invalid.');
    const { expiration } = session.principal;
    if (expiration && expiration.getTime() <= Date.now()) {
      fail('ExpiredToken', 'The security token included in the request is expired');
    }
    return session.principal;
  }

  private assumeRole(
    form: URLSearchParams,
    caller: EmulatedPrincipal,
    callerKeyId: string,
    requestId: string,
  ): string {
    const roleArn = form.get('RoleArn') ?? fail('MissingParameter', 'RoleArn is required');
    const sessionName =
      form.get('RoleSessionName') ?? fail('MissingParameter', 'RoleSessionName is required');
    if (!SESSION_NAME.test(sessionName)) {
      fail('ValidationError', "Value at 'roleSessionName' failed to satisfy constraint");
    }
    const externalId = form.get('ExternalId');
    if (externalId !== null && !EXTERNAL_ID.test(externalId)) {
      fail('ValidationError', "Value at 'externalId' failed to satisfy constraint");
    }
    const role = this.roles.get(roleArn);
    const trusted = (trust: TrustPolicy): boolean =>
      trust.principals.some((entry) => principalMatches(entry, caller, callerKeyId)) &&
      (trust.externalId === undefined || trust.externalId === externalId);
    /* Real STS says the same whether the role is missing, untrusted or the external id is wrong. */
    if (!role || !trusted(role.trust)) {
      fail(
        'AccessDenied',
        `User: ${caller.arn} is not authorized to perform: sts:AssumeRole on resource: ${roleArn}`,
      );
    }
    const max = role.maxSessionDuration ?? 3_600;
    const requested = form.get('DurationSeconds');
    const seconds = requested === null ? (role.sessionDurationSeconds ?? 3_600) : Number(requested);
    if (requested !== null && (!Number.isInteger(seconds) || seconds < 900 || seconds > max)) {
      fail('ValidationError', `The requested DurationSeconds exceeds the 900..${max} range`);
    }
    const [, account, roleName] = ROLE_ARN.exec(roleArn) as RegExpExecArray;
    const expiration = new Date(Math.floor((Date.now() + seconds * 1_000) / 1_000) * 1_000);
    const arn = `arn:aws:sts::${account}:assumed-role/${roleName}/${sessionName}`;
    const accessKeyId = accessKeyIdOf('ASIA');
    const secretAccessKey = randomBytes(30).toString('base64');
    const sessionToken = randomBytes(96).toString('base64');
    const principal: EmulatedPrincipal = { account: account as string, arn, roleArn, expiration };
    this.sessions.set(accessKeyId, { principal, secretAccessKey, sessionToken });
    const roleId = `AROA${accessKeyId.slice(4, 20)}`;
    return (
      `<AssumeRoleResponse xmlns="${XMLNS}"><AssumeRoleResult>` +
      `<AssumedRoleUser><AssumedRoleId>${roleId}:${xmlEscape(sessionName)}</AssumedRoleId>` +
      `<Arn>${xmlEscape(arn)}</Arn></AssumedRoleUser>` +
      `<Credentials><AccessKeyId>${accessKeyId}</AccessKeyId><SecretAccessKey>${secretAccessKey}</SecretAccessKey>` +
      `<SessionToken>${sessionToken}</SessionToken><Expiration>${expiration.toISOString().replace('.000Z', 'Z')}</Expiration></Credentials>` +
      `<PackedPolicySize>0</PackedPolicySize></AssumeRoleResult>` +
      `<ResponseMetadata><RequestId>${requestId}</RequestId></ResponseMetadata></AssumeRoleResponse>`
    );
  }

  private takeFault(action: string): string | undefined {
    if (this.outage) return this.outage;
    const index = this.faultQueue.findIndex((f) => !f.action || f.action === action);
    if (index < 0) return undefined;
    const fault = this.faultQueue[index] as StsFaultSpec;
    if (--fault.times <= 0) this.faultQueue.splice(index, 1);
    return fault.error;
  }
}

/**
 * Starts an STS emulator on `127.0.0.1` (random port). SigV4 signatures are not verified, but the
 * request must be signed with an access key id the emulator knows. Call {@link StsEmulator.close}.
 */
export async function startStsEmulator(options?: StsEmulatorOptions): Promise<StsEmulator> {
  return StsEmulator.start(options);
}
