import { createDecipheriv, hkdfSync } from 'node:crypto';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { parseVaultPolicy, startVaultEmulator, type VaultEmulator } from '../../../support/vault-emulator';

/**
 * The Vault emulator speaks Vault's HTTP API as Vault does: `{ data }` and `{ auth }` envelopes,
 * `{ errors: [...] }` bodies with Vault's statuses and texts, tokens and policies enforced. Driven
 * here with plain `fetch`, as the provider calls it.
 */
class Clock {
  time = Date.now();
  now() {
    return this.time;
  }
}

const clock = new Clock();
let vault: VaultEmulator;
const b64 = (text: string) => Buffer.from(text).toString('base64');
const CONTEXT = b64(JSON.stringify([['typeorm-envelope:keyring', 'main']]));

async function call(
  method: string,
  path: string,
  options: { token?: string; body?: unknown; namespace?: string } = {},
): Promise<{ status: number; body: Record<string, unknown> | undefined }> {
  const headers: Record<string, string> = {};
  if (options.token !== undefined) headers['X-Vault-Token'] = options.token;
  if (options.namespace) headers['X-Vault-Namespace'] = options.namespace;
  const response = await fetch(`${vault.address}/v1/${path}`, {
    method,
    headers,
    ...(options.body === undefined ? {} : { body: JSON.stringify(options.body) }),
  });
  const text = await response.text();
  return { status: response.status, body: text ? (JSON.parse(text) as Record<string, unknown>) : undefined };
}
const data = (r: { body: Record<string, unknown> | undefined }) => r.body?.data as Record<string, unknown>;

beforeAll(async () => {
  vault = await startVaultEmulator({ clock });
});
afterAll(async () => {
  await vault?.close();
});
beforeEach(() => {
  vault.failAll(null);
  vault.resetCalls();
});

