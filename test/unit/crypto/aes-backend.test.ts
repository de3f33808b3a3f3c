import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { constants } from 'node:os';
import { basename, join, resolve } from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { gcmBackend } from '../../../src/crypto/aes-gcm';
import { type NativeGcm, nativeGcm } from '../../../src/crypto/native-gcm';
import { aesBackend, aesBackendInfo } from '../../../src/index';
import { bytes, GCM_VECTORS, hex, refOpen, refSeal } from '../../support/gcm-reference';

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
      for (const v of GCM_VECTORS) {
        const handle = prebuilt.createKey(hex(v.key));
        expect(prebuilt.seal(handle, hex(v.iv), hex(v.plaintext), hex(v.aad)).toString('hex')).toBe(
          v.ciphertext + v.tag,
        );
        expect(prebuilt.open(handle, hex(v.iv), hex(v.ciphertext + v.tag), hex(v.aad))?.toString('hex')).toBe(
          v.plaintext,
        );
        const forged = hex(v.ciphertext + v.tag);
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
