import { createCipheriv, createDecipheriv } from 'node:crypto';
import fc from 'fast-check';
import { TAG_BYTES } from '../../src/crypto/aes-gcm';

/**
 * The 256-bit-key test cases 13-16 of McGrew & Viega, "The Galois/Counter Mode of Operation (GCM)",
 * typed in from the specification (never computed by the code under test).
 */
export interface GcmVector {
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

export const GCM_VECTORS: GcmVector[] = [
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

export const hex = (text: string) => Buffer.from(text, 'hex');

/** node:crypto, written out here, as the reference every other AES-GCM path must match byte for byte. */
export function refSeal(key: Uint8Array, iv: Uint8Array, plaintext: Uint8Array, aad: Uint8Array): Buffer {
  const cipher = createCipheriv('aes-256-gcm', key, iv, { authTagLength: TAG_BYTES });
  cipher.setAAD(aad);
  return Buffer.concat([cipher.update(plaintext), cipher.final(), cipher.getAuthTag()]);
}

export function refOpen(
  key: Uint8Array,
  iv: Uint8Array,
  sealed: Uint8Array,
  aad: Uint8Array,
): Buffer | undefined {
  const decipher = createDecipheriv('aes-256-gcm', key, iv, { authTagLength: TAG_BYTES });
  decipher.setAAD(aad);
  decipher.setAuthTag(sealed.subarray(sealed.length - TAG_BYTES));
  const head = decipher.update(sealed.subarray(0, sealed.length - TAG_BYTES));
  try {
    return Buffer.concat([head, decipher.final()]);
  } catch {
    return undefined;
  }
}

/** Random buffers of `min` to `max` bytes. */
export const bytes = (min: number, max: number) =>
  fc.uint8Array({ minLength: min, maxLength: max }).map((array) => Buffer.from(array));