describe('Transit', () => {
  it('datakey/plaintext answers a 256-bit key and its vault:v1 ciphertext in a data envelope; decrypt opens it', async () => {
    vault.createKey('dk');
    const made = await call('POST', 'transit/datakey/plaintext/dk', {
      token: vault.rootToken,
      body: { bits: 256, context: CONTEXT },
    });
    expect(made.status).toBe(200);
    const { plaintext, ciphertext, key_version } = data(made) as Record<string, string>;
    expect(Buffer.from(plaintext as string, 'base64')).toHaveLength(32);
    expect(ciphertext).toMatch(/^vault:v1:[A-Za-z0-9+/]+=*$/);
    expect(key_version).toBe(1);
    const opened = await call('POST', 'transit/decrypt/dk', {
      token: vault.rootToken,
      body: { ciphertext, context: CONTEXT },
    });
    expect(data(opened)).toEqual({ plaintext });
    const wrapped = await call('POST', 'transit/datakey/wrapped/dk', {
      token: vault.rootToken,
      body: { context: CONTEXT },
    });
    expect(data(wrapped).plaintext).toBeUndefined();
    expect(vault.calls).toMatchObject({ datakey: 2, decrypt: 1 });
    expect(vault.callLog[0]).toMatchObject({
      operation: 'datakey',
      keyName: 'dk',
      context: { 'typeorm-envelope:keyring': 'main' },
      keyVersion: 1,
      status: 200,
      accessor: 'root-accessor',
    });
  });

  it('seals as Vault does: HKDF-SHA256 of the version key with the context as info, nonce ‖ ciphertext ‖ tag', async () => {
    vault.createKey('layout');
    const { ciphertext } = data(
      await call('POST', 'transit/encrypt/layout', {
        token: vault.rootToken,
        body: { plaintext: b64('hello'), context: CONTEXT },
      }),
    ) as { ciphertext: string };
    // Reach into the emulator's key material to check the layout against node:crypto.
    const material = (vault as unknown as { keys: Map<string, { versions: Buffer[] }> }).keys.get(
      '\0transit\0layout',
    )?.versions[0] as Buffer;
    const derived = Buffer.from(
      hkdfSync('sha256', material, Buffer.alloc(0), Buffer.from(CONTEXT, 'base64'), 32),
    );
    const sealed = Buffer.from(ciphertext.slice('vault:v1:'.length), 'base64');
    const decipher = createDecipheriv('aes-256-gcm', derived, sealed.subarray(0, 12));
    decipher.setAuthTag(sealed.subarray(sealed.length - 16));
    expect(Buffer.concat([decipher.update(sealed.subarray(12, -16)), decipher.final()]).toString()).toBe(
      'hello',
    );
  });

  it('a derived key needs a context, and a ciphertext opens only under its own context', async () => {
    vault.createKey('derived');
    const noContext = await call('POST', 'transit/encrypt/derived', {
      token: vault.rootToken,
      body: { plaintext: b64('x') },
    });
    expect(noContext.status).toBe(400);
    expect((noContext.body as { errors: string[] }).errors[0]).toMatch(
      /^missing 'context' for key derivation/,
    );
    const { ciphertext } = data(
      await call('POST', 'transit/encrypt/derived', {
        token: vault.rootToken,
        body: { plaintext: b64('x'), context: CONTEXT },
      }),
    ) as { ciphertext: string };
    const other = b64(JSON.stringify([['typeorm-envelope:keyring', 'other']]));
    const wrong = await call('POST', 'transit/decrypt/derived', {
      token: vault.rootToken,
      body: { ciphertext, context: other },
    });
    expect(wrong).toEqual({ status: 400, body: { errors: ['cipher: message authentication failed'] } });
    // rewrap reports the same failure as an internal error, as Vault and OpenBao do.
    const rewrap = await call('POST', 'transit/rewrap/derived', {
      token: vault.rootToken,
      body: { ciphertext, context: other },
    });
    expect(rewrap).toEqual({ status: 500, body: { errors: ['cipher: message authentication failed'] } });
  });

  it('a key that is not derived ignores the context, which is why the provider refuses such keys', async () => {
    vault.createKey('plain', { derived: false });
    const { ciphertext } = data(
      await call('POST', 'transit/encrypt/plain', {
        token: vault.rootToken,
        body: { plaintext: b64('x'), context: CONTEXT },
      }),
    ) as { ciphertext: string };
    const other = b64(JSON.stringify([['typeorm-envelope:keyring', 'other']]));
    const opened = await call('POST', 'transit/decrypt/plain', {
      token: vault.rootToken,
      body: { ciphertext, context: other },
    });
    expect(data(opened)).toEqual({ plaintext: b64('x') });
  });

  it('rotate adds a version; rewrap moves a ciphertext to it; min_decryption_version refuses older ones as too old', async () => {
    vault.createKey('rot');
    const { ciphertext } = data(
      await call('POST', 'transit/encrypt/rot', {
        token: vault.rootToken,
        body: { plaintext: b64('x'), context: CONTEXT },
      }),
    ) as { ciphertext: string };
    expect((await call('POST', 'transit/keys/rot/rotate', { token: vault.rootToken })).status).toBe(204);
    const rewrapped = data(
      await call('POST', 'transit/rewrap/rot', {
        token: vault.rootToken,
        body: { ciphertext, context: CONTEXT },
      }),
    );
    expect(rewrapped.ciphertext).toMatch(/^vault:v2:/);
    expect(rewrapped.key_version).toBe(2);
    expect(
      (
        await call('POST', 'transit/keys/rot/config', {
          token: vault.rootToken,
          body: { min_decryption_version: 2 },
        })
      ).status,
    ).toBe(204);
    const old = await call('POST', 'transit/decrypt/rot', {
      token: vault.rootToken,
      body: { ciphertext, context: CONTEXT },
    });
    expect(old).toEqual({
      status: 400,
      body: { errors: ['ciphertext or signature version is disallowed by policy (too old)'] },
    });
    const info = data(await call('GET', 'transit/keys/rot', { token: vault.rootToken }));
    expect(info).toMatchObject({
      type: 'aes256-gcm96',
      derived: true,
      exportable: false,
      latest_version: 2,
      min_decryption_version: 2,
      kdf: 'hkdf_sha256',
    });
    expect(Object.keys(info.keys as object)).toEqual(['2']);
  });

  it('answers a missing key with 404 and empty errors on read, 400 "encryption key not found" on use', async () => {
    expect(await call('GET', 'transit/keys/nope', { token: vault.rootToken })).toEqual({
      status: 404,
      body: { errors: [] },
    });
    const use = await call('POST', 'transit/decrypt/nope', {
      token: vault.rootToken,
      body: { ciphertext: 'vault:v1:AAAA', context: CONTEXT },
    });
    expect(use).toEqual({ status: 400, body: { errors: ['encryption key not found'] } });
    const route = await call('POST', 'other/decrypt/nope', { token: vault.rootToken, body: {} });
    expect(route.status).toBe(404);
  });

  it('chacha20-poly1305 keys seal and open too; other key types refuse to encrypt', async () => {
    vault.createKey('cha', { type: 'chacha20-poly1305' });
    const made = data(
      await call('POST', 'transit/datakey/plaintext/cha', {
        token: vault.rootToken,
        body: { context: CONTEXT },
      }),
    );
    const opened = data(
      await call('POST', 'transit/decrypt/cha', {
        token: vault.rootToken,
        body: { ciphertext: made.ciphertext, context: CONTEXT },
      }),
    );
    expect(opened.plaintext).toBe(made.plaintext);
    vault.createKey('rsa', { type: 'rsa-4096', derived: false });
    const refused = await call('POST', 'transit/datakey/plaintext/rsa', { token: vault.rootToken, body: {} });
    expect(refused.status).toBe(400);
  });
});

