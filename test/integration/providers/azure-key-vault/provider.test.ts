import { randomBytes } from 'node:crypto';
import Module from 'node:module';
import { inspect } from 'node:util';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  AzureKeyVaultKeyProvider,
  type AzureKeyVaultKeyProviderOptions,
  ConfigError,
  IntegrityError,
  KeyAccessDeniedError,
  KeyProviderError,
  LocalKeyProvider,
} from '../../../../src';
import {
  type AzureKeyVaultEmulator,
  type EmulatedKey,
  startAzureKeyVaultEmulator,
  testCredential,
} from '../../../support/azure-key-vault-emulator';

const KEYRING = 'typeorm-envelope:keyring';
const TENANT = 'typeorm-envelope:tenant';
const CONTEXT = Object.freeze({ [KEYRING]: 'main' });
const OTHER_KEYRING = Object.freeze({ [KEYRING]: 'other' });
const ACME = Object.freeze({ [KEYRING]: 'main', [TENANT]: 'acme' });
const GLOBEX = Object.freeze({ [KEYRING]: 'main', [TENANT]: 'globex' });

async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (error) {
    return error as Error;
  }
  throw new Error('expected the call to fail');
}

let emulator: AzureKeyVaultEmulator;
let main: EmulatedKey;
const app = testCredential('app');

const provider = (keyId: string, options: Partial<AzureKeyVaultKeyProviderOptions> = {}) =>
  new AzureKeyVaultKeyProvider({
    keyId,
    credential: app,
    clientOptions: emulator.clientOptions(),
    retryOptions: { retryDelayInMs: 5, maxRetryDelayInMs: 20 },
    ...options,
  });
/** The operations the emulator served, in order. */
const served = () => emulator.callLog.map((c) => c.operation);

beforeAll(async () => {
  emulator = await startAzureKeyVaultEmulator();
  emulator.grant('app');
  main = await emulator.createKey('main');
});
afterAll(async () => {
  await emulator?.close();
});
beforeEach(() => {
  emulator.failAll(null);
  emulator.hang(null);
  emulator.resetCalls();
});

