import { CryptographyClient, KeyClient, type KeyClientOptions } from '@azure/keyvault-keys';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  type AzureKeyVaultEmulator,
  type EmulatedKey,
  startAzureKeyVaultEmulator,
  testCredential,
} from '../../../support/azure-key-vault-emulator';

/**
 * The emulator, driven through the real `@azure/keyvault-keys` client: what the provider relies
 * on is what the SDK does against it (and what PROVIDERS.md says the service does).
 */
const fast: KeyClientOptions = { retryOptions: { maxRetries: 3, retryDelayInMs: 5, maxRetryDelayInMs: 20 } };
const ENVELOPE = Buffer.alloc(64, 7);

interface RestErrorLike {
  name: string;
  statusCode?: number;
  code?: string;
  details?: { error?: { code?: string; innerError?: { code?: string } } };
}

async function restError(call: Promise<unknown>): Promise<RestErrorLike> {
  try {
    await call;
  } catch (error) {
    return error as RestErrorLike;
  }
  throw new Error('expected the call to fail');
}
const inner = (error: RestErrorLike) => error.details?.error?.innerError?.code;

let emulator: AzureKeyVaultEmulator;
const app = testCredential('app');
const admin = testCredential('admin');
let k1: EmulatedKey;

const keyClient = (credential = app, options: KeyClientOptions = {}) =>
  new KeyClient(emulator.vaultUrl, credential, { ...emulator.clientOptions(), ...fast, ...options });

beforeAll(async () => {
  emulator = await startAzureKeyVaultEmulator();
  emulator.grant('app');
  emulator.grant('admin', 'Key Vault Crypto Officer');
  k1 = await emulator.createKey('k1');
});
afterAll(async () => {
  await emulator?.close();
});
beforeEach(() => {
  emulator.failAll(null);
  emulator.setLatency(0);
  emulator.hang(null);
  emulator.resetCalls();
});

describe('authentication', () => {
  it('answers a first, unauthenticated request with a bearer challenge; the client gets a token for its tenant and resource and resends', async () => {
    const credential = testCredential('app');
    const raw = await fetch(`${k1.kid}?api-version=2025-07-01`);
    expect(raw.status).toBe(401);
    expect(raw.headers.get('www-authenticate')).toBe(
      `Bearer authorization="https://login.microsoftonline.com/${emulator.tenantId}", resource="https://vault.azure.net"`,
    );
    emulator.resetCalls();

    const key = await keyClient(credential).getKey('k1');
    expect(key.id).toBe(k1.kid);
    expect(emulator.challenges).toBe(1);
    expect(credential.requests).toEqual([
      { scopes: ['https://vault.azure.net/.default'], tenantId: emulator.tenantId },
    ]);
    expect(emulator.callLog).toEqual([
      expect.objectContaining({ operation: 'get', principal: 'app', status: 200, apiVersion: '2025-07-01' }),
    ]);
  });

  it('refuses a token issued for another tenant (401 invalid_token)', async () => {
    const stranger = testCredential('app');
    const other = await startAzureKeyVaultEmulator();
    try {
      const token = await stranger.getToken('https://vault.azure.net/.default', { tenantId: other.tenantId });
      const response = await fetch(`${k1.kid}?api-version=2025-07-01`, {
        headers: { authorization: `Bearer ${token?.token}` },
      });
      expect(response.status).toBe(401);
      expect(response.headers.get('www-authenticate')).toContain('error="invalid_token"');
    } finally {
      await other.close();
    }
  });

  it('revoked tokens (continuous access evaluation) get an insufficient_claims challenge; the client fetches a new token with the claims', async () => {
    const credential = testCredential('app');
    const client = keyClient(credential);
    await client.getKey('k1');
    emulator.revokeTokens('app');
    emulator.resetCalls();
    await client.getKey('k1');
    expect(emulator.challenges).toBe(1);
    expect(credential.requests).toHaveLength(2);
    expect(JSON.parse(credential.requests[1]?.claims ?? '{}')).toMatchObject({
      access_token: { nbf: { essential: true } },
    });
    expect(emulator.calls.get).toBe(1);
  });
});

