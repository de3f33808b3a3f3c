import { spawnSync } from 'node:child_process';
import {
  copyFileSync,
  cpSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  symlinkSync,
} from 'node:fs';
import { dirname, join } from 'node:path';

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