describe('tokens, policies and AppRole', () => {
  it('enforces policies per token; deleting a policy revokes what it allowed at once', async () => {
    vault.createKey('pol');
    vault.setPolicy(
      'pol-user',
      'path "transit/encrypt/pol" { capabilities = ["update"] }\npath "transit/keys/+" { capabilities = ["read"] }',
    );
    const token = vault.createToken({ policies: ['pol-user'] });
    const body = { plaintext: b64('x'), context: CONTEXT };
    expect((await call('POST', 'transit/encrypt/pol', { token, body })).status).toBe(200);
    expect((await call('GET', 'transit/keys/pol', { token })).status).toBe(200);
    const denied = await call('POST', 'transit/decrypt/pol', { token, body: { ciphertext: 'x' } });
    expect(denied).toEqual({
      status: 403,
      body: { errors: ['1 error occurred:\n\t* permission denied\n\n'] },
    });
    // Encrypting to a key that does not exist needs `create` (Vault's upsert): update alone is refused.
    vault.setPolicy('pol-user', [{ path: 'transit/encrypt/*', capabilities: ['update'] }]);
    expect((await call('POST', 'transit/encrypt/ghost', { token, body })).status).toBe(403);
    vault.deletePolicy('pol-user');
    expect((await call('POST', 'transit/encrypt/pol', { token, body })).status).toBe(403);
    expect((await call('POST', 'transit/encrypt/pol', { token: 'hvs.unknown', body })).body).toEqual({
      errors: ['permission denied', 'invalid token'],
    });
    expect((await call('POST', 'transit/encrypt/pol', { body })).status).toBe(403);
  });

  it('AppRole login answers an auth envelope; the token expires with its TTL unless renewed, up to its max TTL', async () => {
    vault.setPolicy('any', [{ path: 'transit/*', capabilities: ['read'] }]);
    vault.createKey('ar');
    const role = vault.createAppRole('app', { policies: ['any'], tokenTtl: 60, tokenMaxTtl: 150 });
    const bad = await call('POST', 'auth/approle/login', {
      body: { role_id: role.roleId, secret_id: 'wrong' },
    });
    expect(bad).toEqual({ status: 400, body: { errors: ['invalid role or secret ID'] } });
    const login = await call('POST', 'auth/approle/login', {
      body: { role_id: role.roleId, secret_id: role.secretId },
    });
    const auth = login.body?.auth as { client_token: string; lease_duration: number; renewable: boolean };
    expect(auth).toMatchObject({ lease_duration: 60, renewable: true });
    expect(auth.client_token).toMatch(/^hvs\./);
    const token = auth.client_token;
    expect((await call('GET', 'transit/keys/ar', { token })).status).toBe(200);
    clock.time += 50_000;
    const renewed = await call('POST', 'auth/token/renew-self', { token, body: {} });
    expect((renewed.body as { auth: { lease_duration: number } }).auth.lease_duration).toBe(60);
    clock.time += 50_000; // 100 s after login: alive thanks to the renewal
    expect((await call('GET', 'transit/keys/ar', { token })).status).toBe(200);
    const capped = await call('POST', 'auth/token/renew-self', { token, body: {} });
    expect((capped.body as { auth: { lease_duration: number } }).auth.lease_duration).toBe(50); // max TTL 150 s
    expect(capped.body?.warnings).toEqual([expect.stringContaining('max_ttl')]);
    clock.time += 51_000;
    expect((await call('GET', 'transit/keys/ar', { token })).status).toBe(403);
    expect(vault.calls.login).toBe(2);
    expect(vault.calls.renewSelf).toBe(2);
  });

  it('keeps keys and tokens apart per namespace (X-Vault-Namespace)', async () => {
    vault.enableTransit('transit', 'team-a');
    vault.createKey('ns-key', { namespace: 'team-a' });
    vault.setPolicy('ns', [{ path: 'transit/keys/*', capabilities: ['read'] }]);
    const inTeam = vault.createToken({ policies: ['ns'], namespace: 'team-a' });
    expect((await call('GET', 'transit/keys/ns-key', { token: inTeam, namespace: 'team-a' })).status).toBe(
      200,
    );
    expect((await call('GET', 'transit/keys/ns-key', { token: inTeam })).status).toBe(403);
    expect((await call('GET', 'transit/keys/ns-key', { token: vault.rootToken })).status).toBe(404);
    expect(vault.callLog[0]).toMatchObject({ namespace: 'team-a', path: 'transit/keys/ns-key' });
  });

  it('parses the HCL policies the documentation shows, and refuses what it cannot read', () => {
    expect(
      parseVaultPolicy(`
        # comment
        path "transit/datakey/plaintext/app" { capabilities = ["update"] }
        path "transit/keys/app" {
          capabilities = ["read"]
        }`),
    ).toEqual([
      { path: 'transit/datakey/plaintext/app', capabilities: ['update'] },
      { path: 'transit/keys/app', capabilities: ['read'] },
    ]);
    expect(() => parseVaultPolicy('path "x" { policy = "write" }')).toThrow(/cannot parse/);
  });
});