describe('keys and key ids', () => {
  it('reports RSA keys with kid URLs on its own address, key_ops, modulus and attributes', async () => {
    const key = await keyClient().getKey('k1', { version: k1.version });
    expect(key.id?.startsWith(`${emulator.vaultUrl}/keys/k1/`)).toBe(true);
    expect(key.keyType).toBe('RSA');
    expect(key.keyOperations).toEqual(expect.arrayContaining(['wrapKey', 'unwrapKey']));
    expect(key.key?.n).toHaveLength(3072 / 8);
    expect(key.properties).toMatchObject({ enabled: true, version: k1.version, name: 'k1' });
  });

  it('serves version-less paths (`/keys/k1/`, `/keys/k1//wrapkey`) with the current version', async () => {
    const client = new CryptographyClient(emulator.kid('k1'), app, { ...emulator.clientOptions(), ...fast });
    const { result } = await client.wrapKey('RSA-OAEP-256', ENVELOPE);
    expect(emulator.callLog.map((c) => [c.operation, c.version])).toEqual([
      ['get', ''],
      ['wrapkey', ''],
    ]);
    const versioned = keyClient().getCryptographyClient('k1', { keyVersion: k1.version });
    expect(Buffer.from((await versioned.unwrapKey('RSA-OAEP-256', result)).result).equals(ENVELOPE)).toBe(
      true,
    );
  });

  it('refuses a request without api-version', async () => {
    const token = await app.getToken('https://vault.azure.net/.default', { tenantId: emulator.tenantId });
    const response = await fetch(k1.kid, { headers: { authorization: `Bearer ${token?.token}` } });
    expect(response.status).toBe(400);
    expect(((await response.json()) as { error: { code: string } }).error.code).toBe('BadParameter');
  });

  it('answers 404 KeyNotFound for an unknown key or version', async () => {
    const unknown = await restError(keyClient().getKey('nope'));
    expect(unknown).toMatchObject({ name: 'RestError', statusCode: 404, code: 'KeyNotFound' });
    const version = await restError(
      keyClient().getKey('k1', { version: 'ffffffffffffffffffffffffffffffff' }),
    );
    expect(version).toMatchObject({ statusCode: 404, code: 'KeyNotFound' });
  });

  it('creates and rotates keys through the real KeyClient (Crypto Officer); earlier versions still unwrap', async () => {
    const officer = keyClient(admin);
    const created = await officer.createRsaKey('rotating', { keySize: 3072 });
    expect(created.id?.startsWith(`${emulator.vaultUrl}/keys/rotating/`)).toBe(true);
    const first = officer.getCryptographyClient('rotating', { keyVersion: created.properties.version });
    const wrapped = (await first.wrapKey('RSA-OAEP-256', ENVELOPE)).result;
    const rotated = await officer.rotateKey('rotating');
    expect(rotated.properties.version).not.toBe(created.properties.version);
    expect((await officer.getKey('rotating')).id).toBe(rotated.id);
    expect(Buffer.from((await first.unwrapKey('RSA-OAEP-256', wrapped)).result).equals(ENVELOPE)).toBe(true);
    const second = officer.getCryptographyClient('rotating', { keyVersion: rotated.properties.version });
    const error = await restError(second.unwrapKey('RSA-OAEP-256', wrapped));
    expect(error).toMatchObject({ statusCode: 400, code: 'BadParameter' });
    expect(emulator.calls).toMatchObject({ create: 1, rotate: 1 });
  });

  it('wraps with A256KW on a Managed HSM oct-HSM key, and refuses oct-HSM keys in a vault', async () => {
    const hsm = await startAzureKeyVaultEmulator({ kind: 'managedHsm' });
    try {
      hsm.grant('app');
      const key = await hsm.createKey('hsm-key', { kty: 'oct-HSM' });
      const client = new KeyClient(hsm.vaultUrl, app, { ...hsm.clientOptions(), ...fast });
      expect((await client.getKey('hsm-key')).keyType).toBe('oct-HSM');
      const crypto = client.getCryptographyClient('hsm-key', { keyVersion: key.version });
      const wrapped = (await crypto.wrapKey('A256KW', ENVELOPE)).result;
      expect(wrapped).toHaveLength(72);
      expect(Buffer.from((await crypto.unwrapKey('A256KW', wrapped)).result).equals(ENVELOPE)).toBe(true);
      const altered = Buffer.from(wrapped);
      altered[10] = (altered[10] as number) ^ 1;
      expect(await restError(crypto.unwrapKey('A256KW', altered))).toMatchObject({ statusCode: 400 });
      expect(app.requests.at(-1)?.scopes).toEqual(['https://managedhsm.azure.net/.default']);
    } finally {
      await hsm.close();
    }
    await expect(emulator.createKey('not-here', { kty: 'oct-HSM' })).rejects.toThrow(/Managed HSM only/);
  });
});