describe('wrapping and unwrapping', () => {
  it('generates a data key here, wraps it with RSA-OAEP-256 by Key Vault, and unwraps it with the same key version', async () => {
    const azure = provider(main.kid);
    expect(azure.describe()).toEqual({ kind: 'azure-key-vault', keyReference: main.kid });
    const { plaintextKey, wrappedKey } = await azure.generateDataKey(CONTEXT);
    expect(plaintextKey).toHaveLength(32);
    expect(plaintextKey.equals(Buffer.alloc(32))).toBe(false);
    expect(wrappedKey.includes(plaintextKey)).toBe(false);
    // [format 1][algorithm 1 = RSA-OAEP-256][version length][version][a 3072-bit RSA ciphertext]
    expect([...wrappedKey.subarray(0, 3)]).toEqual([1, 1, main.version.length]);
    expect(wrappedKey.subarray(3, 3 + main.version.length).toString('ascii')).toBe(main.version);
    expect(wrappedKey).toHaveLength(3 + main.version.length + 384);
    const unwrapped = await azure.unwrapDataKey(wrappedKey, CONTEXT);
    expect(unwrapped.equals(plaintextKey)).toBe(true);
    expect(served()).toEqual(['get', 'get', 'wrapkey', 'unwrapkey']); // ours (key type), the SDK's own, then one each
    for (const call of emulator.callLog) expect(call).toMatchObject({ name: 'main', version: main.version });
    expect(emulator.callLog.filter((c) => c.alg).map((c) => c.alg)).toEqual(['RSA-OAEP-256', 'RSA-OAEP-256']);
    expect(emulator.callLog.every((c) => c.principal === 'app')).toBe(true);
  });

  it('a wrapped key moved to another keyring or another tenant fails with IntegrityError, though the same key unwraps it', async () => {
    const azure = provider(main.kid);
    const { wrappedKey } = await azure.generateDataKey(ACME);
    emulator.resetCalls();
    for (const context of [GLOBEX, OTHER_KEYRING, CONTEXT, { ...ACME, extra: 'x' }]) {
      const error = await rejection(azure.unwrapDataKey(wrappedKey, context));
      expect(error).toBeInstanceOf(IntegrityError);
      expect((error as IntegrityError).detail).toBe(
        'the data key was wrapped for another keyring or tenant (its encryption context differs), or the wrapped key was altered',
      );
      expect((error as IntegrityError).keyId).toBe(main.kid);
    }
    // Key Vault did unwrap each time: the refusal is the envelope's digest, checked here.
    expect(emulator.calls.unwrapkey).toBe(4);
    await expect(azure.unwrapDataKey(wrappedKey, ACME)).resolves.toHaveLength(32);
  });

  it('an altered wrapped key fails with IntegrityError: ciphertext (refused by Key Vault), header, truncation', async () => {
    const azure = provider(main.kid);
    const { wrappedKey } = await azure.generateDataKey(CONTEXT);
    const flip = (index: number) => {
      const altered = Buffer.from(wrappedKey);
      altered[index] = (altered[index] as number) ^ 1;
      return altered;
    };
    emulator.resetCalls();
    const ciphertext = await rejection(azure.unwrapDataKey(flip(wrappedKey.length - 1), CONTEXT));
    expect(ciphertext).toBeInstanceOf(IntegrityError);
    expect(ciphertext.message).toContain('(400 BadParameter)');
    expect(emulator.calls.unwrapkey).toBe(1);
    emulator.resetCalls();
    for (const altered of [flip(0), flip(1), flip(4), wrappedKey.subarray(0, 20), Buffer.alloc(0)]) {
      expect(await rejection(azure.unwrapDataKey(altered, CONTEXT))).toBeInstanceOf(IntegrityError);
    }
    expect(emulator.calls.unwrapkey).toBe(0); // refused before any call
    for (const error of [ciphertext]) {
      expect(error.message).not.toContain(wrappedKey.toString('base64'));
      expect(error.message).not.toContain(wrappedKey.toString('base64url'));
      expect(error.message).not.toContain(wrappedKey.toString('hex'));
    }
  });

  it('a data key wrapped by another version of the key is refused before any call, naming both versions', async () => {
    const key = await emulator.createKey('versioned');
    const old = provider(key.kid);
    const { wrappedKey } = await old.generateDataKey(CONTEXT);
    const next = await emulator.rotateKey('versioned');
    emulator.resetCalls();
    const error = await rejection(provider(next.kid).unwrapDataKey(wrappedKey, CONTEXT));
    expect(error).toBeInstanceOf(IntegrityError);
    expect((error as IntegrityError).detail).toBe(
      `the data key was wrapped by key version ${key.version}, not by this provider's version ${next.version}: ` +
        'configure the versioned key id that wrapped it for its keyring version',
    );
    expect(emulator.calls.unwrapkey).toBe(0);
    await expect(old.unwrapDataKey(wrappedKey, CONTEXT)).resolves.toHaveLength(32); // the old version still works
  });

  it('a data key of another key is refused: its version is not this provider’s', async () => {
    const { wrappedKey } = await provider(main.kid).generateDataKey(CONTEXT);
    const other = await emulator.createKey('other');
    expect(await rejection(provider(other.kid).unwrapDataKey(wrappedKey, CONTEXT))).toBeInstanceOf(
      IntegrityError,
    );
  });

  it('wraps with A256KW under a Managed HSM oct-HSM key, binding the context the same way', async () => {
    const hsm = await startAzureKeyVaultEmulator({ kind: 'managedHsm' });
    try {
      hsm.grant('app');
      const key = await hsm.createKey('hsm', { kty: 'oct-HSM' });
      const azure = new AzureKeyVaultKeyProvider({
        keyId: key.kid,
        credential: app,
        clientOptions: hsm.clientOptions(),
      });
      await azure.validate(ACME);
      const { plaintextKey, wrappedKey } = await azure.generateDataKey(ACME);
      expect([...wrappedKey.subarray(0, 3)]).toEqual([1, 2, key.version.length]);
      expect(wrappedKey).toHaveLength(3 + key.version.length + 72); // RFC 3394 of 64 bytes
      expect((await azure.unwrapDataKey(wrappedKey, ACME)).equals(plaintextKey)).toBe(true);
      expect(await rejection(azure.unwrapDataKey(wrappedKey, GLOBEX))).toBeInstanceOf(IntegrityError);
      expect(hsm.callLog.filter((c) => c.alg).every((c) => c.alg === 'A256KW')).toBe(true);
    } finally {
      await hsm.close();
    }
  });
});

