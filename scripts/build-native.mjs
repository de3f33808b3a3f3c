/**
 * Builds and checks the optional native AES-256-GCM addon (native/gcm.cc, native/binding.gyp) with
 * the node-gyp that ships inside npm, against the running Node's own headers (OpenSSL's included), so
 * nothing is downloaded when they are installed beside Node or `npm config get nodedir` points at them.
 *
 * Modes:
 * - (none): `npm run build:native` and `pretest` in a checkout: builds
 *   build/Release/typeorm_envelope_gcm.node, which src/crypto/native-gcm.ts loads first.
 * - `--install`: the package's `install` script. A no-op when the binary the library would load
 *   (a local build, else `prebuilds/<platform>-<arch>/` shipped in the package) passes its self-test
 *   in a fresh process; otherwise compiles as above where a compiler exists.
 * - `--prebuild`: `npm run build:prebuild`, run by maintainers for each platform shipped: builds,
 *   strips and self-tests `prebuilds/<platform>-<arch>/typeorm-envelope.napi[.glibc|.musl].node`
 *   and records it in prebuilds/manifest.json with its hash and the hash of the sources it was built
 *   from (a test fails when native/ changes without a new prebuild).
 *   Exits 1 on failure.
 *
 * The first two print one line saying whether the native path is available, and ALWAYS exit 0:
 * without a prebuild, compiler, Python or headers, the library uses node:crypto.
 *
 * Environment: TYPEORM_ENVELOPE_NATIVE=0 skips the build; TYPEORM_ENVELOPE_NATIVE_VERBOSE=1 prints
 * node-gyp's output.
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  copyFileSync,
  existsSync,
  mkdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const nativeDir = path.join(root, 'native');
const built = path.join(nativeDir, 'build', 'Release', 'typeorm_envelope_gcm.node');
const addon = path.join(root, 'build', 'Release', 'typeorm_envelope_gcm.node');
const logFile = path.join(root, 'build', 'native-build.log');
const sources = [path.join(nativeDir, 'gcm.cc'), path.join(nativeDir, 'binding.gyp')];
const BUILD_TIMEOUT_MS = 60_000;
const verbose = process.env.TYPEORM_ENVELOPE_NATIVE_VERBOSE === '1';
const mode = process.argv.includes('--prebuild')
  ? 'prebuild'
  : process.argv.includes('--install')
    ? 'install'
    : 'build';
const manifestFile = path.join(root, 'prebuilds', 'manifest.json');

/** Loads the addon in a fresh process (a process caches what it dlopen'ed) and checks a GCM vector. */
const SELF_TEST = `
const m = { exports: {} };
process.dlopen(m, process.argv[1], require('node:os').constants.dlopen.RTLD_NOW);
const g = m.exports;
const h = (s) => Buffer.from(s, 'hex');
const key = h('feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308');
const iv = h('cafebabefacedbaddecaf888');
const aad = h('feedfacedeadbeeffeedfacedeadbeefabaddad2');
const pt = h('d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39');
const k = g.createKey(key);
const sealed = g.seal(k, iv, pt, aad);
if (!sealed.subarray(60).equals(h('76fc6ece0f4e1768cddf8853bb2d551b'))) throw new Error('wrong tag');
if (!g.open(k, iv, sealed, aad).equals(pt)) throw new Error('wrong plaintext');
sealed[0] ^= 1;
if (g.open(k, iv, sealed, aad) !== undefined) throw new Error('forgery accepted');
g.destroyKey(k);
process.stdout.write(g.openssl);
`;

function selfTest(file = addon) {
  if (!existsSync(file)) return { ok: false, reason: 'not built' };
  const run = spawnSync(process.execPath, ['-e', SELF_TEST, file], { encoding: 'utf8', timeout: 15_000 });
  if (run.status === 0) return { ok: true, openssl: run.stdout.trim() };
  const reason = (run.stderr || run.error?.message || `exit ${run.status}`).trim().split('\n').pop();
  return { ok: false, reason: `self-test failed: ${reason}` };
}

