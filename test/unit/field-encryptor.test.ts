import { randomBytes } from 'node:crypto';
import { inspect } from 'node:util';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { ValueBinding } from '../../src/crypto/associated-data';
import { encodeValue } from '../../src/crypto/codec';
import { type ErrorContext, IntegrityError, UnknownKeyVersionError, ValueTypeError } from '../../src/errors';
import { FieldEncryptor, type SealedValue } from '../../src/field-encryptor';
import { DataKeyCache } from '../../src/keys/data-key-cache';
import { FIRST_TENANT_KEY_VERSION, Keyring } from '../../src/keys/keyring';
import { LocalKeyProvider } from '../../src/keys/local-key-provider';

/** Versions 1, 2 and 3, each under its own randomly generated master key. */
const keyring = new Keyring(
  [1, 2, 3].map((version) => ({
    version,
    provider: new LocalKeyProvider({ key: randomBytes(32).toString('base64') }),
  })),
  1,
);
const encryptor = new FieldEncryptor(new DataKeyCache(keyring));
/** An encryptor with an empty cache: every wrapped key it meets goes to the key provider. */
const coldEncryptor = () => new FieldEncryptor(new DataKeyCache(keyring));

const BINDING: ValueBinding = { table: 'users', column: 'email', primaryKey: '42' };
const CONTEXT: ErrorContext = { entity: 'User', column: 'email', primaryKey: '42' };

type Part = 'ciphertext' | 'iv' | 'wrappedKey';

function flipBit(sealed: SealedValue, part: Part, bit: number): SealedValue {
  // Copies: the wrapped key is shared with the cache and must not be altered in place.
  const bytes = Buffer.from(sealed[part]);
  bytes[bit >> 3] = (bytes[bit >> 3] as number) ^ (1 << (bit & 7));
  return { ...sealed, [part]: bytes };
}

async function openError(
  sealed: SealedValue,
  binding = BINDING,
  context = CONTEXT,
  opener = encryptor,
): Promise<unknown> {
  try {
    const value = await opener.open(sealed, binding, context);
    return new Error(`opened to a ${typeof value}`);
  } catch (error) {
    return error;
  }
}

const printed = (error: unknown) => [(error as Error).message, String(error), inspect(error, { depth: 10 })];

describe('FieldEncryptor round trips', () => {
  it('opens what it sealed, for every value type', async () => {
    const values: unknown[] = [
      'héllo wörld ✓ 🙂',
      '',
      -0,
      Number.NaN,
      12.5,
      2n ** 70n,
      true,
      new Date('2020-02-29T12:00:00Z'),
      { a: [1, 'two', null] },
      Buffer.from([0, 1, 255]),
      new Uint8Array([9, 8, 7]),
    ];
    for (const value of values) {
      const sealed = await encryptor.seal(value, BINDING);
      expect(await encryptor.open(sealed, BINDING)).toEqual(value);
    }
  });

  it('round-trips arbitrary strings and JSON under arbitrary bindings', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          fc.string({ unit: 'grapheme' }),
          fc.jsonValue().filter((v) => v !== null),
        ),
        fc.record({
          table: fc.string(),
          column: fc.string(),
          primaryKey: fc.option(fc.string(), { nil: undefined }),
        }),
        async (value, binding) => {
          const sealed = await encryptor.seal(value, binding, 'json');
          expect(await encryptor.open(sealed, binding)).toEqual(JSON.parse(JSON.stringify(value)));
        },
      ),
      { numRuns: 200 },
    );
  });

  it('stores the four parts with a header, a fresh IV per value and the active key version', async () => {
    const a = await encryptor.seal('same value', BINDING);
    const b = await encryptor.seal('same value', BINDING);
    expect(a.ciphertext.subarray(0, 2)).toEqual(Buffer.of(1, 1));
    expect(a.iv.length).toBe(12);
    expect(a.iv.equals(b.iv)).toBe(false);
    expect(a.ciphertext.equals(b.ciphertext)).toBe(false);
    expect(a.keyVersion).toBe(1);
    const unbound = await encryptor.seal('same value', { table: 'users', column: 'email' });
    expect(unbound.ciphertext.subarray(0, 2)).toEqual(Buffer.of(1, 0));
  });

  it('opens with a cold cache, through the key provider', async () => {
    const sealed = await encryptor.seal('cold', BINDING);
    expect(await coldEncryptor().open(sealed, BINDING)).toBe('cold');
  });

  it('never stores the plaintext bytes', async () => {
    await fc.assert(
      fc.asyncProperty(fc.string({ minLength: 8, maxLength: 200 }), async (text) => {
        const sealed = await encryptor.seal(text, BINDING);
        const plain = Buffer.from(text, 'utf8');
        for (const part of [sealed.ciphertext, sealed.iv, sealed.wrappedKey]) {
          expect(part.includes(plain)).toBe(false);
          expect(part.includes(encodeValue(text))).toBe(false);
        }
      }),
      { numRuns: 200 },
    );
  });

  it('enforces the declared type', async () => {
    await expect(encryptor.seal('text', BINDING, 'number')).rejects.toBeInstanceOf(ValueTypeError);
    await expect(encryptor.seal(undefined, BINDING)).rejects.toBeInstanceOf(ValueTypeError);
  });
});