describe('what the SDK does locally (the reason to use RSA-OAEP-256)', () => {
  it('RSA-OAEP (SHA-1) wraps locally with the cached public key, even under a disabled key; RSA-OAEP-256 always calls the service', async () => {
    const key = await emulator.createKey('local-wrap');
    const crypto = keyClient().getCryptographyClient('local-wrap', { keyVersion: key.version });
    await crypto.wrapKey('RSA-OAEP', ENVELOPE);
    expect(emulator.calls).toMatchObject({ get: 1, wrapkey: 0 });
    emulator.setEnabled(key.kid, false);
    await expect(crypto.wrapKey('RSA-OAEP', ENVELOPE)).resolves.toBeDefined(); // no request: not refused
    const refused = await restError(crypto.wrapKey('RSA-OAEP-256', ENVELOPE));
    expect(refused).toMatchObject({ statusCode: 403, code: 'Forbidden' });
    expect(inner(refused)).toBe('KeyDisabled');
    expect(emulator.calls).toMatchObject({ get: 1, wrapkey: 1 });
  });

  it('a 403 on the key GET makes the CryptographyClient go remote-only (a custom role without read)', async () => {
    const key = await emulator.createKey('wrap-only');
    const blind = testCredential('blind');
    emulator.grant('blind', ['wrapkey', 'unwrapkey'], { key: 'wrap-only' });
    const crypto = keyClient(blind).getCryptographyClient('wrap-only', { keyVersion: key.version });
    const wrapped = (await crypto.wrapKey('RSA-OAEP-256', ENVELOPE)).result;
    expect(Buffer.from((await crypto.unwrapKey('RSA-OAEP-256', wrapped)).result).equals(ENVELOPE)).toBe(true);
    expect(emulator.callLog.map((c) => [c.operation, c.status])).toEqual([
      ['get', 403],
      ['wrapkey', 200],
      ['unwrapkey', 200],
    ]);
  });
});

