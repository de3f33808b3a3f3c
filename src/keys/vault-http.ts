import { ConfigError } from '../errors';

/** The `fetch` function this library calls Vault with (Node's own by default). */
export type VaultFetch = (input: string, init: RequestInit) => Promise<Response>;

/** How one Vault server is reached: address, namespace, timeouts and retries. */
export interface VaultHttpOptions {
  /** The server's origin, `https://vault.example.com:8200`, normalized. */
  address: string;
  /** Sent as `X-Vault-Namespace` (Vault Enterprise, OpenBao namespaces). */
  namespace?: string;
  /** Milliseconds one attempt may take, answer included. */
  requestTimeout: number;
  /** Attempts per call, the first included. */
  maxAttempts: number;
  /** First backoff delay in ms; doubled after each attempt, with jitter. */
  retryDelay: number;
  /** Upper bound of one backoff delay (and of a `Retry-After` honoured), in ms. */
  maxRetryDelay: number;
  fetch: VaultFetch;
}

/** What Vault answered, after retries. */
export interface VaultAnswer {
  status: number;
  /** The JSON body (`{ data }`, `{ auth }`, `{ errors }`), or undefined (204, or not JSON). */
  body: Record<string, unknown> | undefined;
  /** `errors` of the body, flattened (Vault's multi-error text reduced to its messages). */
  errors: string[];
  /** Attempts made. */
  attempts: number;
}

/** Vault could not be reached or did not answer in time, after every attempt. */
export class VaultTransportError extends Error {
  override name = 'VaultTransportError';
  constructor(
    readonly kind: 'timeout' | 'network',
    readonly attempts: number,
    /** The network error's code (`ECONNREFUSED`…) or name. */
    readonly code: string,
    options?: { cause?: unknown },
  ) {
    super(kind === 'timeout' ? 'timed out' : code, options);
  }
}

/** HTTP statuses worth another attempt: throttled, Enterprise consistency lag, server-side failures. */
const RETRIED_STATUSES = new Set([412, 429, 500, 502, 503, 504]);
/** A failure that is a verdict on the ciphertext, whatever the status (rewrap reports it as a 500). */
const DETERMINISTIC = /message authentication failed|invalid ciphertext/i;

/**
 * Calls Vault's HTTP API with plain `fetch`: one `AbortSignal.timeout` per attempt, and retries of
 * 412/429/5xx answers and of network failures and timeouts, with exponential backoff (full
 * jitter in the upper half) bounded by `maxRetryDelay`. Redirects are not followed: a
 * `X-Vault-Token` header must never be replayed to wherever a `Location` points.
 */
export class VaultHttp {
  constructor(readonly options: VaultHttpOptions) {}

  async send(
    method: 'GET' | 'POST',
    path: string,
    init: { token?: string; body?: Record<string, unknown> } = {},
  ): Promise<VaultAnswer> {
    const { address, namespace, requestTimeout, maxAttempts } = this.options;
    const headers: Record<string, string> = { 'X-Vault-Request': 'true' };
    if (init.token !== undefined) headers['X-Vault-Token'] = init.token;
    if (namespace) headers['X-Vault-Namespace'] = namespace;
    if (init.body !== undefined) headers['Content-Type'] = 'application/json';
    const body = init.body === undefined ? undefined : JSON.stringify(init.body);
    for (let attempt = 1; ; attempt++) {
      let answer: VaultAnswer;
      let retryAfter: number | undefined;
      try {
        const response = await this.options.fetch(`${address}/v1/${path}`, {
          method,
          headers,
          ...(body === undefined ? {} : { body }),
          redirect: 'manual',
          signal: AbortSignal.timeout(requestTimeout),
        });
        answer = await readAnswer(response, attempt);
        retryAfter = retryAfterMs(response.headers.get('retry-after'));
      } catch (error) {
        const transport = transportError(error, attempt);
        if (attempt >= maxAttempts) throw transport;
        await this.#backoff(attempt);
        continue;
      }
      const deterministic = answer.errors.some((e) => DETERMINISTIC.test(e));
      if (!RETRIED_STATUSES.has(answer.status) || deterministic || attempt >= maxAttempts) return answer;
      await this.#backoff(attempt, retryAfter);
    }
  }