describe('FieldEncryptor binding', () => {
  const moved: [string, ValueBinding][] = [
    ['another table', { ...BINDING, table: 'admins' }],
    ['another column', { ...BINDING, column: 'phone' }],
    ['another primary key', { ...BINDING, primaryKey: '43' }],
    ['no primary key', { table: 'users', column: 'email' }],
    ['a shifted table/column boundary', { ...BINDING, table: 'usersemail', column: '' }],
  ];

  it.each(moved)('refuses a value opened under %s, with the caller context', async (_what, binding) => {
    const sealed = await encryptor.seal('alice@example.com', BINDING);
    const error = await openError(sealed, binding, { entity: 'Account', column: 'mail', primaryKey: '7' });
    expect(error).toBeInstanceOf(IntegrityError);
    expect(error).toMatchObject({ entity: 'Account', column: 'mail', primaryKey: '7', keyVersion: 1 });
  });

  it('binds a value sealed without a primary key to table and column only', async () => {
    const sealed = await encryptor.seal('x', { table: 'users', column: 'email' });
    expect(await encryptor.open(sealed, { table: 'users', column: 'email', primaryKey: '99' })).toBe('x');
    expect(await openError(sealed, { table: 'users', column: 'name' })).toBeInstanceOf(IntegrityError);
  });
});

describe('FieldEncryptor tampering', () => {
  it('refuses any single-bit flip of ciphertext, IV or wrapped key: zero silent corruptions', async () => {
    const parts: Part[] = ['ciphertext', 'iv', 'wrappedKey'];
    await fc.assert(
      fc.asyncProperty(
        fc.string({ maxLength: 40 }),
        fc.constantFrom(...parts),
        fc.nat(),
        fc.boolean(),
        async (text, part, n, cold) => {
          const sealed = await encryptor.seal(text, BINDING);
          const bit = n % (sealed[part].length * 8);
          // A flipped wrapped key misses the cache (it is keyed by the exact wrapped bytes) either way.
          const error = await openError(
            flipBit(sealed, part, bit),
            BINDING,
            CONTEXT,
            cold ? coldEncryptor() : encryptor,
          );
          expect(error).toBeInstanceOf(IntegrityError);
          expect(error).toMatchObject(CONTEXT);
        },
      ),
      { numRuns: 1500 },
    );
  });

  it('refuses every bit flip of the header and of the tag', async () => {
    const sealed = await encryptor.seal('header and tag', BINDING);
    const length = sealed.ciphertext.length;
    const bits = [...Array(16).keys(), ...Array.from({ length: 128 }, (_, i) => (length - 16) * 8 + i)];
    for (const bit of bits) {
      expect(await openError(flipBit(sealed, 'ciphertext', bit))).toBeInstanceOf(IntegrityError);
    }
  });

  it('refuses a flipped key version: unknown version, or IntegrityError under another version key or in the tenant range', async () => {
    for (const active of [1, 2]) {
      keyring.activate(active);
      const sealed = await encryptor.seal('versioned', BINDING).finally(() => keyring.activate(1));
      expect(sealed.keyVersion).toBe(active);
      for (let bit = 0; bit < 31; bit++) {
        const keyVersion = active ^ (1 << bit);
        const error = await openError({ ...sealed, keyVersion });
        /* Versions from 1,000,000 up are tenant keys: in a value of no tenant, a value moved here. */
        if (keyring.has(keyVersion) || keyVersion >= FIRST_TENANT_KEY_VERSION) {
          expect(error).toBeInstanceOf(IntegrityError);
        } else {
          expect(error).toBeInstanceOf(UnknownKeyVersionError);
          expect((error as UnknownKeyVersionError).keyVersion).toBe(keyVersion);
        }
        expect(error).toMatchObject(CONTEXT);
      }
    }
  });

  it('refuses every truncation of the ciphertext', async () => {
    const sealed = await encryptor.seal('truncate me', BINDING);
    for (let length = 0; length < sealed.ciphertext.length; length++) {
      const error = await openError({ ...sealed, ciphertext: sealed.ciphertext.subarray(0, length) });
      expect(error).toBeInstanceOf(IntegrityError);
    }
  });

  it('refuses a truncated or extended IV', async () => {
    const sealed = await encryptor.seal('iv', BINDING);
    expect(await openError({ ...sealed, iv: sealed.iv.subarray(0, 11) })).toBeInstanceOf(IntegrityError);
    expect(await openError({ ...sealed, iv: Buffer.concat([sealed.iv, Buffer.of(0)]) })).toBeInstanceOf(
      IntegrityError,
    );
  });

  it('never puts the plaintext in an error message or in util.inspect(error)', async () => {
    const secret = `secret-${randomBytes(8).toString('hex')}`;
    const sealed = await encryptor.seal(secret, BINDING);
    const errors: unknown[] = [
      await openError(sealed, { ...BINDING, column: 'other' }),
      await openError(flipBit(sealed, 'ciphertext', 30)),
      await openError(flipBit(sealed, 'iv', 3)),
      await openError(flipBit(sealed, 'wrappedKey', 100)),
      await openError({ ...sealed, keyVersion: 3 }),
      await openError({ ...sealed, keyVersion: 9 }),
      await openError({ ...sealed, ciphertext: sealed.ciphertext.subarray(0, 10) }),
      await encryptor.seal(secret, BINDING, 'number').catch((error: unknown) => error),
    ];
    for (const error of errors) {
      expect(error).toBeInstanceOf(Error);
      for (const text of printed(error)) expect(text).not.toContain(secret);
    }
  });
});
