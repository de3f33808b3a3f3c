import { readFileSync, statSync } from 'node:fs';
import { readFile, stat } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { ConfigError, type ErrorContext, KeyAccessDeniedError, KeyProviderError } from '../errors';
import { encodePath, type VaultHttp, VaultTransportError, vaultPath } from './vault-http';

/** How a Vault client authenticates. Exactly one form. */
export type VaultAuth =
  | {
      /** A Vault token (`hvs.…`), used as it is: Vault refusing it is a `KeyAccessDeniedError`. */
      token: string;
    }
  | {
      /**
       * A file holding the token, as Vault Agent's `file` sink writes it: read at first use and
       * again whenever the file changes (Agent rewrites it on every renewal or re-authentication),
       * and once more when Vault refuses the token held.
       */
      tokenFile: string;
    }
  | {
      /** AppRole login; the token it yields is renewed, or obtained again, before its TTL ends. */
      appRole: VaultAppRoleAuth;
    };

/** AppRole credentials (`auth/<mount>/login` with `role_id` and `secret_id`). */
export interface VaultAppRoleAuth {
  roleId: string;
  secretId: string;
  /** The AppRole auth mount. Default `approle`. */
  mount?: string;
}

/** A clock, to measure token TTLs (tests move it by hand). */
export interface VaultClock {
  now(): number;
}

/** Where tokens come from: each call asks for the current one. */
export interface VaultTokenSource {
  /** What it is, for messages: never a secret. */
  readonly label: string;
  /** A token valid now (logging in, renewing or re-reading as needed). */
  token(http: VaultHttp, context: ErrorContext): Promise<string>;
  /**
   * Vault refused `token` (403): whether asking again may yield another one (a new login, a
   * rewritten file). The caller retries once if so.
   */
  refused(token: string): Promise<boolean>;
  /** Drops any token held in memory. */
  forget(): void;
}

/** The AppRole's token: renewed when 2/3 of its lease has passed. */
const RENEW_AT = 2 / 3;
/** A renewal granting less than this share of the login's lease was cut short by the max TTL: log in next time. */
const SHORT_RENEWAL = 0.9;

/** The token source for `auth` (default: `VAULT_TOKEN`, else `~/.vault-token`, as the Vault CLI). */
export function tokenSourceOf(
  auth: VaultAuth | undefined,
  clock: VaultClock,
  needer: string,
): VaultTokenSource {
  if (auth === undefined) {
    const fromEnv = process.env.VAULT_TOKEN;
    if (fromEnv !== undefined && fromEnv.trim() !== '')
      return staticToken(fromEnv.trim(), needer, 'VAULT_TOKEN');
    const file = join(homedir(), '.vault-token');
    if (fileExists(file)) return new TokenFile(file);
    throw new ConfigError(
      `${needer} needs auth: { token }, { tokenFile } or { appRole: { roleId, secretId } } ` +
        '(or VAULT_TOKEN, or a ~/.vault-token file)',
    );
  }
  if (typeof auth !== 'object' || auth === null) throw new ConfigError(`${needer} auth must be an object`);
  const forms = (['token', 'tokenFile', 'appRole'] as const).filter(
    (f) => (auth as Record<string, unknown>)[f] !== undefined,
  );
  if (forms.length !== 1) {
    throw new ConfigError(
      forms.length === 0
        ? `${needer} auth needs one of token, tokenFile or appRole`
        : `Cannot set both auth.${forms[0]} and auth.${forms[1]}`,
    );
  }
  if ('token' in auth && auth.token !== undefined) return staticToken(auth.token, needer, 'auth.token');
  if ('tokenFile' in auth && auth.tokenFile !== undefined) {
    if (typeof auth.tokenFile !== 'string' || auth.tokenFile.trim() === '') {
      throw new ConfigError(`${needer} auth.tokenFile must be a file path`);
    }
    return new TokenFile(auth.tokenFile);
  }
  const { roleId, secretId, mount } = (auth as { appRole: VaultAppRoleAuth }).appRole ?? {};
  for (const [name, value] of [
    ['roleId', roleId],
    ['secretId', secretId],
  ] as const) {
    if (typeof value !== 'string' || value.trim() === '') {
      throw new ConfigError(`${needer} auth.appRole.${name} must be a non-empty string`);
    }
  }
  return new AppRole(roleId, secretId, vaultPath(mount ?? 'approle', 'auth.appRole.mount', needer), clock);
}

