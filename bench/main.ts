/**
 * `npm run bench`: measures the package as a user installs it. Packs it (./test/support/packed-package.ts:
 * the build and the files that are published, the native prebuild included), installs the tarball
 * into a temporary project of its own without a registry, runs the package's install script there
 * as npm would, compiles the benchmark in that project against the installed package (./library.ts
 * becomes `export * from 'typeorm-envelope'`) and runs it (./run.ts). The temporary project is
 * removed afterwards unless `--keep` is given.
 *
 * `npm run bench -- --from-checkout` runs the same benchmark from the compiled checkout instead
 * (`../src`, no packing), for development; its figures are not the installed package's.
 *
 * Both write bench/results.json in the checkout; the environment variables of ./run.ts apply.
 */
import { spawn } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join, resolve } from 'node:path';
import { compileTypeScript, installTarball, packPackage, run } from '../test/support/packed-package';

/** The repository: `.bench-build/bench/main.js` → the checkout. */
const checkout = resolve(__dirname, '..', '..');
const resultsFile = join(checkout, 'bench', 'results.json');

/** The benchmark's sources, copied into the installed project (profile-find.ts reads internals). */
const SOURCES = [
  'bench/run.ts',
  'bench/database.ts',
  'bench/entities.ts',
  'bench/rewrap.ts',
  'bench/rewrap-memory.ts',
  'bench/rewrap-compact.ts',
  'bench/storage-kms.ts',
  'bench/workers.ts',
  'bench/blind-index.ts',
  'bench/kms-sized-key-provider.ts',
  'bench/tenants.ts',
  'bench/stats.ts',
  'test/support/postgres-servers.ts',
];

const INSTALLED_LIBRARY = `/** The library under benchmark: the installed package, by name. */
export * from 'typeorm-envelope';
`;

/** The project's compiler options: those of an application using TypeORM decorators. */
const TSCONFIG = {
  compilerOptions: {
    target: 'ES2022',
    module: 'commonjs',
    moduleResolution: 'node',
    lib: ['ES2022'],
    types: ['node'],
    strict: true,
    esModuleInterop: true,
    skipLibCheck: true,
    experimentalDecorators: true,
    emitDecoratorMetadata: true,
    outDir: 'build',
    rootDir: '.',
  },
  include: ['bench/**/*.ts', 'test/support/*.ts'],
};

function parseArgs(argv: string[]): { fromCheckout: boolean; keep: boolean } {
  const known = new Set(['--from-checkout', '--keep']);
  const unknown = argv.filter((a) => !known.has(a));
  if (unknown.length > 0) {
    throw new Error(
      `unknown argument ${unknown.join(' ')}; usage: npm run bench [-- --from-checkout | --keep]`,
    );
  }
  return { fromCheckout: argv.includes('--from-checkout'), keep: argv.includes('--keep') };
}

/** Packs and installs the package into `work/app`, with the benchmark compiled beside it. */
function prepareInstalled(work: string): { script: string; cwd: string; tarball: string } {
  const started = performance.now();
  console.error('bench: packing the package (production build, native prebuild included)');
  const tarball = packPackage(work);
  const app = join(work, 'app');
  mkdirSync(app);
  writeFileSync(
    join(app, 'package.json'),
    JSON.stringify(
      {
        name: 'typeorm-envelope-bench',
        private: true,
        dependencies: { 'typeorm-envelope': `file:${tarball}` },
      },
      null,
      2,
    ),
  );
  installTarball(app, tarball);
  /* npm runs the package's install script: a no-op when the shipped prebuild loads, else a compile. */
  const installed = join(app, 'node_modules', 'typeorm-envelope');
  const { stdout, stderr } = run(process.execPath, ['scripts/build-native.mjs', '--install'], {
    cwd: installed,
    timeout: 300_000,
  });
  const said = `${stdout}${stderr}`.trim();
  if (said) console.error(`bench: install script: ${said}`);
  for (const file of SOURCES) {
    mkdirSync(join(app, file, '..'), { recursive: true });
    copyFileSync(join(checkout, file), join(app, file));
  }
  writeFileSync(join(app, 'bench', 'library.ts'), INSTALLED_LIBRARY);
  writeFileSync(join(app, 'tsconfig.json'), `${JSON.stringify(TSCONFIG, null, 2)}\n`);
  compileTypeScript(app);
  console.error(
    `bench: installed ${basename(tarball)} into ${app} in ${((performance.now() - started) / 1000).toFixed(0)} s`,
  );
  return { script: join(app, 'build', 'bench', 'run.js'), cwd: app, tarball: basename(tarball) };
}

/** Runs the benchmark in a process of its own; resolves with its exit code. */
function runBench(script: string, cwd: string, env: NodeJS.ProcessEnv): Promise<number> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, [script], {
      cwd,
      env: { ...process.env, ...env },
      stdio: 'inherit',
    });
    /* Ctrl-C reaches the child too; it stops its database and exits, then this process cleans up. */
    const ignore = () => undefined;
    process.on('SIGINT', ignore);
    child.once('error', reject);
    child.once('exit', (code, signal) => {
      process.off('SIGINT', ignore);
      resolvePromise(code ?? (signal ? 1 : 0));
    });
  });
}

async function main(): Promise<void> {
  const { fromCheckout, keep } = parseArgs(process.argv.slice(2));
  const env = { BENCH_RESULTS_FILE: resultsFile, BENCH_CHECKOUT: checkout };
  if (fromCheckout) {
    process.exitCode = await runBench(join(__dirname, 'run.js'), checkout, {
      ...env,
      BENCH_SOURCE: 'checkout',
    });
    return;
  }
  const work = mkdtempSync(join(tmpdir(), 'typeorm-envelope-bench-'));
  try {
    const { script, cwd, tarball } = prepareInstalled(work);
    process.exitCode = await runBench(script, cwd, {
      ...env,
      BENCH_SOURCE: 'installed',
      BENCH_TARBALL: tarball,
    });
  } finally {
    if (keep) console.error(`bench: kept ${work}`);
    else rmSync(work, { recursive: true, force: true });
  }
}

main().catch((error: unknown) => {
  console.error(error);
  process.exitCode = 1;
});
