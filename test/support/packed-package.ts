import { spawnSync } from 'node:child_process';
import { createHash, type Hash } from 'node:crypto';
import {
  chmodSync,
  copyFileSync,
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { basename, dirname, join, relative } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

/** The repository: the nearest directory above this file with a package.json (the benchmark runs
    this file compiled, from `.bench-build/test/support`). */
function repositoryRoot(from: string): string {
  for (let dir = from; ; dir = dirname(dir)) {
    if (existsSync(join(dir, 'package.json'))) return dir;
    if (dirname(dir) === dir) throw new Error(`no package.json above ${from}`);
  }
}

const root = repositoryRoot(__dirname);
const tsc = join(root, 'node_modules/typescript/bin/tsc');

/** Runs a command, failing with its output when it exits non-zero. */
export function run(
  command: string,
  args: string[],
  options: { cwd: string; env?: NodeJS.ProcessEnv; timeout?: number },
): { stdout: string; stderr: string } {
  const result = spawnSync(command, args, {
    cwd: options.cwd,
    env: options.env ?? process.env,
    encoding: 'utf8',
    timeout: options.timeout ?? 120_000,
  });
  const output = `${result.stdout ?? ''}\n${result.stderr ?? ''}`;
  if (result.error) throw new Error(`${command} ${args.join(' ')}: ${result.error.message}\n${output}`);
  if (result.status !== 0) {
    throw new Error(`${command} ${args.join(' ')} exited with ${result.status}\n${output}`);
  }
  return { stdout: result.stdout, stderr: result.stderr };
}

/** Compiles a TypeScript project with the repository's compiler. */
export function compileTypeScript(projectDir: string): void {
  run(process.execPath, [tsc, '-p', projectDir], { cwd: projectDir });
}

/**
 * Builds the package into `workDir` (the same build as `npm run build`, written elsewhere so the
 * working tree's `dist` is left alone) and packs it with `npm pack`: the tarball holds what
 * would be published. Returns the tarball's path.
 */
export function packPackage(workDir: string): string {
  const pkg = join(workDir, 'package-build');
  mkdirSync(join(pkg, 'scripts'), { recursive: true });
  run(process.execPath, [tsc, '-p', join(root, 'tsconfig.build.json'), '--outDir', join(pkg, 'dist')], {
    cwd: root,
  });
  copyFileSync(join(root, 'scripts/write-esm-entry.mjs'), join(pkg, 'scripts/write-esm-entry.mjs'));
  // The entry script loads the build, which needs the peer dependencies (npm pack leaves this out).
  symlinkSync(join(root, 'node_modules'), join(pkg, 'node_modules'));
  run(process.execPath, [join(pkg, 'scripts/write-esm-entry.mjs')], { cwd: pkg });
  /* Everything package.json `files` publishes besides the build (the native prebuild and its
     sources among them), so the tarball is the one users install. */
  const { files = [] } = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { files?: string[] };
  for (const file of ['package.json', ...files.filter((f) => f !== 'dist')]) {
    cpSync(join(root, file), join(pkg, file), { recursive: true });
  }
  const { stdout } = run('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', workDir], {
    cwd: pkg,
  });
  const [packed] = JSON.parse(stdout) as Array<{ filename: string }>;
  if (!packed) throw new Error('npm pack reported no tarball');
  return join(workDir, packed.filename);
}

/**
 * The tarball {@link packPackage} makes from the sources as they are now, packed once per test run
 * and shared by every test file that asks: `runDir` is the run's directory (`inject('packageDir')`,
 * made by the global setup and removed at its teardown).
 *
 * Test files run in parallel processes. The first to ask packs while holding a lock (a file created
 * with O_EXCL), the others wait for the tarball. It is published by renaming a directory holding
 * only it, so nobody sees it half-written, and made read-only: it is never changed, a test that
 * needs a different package makes its own with {@link repack}. It is keyed by a digest of what the
 * build reads, so a source changed between two runs in watch mode (same run directory) gets a new
 * tarball rather than the old one.
 */
export async function sharedPackage(runDir: string): Promise<string> {
  const key = join(runDir, await buildInputsDigest());
  const lock = `${key}.lock`;
  const failed = `${key}.failed`;
  for (;;) {
    const published = publishedTarball(key);
    if (published) return published;
    if (existsSync(failed)) {
      throw new Error(`packing the package failed in another test file:\n${readFileSync(failed, 'utf8')}`);
    }
    let owner: number | undefined;
    try {
      writeFileSync(lock, String(process.pid), { flag: 'wx' });
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
      owner = lockOwner(lock);
    }
    if (owner === undefined) return packUnderLock(key, lock, failed);
    if (!Number.isNaN(owner) && !processAlive(owner) && !publishedTarball(key)) {
      throw new Error(`the process packing the package (pid ${owner}) ended without publishing it`);
    }
    await sleep(250);
  }
}

