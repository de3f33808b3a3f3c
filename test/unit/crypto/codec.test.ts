import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { decodeValue, encodeValue, type ValueType, valueTypeOf } from '../../../src/crypto/codec';
import { ValueTypeError } from '../../../src/errors';

const roundTrip = (value: unknown, declared?: ValueType) => decodeValue(encodeValue(value, declared));

describe('codec round trips', () => {
  it.each(['grapheme', 'grapheme-composite', 'binary', 'grapheme-ascii'] as const)(
    'round-trips strings (unit %s)',
    (unit) => {
      fc.assert(
        fc.property(fc.string({ unit, maxLength: 64 }), (text) => {
          expect(roundTrip(text, 'string')).toBe(text);
          expect(roundTrip(text)).toBe(text);
        }),
      );
    },
  );

  it('round-trips the empty string', () => {
    expect(roundTrip('', 'string')).toBe('');
  });

  it('round-trips every double, NaN, -0 and infinities included', () => {
    fc.assert(
      fc.property(fc.double(), (n) => {
        expect(Object.is(roundTrip(n, 'number'), n)).toBe(true);
      }),
    );
    for (const n of [
      Number.NaN,
      -0,
      0,
      Number.POSITIVE_INFINITY,
      Number.NEGATIVE_INFINITY,
      Number.MIN_VALUE,
    ]) {
      expect(Object.is(roundTrip(n), n)).toBe(true);
    }
  });

  it('round-trips bigints', () => {
    fc.assert(
      fc.property(fc.bigInt(), (n) => {
        expect(roundTrip(n, 'bigint')).toBe(n);
      }),
    );
    const huge = -(2n ** 4096n) + 1n;
    expect(roundTrip(huge)).toBe(huge);
  });

  it('round-trips booleans', () => {
    expect(roundTrip(true, 'boolean')).toBe(true);
    expect(roundTrip(false, 'boolean')).toBe(false);
  });

  it('round-trips dates, invalid dates included', () => {
    fc.assert(
      fc.property(fc.date({ noInvalidDate: false }), (date) => {
        const decoded = roundTrip(date, 'date');
        expect(decoded).toBeInstanceOf(Date);
        expect(Object.is((decoded as Date).getTime(), date.getTime())).toBe(true);
      }),
    );
    expect(Number.isNaN((roundTrip(new Date(Number.NaN)) as Date).getTime())).toBe(true);
  });

  it('round-trips JSON values as JSON would', () => {
    // A top-level null is not encrypted (it is stored as SQL NULL), so it is left out.
    fc.assert(
      fc.property(
        fc.jsonValue().filter((v) => v !== null),
        (value) => {
          // JSON has no -0: the expected value goes through JSON too.
          expect(roundTrip(value, 'json')).toEqual(JSON.parse(JSON.stringify(value)));
        },
      ),
    );
  });

  it('round-trips objects and arrays without a declared type', () => {
    fc.assert(
      fc.property(fc.oneof(fc.array(fc.jsonValue()), fc.dictionary(fc.string(), fc.jsonValue())), (value) => {
        expect(roundTrip(value)).toEqual(JSON.parse(JSON.stringify(value)));
      }),
    );
  });

  it('round-trips Buffers as Buffers', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 256 }), (bytes) => {
        const buffer = Buffer.from(bytes);
        const decoded = roundTrip(buffer, 'buffer');
        expect(Buffer.isBuffer(decoded)).toBe(true);
        expect((decoded as Buffer).equals(buffer)).toBe(true);
      }),
    );
  });

  it('round-trips Uint8Arrays as Uint8Arrays, not Buffers', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 256 }), (bytes) => {
        const decoded = roundTrip(bytes, 'uint8array');
        expect(decoded).toBeInstanceOf(Uint8Array);
        expect(Buffer.isBuffer(decoded)).toBe(false);
        expect(Array.from(decoded as Uint8Array)).toEqual(Array.from(bytes));
      }),
    );
  });

  it('decodes into memory of its own, so zeroing the plaintext bytes leaves the value intact', () => {
    for (const value of [Buffer.from('secret bytes'), new Uint8Array([1, 2, 3]), 'secret text']) {
      const encoded = encodeValue(value);
      const decoded = decodeValue(encoded);
      encoded.fill(0);
      expect(decoded).toEqual(value);
    }
  });
});

