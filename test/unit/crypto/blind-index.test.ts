import { createHash, createHmac, randomBytes } from 'node:crypto';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  BLIND_INDEX_BYTES,
  type BuiltInNormalizer,
  blindIndex,
  checkIndexableType,
  deriveColumnKey,
  type IndexPlace,
  indexInput,
  indexKeyVersionOf,
  normalizerFunction,
  placeInfo,
} from '../../../src/crypto/blind-index';
import { encodeValue } from '../../../src/crypto/codec';
import { ConfigError, ValueTypeError } from '../../../src/errors';

const place = (column = 'email_bidx', table = 'contacts', schema = 'public'): IndexPlace => ({
  schema,
  table,
  column,
});
const indexOf = (key: Buffer, where: IndexPlace, value: unknown, version = 1) =>
  blindIndex(deriveColumnKey(key, where), version, indexInput(value, 'string', undefined));

/** HKDF-SHA256 as RFC 5869 writes it, from HMAC alone: the reference the derivation is checked against. */
function referenceHkdf(ikm: Buffer, salt: Buffer, info: Buffer, length: number): Buffer {
  const prk = createHmac('sha256', salt).update(ikm).digest();
  let block = Buffer.alloc(0);
  const out: Buffer[] = [];
  for (let i = 1; Buffer.concat(out).length < length; i++) {
    block = createHmac('sha256', prk)
      .update(Buffer.concat([block, info, Buffer.of(i)]))
      .digest();
    out.push(block);
  }
  return Buffer.concat(out).subarray(0, length);
}

const units = ['grapheme', 'grapheme-composite', 'binary', 'grapheme-ascii'] as const;

describe('normalisers', () => {
  it.each(['lowercase', 'trim', 'email', 'digits'] as BuiltInNormalizer[])('%s is idempotent', (name) => {
    const normalize = normalizerFunction(name) as (value: string) => string;
    for (const unit of units) {
      fc.assert(
        fc.property(fc.string({ unit, maxLength: 40 }), (text) => {
          const once = normalize(text);
          expect(normalize(once)).toBe(once);
        }),
      );
    }
  });

  it('email trims and lower-cases; digits keeps ASCII digits only', () => {
    expect(normalizerFunction('email')?.(' Ada@Example.COM ')).toBe('ada@example.com');
    expect(normalizerFunction('digits')?.('+44 (20) 7946-0018')).toBe('442079460018');
    expect(normalizerFunction('trim')?.('  A b ')).toBe('A b');
    expect(normalizerFunction('lowercase')?.(' ÀB ')).toBe(' àb ');
  });

  it('equal after normalisation gives equal indexes; the original case never matters', () => {
    const key = randomBytes(32);
    const columnKey = deriveColumnKey(key, place());
    const normalize = normalizerFunction('email');
    fc.assert(
      fc.property(fc.emailAddress(), fc.constantFrom('', ' ', '\t'), (email, pad) => {
        const shouted = `${pad}${email.toUpperCase()}${pad}`;
        expect(blindIndex(columnKey, 1, indexInput(shouted, 'string', normalize))).toEqual(
          blindIndex(columnKey, 1, indexInput(email.toLowerCase(), 'string', normalize)),
        );
      }),
    );
  });

  it('an unknown normaliser name is a ConfigError', () => {
    expect(() => normalizerFunction('upper' as BuiltInNormalizer)).toThrow(ConfigError);
  });

  it('a normaliser that throws or returns a non-string is a ValueTypeError that quotes nothing', () => {
    const secret = 'secret@example.com';
    const throwing = (value: string): string => {
      throw new Error(`cannot normalise ${value}`);
    };
    const error = (() => {
      try {
        indexInput(secret, 'string', throwing);
      } catch (caught) {
        return caught as ValueTypeError;
      }
      return undefined;
    })();
    expect(error).toBeInstanceOf(ValueTypeError);
    expect(error?.message).not.toContain(secret);
    expect(error?.cause).toBeUndefined();
    expect(() => indexInput('x', 'string', () => 42 as unknown as string)).toThrow(/returned a number/);
    expect(() => indexInput('x', 'string', () => null as unknown as string)).toThrow(/returned a null/);
  });
});

