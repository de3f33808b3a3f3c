import { randomBytes } from 'node:crypto';
import { mkdtempSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { inspect } from 'node:util';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  ConfigError,
  IntegrityError,
  KeyAccessDeniedError,
  KeyProviderError,
  LocalKeyProvider,
  VaultTransitKeyProvider,
  type VaultTransitKeyProviderOptions,
} from '../../../../src';
import { startVaultEmulator, transitPolicy, type VaultEmulator } from '../../../support/vault-emulator';

const KEYRING = 'typeorm-envelope:keyring';
const TENANT = 'typeorm-envelope:tenant';
const CONTEXT = Object.freeze({ [KEYRING]: 'main' });
const OTHER_CONTEXT = Object.freeze({ [KEYRING]: 'other' });

class FakeClock {
  time = Date.now();
  now() {
    return this.time;
  }
}

async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (error) {
    return error as Error;
  }
  throw new Error('expected the call to fail');
}

const clock = new FakeClock();
let vault: VaultEmulator;
let token: string;
let keySeq = 0;
const dir = mkdtempSync(join(tmpdir(), 'vault-transit-'));

/** A new derived aes256-gcm96 key and a token whose policy is the least-privilege one for it. */
function newKey(options: Parameters<VaultEmulator['createKey']>[1] = {}): { name: string; token: string } {
  const name = `key-${++keySeq}`;
  vault.createKey(name, options);
  vault.setPolicy(`policy-${name}`, transitPolicy(name));
  return { name, token: vault.createToken({ policies: [`policy-${name}`], displayName: `app-${name}` }) };
}

let keyName: string;
const provider = (options: Partial<VaultTransitKeyProviderOptions> = {}) =>
  new VaultTransitKeyProvider({
    address: vault.address,
    keyName,
    auth: { token },
    retryDelay: 1,
    ...options,
  });

/** No error, message or printout may show a token. */
function expectNoToken(...texts: string[]): void {
  for (const text of texts) for (const issued of vault.issuedTokens()) expect(text).not.toContain(issued);
}

beforeAll(async () => {
  vault = await startVaultEmulator({ clock });
  ({ name: keyName, token } = newKey());
});
afterAll(async () => {
  await vault?.close();
  rmSync(dir, { recursive: true, force: true });
});
beforeEach(() => vault.resetCalls());
afterEach(() => vault.failAll(null));