describe('the key reference the registry records', () => {
  it('a version-less key id is resolved to the current version with one GET (concurrent callers share it)', async () => {
    const key = await emulator.createKey('unversioned');
    const azure = provider(emulator.kid('unversioned'));
    expect(azure.describe().keyReference).toBe(emulator.kid('unversioned'));
    emulator.resetCalls();
    const [a, b] = await Promise.all([azure.resolveKeyReference(), azure.resolveKeyReference()]);
    expect(a).toBe(key.kid);
    expect(b).toBe(key.kid);
    expect(emulator.callLog.map((c) => [c.operation, c.version])).toEqual([['get', '']]);
    expect(azure.describe()).toEqual({ kind: 'azure-key-vault', keyReference: key.kid });
    // Wraps go to that version, named in the path, not to "the current one".
    await emulator.rotateKey('unversioned');
    await azure.generateDataKey(CONTEXT);
    expect(emulator.callLog.at(-1)).toMatchObject({ operation: 'wrapkey', version: key.version });
  });

  it('a versioned key id is its own reference: no call; a trailing slash is dropped', async () => {
    expect(await provider(`${main.kid}/`).resolveKeyReference()).toBe(main.kid);
    expect(emulator.callLog).toEqual([]);
  });

  it('hasKeyReference: the recorded version is adopted by a version-less provider not used yet, even after a rotation', async () => {
    const key = await emulator.createKey('adopted');
    await emulator.rotateKey('adopted');
    const azure = provider(emulator.kid('adopted'));
    emulator.resetCalls();
    expect(await azure.hasKeyReference(key.kid)).toBe(true);
    expect(emulator.callLog).toEqual([]); // no GET: the record decides
    expect(await azure.resolveKeyReference()).toBe(key.kid);
    await azure.generateDataKey(CONTEXT);
    expect(emulator.callLog.at(-1)).toMatchObject({ operation: 'wrapkey', version: key.version });

    const pinned = provider(main.kid);
    expect(await pinned.hasKeyReference(main.kid)).toBe(true);
    expect(await pinned.hasKeyReference(key.kid)).toBe(false); // another key
    expect(await pinned.hasKeyReference(emulator.kid('main'))).toBe(false); // no version: not a record of ours
    expect(
      await pinned.hasKeyReference(main.kid.replace(emulator.vaultUrl, 'https://other.vault.azure.net')),
    ).toBe(false);
    const used = provider(emulator.kid('main'));
    await used.resolveKeyReference();
    expect(await used.hasKeyReference(key.kid)).toBe(false);
  });
});