describe('codec types', () => {
  it('names the type of each supported value', () => {
    expect(valueTypeOf('a')).toBe('string');
    expect(valueTypeOf(1)).toBe('number');
    expect(valueTypeOf(1n)).toBe('bigint');
    expect(valueTypeOf(false)).toBe('boolean');
    expect(valueTypeOf(new Date())).toBe('date');
    expect(valueTypeOf({})).toBe('json');
    expect(valueTypeOf([])).toBe('json');
    expect(valueTypeOf(Buffer.alloc(1))).toBe('buffer');
    expect(valueTypeOf(new Uint8Array(1))).toBe('uint8array');
    expect(valueTypeOf(null)).toBeUndefined();
    expect(valueTypeOf(undefined)).toBeUndefined();
  });

  it('enforces the declared type', () => {
    const cases: [unknown, ValueType][] = [
      [1, 'string'],
      ['1', 'number'],
      [1, 'bigint'],
      [1n, 'number'],
      ['true', 'boolean'],
      [Date.now(), 'date'],
      [{}, 'string'],
      [new Uint8Array(1), 'buffer'],
      [Buffer.alloc(1), 'uint8array'],
      [new Date(), 'string'],
    ];
    for (const [value, declared] of cases) {
      expect(() => encodeValue(value, declared)).toThrow(ValueTypeError);
    }
  });

  it("accepts strings, numbers, booleans, arrays and objects for 'json'", () => {
    for (const value of ['text', 42, true, [1, 'two'], { a: { b: [null] } }]) {
      expect(roundTrip(value, 'json')).toEqual(value);
    }
  });

  it('refuses undefined, null, functions and symbols', () => {
    for (const value of [undefined, null, () => 1, Symbol('s')]) {
      expect(() => encodeValue(value)).toThrow(ValueTypeError);
      expect(() => encodeValue(value, 'json')).toThrow(ValueTypeError);
    }
  });

  it('refuses an object whose JSON form is undefined', () => {
    expect(() => encodeValue({ toJSON: () => undefined }, 'json')).toThrow(ValueTypeError);
  });

  it('refuses values JSON.stringify throws on (bigint inside, cycles) with a ValueTypeError', () => {
    const cyclic: Record<string, unknown> = {};
    cyclic.self = cyclic;
    for (const value of [{ amount: 1n }, [2n], cyclic]) {
      expect(() => encodeValue(value)).toThrow(ValueTypeError);
      expect(() => encodeValue(value, 'json')).toThrow(ValueTypeError);
    }
  });

  it('refuses strings with a lone surrogate, which would not decrypt to the same value', () => {
    for (const broken of ['a\uD800b', '\uDC00', 'x\uDBFF']) {
      expect(() => encodeValue(broken)).toThrow(ValueTypeError);
    }
    expect(decodeValue(encodeValue('\uD83D\uDE00'))).toBe('\uD83D\uDE00');
  });

  it('refuses an unknown type tag on decode', () => {
    for (const tag of [0, 9, 0x7f, 0xff]) {
      expect(() => decodeValue(Buffer.of(tag, 1, 2, 3))).toThrow(ValueTypeError);
    }
    expect(() => decodeValue(Buffer.alloc(0))).toThrow(ValueTypeError);
  });

  it('refuses a number or date body of the wrong length', () => {
    expect(() => decodeValue(Buffer.of(2, 0, 0, 0))).toThrow(ValueTypeError);
    expect(() => decodeValue(Buffer.of(5))).toThrow(ValueTypeError);
  });
});