describe('VaultTransitKeyProvider against the Vault emulator', () => {
  it('generates a 256-bit data key with datakey/plaintext and unwraps it with decrypt, the keyring as context', async () => {
    const transit = provider();
    const reference = `${vault.address}/v1/transit/keys/${keyName}`;
    expect(transit.describe()).toEqual({ kind: 'vault-transit', keyReference: reference });
    expect(await transit.resolveKeyReference()).toBe(reference);
    const { plaintextKey, wrappedKey } = await transit.generateDataKey(CONTEXT);
    expect(plaintextKey).toHaveLength(32);
    expect(wrappedKey.toString()).toMatch(/^vault:v1:[A-Za-z0-9+/]+=*$/);
    expect(wrappedKey.includes(plaintextKey)).toBe(false);
    const unwrapped = await transit.unwrapDataKey(wrappedKey, CONTEXT);
    expect(unwrapped.equals(plaintextKey)).toBe(true);
    expect(vault.callLog.map((c) => [c.operation, c.path, c.context, c.status])).toEqual([
      ['datakey', `transit/datakey/plaintext/${keyName}`, CONTEXT, 200],
      ['decrypt', `transit/decrypt/${keyName}`, CONTEXT, 200],
    ]);
    // Every call is attributable: the token's accessor (never the token) is in Vault's log.
    expect(vault.callLog.every((c) => c.accessor === vault.accessorOf(token))).toBe(true);
  });

  it('sends the context on every call that touches a data key', async () => {
    const transit = provider();
    const { plaintextKey, wrappedKey } = await transit.generateDataKey(CONTEXT);
    await transit.wrapDataKey(plaintextKey, CONTEXT);
    await transit.rewrapDataKey(wrappedKey, CONTEXT, provider());
    await transit.validate(CONTEXT);
    expect(vault.callLog.map((c) => c.operation)).toEqual([
      'datakey',
      'encrypt',
      'rewrap',
      'readKey',
      'datakey',
      'decrypt',
    ]);
    for (const call of vault.callLog.filter((c) => c.operation !== 'readKey'))
      expect(call.context).toEqual(CONTEXT);
  });

  it('refuses a wrapped key under another keyring, another key, altered, or moved to another tenant, with IntegrityError', async () => {
    const transit = provider();
    const { wrappedKey } = await transit.generateDataKey(CONTEXT);
    const wrongContext = await rejection(transit.unwrapDataKey(wrappedKey, OTHER_CONTEXT));
    expect(wrongContext).toBeInstanceOf(IntegrityError);
    expect(wrongContext.message).toContain('message authentication failed');
    expect((wrongContext as IntegrityError).keyId).toBe(transit.describe().keyReference);

    const other = newKey();
    const otherKey = await rejection(
      provider({ keyName: other.name, auth: { token: other.token } }).unwrapDataKey(wrappedKey, CONTEXT),
    );
    expect(otherKey).toBeInstanceOf(IntegrityError);
    expect(otherKey.message).toContain(
      'master key configured for its version may not be the one that wrapped it',
    );

    const altered = Buffer.from(wrappedKey);
    altered[altered.length - 3] = altered[altered.length - 3] === 65 ? 66 : 65;
    expect(await rejection(transit.unwrapDataKey(altered, CONTEXT))).toBeInstanceOf(IntegrityError);

    // A tenant's wrapped key taken to another tenant's rows, on the same Transit key.
    const tenantA = { [KEYRING]: 'main', [TENANT]: 'acme' };
    const tenantB = { [KEYRING]: 'main', [TENANT]: 'globex' };
    const ofA = await transit.generateDataKey(tenantA);
    const moved = await rejection(transit.unwrapDataKey(ofA.wrappedKey, tenantB));
    expect(moved).toBeInstanceOf(IntegrityError);
    expect((await transit.unwrapDataKey(ofA.wrappedKey, tenantA)).equals(ofA.plaintextKey)).toBe(true);
    expect(vault.callLog.filter((c) => c.status === 400).map((c) => c.context)).toContainEqual(tenantB);

    for (const error of [wrongContext, otherKey, moved]) {
      expect(error.message).not.toContain(wrappedKey.toString());
      expect(error.message).not.toContain(wrappedKey.toString().slice(9, 30));
      expectNoToken(error.message, inspect(error, { showHidden: true, depth: 5 }));
    }
  });

  it('refuses a wrapped key without its vault:vN: version prefix before calling Vault', async () => {
    const transit = provider();
    const { wrappedKey } = await transit.generateDataKey(CONTEXT);
    vault.resetCalls();
    for (const blob of [
      Buffer.from(wrappedKey.toString().replace(/^vault:v1:/, '')),
      Buffer.from(wrappedKey.toString().replace(/^vault:v1:/, 'vault:')),
      Buffer.from(wrappedKey.toString().replace(/^vault:v1:/, 'vault:vX:')),
      randomBytes(61), // a local key provider's wrapped key
    ]) {
      const error = await rejection(transit.unwrapDataKey(blob, CONTEXT));
      expect(error).toBeInstanceOf(IntegrityError);
      expect((error as IntegrityError).detail).toMatch(
        /^the wrapped data key is not a Vault Transit ciphertext/,
      );
    }
    expect(vault.callLog).toEqual([]);
  });

  it('validate() checks, in order, that the key exists, its type, exportable off and derived, then a round trip', async () => {
    const detail = async (options: Partial<VaultTransitKeyProviderOptions>) => {
      const error = await rejection(provider(options).validate(CONTEXT));
      expect(error).toBeInstanceOf(KeyProviderError);
      return error as KeyProviderError;
    };
    const missing = await detail({ keyName: 'no-such-key', auth: { token: vault.rootToken } });
    expect(missing).toBeInstanceOf(KeyAccessDeniedError);
    expect(missing.detail).toMatch(
      /^the Transit key was not found: no key no-such-key in mount transit \(HTTP 404\)/,
    );
    const cases: Array<[Parameters<VaultEmulator['createKey']>[1], string]> = [
      [
        { type: 'rsa-4096', derived: false },
        'key type is rsa-4096; an aes256-gcm96 or chacha20-poly1305 key is required',
      ],
      [
        { type: 'aes128-gcm96' },
        'key type is aes128-gcm96; an aes256-gcm96 or chacha20-poly1305 key is required',
      ],
      [
        { exportable: true, derived: false },
        'key is exportable; a key with exportable off is required (an exportable key can be read out of Vault)',
      ],
      [
        { derived: false },
        expect.stringMatching(/^key is not derived; a key created with derived=true is required/) as never,
      ],
    ];
    for (const [options, expected] of cases) {
      const key = newKey(options);
      const error = await detail({ keyName: key.name, auth: { token: key.token } });
      expect(error).not.toBeInstanceOf(KeyAccessDeniedError);
      expect(error.detail).toEqual(expected);
      expect(error.keyId).toBe(`${vault.address}/v1/transit/keys/${key.name}`);
    }
    const cha = newKey({ type: 'chacha20-poly1305' });
    vault.resetCalls();
    await expect(
      provider({ keyName: cha.name, auth: { token: cha.token } }).validate(CONTEXT),
    ).resolves.toBeUndefined();
    expect(vault.callLog.map((c) => c.operation)).toEqual(['readKey', 'datakey', 'decrypt']);
    expect(await provider().describeKey()).toEqual({
      name: keyName,
      type: 'aes256-gcm96',
      derived: true,
      exportable: false,
      allowPlaintextBackup: false,
      latestVersion: 1,
      minDecryptionVersion: 1,
    });
  });

  it('a policy revoked mid-session is a KeyAccessDeniedError naming the path and the capability, never the token', async () => {
    const key = newKey();
    const transit = provider({ keyName: key.name, auth: { token: key.token } });
    const { wrappedKey, plaintextKey } = await transit.generateDataKey(CONTEXT);
    vault.deletePolicy(`policy-${key.name}`);
    for (const [call, operation, path] of [
      [() => transit.unwrapDataKey(wrappedKey, CONTEXT), 'decrypt', `transit/decrypt/${key.name}`],
      [() => transit.generateDataKey(CONTEXT), 'datakey', `transit/datakey/plaintext/${key.name}`],
      [() => transit.wrapDataKey(plaintextKey, CONTEXT), 'encrypt', `transit/encrypt/${key.name}`],
    ] as const) {
      const error = await rejection(call());
      expect(error).toBeInstanceOf(KeyAccessDeniedError);
      expect((error as KeyAccessDeniedError).detail).toBe(
        `Vault denied ${operation} on ${path} (HTTP 403: permission denied): the token's policy must grant "update" on that path, and the token (token) must be valid`,
      );
      expectNoToken(error.message, inspect(error, { showHidden: true, depth: 5 }), String(error.stack));
    }
    const readDenied = await rejection(transit.checkKey());
    expect((readDenied as KeyAccessDeniedError).detail).toContain('must grant "read"');
    // A revoked token is refused the same way.
    vault.setPolicy(`policy-${key.name}`, transitPolicy(key.name));
    await expect(transit.unwrapDataKey(wrappedKey, CONTEXT)).resolves.toHaveLength(32);
    vault.revokeToken(key.token);
    const revoked = await rejection(transit.unwrapDataKey(wrappedKey, CONTEXT));
    expect(revoked).toBeInstanceOf(KeyAccessDeniedError);
    expect(revoked.message).toContain('permission denied; invalid token');
    // No retries of a refusal: one call each.
    expect(vault.faults.decrypt).toBe(0);
  });

  it('a key version below min_decryption_version is a KeyAccessDeniedError; a deleted key too', async () => {
    const key = newKey();
    const transit = provider({ keyName: key.name, auth: { token: key.token } });
    const { wrappedKey } = await transit.generateDataKey(CONTEXT);
    vault.rotateKey(key.name);
    vault.setMinDecryptionVersion(key.name, 2);
    const tooOld = await rejection(transit.unwrapDataKey(wrappedKey, CONTEXT));
    expect(tooOld).toBeInstanceOf(KeyAccessDeniedError);
    expect((tooOld as KeyAccessDeniedError).detail).toBe(
      "Vault Transit refused the data key's key version (Transit key version 1): it is below the key's min_decryption_version; " +
        're-wrap data keys under the latest version before raising it (HTTP 400: ciphertext or signature version is disallowed by policy (too old))',
    );
    vault.setMinDecryptionVersion(key.name, 1);
    await expect(transit.unwrapDataKey(wrappedKey, CONTEXT)).resolves.toHaveLength(32);
    vault.deleteKey(key.name);
    const deleted = await rejection(transit.unwrapDataKey(wrappedKey, CONTEXT));
    expect(deleted).toBeInstanceOf(KeyAccessDeniedError);
    expect(deleted.message).toContain('the Transit key was not found');
  });

  it('rides out throttling and a 500 with backoff: the emulator answering 429, 500, then 200', async () => {
    const transit = provider();
    vault.injectFaults({ operation: 'datakey', fault: 'throttled', times: 1 });
    vault.injectFaults({ operation: 'datakey', fault: 'internal', times: 1 });
    const { plaintextKey } = await transit.generateDataKey(CONTEXT);
    expect(plaintextKey).toHaveLength(32);
    expect(vault.calls.datakey).toBe(3);
    expect(vault.faults.datakey).toBe(2);
    expect(vault.callLog.map((c) => c.status)).toEqual([429, 500, 200]);
  });

  it('a sealed Vault (503) is retried up to maxAttempts, then a KeyProviderError; a refusal is never retried', async () => {
    const transit = provider();
    vault.failAll('sealed');
    const error = await rejection(transit.generateDataKey(CONTEXT));
    expect(error).toBeInstanceOf(KeyProviderError);
    expect(error).not.toBeInstanceOf(KeyAccessDeniedError);
    expect((error as KeyProviderError).detail).toBe(
      'Vault Transit datakey failed after 5 attempts (HTTP 503: Vault is sealed)',
    );
    expect(vault.calls.datakey).toBe(5);

    vault.failAll(null);
    vault.resetCalls();
    const twice = provider({ maxAttempts: 2 });
    vault.failAll('throttled');
    expect((await rejection(twice.generateDataKey(CONTEXT))).message).toContain('after 2 attempts (HTTP 429');
    expect(vault.calls.datakey).toBe(2);

    vault.failAll('forbidden');
    vault.resetCalls();
    expect(await rejection(transit.generateDataKey(CONTEXT))).toBeInstanceOf(KeyAccessDeniedError);
    expect(vault.calls.datakey).toBe(1);
  });

  it('an AEAD failure inside rewrap (Vault answers 500) is an IntegrityError at once, not retried', async () => {
    const transit = provider();
    const { wrappedKey } = await transit.generateDataKey(CONTEXT);
    vault.resetCalls();
    const error = await rejection(transit.rewrapDataKey(wrappedKey, OTHER_CONTEXT, provider()));
    expect(error).toBeInstanceOf(IntegrityError);
    expect(error.message).toContain('HTTP 500: cipher: message authentication failed');
    expect(vault.calls.rewrap).toBe(1);
  });

  it('maps a network failure, a wrong mount and a redirect to KeyProviderError', async () => {
    const closed = await startVaultEmulator();
    const address = closed.address;
    await closed.close();
    const refused = await rejection(provider({ address, maxAttempts: 2 }).generateDataKey(CONTEXT));
    expect(refused).toBeInstanceOf(KeyProviderError);
    expect(refused.message).toContain('Vault Transit datakey failed after 2 attempts (ECONNREFUSED)');

    const wrongMount = await rejection(
      provider({ mount: 'transit-nope', auth: { token: vault.rootToken } }).generateDataKey(CONTEXT),
    );
    expect(wrongMount).toBeInstanceOf(KeyProviderError);
    expect(wrongMount.message).toContain('Vault has no Transit datakey at transit-nope/datakey/plaintext/');

    const redirecting = async (): Promise<Response> =>
      new Response(null, { status: 307, headers: { Location: 'https://elsewhere.example/v1/x' } });
    const redirect = await rejection(provider({ fetch: redirecting }).generateDataKey(CONTEXT));
    expect(redirect).toBeInstanceOf(KeyProviderError);
    expect(redirect.message).toContain('with a redirect (HTTP 307), which is not followed');
  });

  it('sends X-Vault-Namespace, and the namespace is part of the key reference', async () => {
    vault.enableTransit('transit', 'team-a');
    vault.createKey('ns-key', { namespace: 'team-a' });
    vault.setPolicy('team-a-app', transitPolicy('ns-key'));
    const nsToken = vault.createToken({ policies: ['team-a-app'], namespace: 'team-a' });
    const transit = provider({ keyName: 'ns-key', namespace: '/team-a/', auth: { token: nsToken } });
    expect(transit.describe().keyReference).toBe(`${vault.address}/v1/team-a/transit/keys/ns-key`);
    await transit.validate(CONTEXT);
    expect(vault.callLog.map((c) => c.namespace)).toEqual(['team-a', 'team-a', 'team-a']);
    const outside = await rejection(
      provider({ keyName: 'ns-key', auth: { token: nsToken } }).generateDataKey(CONTEXT),
    );
    expect(outside).toBeInstanceOf(KeyAccessDeniedError);
  });

  it('rewraps between two providers of one Transit key with rewrap, never decrypting: the data key stays in Vault', async () => {
    const key = newKey();
    const v1 = provider({ keyName: key.name, auth: { token: key.token } });
    const { plaintextKey, wrappedKey } = await v1.generateDataKey(CONTEXT);
    vault.rotateKey(key.name);
    const v2 = provider({ keyName: key.name, auth: { token: key.token } });
    vault.resetCalls();
    const rewrapped = await v1.rewrapDataKey(wrappedKey, CONTEXT, v2);
    expect(vault.calls).toMatchObject({ rewrap: 1, decrypt: 0, encrypt: 0, datakey: 0 });
    expect(vault.callLog).toEqual([
      expect.objectContaining({
        operation: 'rewrap',
        context: CONTEXT,
        ciphertextVersion: 1,
        keyVersion: 2,
        status: 200,
      }),
    ]);
    expect(rewrapped.toString()).toMatch(/^vault:v2:/);
    expect((await v2.unwrapDataKey(rewrapped, CONTEXT)).equals(plaintextKey)).toBe(true);
    vault.setMinDecryptionVersion(key.name, 2);
    expect((await v2.unwrapDataKey(rewrapped, CONTEXT)).equals(plaintextKey)).toBe(true);
    expect(await rejection(v1.unwrapDataKey(wrappedKey, CONTEXT))).toBeInstanceOf(KeyAccessDeniedError);
  });

  it('rewraps to another Transit key or another provider by decrypt here and wrap there', async () => {
    const transit = provider();
    const other = newKey();
    const destination = provider({ keyName: other.name, auth: { token: other.token } });
    const { plaintextKey, wrappedKey } = await transit.generateDataKey(CONTEXT);
    vault.resetCalls();
    const moved = await transit.rewrapDataKey(wrappedKey, CONTEXT, destination);
    expect(vault.callLog.map((c) => [c.operation, c.keyName])).toEqual([
      ['decrypt', keyName],
      ['encrypt', other.name],
    ]);
    expect((await destination.unwrapDataKey(moved, CONTEXT)).equals(plaintextKey)).toBe(true);
    const local = new LocalKeyProvider({ key: randomBytes(32).toString('base64') });
    const intoVault = await local.rewrapDataKey(
      await local.wrapDataKey(plaintextKey, CONTEXT),
      CONTEXT,
      transit,
    );
    expect((await transit.unwrapDataKey(intoVault, CONTEXT)).equals(plaintextKey)).toBe(true);
  });

  it('prints only kind, key reference and the kind of auth', () => {
    const transit = provider();
    const reference = `${vault.address}/v1/transit/keys/${keyName}`;
    expect(inspect(transit)).toBe(
      `VaultTransitKeyProvider { kind: 'vault-transit', keyReference: '${reference}', auth: 'token' }`,
    );
    expect(JSON.parse(JSON.stringify({ transit }))).toEqual({
      transit: { kind: 'vault-transit', keyReference: reference },
    });
    expectNoToken(inspect(transit, { showHidden: true, depth: 10 }), JSON.stringify(transit));
  });
});