describe('validation names the failed check', () => {
  const detail = async (azure: AzureKeyVaultKeyProvider) => {
    const error = await rejection(azure.validate(CONTEXT));
    expect(error).toBeInstanceOf(KeyProviderError);
    return { error: error as KeyProviderError, detail: (error as KeyProviderError).detail };
  };

  it('exists: a key that is not there, or that the application may not read', async () => {
    const missing = await detail(provider(emulator.kid('nope', 'ffffffffffffffffffffffffffffffff')));
    expect(missing.error).toBeInstanceOf(KeyAccessDeniedError);
    expect(missing.detail).toBe(
      'key check "exists" failed: the key or key version was not found (404 KeyNotFound)',
    );

    const key = await emulator.createKey('unreadable', { size: 2048 });
    const stranger = testCredential('stranger');
    const forbidden = await detail(provider(key.kid, { credential: stranger }));
    expect(forbidden.error).toBeInstanceOf(KeyAccessDeniedError);
    expect(forbidden.detail).toMatch(
      /^key check "exists" failed: the application's identity has no role assignment/,
    );
    expect(forbidden.detail).toContain('(403 Forbidden/ForbiddenByRbac)');
    expect(forbidden.error.keyId).toBe(key.kid);
  });

  it('enabled: disabled, not yet valid, expired', async () => {
    const disabled = await emulator.createKey('off', { size: 2048, enabled: false });
    const off = await detail(provider(disabled.kid));
    expect(off.error).toBeInstanceOf(KeyAccessDeniedError);
    expect(off.detail).toBe(
      'key check "enabled" failed: the key version is disabled; an enabled key is required',
    );

    const later = new Date(Date.now() + 86_400_000);
    const early = await emulator.createKey('early', { size: 2048, notBefore: later });
    expect((await detail(provider(early.kid))).detail).toMatch(
      /^key check "enabled" failed: .* not valid before /,
    );
    const expired = await emulator.createKey('expired', {
      size: 2048,
      expiresOn: new Date(Date.now() - 60_000),
    });
    expect((await detail(provider(expired.kid))).detail).toMatch(
      /^key check "enabled" failed: .* expired at /,
    );
  });

  it('key type and size: RSA below 3072 bits, an EC key', async () => {
    const small = await emulator.createKey('rsa2048', { size: 2048 });
    const rsa = await detail(provider(small.kid));
    expect(rsa.error).not.toBeInstanceOf(KeyAccessDeniedError);
    expect(rsa.detail).toBe(
      'key check "key type and size" failed: the key is RSA of 2048 bits; an RSA key of at least 3072 bits ' +
        '(wrapped with RSA-OAEP-256) or a Managed HSM oct-HSM key (A256KW) is required',
    );
    const ec = await emulator.createKey('ec', { kty: 'EC' });
    expect((await detail(provider(ec.kid))).detail).toMatch(
      /^key check "key type and size" failed: the key is EC;/,
    );
    expect(emulator.calls.wrapkey).toBe(0);
  });

  it('key_ops: wrapKey and unwrapKey must both be allowed', async () => {
    const key = await emulator.createKey('encrypt-only', { keyOps: ['encrypt', 'decrypt', 'wrapKey'] });
    expect((await detail(provider(key.kid))).detail).toBe(
      `key check "key_ops" failed: the key's key_ops lack unwrapKey; wrapKey and unwrapKey are required`,
    );
    emulator.setKeyOps(key.kid, ['sign']);
    expect((await detail(provider(key.kid))).detail).toContain('lack wrapKey and unwrapKey');
  });

  it('round trip: a role that allows wrapping but not unwrapping', async () => {
    const halfway = testCredential('halfway');
    emulator.grant('halfway', ['get', 'wrapkey'], { key: 'main' });
    const trip = await detail(provider(main.kid, { credential: halfway }));
    expect(trip.error).toBeInstanceOf(KeyAccessDeniedError);
    expect(trip.detail).toMatch(
      /^key check "round trip" failed: the application's identity has no role assignment/,
    );
  });

  it('passes: a GET, then the round trip (the SDK’s own GET once), nothing else', async () => {
    const azure = provider(main.kid);
    await expect(azure.validate(CONTEXT)).resolves.toBeUndefined();
    expect(served()).toEqual(['get', 'get', 'wrapkey', 'unwrapkey']);
    emulator.resetCalls();
    await azure.checkKey();
    expect(served()).toEqual(['get']); // checkKey reads the key's state afresh each time
    expect(await azure.getKeyMetadata()).toEqual({
      keyId: main.kid,
      keyType: 'RSA',
      keySize: 3072,
      keyOps: expect.arrayContaining(['wrapKey', 'unwrapKey']),
      enabled: true,
    });
  });
});

