import { execFile, execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { sharedPackage } from '../../../support/packed-package';
import { startVaultEmulator, transitPolicy, type VaultEmulator } from '../../../support/vault-emulator';

/**
 * The packed package, installed into a project that has only typeorm, pg and reflect-metadata (no
 * AWS, Azure or Google client): the Vault provider's types compile with `skipLibCheck: false`, and
 * the provider runs (plain `fetch`) against the emulator.
 */
const root = resolve(__dirname, '../../../..');
const tsc = join(root, 'node_modules/typescript/bin/tsc');
let work: string;
let tarball: string;
let vault: VaultEmulator;

const APPLICATION = `
import {
  EnvelopeEncryption,
  LocalKeyProvider,
  type VaultAuth,
  type VaultTransitKeyDescriptor,
  VaultTransitKeyProvider,
  type VaultTransitKeyProviderOptions,
  type VaultTransitTenantOptions,
} from 'typeorm-envelope';

const auth: VaultAuth = process.env.VAULT_ROLE_ID
  ? { appRole: { roleId: process.env.VAULT_ROLE_ID, secretId: process.env.VAULT_SECRET_ID ?? '' } }
  : { token: process.env.VAULT_TOKEN ?? '' };
export const options: VaultTransitKeyProviderOptions = {
  address: process.env.VAULT_ADDR ?? '',
  keyName: 'app-data',
  auth,
  requestTimeout: 5_000,
  maxAttempts: 3,
};
export const tenantOptions: VaultTransitTenantOptions = {
  auth: async (target) => ({ tokenFile: \`/run/secrets/\${target.tenantId}\` }),
};
export const descriptor: VaultTransitKeyDescriptor = { kind: 'vault-transit', address: 'https://vault.example.com', keyName: 'k' };

export async function main(): Promise<string> {
  const provider = new VaultTransitKeyProvider(options);
  const context = { 'typeorm-envelope:keyring': 'default' };
  await provider.validate(context);
  const { plaintextKey, wrappedKey } = await provider.generateDataKey(context);
  const same = (await provider.unwrapDataKey(wrappedKey, context)).equals(plaintextKey);
  new EnvelopeEncryption({
    keys: [{ version: 1, provider }, { version: 2, provider: new LocalKeyProvider({ key: Buffer.alloc(32, 7).toString('base64') }) }],
    activeVersion: 1,
    tenantKeys: { vaultTransit: tenantOptions },
  });
  return \`\${wrappedKey.toString('latin1').slice(0, 9)} \${same}\`;
}

main().then((line) => console.log(line), (error) => { console.error(String(error)); process.exitCode = 1; });
`;

const TSCONFIG = {
  compilerOptions: {
    strict: true,
    skipLibCheck: false,
    outDir: 'out',
    target: 'ES2022',
    module: 'commonjs',
    moduleResolution: 'node10',
    types: ['node'],
  },
  include: ['*.ts'],
};

beforeAll(async () => {
  vault = await startVaultEmulator();
  work = mkdtempSync(join(tmpdir(), 'typeorm-envelope-vault-'));
  tarball = await sharedPackage(inject('packageDir'));
}, 180_000);
afterAll(async () => {
  await vault?.close();
  if (work) rmSync(work, { recursive: true, force: true });
});

describe('the packed package with Vault Transit, no cloud SDK installed', () => {
  it('compiles with skipLibCheck: false and runs a validated round trip against Vault', async () => {
    const dir = join(work, 'app');
    const modules = join(dir, 'node_modules');
    mkdirSync(join(modules, '@types'), { recursive: true });
    mkdirSync(join(modules, 'typeorm-envelope'));
    execFileSync('tar', ['-xzf', tarball, '-C', join(modules, 'typeorm-envelope'), '--strip-components=1']);
    for (const pkg of ['typeorm', 'pg', 'reflect-metadata', 'lru-cache', 'node-gyp-build', '@types/node']) {
      symlinkSync(join(root, 'node_modules', pkg), join(modules, pkg), 'dir');
    }
    writeFileSync(join(dir, 'package.json'), JSON.stringify({ name: 'vault-app', private: true }));
    writeFileSync(join(dir, 'tsconfig.json'), JSON.stringify(TSCONFIG));
    writeFileSync(join(dir, 'app.ts'), APPLICATION);
    execFileSync(process.execPath, [tsc, '-p', dir], { cwd: dir, encoding: 'utf8', stdio: 'pipe' });

    vault.createKey('app-data');
    vault.setPolicy('app', transitPolicy('app-data'));
    const role = vault.createAppRole('app', { policies: ['app'] });
    // Asynchronously: the emulator answers from this process.
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [join(dir, 'out/app.js')], {
      cwd: dir,
      encoding: 'utf8',
      env: {
        PATH: process.env.PATH,
        VAULT_ADDR: vault.address,
        VAULT_ROLE_ID: role.roleId,
        VAULT_SECRET_ID: role.secretId,
      },
    });
    expect(stderr).toBe('');
    expect(stdout.trim()).toBe('vault:v1: true');
    expect(vault.callLog.map((c) => c.operation)).toEqual([
      'login',
      'readKey',
      'datakey',
      'decrypt',
      'datakey',
      'decrypt',
    ]);
  }, 120_000);
});