/** Records the addon's SHA-256 beside it: the library loads no local build without a matching one. */
function recordHash(file) {
  writeFileSync(`${file}.sha256`, `${createHash('sha256').update(readFileSync(file)).digest('hex')}\n`);
}

function upToDate() {
  if (!existsSync(addon) || !existsSync(`${addon}.sha256`)) return false;
  const builtAt = statSync(addon).mtimeMs;
  return sources.every((file) => statSync(file).mtimeMs <= builtAt);
}

/** node-gyp as shipped inside npm, else one in node_modules. */
function findNodeGyp() {
  const bin = path.join('node-gyp', 'bin', 'node-gyp.js');
  const execDir = path.dirname(process.execPath);
  const candidates = [
    process.env.npm_config_node_gyp,
    path.join(execDir, '..', 'lib', 'node_modules', 'npm', 'node_modules', bin),
    path.join(execDir, 'node_modules', 'npm', 'node_modules', bin),
  ];
  const require = createRequire(path.join(root, 'package.json'));
  for (const from of [root, path.join(execDir, '..', 'lib', 'node_modules', 'npm')]) {
    try {
      candidates.push(require.resolve('node-gyp/bin/node-gyp.js', { paths: [from] }));
    } catch {
      /* not there */
    }
  }
  return candidates.find((file) => file && existsSync(file));
}

/**
 * Node's headers (node_api.h and OpenSSL's), so node-gyp does not download them: npm's `nodedir`
 * setting, else the prefix Node runs from (/usr/local/include/node, /usr/include/node, …).
 */
function findNodeDir() {
  const hasHeaders = (dir) =>
    existsSync(path.join(dir, 'include', 'node', 'node_api.h')) &&
    existsSync(path.join(dir, 'include', 'node', 'openssl', 'evp.h'));
  const candidates = [process.env.npm_config_nodedir, path.resolve(path.dirname(process.execPath), '..')];
  return candidates.find((dir) => dir && hasHeaders(dir));
}

function report(available, detail) {
  const state = available ? 'available' : 'unavailable, using node:crypto';
  console.log(`typeorm-envelope native AES-GCM: ${state} (${detail})`);
  process.exit(mode === 'prebuild' && !available ? 1 : 0);
}

/** The hash of what a binary is built from, recorded beside each prebuild. */
function sourcesHash() {
  const hash = createHash('sha256');
  for (const file of sources) hash.update(path.basename(file)).update('\0').update(readFileSync(file));
  return hash.digest('hex');
}

/** The file the library would load (node-gyp-build's choice), or undefined; never throws. */
function resolveShipped() {
  try {
    const require = createRequire(path.join(root, 'package.json'));
    return require('node-gyp-build').resolve(root);
  } catch {
    return undefined;
  }
}

/** `linux-x64` and the libc tag node-gyp-build matches (`glibc`/`musl`, Linux only). */
function prebuildTarget() {
  const libc =
    process.platform !== 'linux'
      ? undefined
      : process.report?.getReport().header.glibcVersionRuntime
        ? 'glibc'
        : 'musl';
  const name = ['typeorm-envelope', 'napi', ...(libc ? [libc] : []), 'node'].join('.');
  return { dir: `${process.platform}-${process.arch}`, file: name };
}

