import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { constants } from 'node:os';
import { dirname, join, relative, sep } from 'node:path';

/** An OpenSSL AES-256-GCM context pair for one key, made by {@link NativeGcm.createKey}. */
export type NativeGcmHandle = { readonly __nativeGcmHandle: unique symbol };

/**
 * The optional addon built from native/gcm.cc: shipped prebuilt in `prebuilds/` (`npm run
 * build:prebuild`), compiled at install time where no prebuild fits, or by `npm run build:native`.
 */
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
  /**
   * Seals the values of one batch under one key in one call: value i of `plaintexts` is
   * `[ends[i-1], ends[i])`, its IV `ivs[12 i, 12 i + 12)`, and its `ciphertext || tag` is written to
   * `out` after `lead` bytes left for the caller, the whole at
   * `[ends[i-1] + (16 + lead) i, ends[i] + (16 + lead) (i + 1))`. Sets `result[i]` to 1. Throws a
   * TypeError on inconsistent arguments, before any byte is written.
   */
  sealMany(
    handle: NativeGcmHandle,
    key: Uint8Array,
    plaintexts: Uint8Array,
    ends: Uint32Array,
    ivs: Uint8Array,
    aads: Uint8Array,
    aadEnds: Uint32Array,
    aadOf: Uint32Array,
    out: Uint8Array,
    result: Uint8Array,
    lead: number,
  ): void;
  /**
   * Opens the values of one batch under one key in one call: value i of `sealed` is
   * `iv || ciphertext || tag` at `[ends[i-1], ends[i])`; its plaintext is written to `out` at
   * `[ends[i-1] - 28 i, ends[i] - 28 (i + 1))`. `result[i]` is 1 when it authenticated, else 0 with
   * its plaintext range zeroed. Returns how many opened.
   */
  openMany(
    handle: NativeGcmHandle,
    key: Uint8Array,
    sealed: Uint8Array,
    ends: Uint32Array,
    ivs: null,
    aads: Uint8Array,
    aadEnds: Uint32Array,
    aadOf: Uint32Array,
    out: Uint8Array,
    result: Uint8Array,
  ): number;
  /** The OpenSSL version the addon runs with (Node's). */
  readonly openssl: string;
}

/** Which implementation AES-256-GCM runs on: the native addon, or `node:crypto`. */
export type AesBackend = 'native' | 'node:crypto';

/** What {@link aesBackendInfo} reports: the backend in use and, when it is not the native one, why. */
export interface AesBackendInfo {
  /** The implementation `gcmSeal`/`gcmOpen` use for every value and locally wrapped data key. */
  readonly backend: AesBackend;
  /** Why the native addon is not used (no build for this platform, not loadable, self-test failed, disabled); absent when it is. */
  readonly reason?: string;
  /** The addon file loaded, when the backend is native. */
  readonly file?: string;
  /** The OpenSSL version the native addon runs with (Node's own), when the backend is native. */
  readonly openssl?: string;
}

const PACKAGE_NAME = 'typeorm-envelope';

/**
 * The package's root, found upwards from this file: `src/crypto` in a checkout, `dist/src/crypto`
 * in the installed package, `.bench-build/src/crypto` in the benchmark build.
 */
function packageRoot(): string | undefined {
  let dir = __dirname;
  for (let depth = 0; depth < 5; depth++) {
    const manifest = join(dir, 'package.json');
    if (existsSync(manifest)) {
      try {
        if ((JSON.parse(readFileSync(manifest, 'utf8')) as { name?: unknown }).name === PACKAGE_NAME)
          return dir;
      } catch {
        /* not ours: keep looking */
      }
    }
    dir = dirname(dir);
  }
  return undefined;
}

/**
 * The SHA-256 the build recorded for `file`: prebuilds/manifest.json for a shipped prebuild, the
 * `.sha256` file that scripts/build-native.mjs writes beside a local build after its self-test.
 */
function recordedHash(root: string, file: string): string | undefined {
  const shown = relative(root, file).split(sep).join('/');
  try {
    if (shown.startsWith('prebuilds/')) {
      const manifest = JSON.parse(readFileSync(join(root, 'prebuilds', 'manifest.json'), 'utf8')) as {
        builds?: Record<string, { sha256?: unknown }>;
      };
      const hash = manifest.builds?.[shown.slice('prebuilds/'.length)]?.sha256;
      return typeof hash === 'string' ? hash : undefined;
    }
    return readFileSync(`${file}.sha256`, 'utf8').trim();
  } catch {
    return undefined;
  }
}

const firstLine = (error: unknown): string =>
  (error instanceof Error ? error.message : String(error)).trim().split('\n')[0] ?? '';

