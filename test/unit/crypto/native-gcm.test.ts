import { randomBytes } from 'node:crypto';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { gcmBackend, gcmForgetKey, gcmOpen, gcmSeal } from '../../../src/crypto/aes-gcm';
import { type NativeGcm, nativeGcm } from '../../../src/crypto/native-gcm';
import { CachedDataKey } from '../../../src/keys/data-key-cache';
import { bytes, GCM_VECTORS, type GcmVector, hex, refOpen, refSeal } from '../../support/gcm-reference';

/**
 * The native AES-256-GCM addon (native/gcm.cc) against the GCM specification and against node:crypto.
 * Skipped, with the reason in the suite name, when the addon is not built (no compiler) or disabled.
 */
const unavailable = nativeGcm
  ? undefined
  : process.env.TYPEORM_ENVELOPE_NATIVE === '0'
    ? 'disabled by TYPEORM_ENVELOPE_NATIVE=0'
    : 'addon not built (npm run build:native found no compiler, Python or headers)';
const suite = unavailable ? `native AES-256-GCM — skipped: ${unavailable}` : 'native AES-256-GCM';
const native = nativeGcm as NativeGcm;
const nativeIt = it.skipIf(unavailable !== undefined);

describe(suite, () => {
  nativeIt('is the backend gcmSeal/gcmOpen use', () => {
    expect(gcmBackend()).toBe('native');
    expect(native.openssl).toMatch(/^OpenSSL 3\./);
  });

  nativeIt('matches the GCM specification vectors, through the addon and through gcmSeal/gcmOpen', () => {
    for (const v of GCM_VECTORS) {
      const handle = native.createKey(hex(v.key));
      const sealed = native.seal(handle, hex(v.iv), hex(v.plaintext), hex(v.aad));
      expect(sealed.toString('hex')).toBe(v.ciphertext + v.tag);
      expect(native.open(handle, hex(v.iv), hex(v.ciphertext + v.tag), hex(v.aad))?.toString('hex')).toBe(
        v.plaintext,
      );
      native.destroyKey(handle);
      expect(gcmSeal(hex(v.key), hex(v.iv), hex(v.plaintext), hex(v.aad)).toString('hex')).toBe(
        v.ciphertext + v.tag,
      );
      expect(gcmOpen(hex(v.key), hex(v.iv), hex(v.ciphertext + v.tag), hex(v.aad))?.toString('hex')).toBe(
        v.plaintext,
      );
    }
  });

  nativeIt('seals exactly as node:crypto does, and each opens what the other sealed', () => {
    fc.assert(
      fc.property(bytes(32, 32), bytes(12, 12), bytes(0, 300), bytes(0, 64), (key, iv, plaintext, aad) => {
        const sealed = gcmSeal(key, iv, plaintext, aad);
        expect(Buffer.isBuffer(sealed)).toBe(true);
        expect(sealed.equals(refSeal(key, iv, plaintext, aad))).toBe(true);
        expect(refOpen(key, iv, sealed, aad)?.equals(plaintext)).toBe(true);
        const opened = gcmOpen(key, iv, refSeal(key, iv, plaintext, aad), aad);
        expect(Buffer.isBuffer(opened)).toBe(true);
        expect(opened?.equals(plaintext)).toBe(true);
      }),
      { numRuns: 3000 },
    );
  });

  nativeIt('reuses one handle per key Buffer across many values (only the IV is reset)', () => {
    const key = randomBytes(32);
    fc.assert(
      fc.property(bytes(12, 12), bytes(0, 100), bytes(0, 40), (iv, plaintext, aad) => {
        const sealed = gcmSeal(key, iv, plaintext, aad);
        expect(sealed.equals(refSeal(key, iv, plaintext, aad))).toBe(true);
        expect(gcmOpen(key, iv, sealed, aad)?.equals(plaintext)).toBe(true);
        /* A failed open leaves the context usable for the next value. */
        expect(gcmOpen(key, iv, Buffer.concat([sealed, Buffer.of(0)]), aad)).toBeUndefined();
      }),
      { numRuns: 1000 },
    );
    gcmForgetKey(key);
  });

  nativeIt('refuses every single-bit flip of ciphertext, tag, IV and associated data', () => {
    const v = GCM_VECTORS[3] as GcmVector;
    const key = hex(v.key);
    const iv = hex(v.iv);
    const aad = hex(v.aad);
    const sealed = hex(v.ciphertext + v.tag);
    const flips = function* (input: Buffer) {
      for (let bit = 0; bit < input.length * 8; bit++) {
        const copy = Buffer.from(input);
        copy[bit >> 3] = (copy[bit >> 3] as number) ^ (1 << (bit & 7));
        yield copy;
      }
    };
    let count = 0;
    for (const bad of flips(sealed)) {
      expect(gcmOpen(key, iv, bad, aad)).toBeUndefined();
      count++;
    }
    for (const bad of flips(iv)) {
      expect(gcmOpen(key, bad, sealed, aad)).toBeUndefined();
      count++;
    }
    for (const bad of flips(aad)) {
      expect(gcmOpen(key, iv, sealed, bad)).toBeUndefined();
      count++;
    }
    expect(count).toBe((sealed.length + iv.length + aad.length) * 8);
    expect(gcmOpen(key, iv, sealed, aad)?.toString('hex')).toBe(v.plaintext);
  });

  nativeIt('never serves a stale key schedule after gcmForgetKey and new key bytes', () => {
    const iv = randomBytes(12);
    const plaintext = Buffer.from('a value of about thirty bytes.');
    const aad = Buffer.from('aad');
    const first = randomBytes(32);
    const second = randomBytes(32);
    const key = Buffer.from(first);
    expect(gcmSeal(key, iv, plaintext, aad).equals(refSeal(first, iv, plaintext, aad))).toBe(true);
    gcmForgetKey(key);
    gcmForgetKey(key);
    key.set(second);
    const sealed = gcmSeal(key, iv, plaintext, aad);
    expect(sealed.equals(refSeal(second, iv, plaintext, aad))).toBe(true);
    expect(gcmOpen(key, iv, sealed, aad)?.equals(plaintext)).toBe(true);
    expect(gcmOpen(first, iv, sealed, aad)).toBeUndefined();
  });

  nativeIt('re-keys even when a mutated key Buffer was not forgotten (second line of defence)', () => {
    const iv = randomBytes(12);
    const plaintext = randomBytes(30);
    const key = randomBytes(32);
    gcmSeal(key, iv, plaintext, Buffer.alloc(0));
    key.fill(0);
    expect(
      gcmSeal(key, iv, plaintext, Buffer.alloc(0)).equals(refSeal(key, iv, plaintext, Buffer.alloc(0))),
    ).toBe(true);
    gcmForgetKey(key);
  });

  nativeIt('CachedDataKey.destroy() forgets the handle before zeroing the key', () => {
    const bytesOfKey = randomBytes(32);
    const iv = randomBytes(12);
    const plaintext = randomBytes(30);
    const dataKey = new CachedDataKey(1, Buffer.alloc(0), Buffer.from(bytesOfKey));
    let keyBuffer: Buffer | undefined;
    const sealed = dataKey.use((key) => {
      keyBuffer = key;
      return gcmSeal(key, iv, plaintext, Buffer.alloc(0));
    });
    expect(sealed.equals(refSeal(bytesOfKey, iv, plaintext, Buffer.alloc(0)))).toBe(true);
    dataKey.destroy();
    const zeroed = keyBuffer as Buffer;
    expect(zeroed.equals(Buffer.alloc(32))).toBe(true);
    expect(gcmOpen(zeroed, iv, sealed, Buffer.alloc(0))).toBeUndefined();
  });

  nativeIt('accepts plain Uint8Arrays, empty ones and views at an offset', () => {
    const backing = randomBytes(100);
    const key = backing.subarray(7, 39);
    const iv = new Uint8Array(backing.buffer, backing.byteOffset + 50, 12);
    const empty = new Uint8Array(0);
    expect(gcmSeal(key, iv, empty, empty).equals(refSeal(key, iv, empty, empty))).toBe(true);
    const plaintext = new Uint8Array([1, 2, 3]);
    const sealed = gcmSeal(key, iv, plaintext, new Uint8Array([9]));
    expect(sealed.equals(refSeal(key, iv, plaintext, new Uint8Array([9])))).toBe(true);
    expect(gcmOpen(key, iv, new Uint8Array(sealed), new Uint8Array([9]))?.equals(plaintext)).toBe(true);
    gcmForgetKey(key);
  });

  nativeIt('throws TypeError on misuse, and a destroyed handle is never used', () => {
    const iv = Buffer.alloc(12);
    const none = Buffer.alloc(0);
    expect(() => native.createKey(Buffer.alloc(31))).toThrow(TypeError);
    expect(() => native.createKey('k'.repeat(32) as unknown as Uint8Array)).toThrow(TypeError);
    expect(() => native.createKey(new Uint16Array(16) as unknown as Uint8Array)).toThrow(TypeError);
    const handle = native.createKey(Buffer.alloc(32));
    expect(() => native.seal(handle, Buffer.alloc(11), none, none)).toThrow(TypeError);
    expect(() => native.open(handle, Buffer.alloc(13), Buffer.alloc(16), none)).toThrow(TypeError);
    expect(() => native.seal(handle, iv, 'text' as unknown as Uint8Array, none)).toThrow(TypeError);
    expect(() => native.seal(handle, iv, none, null as unknown as Uint8Array)).toThrow(TypeError);
    expect(() => native.seal(handle, iv, none, none, Buffer.alloc(16))).toThrow(TypeError);
    expect(() => native.seal({} as never, iv, none, none)).toThrow(TypeError);
    expect(() => (native.seal as (...args: unknown[]) => Buffer)(handle, iv, none)).toThrow(TypeError);
    expect(native.open(handle, iv, Buffer.alloc(15), none)).toBeUndefined();
    native.destroyKey(handle);
    native.destroyKey(handle);
    expect(() => native.seal(handle, iv, none, none)).toThrow(/destroyed/);
    expect(() => native.open(handle, iv, Buffer.alloc(16), none)).toThrow(TypeError);
    expect(() => native.destroyKey('handle' as never)).toThrow(TypeError);
  });

  nativeIt(
    'writes into a given output buffer, checks its length and overlap, and zeroes it on failure',
    () => {
      const key = randomBytes(32);
      const iv = randomBytes(12);
      const plaintext = randomBytes(30);
      const aad = randomBytes(8);
      const handle = native.createKey(key);
      const out = Buffer.alloc(46);
      expect(native.seal(handle, iv, plaintext, aad, key, out)).toBe(out);
      expect(out.equals(refSeal(key, iv, plaintext, aad))).toBe(true);
      const opened = Buffer.alloc(30);
      expect(native.open(handle, iv, out, aad, key, opened)).toBe(opened);
      expect(opened.equals(plaintext)).toBe(true);
      out[0] = (out[0] as number) ^ 1;
      expect(native.open(handle, iv, out, aad, key, opened)).toBeUndefined();
      expect(opened.equals(Buffer.alloc(30))).toBe(true);
      expect(() => native.seal(handle, iv, plaintext, aad, key, Buffer.alloc(45))).toThrow(TypeError);
      expect(() => native.open(handle, iv, out, aad, key, Buffer.alloc(31))).toThrow(TypeError);
      const shared = Buffer.alloc(100);
      plaintext.copy(shared);
      expect(() =>
        native.seal(handle, iv, shared.subarray(0, 30), aad, key, shared.subarray(20, 66)),
      ).toThrow(/overlap/);
      expect(() =>
        native.seal(handle, iv, shared.subarray(0, 30), aad, key, shared.subarray(30, 76)),
      ).not.toThrow();
      native.destroyKey(handle);
    },
  );

  it('gcmSeal/gcmOpen keep node:crypto errors for keys of another length', () => {
    const iv = Buffer.alloc(12);
    expect(() => gcmSeal(Buffer.alloc(16), iv, Buffer.alloc(1), Buffer.alloc(0))).toThrow(RangeError);
    expect(() => gcmOpen(Buffer.alloc(16), iv, Buffer.alloc(17), Buffer.alloc(0))).toThrow(RangeError);
  });
});
