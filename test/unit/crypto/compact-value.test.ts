import { randomBytes } from 'node:crypto';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { gcmOpen, gcmSeal } from '../../../src/crypto/aes-gcm';
import {
  associatedData,
  FLAG_PRIMARY_KEY_BOUND,
  FLAG_SCHEMA_BOUND,
  FLAG_TENANT_BOUND,
  FORMAT_V1,
  type ValueBinding,
} from '../../../src/crypto/associated-data';
import {
  COMPACT_BODY_OFFSET,
  COMPACT_MIN_BYTES,
  compactDataKeyId,
  compactHeader,
  encodeCompact,
  FORMAT_V2,
  MAX_DATA_KEY_ID,
  parseCompact,
} from '../../../src/crypto/compact-value';
import { IntegrityError } from '../../../src/errors';

const flagsArb = fc
  .subarray([FLAG_PRIMARY_KEY_BOUND, FLAG_SCHEMA_BOUND, FLAG_TENANT_BOUND])
  .map((fs) => fs.reduce((a, b) => a | b, 0));
const idArb = fc.bigInt({ min: 1n, max: MAX_DATA_KEY_ID });
const ivArb = fc.uint8Array({ minLength: 12, maxLength: 12 });
const bodyArb = fc.uint8Array({ minLength: 17, maxLength: 200 });

const binding = (flags: number): ValueBinding => ({
  table: 'people',
  column: 'email',
  ...(flags & FLAG_SCHEMA_BOUND ? { schema: 'public' } : {}),
  ...(flags & FLAG_PRIMARY_KEY_BOUND ? { primaryKey: '42' } : {}),
  ...(flags & FLAG_TENANT_BOUND ? { tenant: 'acme' } : {}),
});

/** Seals like the compact write path: AAD over the two header bytes and the binding. */
function seal(key: Buffer, flags: number, dataKeyId: bigint, plaintext: Buffer): Buffer {
  const iv = randomBytes(12);
  const body = gcmSeal(key, iv, plaintext, associatedData(compactHeader(flags), binding(flags)));
  return encodeCompact({ flags, dataKeyId, iv, body });
}

/** Opens like the read path, with the key `keyOf(id)` names (undefined: no such key row). */
function open(value: Buffer, keyOf: (id: bigint) => Buffer | undefined, flags: number): Buffer | undefined {
  const parsed = parseCompact(value);
  const key = keyOf(parsed.dataKeyId);
  if (!key) return undefined;
  return gcmOpen(key, parsed.iv, parsed.body, associatedData(parsed.header, binding(flags)));
}

describe('compact value format', () => {
  it('lays out format, flags, big-endian id, IV and body at the documented offsets', () => {
    const iv = Buffer.alloc(12, 0xaa);
    const body = Buffer.alloc(17, 0xbb);
    const value = encodeCompact({ flags: FLAG_TENANT_BOUND, dataKeyId: 0x0102030405060708n, iv, body });
    expect(value.length).toBe(22 + 17);
    expect(value.subarray(0, 10).toString('hex')).toBe('02040102030405060708');
    expect(value.subarray(10, 22)).toEqual(iv);
    expect(value.subarray(22)).toEqual(body);
    expect(COMPACT_BODY_OFFSET).toBe(22);
  });

  it('parses what it encodes, for every flag set, id, IV and body', () => {
    fc.assert(
      fc.property(flagsArb, idArb, ivArb, bodyArb, (flags, dataKeyId, iv, body) => {
        const value = encodeCompact({ flags, dataKeyId, iv, body });
        const parsed = parseCompact(value);
        expect(parsed.flags).toBe(flags);
        expect(parsed.dataKeyId).toBe(dataKeyId);
        expect(Buffer.from(parsed.iv)).toEqual(Buffer.from(iv));
        expect(Buffer.from(parsed.body)).toEqual(Buffer.from(body));
        expect(Buffer.from(parsed.header)).toEqual(Buffer.of(FORMAT_V2, flags));
        expect(compactDataKeyId(value)).toBe(dataKeyId);
        /* A Uint8Array that is not a Buffer parses the same. */
        expect(parseCompact(new Uint8Array(value)).dataKeyId).toBe(dataKeyId);
      }),
    );
  });

  it('refuses short values, other formats, unknown flags and impossible ids with an IntegrityError', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: COMPACT_MIN_BYTES - 1 }), (short) => {
        expect(() => parseCompact(short)).toThrow(IntegrityError);
        expect(compactDataKeyId(short)).toBeUndefined();
      }),
    );
    const good = encodeCompact({ flags: 0, dataKeyId: 7n, iv: Buffer.alloc(12), body: Buffer.alloc(17) });
    for (const format of [0, FORMAT_V1, 3, 0xff]) {
      const other = Buffer.from(good);
      other[0] = format;
      expect(() => parseCompact(other)).toThrow(IntegrityError);
      expect(compactDataKeyId(other)).toBeUndefined();
    }
    for (const flags of [0x08, 0x10, 0x80]) {
      const other = Buffer.from(good);
      other[1] = flags;
      expect(() => parseCompact(other)).toThrow(IntegrityError);
    }
    for (const id of [0n, MAX_DATA_KEY_ID + 1n, 2n ** 64n - 1n]) {
      const other = Buffer.from(good);
      other.writeBigUInt64BE(id, 2);
      expect(() => parseCompact(other)).toThrow(/impossible data-key id/);
      expect(compactDataKeyId(other)).toBeUndefined();
    }
  });

  it('never encodes what it would refuse to parse', () => {
    const iv = Buffer.alloc(12);
    const body = Buffer.alloc(17);
    expect(() => encodeCompact({ flags: 0x08, dataKeyId: 1n, iv, body })).toThrow(RangeError);
    expect(() => encodeCompact({ flags: 0, dataKeyId: 0n, iv, body })).toThrow(RangeError);
    expect(() => encodeCompact({ flags: 0, dataKeyId: MAX_DATA_KEY_ID + 1n, iv, body })).toThrow(RangeError);
    expect(() => encodeCompact({ flags: 0, dataKeyId: 1n, iv: Buffer.alloc(16), body })).toThrow(RangeError);
    expect(() => encodeCompact({ flags: 0, dataKeyId: 1n, iv, body: Buffer.alloc(16) })).toThrow(RangeError);
  });

  it('error messages never quote the value', () => {
    const secret = Buffer.from('02000000000000000000', 'hex');
    try {
      parseCompact(secret);
    } catch (error) {
      expect((error as Error).message).not.toContain(secret.toString('hex'));
    }
  });
});

