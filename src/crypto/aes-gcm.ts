import { createCipheriv, createDecipheriv } from 'node:crypto';

/** AES-256-GCM parameters used for every value and every locally wrapped data key. */
export const KEY_BYTES = 32;
export const IV_BYTES = 12;
export const TAG_BYTES = 16;

/**
 * Encrypts `plaintext` and returns `ciphertext || tag`.
 * The caller guarantees that `iv` is never reused with the same key (see `IvPool`).
 */
export function gcmSeal(key: Uint8Array, iv: Uint8Array, plaintext: Uint8Array, aad: Uint8Array): Buffer {
  const cipher = createCipheriv('aes-256-gcm', key, iv, { authTagLength: TAG_BYTES });
  cipher.setAAD(aad);
  const head = cipher.update(plaintext);
  const tail = cipher.final();
  return Buffer.concat([head, tail, cipher.getAuthTag()]);
}

/**
 * Decrypts `ciphertext || tag`. Returns `undefined` when authentication fails, so that the caller
 * can raise an error that names where the value came from.
 */
export function gcmOpen(
  key: Uint8Array,
  iv: Uint8Array,
  sealed: Uint8Array,
  aad: Uint8Array,
): Buffer | undefined {
  /* Precondition: a sealed value is at least a tag, and the IV has the only length we write. */
  if (sealed.length < TAG_BYTES || iv.length !== IV_BYTES) return undefined;
  const decipher = createDecipheriv('aes-256-gcm', key, iv, { authTagLength: TAG_BYTES });
  decipher.setAAD(aad);
  decipher.setAuthTag(sealed.subarray(sealed.length - TAG_BYTES));
  const head = decipher.update(sealed.subarray(0, sealed.length - TAG_BYTES));
  try {
    return Buffer.concat([head, decipher.final()]);
  } catch {
    head.fill(0);
    return undefined;
  }
}
