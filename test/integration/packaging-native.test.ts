import { createHash, randomBytes } from 'node:crypto';
import {
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { createTestSchema, rawQuery, type TestSchema } from '../support/database';
import { repack, run, sharedPackage } from '../support/packed-package';

/**
 * The native AES-256-GCM addon as a user gets it: the packed tarball installed with `npm install`
 * (its `install` script running) into a separate project, offline, with an empty npm cache: the
 * package's dependencies come from this checkout's node_modules as `file:` links (see
 * {@link dependencyDir}), its peers (TypeORM, pg, reflect-metadata) are linked in after the install.
 */
const root = resolve(__dirname, '../..');
const PREBUILD = 'prebuilds/linux-x64/typeorm-envelope.napi.glibc.node';
const LOCAL_BUILD = 'build/Release/typeorm_envelope_gcm.node';
/** What the package ships beside dist/ for the addon (package.json `files`). */
const NATIVE_FILES = ['prebuilds', 'native/gcm.cc', 'native/binding.gyp', 'scripts/build-native.mjs'];
const PEERS = ['typeorm', 'pg', 'reflect-metadata'];
const report = process.report.getReport() as { header?: { glibcVersionRuntime?: string } };
const glibcX64 =
  process.platform === 'linux' && process.arch === 'x64' && Boolean(report.header?.glibcVersionRuntime);

/**
 * A program using the installed package: prints the AES backend, saves the rows given in ROWS, and
 * prints every row it reads back. Plain CommonJS with the decorators applied by hand, so no compiler
 * runs in the project.
 */
const APP = `
require('reflect-metadata');
const { Column, DataSource, Entity, PrimaryGeneratedColumn } = require('typeorm');
const { Encrypted, EnvelopeEncryption, LocalKeyProvider, aesBackend, aesBackendInfo } = require('typeorm-envelope');

class Customer {}
PrimaryGeneratedColumn()(Customer.prototype, 'id');
Column({ type: 'varchar' })(Customer.prototype, 'label');
Encrypted({ type: 'string' })(Customer.prototype, 'email');
Entity({ name: 'customer' })(Customer);

async function main() {
  const encryption = new EnvelopeEncryption({
    keys: [{ version: 1, provider: new LocalKeyProvider({ key: process.env.MASTER_KEY }) }],
    activeVersion: 1,
  });
  const dataSource = new DataSource({ type: 'postgres', url: process.env.DATABASE_URL, entities: [Customer], synchronize: true });
  encryption.attach(dataSource);
  await dataSource.initialize();
  const repo = dataSource.getRepository(Customer);
  for (const [label, email] of JSON.parse(process.env.ROWS || '[]')) await repo.save({ label, email });
  const rows = (await repo.find({ order: { id: 'ASC' } })).map((c) => [c.label, c.email]);
  await dataSource.destroy();
  console.log(JSON.stringify({ backend: aesBackend(), info: aesBackendInfo(), rows }));
}
main().catch((error) => { console.error(error); process.exitCode = 1; });
`;

interface AppOutput {
  backend: 'native' | 'node:crypto';
  info: { backend: string; reason?: string; file?: string; openssl?: string };
  rows: Array<[string, string]>;
}

let db: TestSchema;
let work: string;
let url: string;
let masterKey: string;
let tarball: string;
let tarballWithoutPrebuild: string;
/** Every row saved so far, in order: each later program must read all of them. */
const saved: Array<[string, string]> = [];

/** The package as published, repacked in this test's directory without the prebuilds. */
function withoutPrebuilds(published: string): string {
  const dir = join(work, 'pack-without-prebuilds');
  mkdirSync(dir);
  return repack(published, dir, (pkg) => rmSync(join(pkg, 'prebuilds'), { recursive: true }));
}

/**
 * A dependency as `npm install` may link it: this checkout's installed copy, except that npm runs
 * a linked directory's `prepare` script (a build from sources, which a registry install never
 * runs): such a package is copied without it (only possible for one with no dependencies).
 */
function dependencyDir(name: string): string {
  const installed = join(root, 'node_modules', name);
  const manifest = JSON.parse(readFileSync(join(installed, 'package.json'), 'utf8')) as {
    scripts?: Record<string, string>;
    dependencies?: Record<string, string>;
  };
  if (manifest.scripts?.prepare === undefined) return installed;
  if (Object.keys(manifest.dependencies ?? {}).length > 0)
    throw new Error(`${name}: prepare and dependencies`);
  const copy = join(work, 'dependencies', name);
  if (!existsSync(copy)) {
    mkdirSync(resolve(copy, '..'), { recursive: true });
    run('cp', ['-R', installed, copy], { cwd: root });
    delete manifest.scripts.prepare;
    writeFileSync(join(copy, 'package.json'), JSON.stringify(manifest, null, 2));
  }
  return copy;
}

/** `npm install` of the tarball into a new project; returns the project and npm's output. */
function install(name: string, from: string, env: NodeJS.ProcessEnv = {}): { app: string; output: string } {
  const app = join(work, name);
  mkdirSync(app);
  const { dependencies } = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as {
    dependencies: Record<string, string>;
  };
  const links = Object.fromEntries(
    Object.keys(dependencies).map((dep) => [dep, `file:${dependencyDir(dep)}`]),
  );
  writeFileSync(
    join(app, 'package.json'),
    JSON.stringify({ name, private: true, dependencies: { 'typeorm-envelope': `file:${from}`, ...links } }),
  );
  writeFileSync(join(app, 'main.js'), APP);
  const { stdout, stderr } = run(
    'npm',
    [
      'install',
      '--offline',
      '--legacy-peer-deps',
      '--foreground-scripts',
      '--no-audit',
      '--no-fund',
      '--cache',
      join(work, `npm-cache-${name}`),
    ],
    { cwd: app, env: { ...process.env, ...env }, timeout: 240_000 },
  );
  for (const peer of PEERS) symlinkSync(join(root, 'node_modules', peer), join(app, 'node_modules', peer));
  return { app, output: `${stdout}\n${stderr}` };
}

/** Runs the program in `app`, saving `rows`; checks it read back every row saved so far. */
function runApp(app: string, rows: Array<[string, string]>, env: NodeJS.ProcessEnv = {}): AppOutput {
  const { stdout, stderr } = run(process.execPath, ['main.js'], {
    cwd: app,
    env: {
      ...process.env,
      TYPEORM_ENVELOPE_NATIVE: '',
      ...env,
      DATABASE_URL: url,
      MASTER_KEY: masterKey,
      ROWS: JSON.stringify(rows),
    },
  });
  expect(`${stdout}${stderr}`).not.toContain(masterKey);
  const output = JSON.parse(stdout.trim().split('\n').pop() as string) as AppOutput;
  saved.push(...rows);
  expect(output.rows).toEqual(saved);
  return output;
}

/** The stored values: ciphertext only, one value of the right length per row, no plaintext. */
async function expectStoredEncrypted(): Promise<void> {
  const stored = await rawQuery<Record<string, unknown>>(
    db.url,
    `SELECT label, email_ciphertext, email_iv, email_key_version FROM "${db.schema}".customer ORDER BY id`,
  );
  expect(stored.map((row) => row.label)).toEqual(saved.map(([label]) => label));
  stored.forEach((row, i) => {
    const email = (saved[i] as [string, string])[1];
    const ciphertext = row.email_ciphertext as Buffer;
    expect(ciphertext).toBeInstanceOf(Buffer);
    expect(ciphertext.toString('latin1')).not.toContain(email);
    expect((row.email_iv as Buffer).length).toBe(12);
    expect(row.email_key_version).toBe(1);
  });
}

const email = (label: string) => `${label}-${randomBytes(4).toString('hex')}@example.com`;

beforeAll(async () => {
  db = await createTestSchema('packaging_native');
  work = mkdtempSync(join(tmpdir(), 'packaging-native-'));
  const separator = db.url.includes('?') ? '&' : '?';
  url = `${db.url}${separator}options=${encodeURIComponent(`-c search_path=${db.schema}`)}`;
  masterKey = randomBytes(32).toString('base64');
  tarball = await sharedPackage(inject('packageDir'));
  tarballWithoutPrebuild = withoutPrebuilds(tarball);
}, 300_000);
afterAll(async () => {
  await db?.drop();
  if (work) rmSync(work, { recursive: true, force: true });
});

describe.skipIf(!glibcX64)('native AES-GCM in the installed package (linux-x64, glibc)', () => {
  it('ships the prebuild, the sources and the install script, and nothing else of the addon', () => {
    const listing = run('tar', ['-tzf', tarball], { cwd: work }).stdout.split('\n').filter(Boolean);
    const files = listing.map((entry) => entry.replace(/^package\//, ''));
    expect(files).toEqual(
      expect.arrayContaining([PREBUILD, 'prebuilds/manifest.json', ...NATIVE_FILES.slice(1)]),
    );
    expect(files.filter((file) => /^(native|prebuilds|scripts|build)\//.test(file)).sort()).toEqual(
      [PREBUILD, 'prebuilds/manifest.json', ...NATIVE_FILES.slice(1)].sort(),
    );
    expect(files.some((file) => /^(src|test|bench)\//.test(file))).toBe(false);
    // The addon adds about 30 kB to the tarball.
    expect(statSync(tarball).size - statSync(tarballWithoutPrebuild).size).toBeLessThan(16_000);
    /* The compiled library, its declarations, README and CHANGELOG (about 315 kB with four key
       providers): the bound catches tests, sources or a build directory shipped by mistake. */
    expect(statSync(tarball).size).toBeLessThan(512 * 1024);
  });

  it('uses the shipped prebuild without compiling, and its values open with node:crypto', async () => {
    const { app, output } = install('app-prebuild', tarball);
    expect(output).toContain(`typeorm-envelope native AES-GCM: available (${PREBUILD}`);
    const installed = join(app, 'node_modules', 'typeorm-envelope');
    expect(existsSync(join(installed, 'build'))).toBe(false);
    expect(existsSync(join(installed, 'native', 'build'))).toBe(false);

    const native = runApp(app, [
      ['native-1', email('native-1')],
      ['native-2', email('native-2')],
    ]);
    expect(native.backend).toBe('native');
    expect(native.info).toEqual({
      backend: 'native',
      file: join(installed, PREBUILD),
      openssl: expect.stringMatching(/^OpenSSL 3\./),
    });

    const reference = runApp(app, [['node-crypto-1', email('node-crypto-1')]], {
      TYPEORM_ENVELOPE_NATIVE: '0',
    });
    expect(reference.info).toEqual({
      backend: 'node:crypto',
      reason: 'disabled by TYPEORM_ENVELOPE_NATIVE=0',
    });
    // The native program reads what node:crypto sealed (and node:crypto read what it sealed, above).
    expect(runApp(app, []).backend).toBe('native');
    await expectStoredEncrypted();

    // The prebuild removed: node:crypto, saying why, and every value still opens.
    const prebuilt = join(installed, PREBUILD);
    const bytes = readFileSync(prebuilt);
    rmSync(resolve(prebuilt, '..'), { recursive: true });
    const removed = runApp(app, [['removed', email('removed')]]);
    expect(removed.backend).toBe('node:crypto');
    expect(removed.info.reason).toMatch(
      /^no native build for linux-x64: No native build was found for platform=linux arch=x64/,
    );

    // The prebuild damaged (random bytes, truncated): never handed to the dynamic loader, where a
    // truncated shared object crashes the process (SIGBUS); node:crypto, saying why.
    mkdirSync(resolve(prebuilt, '..'), { recursive: true });
    for (const damaged of [randomBytes(bytes.length), bytes.subarray(0, 4096)]) {
      writeFileSync(prebuilt, damaged);
      const corrupt = runApp(app, [['damaged', email('damaged')]]);
      expect(corrupt.backend).toBe('node:crypto');
      expect(corrupt.info.reason).toBe(
        `${PREBUILD} does not match its recorded SHA-256 (damaged or replaced)`,
      );
    }
    // A file that matches the manifest but does not load (both replaced): the loader's error.
    const manifestFile = join(installed, 'prebuilds', 'manifest.json');
    const manifest = readFileSync(manifestFile, 'utf8');
    const garbage = randomBytes(bytes.length);
    writeFileSync(prebuilt, garbage);
    writeFileSync(
      manifestFile,
      manifest.replace(
        /"sha256": "[0-9a-f]{64}"/,
        `"sha256": "${createHash('sha256').update(garbage).digest('hex')}"`,
      ),
    );
    const unloadable = runApp(app, []);
    expect(unloadable.backend).toBe('node:crypto');
    expect(unloadable.info.reason).toMatch(
      new RegExp(`^could not load ${PREBUILD.replace(/\./g, '\\.')}: .*invalid ELF header`),
    );

    // Restored: native again, reading every value sealed by either backend.
    copyFileSync(join(root, PREBUILD), prebuilt);
    writeFileSync(manifestFile, manifest);
    expect(runApp(app, []).backend).toBe('native');
    await expectStoredEncrypted();
  }, 300_000);

  it('compiles at install time where no prebuild fits and a compiler exists', async () => {
    const { app, output } = install('app-compiled', tarballWithoutPrebuild);
    expect(output).toMatch(/typeorm-envelope native AES-GCM: available \(built in /);
    const installed = join(app, 'node_modules', 'typeorm-envelope');
    expect(existsSync(join(installed, LOCAL_BUILD))).toBe(true);
    expect(existsSync(join(installed, 'native', 'build'))).toBe(false);
    const compiled = runApp(app, [['compiled', email('compiled')]]);
    expect(compiled.info).toEqual({
      backend: 'native',
      file: join(installed, LOCAL_BUILD),
      openssl: expect.stringMatching(/^OpenSSL 3\./),
    });
    expect(runApp(app, [], { TYPEORM_ENVELOPE_NATIVE: '0' }).backend).toBe('node:crypto');
    await expectStoredEncrypted();
  }, 300_000);

  it('installs without a prebuild or a compiler, and runs on node:crypto saying why', async () => {
    const { app, output } = install('app-no-compiler', tarballWithoutPrebuild, { CC: 'false', CXX: 'false' });
    expect(output).toMatch(
      /typeorm-envelope native AES-GCM: unavailable, using node:crypto \(build failed; see build\/native-build\.log\)/,
    );
    const installed = join(app, 'node_modules', 'typeorm-envelope');
    expect(existsSync(join(installed, LOCAL_BUILD))).toBe(false);
    const fallback = runApp(app, [['no-compiler', email('no-compiler')]]);
    expect(fallback.backend).toBe('node:crypto');
    expect(fallback.info.reason).toMatch(/^no native build for linux-x64: /);
    await expectStoredEncrypted();
  }, 300_000);
});