describe('json values JSON cannot hold', () => {
  /** String leaves carry this marker: no error message may contain any part of the value. */
  const SECRET = 'SECRET-7f3a';
  const marked = (v: unknown): unknown => {
    if (typeof v === 'string') return `${SECRET}${v}`;
    if (Array.isArray(v)) return v.map(marked);
    if (v !== null && typeof v === 'object') {
      return Object.fromEntries(Object.entries(v).map(([k, item]) => [`${SECRET}${k}`, marked(item)]));
    }
    return v;
  };
  const secretJson = fc.jsonValue().map(marked);

  /** Puts `inner` somewhere inside `outer`: as a property, an array element, or deeper. */
  const around = (inner: fc.Arbitrary<unknown>) =>
    fc.oneof(
      fc
        .tuple(secretJson, inner, fc.string())
        .map(([other, bad, key]) => ({ [`${SECRET}${key}`]: bad, other })),
      fc.tuple(secretJson, inner).map(([other, bad]) => [other, [bad]]),
      fc.tuple(secretJson, inner).map(([other, bad]) => ({ deep: { deeper: [other, { bad }] } })),
    );

  const refusal = (value: unknown) => {
    try {
      encodeValue(value, 'json');
    } catch (error) {
      return error;
    }
    return undefined;
  };

  const expectRefused = (value: unknown, reason: RegExp) => {
    const error = refusal(value);
    expect(error).toBeInstanceOf(ValueTypeError);
    expect(error).not.toBeInstanceOf(TypeError);
    expect((error as ValueTypeError).message).toMatch(reason);
    expect((error as ValueTypeError).message).not.toContain(SECRET);
    expect((error as ValueTypeError).cause).toBeUndefined();
    /* Without a declared type an object or array is a json value too. */
    expect(refusal(value)).toBeInstanceOf(ValueTypeError);
  };

  it('refuses a bigint anywhere inside, naming it and nothing of the value', () => {
    fc.assert(fc.property(around(fc.bigInt()), (value) => expectRefused(value, /bigint/)));
  });

  it('refuses a cycle anywhere inside', () => {
    fc.assert(
      fc.property(
        fc.dictionary(fc.string(), secretJson),
        fc.string(),
        fc.boolean(),
        (object, key, inArray) => {
          const value: Record<string, unknown> = { ...object };
          const holder = inArray ? [value] : { value };
          value[`${SECRET}${key}`] = holder;
          expectRefused(holder, /cycle/);
        },
      ),
    );
  });

  it('refuses a Map or a Set anywhere inside, which JSON would store as {}', () => {
    const maps = fc
      .array(fc.tuple(fc.string(), secretJson), { maxLength: 3 })
      .map((entries) => new Map(entries.map(([k, v]) => [`${SECRET}${k}`, v])));
    const sets = fc.array(secretJson, { maxLength: 3 }).map((items) => new Set(items));
    fc.assert(fc.property(around(maps), (value) => expectRefused(value, /Map/)));
    fc.assert(fc.property(around(sets), (value) => expectRefused(value, /Set/)));
    expectRefused(new Map([[SECRET, 1]]), /Map/);
  });

  it('still stores empty objects and strings that look like them', () => {
    for (const value of [{}, [{}], { a: {} }, '{}', { text: '{}' }]) {
      expect(roundTrip(value, 'json')).toEqual(value);
    }
  });

  it('gives a Date inside back as its ISO string, and a Buffer as { type, data }, as JSON does', () => {
    fc.assert(
      fc.property(fc.date({ noInvalidDate: true }), fc.uint8Array({ maxLength: 64 }), (date, bytes) => {
        const decoded = roundTrip({ at: date, bytes: Buffer.from(bytes), list: [date] }, 'json');
        expect(decoded).toEqual({
          at: date.toISOString(),
          bytes: { type: 'Buffer', data: Array.from(bytes) },
          list: [date.toISOString()],
        });
      }),
    );
    // A top-level Date in a property declared json is a JSON value too.
    const date = new Date(0);
    expect(roundTrip(date, 'json')).toBe(date.toISOString());
  });
});