  #backoff(attempt: number, retryAfter?: number): Promise<void> {
    const { retryDelay, maxRetryDelay } = this.options;
    const ceiling = Math.min(maxRetryDelay, retryDelay * 2 ** (attempt - 1));
    const delay = Math.max(
      ceiling / 2 + Math.random() * (ceiling / 2),
      Math.min(retryAfter ?? 0, maxRetryDelay),
    );
    return new Promise((resolve) => setTimeout(resolve, delay).unref());
  }
}

async function readAnswer(response: Response, attempts: number): Promise<VaultAnswer> {
  const text = await response.text();
  let body: Record<string, unknown> | undefined;
  if (text.trim() !== '') {
    try {
      const parsed: unknown = JSON.parse(text);
      if (parsed && typeof parsed === 'object' && !Array.isArray(parsed))
        body = parsed as Record<string, unknown>;
    } catch {
      /* Not JSON (a proxy's error page): the status alone speaks. */
    }
  }
  const raw = Array.isArray(body?.errors) ? (body.errors as unknown[]) : [];
  return { status: response.status, body, errors: raw.flatMap(flattenVaultError), attempts };
}

/** Vault joins several errors as `2 errors occurred:\n\t* a\n\t* b\n\n`; this yields `a`, `b`. */
function flattenVaultError(error: unknown): string[] {
  if (typeof error !== 'string') return [];
  const items = error
    .replace(/^\s*\d+ errors? occurred:\s*/, '')
    .split(/\n\t\* /)
    .map((e) => e.replace(/^\* /, '').replace(/\s+/g, ' ').trim())
    .filter((e) => e !== '');
  return items.length > 0 ? items : [error.trim()];
}

function retryAfterMs(header: string | null): number | undefined {
  if (header === null) return undefined;
  const seconds = Number(header);
  return Number.isFinite(seconds) && seconds >= 0 ? seconds * 1000 : undefined;
}

function transportError(error: unknown, attempts: number): VaultTransportError {
  const name = (error as { name?: unknown })?.name;
  if (name === 'TimeoutError' || name === 'AbortError') {
    return new VaultTransportError('timeout', attempts, 'TimeoutError', { cause: error });
  }
  /* fetch wraps the socket error: `TypeError: fetch failed` with `cause.code` (`ECONNREFUSED`…). */
  const cause = (error as { cause?: { code?: unknown; name?: unknown } })?.cause;
  const code =
    typeof cause?.code === 'string'
      ? cause.code
      : typeof cause?.name === 'string'
        ? cause.name
        : typeof name === 'string'
          ? name
          : 'NetworkError';
  return new VaultTransportError('network', attempts, code, { cause: error });
}

/** The origin of a Vault address (`https://host:port`), refusing anything that is not one. */
export function vaultOrigin(address: unknown, needer: string): string {
  if (typeof address !== 'string' || address.trim() === '') {
    throw new ConfigError(
      `${needer} needs address: the Vault server's URL, e.g. https://vault.example.com:8200`,
    );
  }
  let url: URL;
  try {
    url = new URL(address.trim());
  } catch {
    throw new ConfigError(`${needer} address is not a URL (e.g. https://vault.example.com:8200)`);
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') {
    throw new ConfigError(`${needer} address must be an http(s) URL, got ${url.protocol}`);
  }
  /* Credentials in the URL would travel with every request and land in every log that prints it. */
  if (url.username || url.password) {
    throw new ConfigError(`${needer} address must not carry credentials; give them with auth`);
  }
  if ((url.pathname !== '/' && url.pathname !== '') || url.search || url.hash) {
    throw new ConfigError(`${needer} address must be the server's origin only (no path, query or fragment)`, {
      keyId: url.origin,
    });
  }
  return url.origin;
}

/** A mount or namespace path: segments of letters, digits, `_`, `-` and `.`, slashes trimmed. */
export function vaultPath(value: unknown, what: string, needer: string): string {
  const path = typeof value === 'string' ? value.trim().replace(/^\/+|\/+$/g, '') : '';
  if (!/^[A-Za-z0-9_.-]+(\/[A-Za-z0-9_.-]+)*$/.test(path) || path.split('/').some((s) => /^\.+$/.test(s))) {
    throw new ConfigError(
      `${needer} ${what} must be a path such as "transit" or "team-a/transit", got ${describe(value)}`,
    );
  }
  return path;
}

function describe(value: unknown): string {
  return typeof value === 'string' ? JSON.stringify(value) : typeof value;
}

/** Each segment URI-encoded, slashes kept. */
export function encodePath(path: string): string {
  return path.split('/').map(encodeURIComponent).join('/');
}