function staticToken(token: unknown, needer: string, what: string): VaultTokenSource {
  if (typeof token !== 'string' || token.trim() === '' || /\s/.test(token.trim())) {
    throw new ConfigError(`${needer} ${what} must be a Vault token (no whitespace)`);
  }
  const value = token.trim();
  return {
    label: 'token',
    token: async () => value,
    refused: async () => false,
    forget() {},
  };
}

function fileExists(path: string): boolean {
  try {
    return statSync(path).isFile() && readFileSync(path, 'utf8').trim() !== '';
  } catch {
    return false;
  }
}

/** A token file, re-read when its inode, size or modification time changes. */
class TokenFile implements VaultTokenSource {
  readonly label: string;
  #held: { token: string; stamp: string } | undefined;

  constructor(readonly path: string) {
    this.label = `token file ${path}`;
  }

  async token(_http: VaultHttp, context: ErrorContext): Promise<string> {
    const stamp = await this.#stamp(context);
    if (this.#held?.stamp === stamp) return this.#held.token;
    return this.#read(stamp, context);
  }

  async refused(token: string): Promise<boolean> {
    try {
      return (await this.#read(await this.#stamp({}), {})) !== token;
    } catch {
      return false;
    }
  }

  forget(): void {
    this.#held = undefined;
  }

  async #stamp(context: ErrorContext): Promise<string> {
    try {
      const s = await stat(this.path);
      return `${s.ino}:${s.size}:${s.mtimeMs}`;
    } catch (error) {
      throw this.#unreadable(error, context);
    }
  }

  async #read(stamp: string, context: ErrorContext): Promise<string> {
    let token: string;
    try {
      token = (await readFile(this.path, 'utf8')).trim();
    } catch (error) {
      throw this.#unreadable(error, context);
    }
    if (token === '' || /\s/.test(token)) {
      throw new KeyProviderError(`the Vault token file ${this.path} holds no token`, context);
    }
    this.#held = { token, stamp };
    return token;
  }

  #unreadable(error: unknown, context: ErrorContext): KeyProviderError {
    const code = (error as NodeJS.ErrnoException)?.code ?? 'error';
    return new KeyProviderError(`the Vault token file ${this.path} cannot be read (${code})`, context, {
      cause: error,
    });
  }
}

interface Lease {
  token: string;
  /** No TTL (lease_duration 0): used until Vault refuses it. */
  endless: boolean;
  renewAt: number;
  expiresAt: number;
  renewable: boolean;
  /** The lease the login granted, in ms. */
  loginLease: number;
}

/**
 * AppRole: logs in with `role_id` and `secret_id`, renews the token (`auth/token/renew-self`)
 * once 2/3 of its lease has passed, and logs in again when it cannot be renewed (not renewable,
 * renewal refused, or a renewal cut short by the token's max TTL). Concurrent calls share one
 * login or renewal.
 */
class AppRole implements VaultTokenSource {
  readonly label: string;
  #lease: Lease | undefined;
  #pending: Promise<string> | undefined;

  constructor(
    readonly roleId: string,
    readonly secretId: string,
    readonly mount: string,
    readonly clock: VaultClock,
  ) {
    this.label = `AppRole login at auth/${mount}`;
  }