describe('fault injection and call counting', () => {
  it('forbidden, throttled, internal and sealed faults answer as Vault does, counted per operation', async () => {
    vault.createKey('faults');
    const body = { bits: 256, context: CONTEXT };
    vault.injectFaults({ operation: 'datakey', fault: 'throttled', times: 1 });
    vault.injectFaults({ operation: 'datakey', fault: 'internal', times: 1 });
    vault.injectFaults({ fault: 'forbidden', times: 1 });
    const statuses = [];
    for (let i = 0; i < 4; i++) {
      statuses.push(
        (await call('POST', 'transit/datakey/plaintext/faults', { token: vault.rootToken, body })).status,
      );
    }
    expect(statuses).toEqual([429, 500, 403, 200]);
    vault.failAll('sealed');
    expect(await call('GET', 'transit/keys/faults', { token: vault.rootToken })).toEqual({
      status: 503,
      body: { errors: ['Vault is sealed'] },
    });
    expect(vault.calls).toMatchObject({ datakey: 4, readKey: 1 });
    expect(vault.faults).toMatchObject({ datakey: 3, readKey: 1 });
  });

  it('a hanging emulator reads requests and never answers', async () => {
    vault.setHanging(true);
    const abort = new AbortController();
    try {
      let settled = false;
      const started = fetch(`${vault.address}/v1/transit/keys/faults`, {
        headers: { 'X-Vault-Token': vault.rootToken },
        signal: abort.signal,
      }).finally(() => {
        settled = true;
      });
      started.catch(() => {});
      while (vault.callLog.length === 0) await new Promise((resolve) => setImmediate(resolve));
      // The request was read and handled; the handler returned without answering.
      await new Promise((resolve) => setImmediate(resolve));
      expect(vault.callLog[0]?.operation).toBe('readKey');
      expect(vault.callLog[0]?.status).toBeUndefined();
      expect(settled).toBe(false);
    } finally {
      abort.abort();
      vault.setHanging(false);
    }
  });
});
