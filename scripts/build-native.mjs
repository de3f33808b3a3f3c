/**
 * `npm run build:native` (and `pretest`): builds the optional native AES-256-GCM addon
 * (native/gcm.cc, native/binding.gyp) with the node-gyp that ships inside npm, against the running
 * Node's own headers (OpenSSL's included), so nothing is downloaded when they are installed beside
 * Node or `npm config get nodedir` points at them; then copies it to
 * build/Release/typeorm_envelope_gcm.node, where src/crypto/native-gcm.ts looks for it.
 *
 * Prints one line saying whether the native path is available, and ALWAYS exits 0: without a
 * compiler, Python or headers, src/crypto/aes-gcm.ts keeps using node:crypto.
 *
 * Environment: TYPEORM_ENVELOPE_NATIVE=0 skips the build; TYPEORM_ENVELOPE_NATIVE_VERBOSE=1 prints
 * node-gyp's output.
 */
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
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

/** Loads the addon in a fresh process (a process caches what it dlopen'ed) and checks a GCM vector. */
const SELF_TEST = `
const g = require(process.argv[1]);
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

function selfTest() {
  if (!existsSync(addon)) return { ok: false, reason: 'not built' };
  const run = spawnSync(process.execPath, ['-e', SELF_TEST, addon], { encoding: 'utf8', timeout: 15_000 });
  if (run.status === 0) return { ok: true, openssl: run.stdout.trim() };
  const reason = (run.stderr || run.error?.message || `exit ${run.status}`).trim().split('\n').pop();
  return { ok: false, reason: `self-test failed: ${reason}` };
}

function upToDate() {
  if (!existsSync(addon)) return false;
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
  process.exit(0);
}

function main() {
  if (process.env.TYPEORM_ENVELOPE_NATIVE === '0') report(false, 'disabled by TYPEORM_ENVELOPE_NATIVE=0');
  if (upToDate()) {
    const test = selfTest();
    if (test.ok) report(true, `up to date, ${test.openssl}`);
  }
  const nodeGyp = findNodeGyp();
  if (!nodeGyp) report(false, 'node-gyp not found');
  const nodeDir = findNodeDir();
  const args = [nodeGyp, 'rebuild', '--release', ...(nodeDir ? [`--nodedir=${nodeDir}`] : [])];
  /* A failed build leaves no addon behind, so the line printed below is what tests will see. */
  rmSync(addon, { force: true });
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
  const headers = nodeDir ? `headers from ${nodeDir}` : "node-gyp's headers";
  report(true, `built in ${seconds} s, ${headers}, ${test.openssl}`);
}

try {
  main();
} catch (error) {
  report(false, `unexpected error: ${error instanceof Error ? error.message : String(error)}`);
}
