import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { resolve } from 'node:path';

const root = resolve(__dirname, '../..');
const cliArgs = (args: string[]) => [
  '-r',
  resolve(root, 'test/support/register-ts.cjs'),
  resolve(root, 'src/cli/main.ts'),
  '-d',
  resolve(root, 'test/fixtures/rotation-project.ts'),
  ...args,
];

/** Runs the `typeorm-envelope` CLI from source in a child process and waits for it. */
export function runCli(args: string[], env: Record<string, string>) {
  const result = spawnSync(process.execPath, cliArgs(args), {
    cwd: root,
    env: { ...process.env, ...env },
    encoding: 'utf8',
    timeout: 120_000,
  });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

/** Starts the CLI in a child process without waiting (for tests that kill it). */
export function startCli(args: string[], env: Record<string, string>): ChildProcess {
  return spawn(process.execPath, cliArgs(args), {
    cwd: root,
    env: { ...process.env, ...env },
    stdio: 'pipe',
  });
}