/**
 * Finds the addon the way native packages do (`node-gyp-build`: a local `build/Release` first, then
 * `prebuilds/<platform>-<arch>/` shipped in the package), loads it and checks it against a GCM
 * vector. Never throws: any failure leaves node:crypto in use, with the reason kept for
 * {@link aesBackendInfo}.
 */
function load(): { addon?: NativeGcm; info: AesBackendInfo } {
  const fallback = (reason: string) => ({ info: { backend: 'node:crypto', reason } as const });
  if (process.env.TYPEORM_ENVELOPE_NATIVE === '0') return fallback('disabled by TYPEORM_ENVELOPE_NATIVE=0');
  const root = packageRoot();
  if (root === undefined) return fallback(`package root of ${PACKAGE_NAME} not found from ${__dirname}`);
  let file: string;
  try {
    const nodeGypBuild = require('node-gyp-build') as { resolve(dir: string): string };
    file = nodeGypBuild.resolve(root);
  } catch (error) {
    const code = (error as { code?: unknown }).code;
    return fallback(
      code === 'MODULE_NOT_FOUND'
        ? 'node-gyp-build is not installed'
        : `no native build for ${process.platform}-${process.arch}: ${firstLine(error)}`,
    );
  }
  const shown = relative(root, file).split(sep).join('/');
  /*
   * Checked before dlopen: a truncated or damaged shared object can crash the process inside the
   * dynamic loader (SIGBUS), which no try/catch survives.
   */
  const expected = recordedHash(root, file);
  if (expected === undefined)
    return fallback(`${shown} has no recorded SHA-256 (rebuild it: npm run build:native)`);
  try {
    if (createHash('sha256').update(readFileSync(file)).digest('hex') !== expected) {
      return fallback(`${shown} does not match its recorded SHA-256 (damaged or replaced)`);
    }
  } catch (error) {
    return fallback(`could not read ${shown}: ${firstLine(error)}`);
  }
  let addon: NativeGcm;
  try {
    /*
     * RTLD_NOW, not require()'s lazy binding: an addon whose OpenSSL symbols this Node does not
     * export then fails here, instead of aborting the process at its first call.
     */
    const module = { exports: {} as NativeGcm };
    process.dlopen(module, file, constants.dlopen.RTLD_NOW);
    addon = module.exports;
  } catch (error) {
    return fallback(`could not load ${shown}: ${firstLine(error)}`);
  }
  try {
    if (
      typeof addon.createKey !== 'function' ||
      typeof addon.openMany !== 'function' ||
      typeof addon.sealMany !== 'function' ||
      !selfTest(addon)
    ) {
      return fallback(`${shown} failed its AES-256-GCM self-test`);
    }
  } catch (error) {
    return fallback(`${shown} failed its AES-256-GCM self-test: ${firstLine(error)}`);
  }
  return { addon, info: { backend: 'native', file, openssl: addon.openssl } };
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
    /* The batch call, on the same vector stored as iv || ciphertext || tag. */
    const out = Buffer.alloc(plaintext.length);
    const one = [
      Uint32Array.of(12 + sealed.length),
      aad,
      Uint32Array.of(aad.length),
      Uint32Array.of(0),
    ] as const;
    const opened = addon.openMany(
      handle,
      key,
      Buffer.concat([iv, sealed]),
      one[0],
      null,
      one[1],
      one[2],
      one[3],
      out,
      new Uint8Array(1),
    );
    if (opened !== 1 || !out.equals(plaintext)) return false;
    sealed[0] = (sealed[0] as number) ^ 1;
    return addon.open(handle, iv, sealed, aad) === undefined;
  } finally {
    addon.destroyKey(handle);
  }
}

const loaded = load();

/**
 * The native AES-256-GCM addon when one is found for this platform and passes its self-test, unless
 * `TYPEORM_ENVELOPE_NATIVE=0`; otherwise `undefined` and node:crypto is used.
 */
export const nativeGcm: NativeGcm | undefined = loaded.addon;

/**
 * The AES-256-GCM implementation this process uses: `'native'` (the OpenSSL addon shipped in the
 * package as a prebuilt binary, or compiled at install time) or `'node:crypto'`. Both produce the
 * same bytes, so values sealed by one open with the other. See {@link aesBackendInfo} for why the
 * native one is not used.
 */
export function aesBackend(): AesBackend {
  return loaded.info.backend;
}

/**
 * The backend in use with, when it is `node:crypto`, the reason the native addon is not used (for
 * example no prebuilt binary for this platform and no compiler at install time, a binary that does
 * not load, or `TYPEORM_ENVELOPE_NATIVE=0`). Never throws.
 */
export function aesBackendInfo(): AesBackendInfo {
  return loaded.info;
}
