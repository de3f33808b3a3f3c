import { createCipheriv, createDecipheriv } from 'node:crypto';
import { type NativeGcmHandle, nativeGcm } from './native-gcm';

/** AES-256-GCM parameters used for every value and every locally wrapped data key. */
export const KEY_BYTES = 32;
export const IV_BYTES = 12;
export const TAG_BYTES = 16;

/**
 * Native OpenSSL contexts (key schedule set once, only the IV reset per value), by key Buffer object.
 *
 * Contract: a key Buffer whose bytes are about to be zeroed or reused for another key must first be
 * passed to {@link gcmForgetKey} (`CachedDataKey.destroy()` does), which frees its contexts and
 * cleanses their copy of the key at once. Keys never forgotten (e.g. a master key held for the life
 * of a provider) are freed by the GC with their Buffer. As a second line of defence, every native
 * call also passes the key bytes, and the addon re-keys a handle whose key bytes changed
 * (constant-time compare), so a mutated Buffer can never be served by a stale key schedule.
 */
const handles = new WeakMap<Uint8Array, NativeGcmHandle>();

/** The native contexts of `key`, made at its first use. Only with the native backend. */
export function handleFor(key: Uint8Array): NativeGcmHandle {
  let handle = handles.get(key);
  if (handle === undefined) {
    handle = (nativeGcm as NonNullable<typeof nativeGcm>).createKey(key);
    handles.set(key, handle);
  }
  return handle;
}

/** Which implementation `gcmSeal`/`gcmOpen` use: the native addon, or node:crypto (see native-gcm.ts). */
export function gcmBackend(): 'native' | 'node:crypto' {
  return nativeGcm ? 'native' : 'node:crypto';
}

/**
 * Frees the native contexts cached for `key` (if any) and forgets them. Call it before zeroing or
 * reusing the bytes of a key Buffer that was passed to `gcmSeal`/`gcmOpen`. A no-op with node:crypto.
 */
export function gcmForgetKey(key: Uint8Array): void {
  const handle = handles.get(key);
  if (handle === undefined) return;
  handles.delete(key);
  nativeGcm?.destroyKey(handle);
}

/**
 * Encrypts `plaintext` and returns `ciphertext || tag`.
 * The caller guarantees that `iv` is never reused with the same key (see `IvPool`).
 */
export function gcmSeal(key: Uint8Array, iv: Uint8Array, plaintext: Uint8Array, aad: Uint8Array): Buffer {
  /* Other lengths take node:crypto's path, so that they fail exactly as they always did. */
  if (nativeGcm && key.length === KEY_BYTES && iv.length === IV_BYTES) {
    const out = Buffer.allocUnsafe(plaintext.length + TAG_BYTES);
    return nativeGcm.seal(handleFor(key), iv, plaintext, aad, key, out);
  }
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
  if (nativeGcm && key.length === KEY_BYTES) {
    /* Like Buffer.concat on node:crypto's path, the result is a slice of Node's Buffer pool. */
    const out = Buffer.allocUnsafe(sealed.length - TAG_BYTES);
    return nativeGcm.open(handleFor(key), iv, sealed, aad, key, out);
  }
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