describe('refusals', () => {
  it('a removed role assignment is 403 Forbidden / ForbiddenByRbac, naming the data action; a role on another key does not help', async () => {
    const key = await emulator.createKey('rbac');
    const user = testCredential('user');
    emulator.grant('user', 'Key Vault Crypto Service Encryption User', { key: 'rbac' });
    const crypto = keyClient(user).getCryptographyClient('rbac', { keyVersion: key.version });
    const wrapped = (await crypto.wrapKey('RSA-OAEP-256', ENVELOPE)).result;
    expect(await restError(keyClient(user).getKey('k1'))).toMatchObject({ statusCode: 403 });

    emulator.removeRoleAssignment('user');
    const error = await restError(crypto.unwrapKey('RSA-OAEP-256', wrapped));
    expect(error).toMatchObject({ name: 'RestError', statusCode: 403, code: 'Forbidden' });
    expect(inner(error)).toBe('ForbiddenByRbac');
    expect(emulator.callLog.at(-1)).toMatchObject({ operation: 'unwrapkey', principal: 'user', status: 403 });
    const officerOnly = await restError(keyClient().createRsaKey('by-app'));
    expect(inner(officerOnly)).toBe('ForbiddenByRbac');
  });

  it('a disabled key version refuses wrap and unwrap (403 KeyDisabled) and still answers GET with enabled: false', async () => {
    const key = await emulator.createKey('disabled');
    const crypto = keyClient().getCryptographyClient('disabled', { keyVersion: key.version });
    const wrapped = (await crypto.wrapKey('RSA-OAEP-256', ENVELOPE)).result;
    emulator.setEnabled(key.kid, false);
    for (const call of [
      crypto.wrapKey('RSA-OAEP-256', ENVELOPE),
      crypto.unwrapKey('RSA-OAEP-256', wrapped),
    ]) {
      const error = await restError(call);
      expect(error).toMatchObject({ statusCode: 403, code: 'Forbidden' });
      expect(inner(error)).toBe('KeyDisabled');
    }
    expect((await keyClient().getKey('disabled')).properties.enabled).toBe(false);
    emulator.setEnabled(key.kid, true);
    await expect(crypto.unwrapKey('RSA-OAEP-256', wrapped)).resolves.toBeDefined();
  });
});

describe('faults and call counting', () => {
  it('throttles with 429 and Retry-After; the SDK waits and retries', async () => {
    const crypto = keyClient().getCryptographyClient('k1', { keyVersion: k1.version });
    await crypto.wrapKey('RSA-OAEP-256', ENVELOPE);
    emulator.resetCalls();
    emulator.injectFaults({ operation: 'wrapkey', status: 429, times: 2, retryAfter: 0 });
    await crypto.wrapKey('RSA-OAEP-256', ENVELOPE);
    expect(emulator.calls.wrapkey).toBe(3);
    expect(emulator.faults.wrapkey).toBe(2);
    expect(emulator.callLog.map((c) => c.status)).toEqual([429, 429, 200]);
  });

  it('answers 500 then 200; an outage exhausts the retries with the last 5xx', async () => {
    const client = keyClient();
    emulator.injectFaults({ operation: 'get', status: 500, times: 1 });
    await client.getKey('k1');
    expect(emulator.callLog.map((c) => c.status)).toEqual([500, 200]);
    emulator.resetCalls();
    emulator.failAll(503);
    const error = await restError(client.getKey('k1'));
    expect(error).toMatchObject({ statusCode: 503, code: 'ServiceUnavailable' });
    expect(emulator.calls.get).toBe(4); // maxRetries 3
  });

  it('delays answers, and can leave requests unanswered until the client gives up', async () => {
    const client = keyClient();
    await client.getKey('k1');
    emulator.setLatency(50);
    await client.getKey('k1');
    emulator.setLatency(0);
    emulator.hang({ operation: 'get', times: 1 });
    const error = await restError(client.getKey('k1', { requestOptions: { timeout: 200 } }));
    expect(error.name).toBe('AbortError');
    expect(emulator.callLog.at(-1)).toMatchObject({ operation: 'get', status: 0 });
    await expect(client.getKey('k1')).resolves.toBeDefined();
  });

  it('counts authenticated requests per operation; resetCalls() zeroes them', async () => {
    const crypto = keyClient().getCryptographyClient('k1', { keyVersion: k1.version });
    const wrapped = (await crypto.wrapKey('RSA-OAEP-256', ENVELOPE)).result;
    await crypto.unwrapKey('RSA-OAEP-256', wrapped);
    expect(emulator.calls).toMatchObject({ get: 1, wrapkey: 1, unwrapkey: 1, create: 0, rotate: 0 });
    expect(emulator.challenges).toBe(1);
    emulator.resetCalls();
    expect(emulator.calls).toMatchObject({ get: 0, wrapkey: 0, unwrapkey: 0 });
    expect(emulator.callLog).toEqual([]);
    expect(emulator.challenges).toBe(0);
  });
});