describe('authentication', () => {
  it('a token file is re-read when Vault Agent rewrites it, and once more when Vault refuses the token held', async () => {
    const key = newKey();
    const file = join(dir, 'agent-token');
    writeFileSync(file, `${key.token}\n`);
    const transit = provider({ keyName: key.name, auth: { tokenFile: file } });
    const { wrappedKey } = await transit.generateDataKey(CONTEXT);
    const second = vault.createToken({ policies: [`policy-${key.name}`] });
    // Agent writes a new file and renames it over the old one.
    writeFileSync(`${file}.tmp`, second);
    renameSync(`${file}.tmp`, file);
    await transit.unwrapDataKey(wrappedKey, CONTEXT);
    expect(vault.callLog.map((c) => c.accessor)).toEqual([
      vault.accessorOf(key.token),
      vault.accessorOf(second),
    ]);

    vault.revokeToken(second);
    const error = await rejection(transit.unwrapDataKey(wrappedKey, CONTEXT));
    expect(error).toBeInstanceOf(KeyAccessDeniedError);
    expect(error.message).toContain(`the token (token file ${file}) must be valid`);
    expectNoToken(error.message);

    rmSync(file);
    const gone = await rejection(transit.unwrapDataKey(wrappedKey, CONTEXT));
    expect(gone).toBeInstanceOf(KeyProviderError);
    expect(gone.message).toContain(`the Vault token file ${file} cannot be read (ENOENT)`);
  });

  it('AppRole: logs in at first use, renews at 2/3 of the TTL, logs in again near the max TTL', async () => {
    const key = newKey();
    const role = vault.createAppRole(`role-${key.name}`, {
      policies: [`policy-${key.name}`],
      tokenTtl: 600,
      tokenMaxTtl: 1_500,
    });
    const transit = provider({ keyName: key.name, auth: { appRole: role }, clock });
    const ops = () => vault.callLog.map((c) => c.operation);
    const { wrappedKey } = await transit.generateDataKey(CONTEXT);
    await Promise.all([1, 2, 3].map(() => transit.unwrapDataKey(wrappedKey, CONTEXT)));
    expect(ops()).toEqual(['login', 'datakey', 'decrypt', 'decrypt', 'decrypt']);
    const first = vault.callLog[1]?.accessor;

    vault.resetCalls();
    clock.time += 401_000; // past 2/3 of 600 s
    await transit.unwrapDataKey(wrappedKey, CONTEXT);
    expect(ops()).toEqual(['renewSelf', 'decrypt']);
    expect(vault.callLog[1]?.accessor).toBe(first);

    vault.resetCalls();
    clock.time += 401_000; // 802 s: renewed again (lease up to 1,402 s)
    await transit.unwrapDataKey(wrappedKey, CONTEXT);
    clock.time += 401_000; // 1,203 s: the renewal is capped at the max TTL (297 s left): last one
    await transit.unwrapDataKey(wrappedKey, CONTEXT);
    clock.time += 200_000; // 1,403 s: past 2/3 of that short lease: a new login
    await transit.unwrapDataKey(wrappedKey, CONTEXT);
    expect(ops()).toEqual(['renewSelf', 'decrypt', 'renewSelf', 'decrypt', 'login', 'decrypt']);
    expect(vault.callLog.at(-1)?.accessor).not.toBe(first);
    expect(vault.callLog.every((c) => c.status === 200)).toBe(true);
  });

  it('AppRole: a token revoked by an operator is replaced by a new login; a revoked secret id is a KeyAccessDeniedError', async () => {
    const key = newKey();
    const role = vault.createAppRole(`role2-${key.name}`, { policies: [`policy-${key.name}`] });
    const transit = provider({ keyName: key.name, auth: { appRole: role }, clock });
    const { wrappedKey } = await transit.generateDataKey(CONTEXT);
    const issued = vault
      .issuedTokens()
      .find((t) => vault.accessorOf(t) === vault.callLog[1]?.accessor) as string;
    vault.revokeToken(issued);
    vault.resetCalls();
    await expect(transit.unwrapDataKey(wrappedKey, CONTEXT)).resolves.toHaveLength(32);
    expect(vault.callLog.map((c) => [c.operation, c.status])).toEqual([
      ['decrypt', 403],
      ['login', 200],
      ['decrypt', 200],
    ]);

    vault.revokeSecretIds(role.roleId);
    vault.revokeToken(
      vault.issuedTokens().find((t) => vault.accessorOf(t) === vault.callLog[2]?.accessor) as string,
    );
    const error = await rejection(transit.unwrapDataKey(wrappedKey, CONTEXT));
    expect(error).toBeInstanceOf(KeyAccessDeniedError);
    expect((error as KeyAccessDeniedError).detail).toBe(
      'Vault refused the AppRole login at auth/approle (HTTP 400: invalid role or secret ID): check the role_id and secret_id (a secret_id may have expired or used up its uses)',
    );
    expect(error.message).not.toContain(role.secretId);
    expect(error.message).not.toContain(role.roleId);
    expect(inspect(transit)).not.toContain(role.secretId);
  });

  it('AppRole: a throttled login is retried', async () => {
    const key = newKey();
    const role = vault.createAppRole(`role3-${key.name}`, { policies: [`policy-${key.name}`] });
    vault.injectFaults({ operation: 'login', fault: 'throttled', times: 2 });
    await provider({ keyName: key.name, auth: { appRole: role } }).generateDataKey(CONTEXT);
    expect(vault.callLog.map((c) => [c.operation, c.status])).toEqual([
      ['login', 429],
      ['login', 429],
      ['login', 200],
      ['datakey', 200],
    ]);
  });

  it('without auth, uses VAULT_TOKEN as the Vault CLI does', async () => {
    const saved = process.env.VAULT_TOKEN;
    process.env.VAULT_TOKEN = token;
    try {
      const transit = new VaultTransitKeyProvider({ address: vault.address, keyName, retryDelay: 1 });
      await transit.generateDataKey(CONTEXT);
      expect(vault.callLog[0]?.accessor).toBe(vault.accessorOf(token));
    } finally {
      if (saved === undefined) delete process.env.VAULT_TOKEN;
      else process.env.VAULT_TOKEN = saved;
    }
  });
});