describe('compact value tampering', () => {
  const keys = new Map<bigint, Buffer>([
    [1n, randomBytes(32)],
    [2n, randomBytes(32)],
  ]);
  const keyOf = (id: bigint) => keys.get(id);

  it('opens an untouched value', () => {
    fc.assert(
      fc.property(flagsArb, fc.uint8Array({ minLength: 1, maxLength: 64 }), (flags, text) => {
        const plaintext = Buffer.from(text);
        const value = seal(keys.get(1n) as Buffer, flags, 1n, plaintext);
        expect(open(value, keyOf, flags)).toEqual(plaintext);
      }),
    );
  });

  it('any changed bit anywhere fails: a parse error, an unknown key, or failed authentication', () => {
    fc.assert(
      fc.property(
        flagsArb,
        fc.uint8Array({ minLength: 1, maxLength: 64 }),
        fc.nat(),
        fc.integer({ min: 0, max: 7 }),
        (flags, text, at, bit) => {
          const value = seal(keys.get(1n) as Buffer, flags, 1n, Buffer.from(text));
          const tampered = Buffer.from(value);
          const index = at % tampered.length;
          tampered[index] = (tampered[index] as number) ^ (1 << bit);
          let opened: Buffer | undefined;
          try {
            opened = open(tampered, keyOf, flags);
          } catch (error) {
            expect(error).toBeInstanceOf(IntegrityError);
            return;
          }
          expect(opened).toBeUndefined();
        },
      ),
    );
  });

  it('a value pointed at another existing data key fails authentication', () => {
    const value = seal(keys.get(1n) as Buffer, 0, 1n, Buffer.from('x'));
    const moved = Buffer.from(value);
    moved.writeBigUInt64BE(2n, 2);
    expect(parseCompact(moved).dataKeyId).toBe(2n);
    expect(open(moved, keyOf, 0)).toBeUndefined();
  });

  it('truncating or extending a value fails', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 1, maxLength: 64 }), fc.nat(), (text, cut) => {
        const value = seal(keys.get(1n) as Buffer, 0, 1n, Buffer.from(text));
        const shorter = value.subarray(0, cut % value.length);
        let outcome: Buffer | undefined | 'threw';
        try {
          outcome = open(shorter, keyOf, 0);
        } catch (error) {
          expect(error).toBeInstanceOf(IntegrityError);
          outcome = 'threw';
        }
        expect(outcome === 'threw' || outcome === undefined).toBe(true);
        expect(open(Buffer.concat([value, Buffer.of(0)]), keyOf, 0)).toBeUndefined();
      }),
    );
  });

  it('a value moved to another row, column or tenant fails authentication', () => {
    const key = keys.get(1n) as Buffer;
    const flags = FLAG_PRIMARY_KEY_BOUND | FLAG_TENANT_BOUND;
    const value = seal(key, flags, 1n, Buffer.from('secret'));
    const parsed = parseCompact(value);
    const base = binding(flags);
    for (const elsewhere of [
      { ...base, primaryKey: '43' },
      { ...base, column: 'phone' },
      { ...base, tenant: 'globex' },
      { ...base, table: 'other' },
    ]) {
      expect(gcmOpen(key, parsed.iv, parsed.body, associatedData(parsed.header, elsewhere))).toBeUndefined();
    }
  });
});
