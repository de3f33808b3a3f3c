import { randomBytes } from 'node:crypto';
import { inspect } from 'node:util';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ConfigError, IntegrityError } from '../../../src/errors';
import type { EncryptionContext } from '../../../src/keys/key-provider';
import { LocalKeyProvider } from '../../../src/keys/local-key-provider';

/** A fresh master key for each use: no key is ever written into the repository. */
const newKey = () => randomBytes(32).toString('base64');
const CONTEXT: EncryptionContext = { 'typeorm-envelope:keyring': 'test' };

function flipBit(bytes: Buffer, bit: number): Buffer {
  const copy = Buffer.from(bytes);
  copy[bit >> 3] = (copy[bit >> 3] as number) ^ (1 << (bit & 7));
  return copy;
}

async function unwrapError(provider: LocalKeyProvider, wrapped: Buffer, context = CONTEXT): Promise<unknown> {
  try {
    const key = await provider.unwrapDataKey(wrapped, context);
    return new Error(`unwrapped to a ${key.length}-byte key`);
  } catch (error) {
    return error;
  }
}

describe('LocalKeyProvider configuration', () => {
  const badKeys: [string, unknown][] = [
    ['16 bytes', randomBytes(16).toString('base64')],
    ['31 bytes', randomBytes(31).toString('base64')],
    ['33 bytes', randomBytes(33).toString('base64')],
    ['64 bytes', randomBytes(64).toString('base64')],
    ['32 bytes in hex', randomBytes(32).toString('hex')],
    ['32 bytes in base64url', `${randomBytes(32).toString('base64url')}-_`],
    ['not base64', `not base64 at all ${randomBytes(8).toString('hex')}!`],
    ['base64 with a bad padding', `${newKey().slice(0, 40)}=A==`],
    ['empty', ''],
    ['blank', '    '],
    ['missing', undefined],
    ['null', null],
    ['a number', 12345],
    ['a Buffer', randomBytes(32)],
  ];

  it.each(badKeys)('refuses a key that is %s, saying how to make one without echoing it', (_what, key) => {
    let error: unknown;
    try {
      new LocalKeyProvider({ key } as { key: string });
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(ConfigError);
    const printed = [(error as Error).message, String(error), inspect(error)];
    for (const text of printed) {
      expect(text).toContain('openssl rand -base64 32');
      if (typeof key === 'string' && key.trim().length > 0) expect(text).not.toContain(key.trim());
      if (Buffer.isBuffer(key)) {
        expect(text).not.toContain(key.toString('base64'));
        expect(text).not.toContain(key.toString('hex'));
      }
    }
  });

  it('refuses missing options', () => {
    expect(() => new LocalKeyProvider(undefined as unknown as { key: string })).toThrow(ConfigError);
    expect(() => new LocalKeyProvider({} as { key: string })).toThrow(ConfigError);
  });

  it('accepts a key surrounded by whitespace, as read from a file', async () => {
    const key = newKey();
    const provider = new LocalKeyProvider({ key: `${key}\n` });
    expect(provider.fingerprint).toBe(new LocalKeyProvider({ key }).fingerprint);
  });
});

describe('LocalKeyProvider wrapping', () => {
  it('round-trips generated and wrapped data keys', async () => {
    const provider = new LocalKeyProvider({ key: newKey() });
    const { plaintextKey, wrappedKey } = await provider.generateDataKey(CONTEXT);
    expect(plaintextKey.length).toBe(32);
    expect(wrappedKey.length).toBe(1 + 12 + 32 + 16);
    expect((await provider.unwrapDataKey(wrappedKey, CONTEXT)).equals(plaintextKey)).toBe(true);

    const dataKey = randomBytes(32);
    const wrapped = await provider.wrapDataKey(dataKey, CONTEXT);
    expect(wrapped.includes(dataKey)).toBe(false);
    expect((await provider.unwrapDataKey(wrapped, CONTEXT)).equals(dataKey)).toBe(true);
    await expect(provider.validate(CONTEXT)).resolves.toBeUndefined();
  });

  it('wraps the same data key differently each time', async () => {
    const provider = new LocalKeyProvider({ key: newKey() });
    const dataKey = randomBytes(32);
    const a = await provider.wrapDataKey(dataKey, CONTEXT);
    const b = await provider.wrapDataKey(dataKey, CONTEXT);
    expect(a.equals(b)).toBe(false);
  });

  it('refuses to unwrap under another encryption context', async () => {
    const provider = new LocalKeyProvider({ key: newKey() });
    const { wrappedKey } = await provider.generateDataKey(CONTEXT);
    const others: EncryptionContext[] = [
      { 'typeorm-envelope:keyring': 'other' },
      {},
      { ...CONTEXT, extra: '' },
    ];
    for (const other of others) {
      expect(await unwrapError(provider, wrappedKey, other)).toBeInstanceOf(IntegrityError);
    }
  });

  it('treats the encryption context as a set: key order does not matter', async () => {
    const provider = new LocalKeyProvider({ key: newKey() });
    const { plaintextKey, wrappedKey } = await provider.generateDataKey({ a: '1', b: '2' });
    expect((await provider.unwrapDataKey(wrappedKey, { b: '2', a: '1' })).equals(plaintextKey)).toBe(true);
  });

  it('refuses to unwrap under another master key', async () => {
    const { wrappedKey } = await new LocalKeyProvider({ key: newKey() }).generateDataKey(CONTEXT);
    const other = new LocalKeyProvider({ key: newKey() });
    const error = await unwrapError(other, wrappedKey);
    expect(error).toBeInstanceOf(IntegrityError);
    expect((error as IntegrityError).keyId).toBe(other.fingerprint);
    expect((error as IntegrityError).message).toMatch(/master key of that version may be wrong/);
  });

  it('refuses every single-bit flip of a wrapped key', async () => {
    const provider = new LocalKeyProvider({ key: newKey() });
    const { wrappedKey } = await provider.generateDataKey(CONTEXT);
    for (let bit = 0; bit < wrappedKey.length * 8; bit++) {
      expect(await unwrapError(provider, flipBit(wrappedKey, bit))).toBeInstanceOf(IntegrityError);
    }
  });

  it('refuses single-bit flips of wrapped keys under any context (property)', async () => {
    const provider = new LocalKeyProvider({ key: newKey() });
    await fc.assert(
      fc.asyncProperty(
        fc.dictionary(fc.string(), fc.string(), { maxKeys: 4 }),
        fc.nat({ max: 61 * 8 - 1 }),
        async (context, bit) => {
          const { wrappedKey } = await provider.generateDataKey(context);
          expect(await unwrapError(provider, flipBit(wrappedKey, bit), context)).toBeInstanceOf(
            IntegrityError,
          );
        },
      ),
      { numRuns: 300 },
    );
  });

  it('refuses truncated, extended and empty wrapped keys', async () => {
    const provider = new LocalKeyProvider({ key: newKey() });
    const { wrappedKey } = await provider.generateDataKey(CONTEXT);
    for (let length = 0; length < wrappedKey.length; length++) {
      expect(await unwrapError(provider, wrappedKey.subarray(0, length))).toBeInstanceOf(IntegrityError);
    }
    const extended = Buffer.concat([wrappedKey, Buffer.of(0)]);
    expect(await unwrapError(provider, extended)).toBeInstanceOf(IntegrityError);
  });
});

describe('LocalKeyProvider never reveals its key', () => {
  it('keeps the key out of inspect, JSON, String and describe()', () => {
    const key = newKey();
    const provider = new LocalKeyProvider({ key });
    const hex = Buffer.from(key, 'base64').toString('hex');
    const printed = [
      inspect(provider),
      inspect(provider, { customInspect: false, showHidden: true, depth: Number.POSITIVE_INFINITY }),
      JSON.stringify(provider),
      String(provider),
      `${provider}`,
      JSON.stringify(provider.describe()),
      Object.keys(provider).join(','),
    ];
    for (const text of printed) {
      expect(text).not.toContain(key);
      expect(text).not.toContain(key.slice(0, 16));
      expect(text.toLowerCase()).not.toContain(hex);
      expect(text.toLowerCase()).not.toContain(hex.slice(0, 16));
    }
    expect(inspect(provider)).toContain(provider.fingerprint);
    expect(JSON.parse(JSON.stringify(provider))).toEqual({
      kind: 'local',
      fingerprint: provider.fingerprint,
    });
  });

  it('has a fingerprint that is stable for a key and differs between keys', () => {
    const key = newKey();
    const fingerprint = new LocalKeyProvider({ key }).fingerprint;
    expect(fingerprint).toMatch(/^sha256:[0-9a-f]{16}$/);
    expect(new LocalKeyProvider({ key }).fingerprint).toBe(fingerprint);
    expect(new LocalKeyProvider({ key: newKey() }).fingerprint).not.toBe(fingerprint);
    expect(new LocalKeyProvider({ key }).describe()).toEqual({ kind: 'local', keyReference: fingerprint });
  });
});
