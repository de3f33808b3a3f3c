import { describe, expect, it } from 'vitest';
import { gcmOpen, gcmSeal, IV_BYTES, KEY_BYTES, TAG_BYTES } from '../../../src/crypto/aes-gcm';

/**
 * The 256-bit-key test cases 13-16 of McGrew & Viega, "The Galois/Counter Mode of Operation (GCM)",
 * typed in from the specification (never computed by the code under test).
 */
interface Vector {
  name: string;
  key: string;
  iv: string;
  plaintext: string;
  aad: string;
  ciphertext: string;
  tag: string;
}

const K15 = 'feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308';
const P15 =
  'd9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72' +
  '1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255';
const C15 =
  '522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa' +
  '8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad';

const VECTORS: Vector[] = [
  {
    name: 'test case 13: zero key, empty plaintext',
    key: '00'.repeat(32),
    iv: '00'.repeat(12),
    plaintext: '',
    aad: '',
    ciphertext: '',
    tag: '530f8afbc74536b9a963b4f1c4cb738b',
  },
  {
    name: 'test case 14: zero key, one zero block',
    key: '00'.repeat(32),
    iv: '00'.repeat(12),
    plaintext: '00'.repeat(16),
    aad: '',
    ciphertext: 'cea7403d4d606b6e074ec5d3baf39d18',
    tag: 'd0d1c8a799996bf0265b98b5d48ab919',
  },
  {
    name: 'test case 15: 64-byte plaintext, no AAD',
    key: K15,
    iv: 'cafebabefacedbaddecaf888',
    plaintext: P15,
    aad: '',
    ciphertext: C15,
    tag: 'b094dac5d93471bdec1a502270e3cc6c',
  },
  {
    name: 'test case 16: 60-byte plaintext, 20-byte AAD',
    key: K15,
    iv: 'cafebabefacedbaddecaf888',
    plaintext: P15.slice(0, 120),
    aad: 'feedfacedeadbeeffeedfacedeadbeefabaddad2',
    ciphertext: C15.slice(0, 120),
    tag: '76fc6ece0f4e1768cddf8853bb2d551b',
  },
];

const hex = (text: string) => Buffer.from(text, 'hex');

describe('AES-256-GCM known answers (GCM specification, test cases 13-16)', () => {
  it('uses the parameters of the specification', () => {
    expect([KEY_BYTES, IV_BYTES, TAG_BYTES]).toEqual([32, 12, 16]);
  });

  for (const v of VECTORS) {
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
  const v = VECTORS[3] as Vector;
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
