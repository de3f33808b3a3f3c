import { existsSync } from 'node:fs';
import { join } from 'node:path';

/** An OpenSSL AES-256-GCM context pair for one key, made by {@link NativeGcm.createKey}. */
export type NativeGcmHandle = { readonly __nativeGcmHandle: unique symbol };

/** The optional addon built from native/gcm.cc by `npm run build:native`. */
export interface NativeGcm {
  /** Sets up encrypt and decrypt contexts for a 32-byte key; freed by the GC or {@link destroyKey}. */
  createKey(key: Uint8Array): NativeGcmHandle;
  /** Frees the contexts and cleanses the key copy now; idempotent. */
  destroyKey(handle: NativeGcmHandle): void;
  /**
   * Returns `ciphertext || tag`. With `key`, a handle whose key bytes differ from it is re-keyed first.
   * With `out` (exactly `plaintext.length + 16` bytes, overlapping no input), writes there and returns
   * it: a slice of Node's Buffer pool costs far less than a Buffer of the addon's own.
   * Throws a TypeError on arguments of the wrong type or length.
   */
  seal<T extends Uint8Array = Buffer>(
    handle: NativeGcmHandle,
    iv: Uint8Array,
    plaintext: Uint8Array,
    aad: Uint8Array,
    key?: Uint8Array,
    out?: T,
  ): T;
  /**
   * Returns the plaintext (in `out` when given, `sealed.length - 16` bytes), or `undefined` when
   * authentication fails; `out` is then zeroed.
   */
  open<T extends Uint8Array = Buffer>(
    handle: NativeGcmHandle,
    iv: Uint8Array,
    sealed: Uint8Array,
    aad: Uint8Array,
    key?: Uint8Array,
    out?: T,
  ): T | undefined;
  /** The OpenSSL version the addon runs with (Node's). */
  readonly openssl: string;
}

const ADDON = join('build', 'Release', 'typeorm_envelope_gcm.node');

/**
 * Where the addon may be, relative to this file: `src/crypto` (ts-node, vitest), `dist/crypto`
 * (tsconfig.build.json), or one level deeper (`dist/src/crypto`, `.bench-build/src/crypto`).
 */
export const NATIVE_GCM_CANDIDATES: readonly string[] = [
  join(__dirname, '..', '..', ADDON),
  join(__dirname, '..', '..', '..', ADDON),
];

function load(): NativeGcm | undefined {
  if (process.env.TYPEORM_ENVELOPE_NATIVE === '0') return undefined;
  for (const file of NATIVE_GCM_CANDIDATES) {
    if (!existsSync(file)) continue;
    try {
      const addon = require(file) as NativeGcm;
      if (typeof addon.createKey === 'function' && selfTest(addon)) return addon;
    } catch {
      /* Built for another platform or OpenSSL, or not loadable here: node:crypto is used. */
    }
  }
  return undefined;
}

/** Test case 16 of the GCM specification, so a miscompiled addon is never used. */
function selfTest(addon: NativeGcm): boolean {
  const hex = (text: string) => Buffer.from(text, 'hex');
  const key = hex('feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308');
  const iv = hex('cafebabefacedbaddecaf888');
  const aad = hex('feedfacedeadbeeffeedfacedeadbeefabaddad2');
  const plaintext = hex(
    'd9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72' +
      '1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39',
  );
  const expected = hex(
    '522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa' +
      '8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662' +
      '76fc6ece0f4e1768cddf8853bb2d551b',
  );
  const handle = addon.createKey(key);
  try {
    const sealed = addon.seal(handle, iv, plaintext, aad);
    if (!sealed.equals(expected)) return false;
    if (!addon.open(handle, iv, sealed, aad)?.equals(plaintext)) return false;
    sealed[0] = (sealed[0] as number) ^ 1;
    return addon.open(handle, iv, sealed, aad) === undefined;
  } finally {
    addon.destroyKey(handle);
  }
}

/**
 * The native AES-256-GCM addon when it is built and passes its self-test, unless
 * `TYPEORM_ENVELOPE_NATIVE=0`; otherwise `undefined` and node:crypto is used.
 */
export const nativeGcm: NativeGcm | undefined = load();