  async token(http: VaultHttp, context: ErrorContext): Promise<string> {
    const lease = this.#lease;
    if (lease && (lease.endless || this.clock.now() < lease.renewAt)) return lease.token;
    this.#pending ??= this.#refresh(http, context).finally(() => {
      this.#pending = undefined;
    });
    return this.#pending;
  }

  async refused(token: string): Promise<boolean> {
    if (this.#lease?.token === token) this.#lease = undefined;
    return true;
  }

  forget(): void {
    this.#lease = undefined;
  }

  async #refresh(http: VaultHttp, context: ErrorContext): Promise<string> {
    const lease = this.#lease;
    if (lease?.renewable && this.clock.now() < lease.expiresAt) {
      const renewed = await this.#renew(http, lease).catch(() => undefined);
      if (renewed) return renewed;
    }
    return this.#login(http, context);
  }

  async #renew(http: VaultHttp, lease: Lease): Promise<string | undefined> {
    const answer = await http.send('POST', 'auth/token/renew-self', { token: lease.token, body: {} });
    const auth = authOf(answer.body);
    if (answer.status !== 200 || !auth) return undefined;
    const now = this.clock.now();
    const ms = auth.leaseSeconds * 1000;
    this.#lease = {
      ...lease,
      renewAt: now + ms * RENEW_AT,
      expiresAt: now + ms,
      /* Cut short by the max TTL: this lease is the last; log in when it is 2/3 through. */
      renewable: auth.renewable && ms >= lease.loginLease * SHORT_RENEWAL,
    };
    return lease.token;
  }

  async #login(http: VaultHttp, context: ErrorContext): Promise<string> {
    this.#lease = undefined;
    const path = `auth/${encodePath(this.mount)}/login`;
    let answer: Awaited<ReturnType<VaultHttp['send']>>;
    try {
      answer = await http.send('POST', path, { body: { role_id: this.roleId, secret_id: this.secretId } });
    } catch (error) {
      const what = error instanceof VaultTransportError ? transportText(error) : 'failed';
      throw new KeyProviderError(`Vault AppRole login at auth/${this.mount} ${what}`, context, {
        cause: error,
      });
    }
    const auth = authOf(answer.body);
    if (answer.status === 200 && auth?.token) {
      const now = this.clock.now();
      const ms = auth.leaseSeconds * 1000;
      this.#lease = {
        token: auth.token,
        endless: ms === 0,
        renewAt: now + ms * RENEW_AT,
        expiresAt: now + ms,
        renewable: auth.renewable,
        loginLease: ms,
      };
      return auth.token;
    }
    const reason = answer.errors.join('; ') || `HTTP ${answer.status}`;
    /* Vault answers a wrong role_id or secret_id (or a used-up or expired secret_id) with 400. */
    if (answer.status === 400 || answer.status === 403) {
      throw new KeyAccessDeniedError(
        `Vault refused the AppRole login at auth/${this.mount} (HTTP ${answer.status}: ${reason}): ` +
          'check the role_id and secret_id (a secret_id may have expired or used up its uses)',
        context,
      );
    }
    throw new KeyProviderError(
      `Vault AppRole login at auth/${this.mount} failed${attemptsText(answer.attempts)} (HTTP ${answer.status}: ${reason})`,
      context,
    );
  }
}

function authOf(
  body: Record<string, unknown> | undefined,
): { token: string | undefined; leaseSeconds: number; renewable: boolean } | undefined {
  const auth = body?.auth as Record<string, unknown> | undefined;
  if (!auth || typeof auth !== 'object') return undefined;
  const lease = typeof auth.lease_duration === 'number' && auth.lease_duration > 0 ? auth.lease_duration : 0;
  return {
    token: typeof auth.client_token === 'string' && auth.client_token !== '' ? auth.client_token : undefined,
    leaseSeconds: lease,
    renewable: auth.renewable === true,
  };
}

/** ` after N attempts`, when there was more than one. */
export function attemptsText(attempts: number): string {
  return attempts > 1 ? ` after ${attempts} attempts` : '';
}

/** What a transport failure was, for messages. */
export function transportText(error: VaultTransportError): string {
  const after = attemptsText(error.attempts);
  return error.kind === 'timeout'
    ? `timed out${after}: the server did not answer within requestTimeout`
    : `failed${after} (${error.code})`;
}