describe('revocation and faults', () => {
  it('a role assignment removed mid-session: KeyAccessDeniedError naming ForbiddenByRbac; restored: works again', async () => {
    const key = await emulator.createKey('revocable');
    const tenantApp = testCredential('tenant-app');
    emulator.grant('tenant-app', 'Key Vault Crypto Service Encryption User', { key: 'revocable' });
    const azure = provider(key.kid, { credential: tenantApp });
    const { wrappedKey } = await azure.generateDataKey(CONTEXT);
    emulator.removeRoleAssignment('tenant-app', { key: 'revocable' });
    for (const call of [azure.unwrapDataKey(wrappedKey, CONTEXT), azure.generateDataKey(CONTEXT)]) {
      const error = await rejection(call);
      expect(error).toBeInstanceOf(KeyAccessDeniedError);
      expect(error.message).toContain('(403 Forbidden/ForbiddenByRbac)');
      expect(error.message).toContain('Key Vault Crypto Service Encryption User');
      expect((error as KeyAccessDeniedError).keyId).toBe(key.kid);
      expect((error.cause as Error).name).toBe('RestError');
    }
    emulator.grant('tenant-app', 'Key Vault Crypto Service Encryption User', { key: 'revocable' });
    await expect(azure.unwrapDataKey(wrappedKey, CONTEXT)).resolves.toHaveLength(32);
  });

  it('a key version disabled after the fact: unwrap and wrap are KeyAccessDeniedError (KeyDisabled); enabled again: works', async () => {
    const azure = provider(main.kid);
    const { wrappedKey } = await azure.generateDataKey(CONTEXT);
    emulator.setEnabled(main.kid, false);
    try {
      for (const call of [
        azure.unwrapDataKey(wrappedKey, CONTEXT),
        azure.wrapDataKey(randomBytes(32), CONTEXT),
      ]) {
        const error = await rejection(call);
        expect(error).toBeInstanceOf(KeyAccessDeniedError);
        expect((error as KeyAccessDeniedError).detail).toBe(
          'the key version is disabled (403 Forbidden/KeyDisabled)',
        );
      }
    } finally {
      emulator.setEnabled(main.kid, true);
    }
    await expect(azure.unwrapDataKey(wrappedKey, CONTEXT)).resolves.toHaveLength(32);
  });

  it('a deleted key: KeyAccessDeniedError (404 KeyNotFound)', async () => {
    const key = await emulator.createKey('deleted', { size: 2048 });
    emulator.deleteKey('deleted');
    const error = await rejection(provider(key.kid).wrapDataKey(randomBytes(32), CONTEXT));
    expect(error).toBeInstanceOf(KeyAccessDeniedError);
    expect(error.message).toContain('(404 KeyNotFound)');
  });

  it('tokens revoked by continuous access evaluation: the client gets a new one and the call succeeds', async () => {
    const azure = provider(main.kid);
    const { wrappedKey } = await azure.generateDataKey(CONTEXT);
    const before = app.requests.length;
    emulator.revokeTokens('app');
    await expect(azure.unwrapDataKey(wrappedKey, CONTEXT)).resolves.toHaveLength(32);
    expect(app.requests.slice(before).some((r) => r.claims)).toBe(true);
  });

  it('a credential that Microsoft Entra refuses is KeyAccessDeniedError; one that cannot work here is KeyProviderError', async () => {
    const refused = testCredential('app');
    refused.failWith('AuthenticationError');
    const denied = await rejection(
      provider(main.kid, { credential: refused }).wrapDataKey(randomBytes(32), CONTEXT),
    );
    expect(denied).toBeInstanceOf(KeyAccessDeniedError);
    expect(denied.message).toContain('(AuthenticationError)');
    const unavailable = testCredential('app');
    unavailable.failWith('CredentialUnavailableError');
    const error = await rejection(
      provider(main.kid, { credential: unavailable }).wrapDataKey(randomBytes(32), CONTEXT),
    );
    expect(error).toBeInstanceOf(KeyProviderError);
    expect(error).not.toBeInstanceOf(KeyAccessDeniedError);
    expect(error.message).toContain('(CredentialUnavailableError)');
  });

  it('throttling (429 with Retry-After) and a 500 are retried by the SDK; the call succeeds', async () => {
    const azure = provider(main.kid);
    const { wrappedKey } = await azure.generateDataKey(CONTEXT);
    emulator.resetCalls();
    emulator.injectFaults({ operation: 'unwrapkey', status: 429, times: 2, retryAfter: 0 });
    emulator.injectFaults({ operation: 'unwrapkey', status: 500, times: 1 });
    await expect(azure.unwrapDataKey(wrappedKey, CONTEXT)).resolves.toHaveLength(32);
    expect(emulator.callLog.map((c) => c.status)).toEqual([429, 429, 500, 200]);
  });

  it('an outage exhausts the retries: KeyProviderError after 5 attempts, not an access error', async () => {
    const azure = provider(main.kid);
    await azure.generateDataKey(CONTEXT);
    emulator.resetCalls();
    emulator.failAll(503);
    const error = await rejection(azure.generateDataKey(CONTEXT));
    expect(error).toBeInstanceOf(KeyProviderError);
    expect(error).not.toBeInstanceOf(KeyAccessDeniedError);
    expect((error as KeyProviderError).detail).toBe(
      'Key Vault wrapKey failed after 5 attempts (503 ServiceUnavailable)',
    );
    expect(emulator.calls.wrapkey).toBe(5);

    emulator.failAll(null);
    emulator.injectFaults({ operation: 'wrapkey', status: 429, times: 2 });
    const throttled = await rejection(
      provider(main.kid, { retryOptions: { maxRetries: 1, retryDelayInMs: 5 } }).generateDataKey(CONTEXT),
    );
    expect(throttled).not.toBeInstanceOf(KeyAccessDeniedError);
    expect(throttled.message).toContain('was throttled after 2 attempts (429 Throttled)');
  });

  it('an endpoint that never answers: each attempt times out and is retried; then KeyProviderError', async () => {
    const azure = provider(main.kid, {
      requestTimeout: 200,
      retryOptions: { maxRetries: 1, retryDelayInMs: 5 },
    });
    await azure.generateDataKey(CONTEXT);
    emulator.resetCalls();
    emulator.hang({ operation: 'wrapkey' });
    const error = await rejection(azure.generateDataKey(CONTEXT));
    expect(error).toBeInstanceOf(KeyProviderError);
    expect((error as KeyProviderError).detail).toBe(
      'Key Vault wrapKey timed out after 2 attempts: no answer within requestTimeout (200 ms)',
    );
    expect(emulator.calls.wrapkey).toBe(2);
    emulator.hang(null);
    emulator.hang({ operation: 'wrapkey', times: 1 });
    await expect(azure.generateDataKey(CONTEXT)).resolves.toBeDefined(); // one lost attempt, then an answer
  });

  it('a vault that refuses connections: KeyProviderError naming the network error', async () => {
    const closed = await startAzureKeyVaultEmulator();
    const kid = `${closed.vaultUrl}/keys/k/0123456789abcdef0123456789abcdef`;
    await closed.close();
    const error = await rejection(
      provider(kid, { retryOptions: { maxRetries: 1, retryDelayInMs: 5 } }).wrapDataKey(
        randomBytes(32),
        CONTEXT,
      ),
    );
    expect(error).toBeInstanceOf(KeyProviderError);
    expect(error.message).toContain('ECONNREFUSED');
  });
});

