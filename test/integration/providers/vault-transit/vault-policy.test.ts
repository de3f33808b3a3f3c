import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { VaultTransitKeyProvider } from '../../../../src';
import { startVaultEmulator, type VaultEmulator } from '../../../support/vault-emulator';

/**
 * The policy the documentation asks the customer to grant (examples/vault-transit/policy.hcl,
 * shown in README.md) is enough for everything the provider does, and allows nothing else.
 */
const root = resolve(__dirname, '../../../..');
const policy = readFileSync(resolve(root, 'examples/vault-transit/policy.hcl'), 'utf8');
const CONTEXT = { 'typeorm-envelope:keyring': 'default' };
let vault: VaultEmulator;
let token: string;

beforeAll(async () => {
  vault = await startVaultEmulator();
  vault.createKey('app-data');
  vault.createKey('other-data');
  vault.setPolicy('app-data-encryption', policy);
  token = vault.createToken({ policies: ['app-data-encryption'] });
});
afterAll(async () => {
  await vault?.close();
});

describe('the documented least-privilege Vault policy', () => {
  it('is the one README.md shows', () => {
    expect(readFileSync(resolve(root, 'README.md'), 'utf8')).toContain(policy);
  });

  it('allows validation, data keys, unwrapping, wrapping and re-wrapping after rotate', async () => {
    const provider = new VaultTransitKeyProvider({
      address: vault.address,
      keyName: 'app-data',
      auth: { token },
    });
    await provider.validate(CONTEXT);
    const { plaintextKey, wrappedKey } = await provider.generateDataKey(CONTEXT);
    await provider.wrapDataKey(plaintextKey, CONTEXT);
    vault.rotateKey('app-data');
    const rewrapped = await provider.rewrapDataKey(wrappedKey, CONTEXT, provider);
    expect((await provider.unwrapDataKey(rewrapped, CONTEXT)).equals(plaintextKey)).toBe(true);
    expect(vault.callLog.every((c) => c.status === 200)).toBe(true);
  });

  it.each([
    ['rotate the key', 'POST', 'transit/keys/app-data/rotate'],
    ['change its configuration', 'POST', 'transit/keys/app-data/config'],
    ['create a key by encrypting to a new name', 'POST', 'transit/encrypt/new-key'],
    ['use another key', 'POST', 'transit/datakey/plaintext/other-data'],
    ['read another key', 'GET', 'transit/keys/other-data'],
    ['ask for a wrapped-only data key', 'POST', 'transit/datakey/wrapped/app-data'],
  ])('does not let the application %s', async (_what, method, path) => {
    const response = await fetch(`${vault.address}/v1/${path}`, {
      method,
      headers: { 'X-Vault-Token': token },
      ...(method === 'POST' ? { body: JSON.stringify({ plaintext: 'AAAA', context: 'W10=' }) } : {}),
    });
    expect(response.status).toBe(403);
  });
});