/** Packs into a directory of this process's, publishes the tarball, releases the lock. */
function packUnderLock(key: string, lock: string, failed: string): string {
  const work = mkdtempSync(`${key}.build-`);
  try {
    // Someone may have published and released the lock between our look and our lock.
    const already = publishedTarball(key);
    if (already) return already;
    const tarball = packPackage(work);
    const staging = mkdtempSync(`${key}.staging-`);
    const name = basename(tarball);
    renameSync(tarball, join(staging, name));
    chmodSync(join(staging, name), 0o444);
    renameSync(staging, key);
    return join(key, name);
  } catch (error) {
    const temporary = `${failed}.${process.pid}`;
    writeFileSync(temporary, error instanceof Error ? error.message : String(error));
    renameSync(temporary, failed);
    throw error;
  } finally {
    rmSync(work, { recursive: true, force: true });
    rmSync(lock, { force: true });
  }
}

/** The tarball published under `key`, if it has been. */
function publishedTarball(key: string): string | undefined {
  if (!existsSync(key)) return undefined;
  const [name] = readdirSync(key).filter((file) => file.endsWith('.tgz'));
  return name === undefined ? undefined : join(key, name);
}

/** The pid in the lock file; NaN while its owner has not written it yet, or once it is gone. */
function lockOwner(lock: string): number {
  try {
    return Number.parseInt(readFileSync(lock, 'utf8'), 10);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return Number.NaN;
    throw error;
  }
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * A digest of everything {@link packPackage} reads from the checkout: the compiler options as
 * resolved from tsconfig.build.json, the files it compiles, the entry script, package.json and
 * every other file package.json `files` publishes, the compiler's version, and the record of
 * installed packages.
 */
async function buildInputsDigest(): Promise<string> {
  const { default: ts } = await import('typescript');
  const config = ts.getParsedCommandLineOfConfigFile(join(root, 'tsconfig.build.json'), undefined, {
    ...ts.sys,
    onUnRecoverableConfigFileDiagnostic: (diagnostic) => {
      throw new Error(ts.flattenDiagnosticMessageText(diagnostic.messageText, '\n'));
    },
  });
  if (!config) throw new Error('tsconfig.build.json could not be read');
  const hash = createHash('sha256').update(`${ts.version}\0${JSON.stringify(config.options)}\0`);
  const { files = [] } = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { files?: string[] };
  const inputs = [
    ...config.fileNames,
    ...['package.json', 'scripts/write-esm-entry.mjs', ...files.filter((f) => f !== 'dist')].map((file) =>
      join(root, file),
    ),
    /* What is installed, which the compile reads types from: npm rewrites this on every install. */
    join(root, 'node_modules', '.package-lock.json'),
  ];
  for (const input of inputs) hashPath(hash, input);
  return `typeorm-envelope-${hash.digest('hex').slice(0, 16)}`;
}

/** Adds a file, or every file under a directory, to `hash` (a missing one counts as missing). */
function hashPath(hash: Hash, path: string): void {
  const name = relative(root, path);
  if (!existsSync(path)) {
    hash.update(`missing ${name}\0`);
  } else if (statSync(path).isDirectory()) {
    for (const entry of readdirSync(path).sort()) hashPath(hash, join(path, entry));
  } else {
    const bytes = readFileSync(path);
    hash.update(`${name} ${bytes.length}\0`).update(bytes);
  }
}

/**
 * A variant of a packed tarball: extracts it into `workDir`, lets `change` edit the package's files,
 * and packs the result into `workDir`. The tarball itself is left as it is.
 */
export function repack(tarball: string, workDir: string, change: (packageDir: string) => void): string {
  const extracted = mkdtempSync(join(workDir, 'repack-'));
  run('tar', ['-xzf', tarball, '-C', extracted], { cwd: workDir });
  const pkg = join(extracted, 'package');
  change(pkg);
  const { stdout } = run('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', workDir], {
    cwd: pkg,
  });
  const [packed] = JSON.parse(stdout) as Array<{ filename: string }>;
  if (!packed) throw new Error('npm pack reported no tarball');
  return join(workDir, packed.filename);
}

/**
 * Installs the tarball into `appDir/node_modules/typeorm-envelope` and makes the repository's
 * installed packages (TypeORM, pg, reflect-metadata, the package's own dependencies, TypeScript
 * and type definitions) resolvable from `appDir`, without a registry: an offline `npm install`.
 */
export function installTarball(appDir: string, tarball: string): void {
  const modules = join(appDir, 'node_modules');
  mkdirSync(modules, { recursive: true });
  for (const entry of readdirSync(join(root, 'node_modules'))) {
    if (entry.startsWith('.') || entry === 'typeorm-envelope') continue;
    symlinkSync(join(root, 'node_modules', entry), join(modules, entry));
  }
  run('tar', ['-xzf', tarball, '-C', modules], { cwd: appDir });
  renameSync(join(modules, 'package'), join(modules, 'typeorm-envelope'));
}