/** Copies the fresh build into prebuilds/, strips it where `strip` exists, and records it. */
function writePrebuild(openssl) {
  const target = prebuildTarget();
  const dir = path.join(root, 'prebuilds', target.dir);
  const file = path.join(dir, target.file);
  mkdirSync(dir, { recursive: true });
  copyFileSync(addon, file);
  const strip = spawnSync('strip', ['--strip-unneeded', file], { encoding: 'utf8' });
  const test = selfTest(file);
  if (!test.ok) {
    rmSync(file, { force: true });
    report(false, `prebuild ${test.reason}`);
  }
  const manifest = existsSync(manifestFile) ? JSON.parse(readFileSync(manifestFile, 'utf8')) : {};
  const key = `${target.dir}/${target.file}`;
  manifest.builds = {
    ...manifest.builds,
    [key]: {
      sources: sourcesHash(),
      sha256: createHash('sha256').update(readFileSync(file)).digest('hex'),
      bytes: statSync(file).size,
      node: process.versions.node,
      napi: 8,
      openssl,
      stripped: strip.status === 0,
    },
  };
  writeFileSync(manifestFile, `${JSON.stringify(manifest, null, 2)}\n`);
  report(true, `prebuild written: prebuilds/${key}, ${statSync(file).size} bytes, ${openssl}`);
}

function main() {
  if (process.env.TYPEORM_ENVELOPE_NATIVE === '0') report(false, 'disabled by TYPEORM_ENVELOPE_NATIVE=0');
  if (mode === 'install') {
    const shipped = resolveShipped();
    const test = shipped ? selfTest(shipped) : { ok: false };
    if (test.ok) {
      if (shipped === addon && !existsSync(`${addon}.sha256`)) recordHash(addon);
      report(true, `${path.relative(root, shipped)}, ${test.openssl}`);
    }
  }
  if (mode === 'build' && upToDate()) {
    const test = selfTest();
    if (test.ok) report(true, `up to date, ${test.openssl}`);
  }
  const nodeGyp = findNodeGyp();
  if (!nodeGyp) report(false, 'node-gyp not found');
  const nodeDir = findNodeDir();
  const args = [nodeGyp, 'rebuild', '--release', ...(nodeDir ? [`--nodedir=${nodeDir}`] : [])];
  /* A failed build leaves no addon behind, so the line printed below is what tests will see. */
  rmSync(addon, { force: true });
  rmSync(`${addon}.sha256`, { force: true });
  const started = performance.now();
  const run = spawnSync(process.execPath, args, {
    cwd: nativeDir,
    encoding: 'utf8',
    timeout: BUILD_TIMEOUT_MS,
    stdio: verbose ? 'inherit' : 'pipe',
    env: { ...process.env, npm_config_loglevel: verbose ? 'info' : 'warn' },
  });
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  if (run.status !== 0) {
    const log = `${run.error ? `${run.error.message}\n` : ''}${run.stdout ?? ''}${run.stderr ?? ''}`;
    try {
      mkdirSync(path.dirname(logFile), { recursive: true });
      writeFileSync(logFile, `node ${args.join(' ')}\n${log}`);
    } catch {
      /* best effort */
    }
    const why =
      run.error?.code === 'ETIMEDOUT' ? `timed out after ${BUILD_TIMEOUT_MS / 1000} s` : 'build failed';
    report(false, `${why}; see ${path.relative(root, logFile)}`);
  }
  /* Copied under a temporary name, then renamed: a concurrent test run never loads half a file. */
  mkdirSync(path.dirname(addon), { recursive: true });
  const partial = `${addon}.${process.pid}.tmp`;
  copyFileSync(built, partial);
  renameSync(partial, addon);
  const test = selfTest();
  if (!test.ok) {
    rmSync(addon, { force: true });
    report(false, test.reason);
  }
  recordHash(addon);
  if (mode === 'prebuild') writePrebuild(test.openssl);
  /* An installed package keeps the addon, not node-gyp's intermediate files. */
  if (mode === 'install') rmSync(path.join(nativeDir, 'build'), { recursive: true, force: true });
  const headers = nodeDir ? `headers from ${nodeDir}` : "node-gyp's headers";
  report(true, `built in ${seconds} s, ${headers}, ${test.openssl}`);
}

try {
  main();
} catch (error) {
  report(false, `unexpected error: ${error instanceof Error ? error.message : String(error)}`);
}