describe('secrets stay out of errors and output', () => {
  it('errors carry no token, no wrapped key, no envelope, even inspected with hidden fields', async () => {
    const azure = provider(main.kid);
    const { wrappedKey, plaintextKey } = await azure.generateDataKey(CONTEXT);
    emulator.failAll(500);
    const errors = [
      await rejection(azure.unwrapDataKey(wrappedKey, CONTEXT)),
      await rejection(azure.wrapDataKey(plaintextKey, CONTEXT)),
    ];
    emulator.failAll(null);
    const forms = [
      ...app.tokens,
      wrappedKey.toString('base64'),
      wrappedKey.subarray(35).toString('base64url'),
      plaintextKey.toString('base64'),
      plaintextKey.toString('base64url'),
      plaintextKey.toString('hex'),
    ];
    for (const error of errors) {
      const printed = [
        error.message,
        inspect(error, { showHidden: true, depth: Number.POSITIVE_INFINITY }),
        JSON.stringify(error),
      ].join('\n');
      for (const secret of forms) expect(printed).not.toContain(secret);
      expect((error.cause as { request?: unknown }).request).toBeUndefined();
      expect((error.cause as { statusCode?: number }).statusCode).toBe(500);
    }
  });

  it('prints only kind and key id', async () => {
    const azure = provider(emulator.kid('main'));
    expect(inspect(azure)).toBe(
      `AzureKeyVaultKeyProvider { kind: 'azure-key-vault', keyId: '${emulator.kid('main')}' }`,
    );
    await azure.resolveKeyReference();
    expect(JSON.parse(JSON.stringify({ azure }))).toEqual({
      azure: { kind: 'azure-key-vault', keyId: main.kid },
    });
    for (const token of app.tokens) expect(inspect(azure, { showHidden: true })).not.toContain(token);
  });
});

describe('moving data keys between providers', () => {
  it('from a LocalKeyProvider into Key Vault and back, and from one Key Vault key to another', async () => {
    const local = new LocalKeyProvider({ key: randomBytes(32).toString('base64') });
    const azure = provider(main.kid);
    const other = provider((await emulator.createKey('destination')).kid);
    const { plaintextKey, wrappedKey } = await local.generateDataKey(ACME);
    emulator.resetCalls();
    const inAzure = await local.rewrapDataKey(wrappedKey, ACME, azure);
    expect(emulator.calls.wrapkey).toBe(1);
    expect((await azure.unwrapDataKey(inAzure, ACME)).equals(plaintextKey)).toBe(true);
    const moved = await azure.rewrapDataKey(inAzure, ACME, other);
    expect(moved.equals(inAzure)).toBe(false);
    expect((await other.unwrapDataKey(moved, ACME)).equals(plaintextKey)).toBe(true);
    expect(await rejection(azure.unwrapDataKey(moved, ACME))).toBeInstanceOf(IntegrityError);
    expect(await rejection(azure.rewrapDataKey(inAzure, GLOBEX, other))).toBeInstanceOf(IntegrityError);
    const back = await other.rewrapDataKey(moved, ACME, local);
    expect((await local.unwrapDataKey(back, ACME)).equals(plaintextKey)).toBe(true);
    local.destroy();
  });
});

