import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { EnvelopeEncryption } from '../../../src/envelope-encryption';
import { ConfigError, UnknownKeyVersionError } from '../../../src/errors';
import type { KeyProvider } from '../../../src/keys/key-provider';
import { Keyring } from '../../../src/keys/keyring';
import { LocalKeyProvider } from '../../../src/keys/local-key-provider';

const provider = () => new LocalKeyProvider({ key: randomBytes(32).toString('base64') });

describe('Keyring', () => {
  it('lists its versions in ascending order and starts at the given active version', () => {
    const keyring = new Keyring(
      [
        { version: 3, provider: provider() },
        { version: 1, provider: provider() },
        { version: 2, provider: provider() },
      ],
      2,
    );
    expect(keyring.versions).toEqual([1, 2, 3]);
    expect(keyring.activeVersion).toBe(2);
    expect(keyring.has(3)).toBe(true);
    expect(keyring.has(4)).toBe(false);
  });

  it('returns the provider of each version', () => {
    const one = provider();
    const two = provider();
    const keyring = new Keyring(
      [
        { version: 1, provider: one },
        { version: 2, provider: two },
      ],
      1,
    );
    expect(keyring.provider(1)).toBe(one);
    expect(keyring.provider(2)).toBe(two);
  });

  it('needs at least one version', () => {
    expect(() => new Keyring([], 1)).toThrow(ConfigError);
    expect(() => new Keyring(undefined as unknown as [], 1)).toThrow(ConfigError);
  });

  it.each([0, -1, 1.5, Number.NaN, Number.POSITIVE_INFINITY, 2 ** 53, '1' as unknown as number])(
    'refuses the invalid version %s',
    (version) => {
      expect(() => new Keyring([{ version, provider: provider() }], version)).toThrow(ConfigError);
    },
  );

  it.each([null, undefined, 5, 'v1', [1]])('refuses the keyring entry %s with a ConfigError', (entry) => {
    const entries = [entry] as unknown as [];
    expect(() => new Keyring(entries, 1)).toThrow(ConfigError);
    expect(() => new Keyring(entries, 1)).toThrow(/key version entry 1 must be an object/);
    expect(() => new EnvelopeEncryption({ keys: entries, activeVersion: 1 })).toThrow(ConfigError);
  });

  it.each([null, 123, '', {}])('refuses the keyringId %s: it must be a non-empty string', (keyringId) => {
    const entries = [{ version: 1, provider: provider() }];
    const id = keyringId as unknown as string;
    expect(() => new Keyring(entries, 1, id)).toThrow(ConfigError);
    expect(() => new Keyring(entries, 1, id)).toThrow(/keyringId must be a non-empty string/);
    expect(() => new EnvelopeEncryption({ keys: entries, activeVersion: 1, keyringId: id })).toThrow(
      ConfigError,
    );
  });

  it("uses 'default' when no keyringId is given", () => {
    expect(new Keyring([{ version: 1, provider: provider() }], 1).keyringId).toBe('default');
    expect(new Keyring([{ version: 1, provider: provider() }], 1, undefined).keyringId).toBe('default');
  });

  it('refuses a version configured twice', () => {
    const entries = [
      { version: 1, provider: provider() },
      { version: 1, provider: provider() },
    ];
    expect(() => new Keyring(entries, 1)).toThrow(/configured twice/);
    expect(() => new Keyring(entries, 1)).toThrow(ConfigError);
  });

  it('refuses a version without a provider', () => {
    expect(() => new Keyring([{ version: 1, provider: undefined as unknown as KeyProvider }], 1)).toThrow(
      ConfigError,
    );
    expect(() => new Keyring([{ version: 1, provider: {} as KeyProvider }], 1)).toThrow(ConfigError);
  });

  it('refuses an active version that is not configured', () => {
    expect(() => new Keyring([{ version: 1, provider: provider() }], 2)).toThrow(ConfigError);
  });

  it('activates a configured version and refuses an unconfigured one', () => {
    const keyring = new Keyring(
      [
        { version: 1, provider: provider() },
        { version: 2, provider: provider() },
      ],
      1,
    );
    keyring.activate(2);
    expect(keyring.activeVersion).toBe(2);
    expect(() => keyring.activate(3)).toThrow(ConfigError);
    expect(keyring.activeVersion).toBe(2);
    keyring.activate(1);
    expect(keyring.activeVersion).toBe(1);
  });

  it('names the missing version in UnknownKeyVersionError', () => {
    const keyring = new Keyring([{ version: 1, provider: provider() }], 1);
    let error: unknown;
    try {
      keyring.provider(7);
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(UnknownKeyVersionError);
    expect((error as UnknownKeyVersionError).keyVersion).toBe(7);
    expect((error as Error).message).toContain('7');
  });

  it('binds wrapped keys to its id through a frozen encryption context', () => {
    const entries = [{ version: 1, provider: provider() }];
    expect(new Keyring(entries, 1).context).toEqual({ 'typeorm-envelope:keyring': 'default' });
    const keyring = new Keyring(entries, 1, 'billing');
    expect(keyring.keyringId).toBe('billing');
    expect(keyring.context).toEqual({ 'typeorm-envelope:keyring': 'billing' });
    expect(Object.isFrozen(keyring.context)).toBe(true);
  });
});

describe('Keyring recorded key references', () => {
  it('uses a version whose master key is the recorded one, and refuses one with another key, naming both', async () => {
    const recorded = provider();
    const configured = provider();
    const keyring = new Keyring(
      [
        { version: 1, provider: recorded },
        { version: 2, provider: configured },
      ],
      1,
    );
    expect(keyring.registryRead).toBe(false);
    await expect(keyring.checkedProvider(2)).resolves.toBe(configured); // nothing recorded: nothing to compare
    keyring.recordReferences([
      [1, recorded.fingerprint],
      [2, recorded.fingerprint],
    ]);
    expect(keyring.registryRead).toBe(true);
    await expect(keyring.checkedProvider(1)).resolves.toBe(recorded);
    const error = await keyring.checkedProvider(2).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ConfigError);
    expect(error).toMatchObject({ keyVersion: 2, keyId: configured.fingerprint });
    expect(String((error as Error).message)).toContain(recorded.fingerprint);
    expect(String((error as Error).message)).toContain(configured.fingerprint);
    expect(String((error as Error).message)).toContain('version 2');
    // Corrected records are taken into account.
    keyring.recordReferences([[2, configured.fingerprint]]);
    await expect(keyring.checkedProvider(2)).resolves.toBe(configured);
  });
});
