import { describe, expect, it } from 'vitest';
import { gcmOpen, gcmSeal, IV_BYTES, KEY_BYTES, TAG_BYTES } from '../../../src/crypto/aes-gcm';
import { GCM_VECTORS, type GcmVector, hex } from '../../support/gcm-reference';

describe('AES-256-GCM known answers (GCM specification, test cases 13-16)', () => {
  it('uses the parameters of the specification', () => {
    expect([KEY_BYTES, IV_BYTES, TAG_BYTES]).toEqual([32, 12, 16]);
  });

  for (const v of GCM_VECTORS) {
    describe(v.name, () => {
      it('gcmSeal returns exactly C || T', () => {
        const sealed = gcmSeal(hex(v.key), hex(v.iv), hex(v.plaintext), hex(v.aad));
        expect(sealed.toString('hex')).toBe(v.ciphertext + v.tag);
      });

      it('gcmOpen returns P', () => {
        const opened = gcmOpen(hex(v.key), hex(v.iv), hex(v.ciphertext + v.tag), hex(v.aad));
        expect(opened?.toString('hex')).toBe(v.plaintext);
      });
    });
  }
});

describe('gcmOpen refuses what was not sealed', () => {
  const v = GCM_VECTORS[3] as GcmVector;
  const key = hex(v.key);
  const iv = hex(v.iv);
  const aad = hex(v.aad);
  const sealed = hex(v.ciphertext + v.tag);

  const flipped = (bytes: Buffer, index: number) => {
    const copy = Buffer.from(bytes);
    copy[index] = (copy[index] as number) ^ 0x01;
    return copy;
  };

  it('returns undefined for a wrong tag', () => {
    expect(gcmOpen(key, iv, flipped(sealed, sealed.length - 1), aad)).toBeUndefined();
    expect(gcmOpen(key, iv, Buffer.concat([hex(v.ciphertext), Buffer.alloc(16)]), aad)).toBeUndefined();
  });

  it('returns undefined for an altered ciphertext', () => {
    expect(gcmOpen(key, iv, flipped(sealed, 0), aad)).toBeUndefined();
  });

  it('returns undefined for a wrong IV', () => {
    expect(gcmOpen(key, flipped(iv, 11), sealed, aad)).toBeUndefined();
  });

  it('returns undefined for an IV of another length', () => {
    expect(gcmOpen(key, iv.subarray(0, 8), sealed, aad)).toBeUndefined();
    expect(gcmOpen(key, Buffer.concat([iv, Buffer.of(0)]), sealed, aad)).toBeUndefined();
  });

  it('returns undefined for wrong associated data', () => {
    expect(gcmOpen(key, iv, sealed, flipped(aad, 0))).toBeUndefined();
    expect(gcmOpen(key, iv, sealed, Buffer.alloc(0))).toBeUndefined();
    expect(gcmOpen(key, iv, sealed, Buffer.concat([aad, Buffer.of(0)]))).toBeUndefined();
  });

  it('returns undefined for another key', () => {
    expect(gcmOpen(flipped(key, 31), iv, sealed, aad)).toBeUndefined();
  });

  it('returns undefined for an input shorter than a tag', () => {
    for (let length = 0; length < TAG_BYTES; length++) {
      expect(gcmOpen(key, iv, sealed.subarray(0, length), aad)).toBeUndefined();
    }
  });

  it('returns undefined for a truncated or extended input', () => {
    expect(gcmOpen(key, iv, sealed.subarray(1), aad)).toBeUndefined();
    expect(gcmOpen(key, iv, sealed.subarray(0, sealed.length - 1), aad)).toBeUndefined();
    expect(gcmOpen(key, iv, Buffer.concat([sealed, Buffer.of(0)]), aad)).toBeUndefined();
  });
});