describe('blind index values', () => {
  it('is the version, then HMAC-SHA256 under the HKDF-derived column key (RFC 5869)', () => {
    const key = Buffer.from(Array.from({ length: 32 }, (_, i) => i));
    const where = place();
    const expectedKey = referenceHkdf(
      key,
      Buffer.from('typeorm-envelope blind index v1'),
      placeInfo(where),
      32,
    );
    expect(deriveColumnKey(key, where)).toEqual(expectedKey);
    const index = indexOf(key, where, 'ada@example.com', 7);
    expect(index.length).toBe(BLIND_INDEX_BYTES);
    expect(indexKeyVersionOf(index)).toBe(7);
    expect(index.subarray(2)).toEqual(
      createHmac('sha256', expectedKey).update(encodeValue('ada@example.com', 'string')).digest(),
    );
  });

  it('is neither SHA-256 of the value nor an HMAC under an empty, zero or constant key', () => {
    fc.assert(
      fc.property(fc.string({ maxLength: 30 }), (value) => {
        const index = indexOf(randomBytes(32), place(), value).subarray(2);
        const encoded = encodeValue(value, 'string');
        for (const candidate of [
          createHash('sha256').update(value).digest(),
          createHash('sha256').update(encoded).digest(),
          createHmac('sha256', Buffer.alloc(0)).update(value).digest(),
          createHmac('sha256', Buffer.alloc(0)).update(encoded).digest(),
          createHmac('sha256', Buffer.alloc(32)).update(encoded).digest(),
          createHmac('sha256', deriveColumnKey(Buffer.alloc(32), place()))
            .update(encoded)
            .digest(),
        ]) {
          expect(index.equals(candidate)).toBe(false);
        }
      }),
      { numRuns: 50 },
    );
  });

  it('differs between tables, columns, schemas and index keys (tenants) for the same value', () => {
    fc.assert(
      fc.property(
        fc.string({ maxLength: 20 }),
        fc.tuple(fc.string({ maxLength: 8 }), fc.string({ maxLength: 8 }), fc.string({ maxLength: 8 })),
        fc.tuple(fc.string({ maxLength: 8 }), fc.string({ maxLength: 8 }), fc.string({ maxLength: 8 })),
        (value, [s1, t1, c1], [s2, t2, c2]) => {
          const key = randomBytes(32);
          const a = indexOf(key, place(c1, t1, s1), value);
          const b = indexOf(key, place(c2, t2, s2), value);
          expect(a.equals(b)).toBe(s1 === s2 && t1 === t2 && c1 === c2);
          expect(indexOf(randomBytes(32), place(c1, t1, s1), value).equals(a)).toBe(false);
        },
      ),
      { numRuns: 200 },
    );
  });

  it('the place encoding is unambiguous: moving characters between table and column changes the key', () => {
    const key = randomBytes(32);
    expect(indexOf(key, place('b_bidx', 'a'), 'x')).not.toEqual(indexOf(key, place('_bidx', 'ab'), 'x'));
  });

  it('keeps the value type: the string "1" and the number 1 never share an index', () => {
    const columnKey = deriveColumnKey(randomBytes(32), place());
    const of = (value: unknown) => blindIndex(columnKey, 1, indexInput(value, undefined, undefined));
    expect(of('1')).not.toEqual(of(1));
    expect(of(0)).toEqual(of(-0));
    expect(of(new Date(5))).toEqual(of(new Date(5)));
    expect(of(Buffer.from('ab'))).toEqual(of(Buffer.from('ab')));
  });

  it('refuses JSON values and JSON properties, and normalisers on non-strings', () => {
    expect(() => indexInput({ a: 1 }, undefined, undefined)).toThrow(ValueTypeError);
    expect(() => checkIndexableType('json', undefined)).toThrow(ConfigError);
    expect(() => checkIndexableType('number', 'email')).toThrow(ConfigError);
    expect(() => checkIndexableType('string', 'email')).not.toThrow();
    expect(() => indexInput(null, 'string', undefined)).toThrow(ValueTypeError);
  });

  it('refuses index keys that are not 256 bits and versions outside 1..65535', () => {
    expect(() => deriveColumnKey(randomBytes(16), place())).toThrow(ConfigError);
    const columnKey = deriveColumnKey(randomBytes(32), place());
    expect(() => blindIndex(columnKey, 0, Buffer.of(1))).toThrow(ConfigError);
    expect(() => blindIndex(columnKey, 65_536, Buffer.of(1))).toThrow(ConfigError);
    expect(indexKeyVersionOf(Buffer.alloc(3))).toBe(0);
  });
});