describe('VaultTransitKeyProvider configuration', () => {
  const base = { address: 'https://vault.example.com:8200', keyName: 'app-data', auth: { token: 'hvs.x' } };
  const build = (extra: Record<string, unknown>) => () =>
    new VaultTransitKeyProvider({ ...base, ...extra } as VaultTransitKeyProviderOptions);

  it('normalizes the address and refuses one with a path, query or credentials', () => {
    expect(new VaultTransitKeyProvider({ ...base, address: 'https://Vault.Example.com:8200/' }).address).toBe(
      'https://vault.example.com:8200',
    );
    expect(build({ address: 'https://vault.example.com/v1/' })).toThrow(/origin only/);
    expect(build({ address: 'https://user:pw@vault.example.com' })).toThrow(/must not carry credentials/);
    expect(build({ address: 'ftp://vault.example.com' })).toThrow(/http\(s\) URL/);
    expect(build({ address: '' })).toThrow(ConfigError);
    expect(build({ address: undefined })).toThrow(/needs address/);
  });

  it('refuses bad key names, mounts and namespaces, and conflicting or empty auth', () => {
    for (const keyName of ['', 'a b', '../x', 'x/y', undefined, 7])
      expect(build({ keyName })).toThrow(/needs keyName/);
    expect(build({ mount: '../sys' })).toThrow(/mount must be a path/);
    expect(build({ namespace: 'a b' })).toThrow(/namespace must be a path/);
    expect(new VaultTransitKeyProvider({ ...base, mount: '/team/transit/' }).mount).toBe('team/transit');
    expect(build({ auth: { token: 'a', tokenFile: '/t' } })).toThrow(
      'Cannot set both auth.token and auth.tokenFile',
    );
    expect(build({ auth: {} })).toThrow(/auth needs one of token, tokenFile or appRole/);
    expect(build({ auth: { token: ' ' } })).toThrow(/auth.token must be a Vault token/);
    expect(build({ auth: { appRole: { roleId: 'r' } } })).toThrow(
      /auth.appRole.secretId must be a non-empty string/,
    );
  });

  it('refuses timeouts and attempts that are not positive', () => {
    for (const value of [0, -1, Number.NaN, '5']) {
      expect(build({ requestTimeout: value })).toThrow(
        /requestTimeout must be a positive number of milliseconds/,
      );
    }
    expect(build({ maxAttempts: 0 })).toThrow(/maxAttempts must be a positive integer/);
    expect(build({ maxAttempts: 1.5 })).toThrow(ConfigError);
  });

  it('without auth, VAULT_TOKEN or ~/.vault-token, says what to give', () => {
    const saved = { token: process.env.VAULT_TOKEN, home: process.env.HOME };
    delete process.env.VAULT_TOKEN;
    process.env.HOME = dir;
    try {
      expect(() => new VaultTransitKeyProvider({ address: base.address, keyName: 'k' })).toThrow(
        /needs auth: \{ token \}, \{ tokenFile \} or \{ appRole: \{ roleId, secretId \} \}/,
      );
      writeFileSync(join(dir, '.vault-token'), 'hvs.from-cli-login');
      expect(inspect(new VaultTransitKeyProvider({ address: base.address, keyName: 'k' }))).toContain(
        `auth: 'token file ${join(dir, '.vault-token')}'`,
      );
    } finally {
      if (saved.token !== undefined) process.env.VAULT_TOKEN = saved.token;
      process.env.HOME = saved.home;
    }
  });
});
