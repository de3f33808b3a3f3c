import { createCipheriv, createDecipheriv, createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { constants } from 'node:os';
import { basename, join, resolve } from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { gcmBackend, TAG_BYTES } from '../../../src/crypto/aes-gcm';
import { type NativeGcm, nativeGcm } from '../../../src/crypto/native-gcm';
import { aesBackend, aesBackendInfo } from '../../../src/index';

const root = resolve(__dirname, '../../..');
const PREBUILD = 'linux-x64/typeorm-envelope.napi.glibc.node';
const report = process.report.getReport() as { header?: { glibcVersionRuntime?: string } };
const glibcX64 =
  process.platform === 'linux' && process.arch === 'x64' && Boolean(report.header?.glibcVersionRuntime);

interface Manifest {
  builds: Record<string, { sources: string; sha256: string; bytes: number; napi: number }>;
}
const manifest = JSON.parse(readFileSync(join(root, 'prebuilds/manifest.json'), 'utf8')) as Manifest;

/** The same hash scripts/build-native.mjs records: each source's name, a NUL, its bytes. */
function sourcesHash(): string {
  const hash = createHash('sha256');
  for (const file of ['native/gcm.cc', 'native/binding.gyp']) {
    hash
      .update(basename(file))
      .update('\0')
      .update(readFileSync(join(root, file)));
  }
  return hash.digest('hex');
}

const sha256 = (file: string) => createHash('sha256').update(readFileSync(file)).digest('hex');

/** node:crypto, the reference. */
function refSeal(key: Uint8Array, iv: Uint8Array, plaintext: Uint8Array, aad: Uint8Array): Buffer {
  const cipher = createCipheriv('aes-256-gcm', key, iv, { authTagLength: TAG_BYTES });
  cipher.setAAD(aad);
  return Buffer.concat([cipher.update(plaintext), cipher.final(), cipher.getAuthTag()]);
}
function refOpen(key: Uint8Array, iv: Uint8Array, sealed: Uint8Array, aad: Uint8Array): Buffer | undefined {
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

const hex = (text: string) => Buffer.from(text, 'hex');
const K15 = 'feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308';
const P15 =
  'd9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72' +
  '1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255';
const C15 =
  '522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa' +
  '8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad';
/** McGrew & Viega, test cases 13-16 (256-bit key), typed in from the specification. */
const VECTORS = [
  {
    key: '00'.repeat(32),
    iv: '00'.repeat(12),
    p: '',
    aad: '',
    c: '',
    tag: '530f8afbc74536b9a963b4f1c4cb738b',
  },
  {
    key: '00'.repeat(32),
    iv: '00'.repeat(12),
    p: '00'.repeat(16),
    aad: '',
    c: 'cea7403d4d606b6e074ec5d3baf39d18',
    tag: 'd0d1c8a799996bf0265b98b5d48ab919',
  },
  {
    key: K15,
    iv: 'cafebabefacedbaddecaf888',
    p: P15,
    aad: '',
    c: C15,
    tag: 'b094dac5d93471bdec1a502270e3cc6c',
  },
  {
    key: K15,
    iv: 'cafebabefacedbaddecaf888',
    p: P15.slice(0, 120),
    aad: 'feedfacedeadbeeffeedfacedeadbeefabaddad2',
    c: C15.slice(0, 120),
    tag: '76fc6ece0f4e1768cddf8853bb2d551b',
  },
];

const bytes = (min: number, max: number) =>
  fc.uint8Array({ minLength: min, maxLength: max }).map((array) => Buffer.from(array));

describe('aesBackend() and aesBackendInfo()', () => {
  it('report the backend gcmSeal/gcmOpen use, with a reason exactly when it is node:crypto', () => {
    const info = aesBackendInfo();
    expect(aesBackend()).toBe(gcmBackend());
    expect(info.backend).toBe(aesBackend());
    if (nativeGcm) {
      expect(info.reason).toBeUndefined();
      expect(existsSync(info.file as string)).toBe(true);
      expect(info.openssl).toBe(nativeGcm.openssl);
    } else {
      expect(info.reason).toEqual(expect.any(String));
      expect(info.file).toBeUndefined();
    }
    if (process.env.TYPEORM_ENVELOPE_NATIVE === '0') {
      expect(info).toEqual({ backend: 'node:crypto', reason: 'disabled by TYPEORM_ENVELOPE_NATIVE=0' });
    }
  });
});

describe('prebuilds/ (what the package ships)', () => {
  it('holds a linux-x64 glibc build, each build matching its recorded hash and the current sources', () => {
    expect(Object.keys(manifest.builds)).toContain(PREBUILD);
    for (const [file, build] of Object.entries(manifest.builds)) {
      const path = join(root, 'prebuilds', file);
      expect(sha256(path), `${file}: rebuild with npm run build:prebuild`).toBe(build.sha256);
      expect(readFileSync(path).length).toBe(build.bytes);
      expect(build.sources, `${file} was built from other sources: npm run build:prebuild`).toBe(
        sourcesHash(),
      );
      expect(build.napi).toBe(8);
    }
  });

  describe.skipIf(!glibcX64)('the linux-x64 prebuild itself, against the GCM vectors and node:crypto', () => {
    const load = (): NativeGcm => {
      const module = { exports: {} as NativeGcm };
      process.dlopen(module, join(root, 'prebuilds', PREBUILD), constants.dlopen.RTLD_NOW);
      return module.exports;
    };

    it('matches the GCM specification vectors and refuses a flipped tag', () => {
      const prebuilt = load();
      expect(prebuilt.openssl).toMatch(/^OpenSSL 3\./);
      for (const v of VECTORS) {
        const handle = prebuilt.createKey(hex(v.key));
        expect(prebuilt.seal(handle, hex(v.iv), hex(v.p), hex(v.aad)).toString('hex')).toBe(v.c + v.tag);
        expect(prebuilt.open(handle, hex(v.iv), hex(v.c + v.tag), hex(v.aad))?.toString('hex')).toBe(v.p);
        const forged = hex(v.c + v.tag);
        forged[forged.length - 1] = (forged[forged.length - 1] as number) ^ 1;
        expect(prebuilt.open(handle, hex(v.iv), forged, hex(v.aad))).toBeUndefined();
        prebuilt.destroyKey(handle);
      }
    });

    it('seals exactly as node:crypto does, and each opens what the other sealed', () => {
      const prebuilt = load();
      fc.assert(
        fc.property(bytes(32, 32), bytes(12, 12), bytes(0, 300), bytes(0, 64), (key, iv, plaintext, aad) => {
          const handle = prebuilt.createKey(key);
          const sealed = prebuilt.seal(handle, iv, plaintext, aad);
          expect(sealed.equals(refSeal(key, iv, plaintext, aad))).toBe(true);
          expect(refOpen(key, iv, sealed, aad)?.equals(plaintext)).toBe(true);
          expect(prebuilt.open(handle, iv, refSeal(key, iv, plaintext, aad), aad)?.equals(plaintext)).toBe(
            true,
          );
          prebuilt.destroyKey(handle);
        }),
        { numRuns: 1000 },
      );
    });
  });
});
