import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { sharedPackage } from '../../../support/packed-package';

/**
 * The published package with the Azure provider in it: its declarations compile, and it loads and
 * runs, in a project without any Azure package; with them installed, the SDK's own types fit.
 */
const root = resolve(__dirname, '../../../..');
const tsc = join(root, 'node_modules/typescript/bin/tsc');
let work: string;
let tarball: string;

const APPLICATION = `
import 'reflect-metadata';
import {
  AzureKeyVaultKeyProvider,
  type AzureKeyVaultKeyProviderOptions,
  type AzureKeyVaultTenantOptions,
  type AzureTokenCredential,
  EnvelopeEncryption,
  type TenantKeyDescriptor,
} from 'typeorm-envelope';

const credential: AzureTokenCredential = {
  getToken: async () => ({ token: 'never-used', expiresOnTimestamp: Date.now() + 60_000 }),
};
export const options: AzureKeyVaultKeyProviderOptions = {
  keyId: 'https://contoso.vault.azure.net/keys/app-data/0123456789abcdef0123456789abcdef',
  credential,
  requestTimeout: 5_000,
  retryOptions: { maxRetries: 3, retryDelayInMs: 500 },
  clientOptions: { serviceVersion: '7.6' },
};
export const tenantOptions: AzureKeyVaultTenantOptions = { credential, requestTimeout: 5_000 };
export const descriptor: TenantKeyDescriptor = { kind: 'azure-key-vault', keyId: options.keyId };
export function build(): AzureKeyVaultKeyProvider {
  return new AzureKeyVaultKeyProvider(options);
}
export const encryption = (provider: AzureKeyVaultKeyProvider) =>
  new EnvelopeEncryption({ keys: [{ version: 1, provider }], activeVersion: 1, tenantKeys: { azureKeyVault: tenantOptions } });
`;

const WITH_SDK = `
import type { TokenCredential } from '@azure/core-auth';
import type { KeyClientOptions } from '@azure/keyvault-keys';
import { AzureKeyVaultKeyProvider } from 'typeorm-envelope';

declare const credential: TokenCredential;
declare const clientOptions: KeyClientOptions;
export const provider = new AzureKeyVaultKeyProvider({
  keyId: 'https://contoso.vault.azure.net/keys/app-data',
  credential,
  clientOptions,
});
`;

/** Run without any Azure package: the library loads; building the provider names what to install. */
const RUNTIME = `
const { AzureKeyVaultKeyProvider, EnvelopeEncryption, LocalKeyProvider } = require('typeorm-envelope');
const { randomBytes } = require('node:crypto');
new EnvelopeEncryption({
  keys: [{ version: 1, provider: new LocalKeyProvider({ key: randomBytes(32).toString('base64') }) }],
  activeVersion: 1,
  tenantKeys: { azureKeyVault: {} },
});
try {
  new AzureKeyVaultKeyProvider({
    keyId: 'https://contoso.vault.azure.net/keys/app-data',
    credential: { getToken: async () => null },
  });
  console.log('constructed');
} catch (error) {
  console.log(error.name + ': ' + error.message);
}
`;

const TSCONFIG = {
  compilerOptions: {
    strict: true,
    skipLibCheck: false,
    noEmit: true,
    target: 'ES2022',
    module: 'commonjs',
    moduleResolution: 'node10',
    experimentalDecorators: true,
    emitDecoratorMetadata: true,
    types: ['node'],
  },
  include: ['*.ts'],
};

/** A project whose node_modules holds only the given packages (linked from this repository's) and the packed library. */
function project(name: string, packages: string[], files: Record<string, string>): string {
  const dir = join(work, name);
  const modules = join(dir, 'node_modules');
  mkdirSync(join(modules, '@types'), { recursive: true });
  mkdirSync(join(modules, 'typeorm-envelope'));
  execFileSync('tar', ['-xzf', tarball, '-C', join(modules, 'typeorm-envelope'), '--strip-components=1']);
  for (const pkg of packages) {
    if (pkg.includes('/')) mkdirSync(join(modules, pkg.split('/')[0] as string), { recursive: true });
    symlinkSync(join(root, 'node_modules', pkg), join(modules, pkg), 'dir');
  }
  writeFileSync(join(dir, 'package.json'), JSON.stringify({ name, private: true }));
  writeFileSync(join(dir, 'tsconfig.json'), JSON.stringify(TSCONFIG, null, 2));
  for (const [file, text] of Object.entries(files)) writeFileSync(join(dir, file), text);
  return dir;
}

function run(command: string, args: string[], cwd: string): { status: number; output: string } {
  try {
    const stdout = execFileSync(command, args, { cwd, encoding: 'utf8', stdio: 'pipe' });
    return { status: 0, output: stdout };
  } catch (error) {
    const { status, stdout, stderr } = error as { status: number; stdout: string; stderr: string };
    return { status, output: `${stdout}${stderr}` };
  }
}

/** What the package needs at run time besides the optional providers. */
const RUNTIME_PACKAGES = ['typeorm', 'pg', 'reflect-metadata', 'lru-cache', 'node-gyp-build', 'commander'];

beforeAll(async () => {
  work = mkdtempSync(join(tmpdir(), 'typeorm-envelope-azure-'));
  tarball = await sharedPackage(inject('packageDir'));
}, 180_000);
afterAll(() => {
  if (work) rmSync(work, { recursive: true, force: true });
});

describe('the published package and Azure Key Vault', () => {
  it('declarations compile with skipLibCheck: false in a project without any @azure package', {
    timeout: 180_000,
  }, () => {
    const dir = project('no-azure', ['typeorm', 'pg', 'reflect-metadata', '@types/node'], {
      'app.ts': APPLICATION,
    });
    const result = run(process.execPath, [tsc, '-p', dir], dir);
    expect(result.output).not.toContain('TS2307');
    expect(result.output).toBe('');
    expect(result.status).toBe(0);
  });

  it("accept the SDK's own TokenCredential and KeyClientOptions where it is installed", {
    timeout: 180_000,
  }, () => {
    const dir = project(
      'with-azure',
      ['typeorm', 'pg', 'reflect-metadata', '@types/node', '@azure', '@typespec'],
      {
        'app.ts': WITH_SDK,
      },
    );
    const result = run(process.execPath, [tsc, '-p', dir], dir);
    expect(result.output).toBe('');
    expect(result.status).toBe(0);
  });

  it('loads without any @azure package; building the provider is a ConfigError naming @azure/keyvault-keys', () => {
    const dir = project('runtime-no-azure', RUNTIME_PACKAGES, { 'main.js': RUNTIME });
    const result = run(process.execPath, ['main.js'], dir);
    expect(result.status, result.output).toBe(0);
    expect(result.output.trim()).toBe(
      'ConfigError: AzureKeyVaultKeyProvider needs the optional peer dependency @azure/keyvault-keys: npm install @azure/keyvault-keys',
    );
  });
});