describe('configuration', () => {
  it('requires a key id of the form <vault>/keys/<name>[/<version>], over https unless insecure connections are allowed', () => {
    const build =
      (keyId: unknown, options: Partial<AzureKeyVaultKeyProviderOptions> = {}) =>
      () =>
        new AzureKeyVaultKeyProvider({
          credential: app,
          ...options,
          keyId,
        } as AzureKeyVaultKeyProviderOptions);
    for (const keyId of [
      undefined,
      '',
      ' ',
      42,
      'k1',
      'https://v.vault.azure.net/secrets/k1',
      'https://v.vault.azure.net/keys/',
    ]) {
      expect(build(keyId)).toThrow(ConfigError);
    }
    expect(build('https://v.vault.azure.net/keys/k1/abc?x=1')).toThrow(/needs keyId/);
    expect(build('https://v.vault.azure.net/keys/k 1')).toThrow(/whitespace/);
    expect(build('http://127.0.0.1:1/keys/k1')).toThrow(/https:\/\/ URL/);
    expect(build('https://v.vault.azure.net/keys/k1/abc/wrapkey')).toThrow(ConfigError);
    expect(build('https://v.vault.azure.net/keys/k1')).not.toThrow();
    expect(build('https://V.Vault.Azure.Net/keys/k1/ABC')().keyId).toBe(
      'https://v.vault.azure.net/keys/k1/ABC',
    );
  });

  it('refuses bad timeouts, retries and credentials, and retryOptions given twice', () => {
    const base = { keyId: 'https://v.vault.azure.net/keys/k1', credential: app };
    for (const requestTimeout of [0, -1, Number.NaN, Number.POSITIVE_INFINITY, '5' as unknown as number]) {
      expect(() => new AzureKeyVaultKeyProvider({ ...base, requestTimeout })).toThrow(
        /requestTimeout must be a positive number of milliseconds/,
      );
    }
    expect(() => new AzureKeyVaultKeyProvider({ ...base, retryOptions: { maxRetries: -1 } })).toThrow(
      ConfigError,
    );
    expect(
      () => new AzureKeyVaultKeyProvider({ ...base, retryOptions: {}, clientOptions: { retryOptions: {} } }),
    ).toThrow('Cannot set both retryOptions and clientOptions.retryOptions');
    expect(
      () =>
        new AzureKeyVaultKeyProvider({
          ...base,
          credential: {} as AzureKeyVaultKeyProviderOptions['credential'],
        }),
    ).toThrow(/TokenCredential/);
  });

  it('without a credential, names @azure/identity (not installed here) as the package to install', () => {
    const error = (() => {
      try {
        new AzureKeyVaultKeyProvider({ keyId: 'https://v.vault.azure.net/keys/k1' });
      } catch (e) {
        return e as Error;
      }
      throw new Error('expected a ConfigError');
    })();
    expect(error).toBeInstanceOf(ConfigError);
    expect(error.message).toBe(
      'AzureKeyVaultKeyProvider without a credential needs the optional peer dependency @azure/identity: npm install @azure/identity',
    );
  });

  it('explains how to install @azure/keyvault-keys when it is missing', () => {
    const loader = Module as unknown as { _load: (request: string, ...rest: unknown[]) => unknown };
    const original = loader._load;
    loader._load = function (this: unknown, request: string, ...rest: unknown[]) {
      if (request === '@azure/keyvault-keys') {
        throw Object.assign(new Error(`Cannot find module '${request}'`), { code: 'MODULE_NOT_FOUND' });
      }
      return original.call(this, request, ...rest);
    };
    try {
      expect(
        () => new AzureKeyVaultKeyProvider({ keyId: 'https://v.vault.azure.net/keys/k1', credential: app }),
      ).toThrow(
        'AzureKeyVaultKeyProvider needs the optional peer dependency @azure/keyvault-keys: npm install @azure/keyvault-keys',
      );
    } finally {
      loader._load = original;
    }
  });
});
