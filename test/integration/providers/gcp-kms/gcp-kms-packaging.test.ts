import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { installTarball, sharedPackage } from '../../../support/packed-package';

/** The packed package with and without the optional Google Cloud packages installed. */
const root = resolve(__dirname, '../../../..');
const tsc = join(root, 'node_modules/typescript/bin/tsc');
const GOOGLE_PACKAGES = ['@google-cloud', 'google-auth-library', 'google-gax'];
let work: string;
let tarball: string;

/** An application's use of the Cloud KMS options, written without the Google packages' types. */
const WITHOUT_SDK = `
import 'reflect-metadata';
import {
  EnvelopeEncryption,
  GcpKmsKeyProvider,
  type GcpKmsKeyProviderOptions,
  type GcpKmsTenantOptions,
  gcpKmsKeyFactory,
} from 'typeorm-envelope';

export const options: GcpKmsKeyProviderOptions = {
  keyName: 'projects/acme/locations/europe-west1/keyRings/app/cryptoKeys/data',
  requestTimeout: 5_000,
  maxAttempts: 3,
};
export const tenants: GcpKmsTenantOptions = { requestTimeout: 5_000 };
export const factory = gcpKmsKeyFactory(tenants);
export function build(): EnvelopeEncryption {
  return new EnvelopeEncryption({
    keys: [{ version: 1, provider: new GcpKmsKeyProvider(options) }],
    activeVersion: 1,
    tenantKeys: { gcpKms: tenants },
  });
}
`;

/** The same with the Google packages installed: their own client and auth client fit the options. */
const WITH_SDK = `
import { KeyManagementServiceClient } from '@google-cloud/kms';
import { OAuth2Client } from 'google-auth-library';
import { GcpKmsKeyProvider } from 'typeorm-envelope';

const keyName = 'projects/acme/locations/europe-west1/keyRings/app/cryptoKeys/data';
export const withAuth = new GcpKmsKeyProvider({ keyName, authClient: new OAuth2Client(), clientOptions: { projectId: 'acme' } });
export const withClient = new GcpKmsKeyProvider({ keyName, client: new KeyManagementServiceClient({ fallback: 'rest' }) });
export const full = withClient.client as KeyManagementServiceClient;
export const path = full.cryptoKeyPath('acme', 'europe-west1', 'app', 'data');
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

function compile(dir: string): string {
  try {
    execFileSync(process.execPath, [tsc, '-p', dir], { cwd: dir, encoding: 'utf8', stdio: 'pipe' });
    return '';
  } catch (error) {
    const { stdout, stderr } = error as { stdout: string; stderr: string };
    return `${stdout}${stderr}` || String(error);
  }
}

/** A project holding the packed package and every installed package but the Google ones. */
function withoutGoogle(name: string, source: string): string {
  const dir = join(work, name);
  const modules = join(dir, 'node_modules');
  mkdirSync(modules, { recursive: true });
  for (const entry of readdirSync(join(root, 'node_modules'))) {
    if (entry.startsWith('.') || GOOGLE_PACKAGES.includes(entry)) continue;
    symlinkSync(join(root, 'node_modules', entry), join(modules, entry));
  }
  execFileSync('tar', ['-xzf', tarball, '-C', modules]);
  execFileSync('mv', [join(modules, 'package'), join(modules, 'typeorm-envelope')]);
  writeFileSync(join(dir, 'package.json'), JSON.stringify({ name, private: true }));
  writeFileSync(join(dir, 'tsconfig.json'), JSON.stringify(TSCONFIG, null, 2));
  writeFileSync(join(dir, 'app.ts'), source);
  return dir;
}

beforeAll(async () => {
  work = mkdtempSync(join(tmpdir(), 'typeorm-envelope-gcp-'));
  tarball = await sharedPackage(inject('packageDir'));
}, 180_000);
afterAll(() => {
  if (work) rmSync(work, { recursive: true, force: true });
});

describe('the package without @google-cloud/kms and google-auth-library', () => {
  it('compiles an application using the Cloud KMS options with skipLibCheck: false', {
    timeout: 180_000,
  }, () => {
    expect(compile(withoutGoogle('types-without', WITHOUT_SDK))).toBe('');
  });

  it('loads, and building a GcpKmsKeyProvider says which package to install', () => {
    const dir = withoutGoogle('load-without', '');
    const script = `
      const lib = require('typeorm-envelope');
      new lib.EnvelopeEncryption({ keys: [{ version: 1, provider: new lib.LocalKeyProvider({ key: Buffer.alloc(32, 7).toString('base64') }) }], activeVersion: 1, tenantKeys: { gcpKms: {} } });
      try { new lib.GcpKmsKeyProvider({ keyName: 'projects/p/locations/l/keyRings/r/cryptoKeys/k' }); console.log('built'); }
      catch (error) { console.log(error.name + ': ' + error.message); }`;
    const output = execFileSync(process.execPath, ['-e', script], { cwd: dir, encoding: 'utf8' });
    expect(output.trim()).toBe(
      'ConfigError: GcpKmsKeyProvider needs the optional peer dependency @google-cloud/kms: npm install @google-cloud/kms',
    );
  });
});

describe('the package with them', () => {
  it("accepts @google-cloud/kms's own KeyManagementServiceClient and google-auth-library's OAuth2Client", {
    timeout: 180_000,
  }, () => {
    const dir = join(work, 'types-with');
    mkdirSync(dir);
    installTarball(dir, tarball);
    writeFileSync(join(dir, 'package.json'), JSON.stringify({ name: 'types-with', private: true }));
    writeFileSync(join(dir, 'tsconfig.json'), JSON.stringify(TSCONFIG, null, 2));
    writeFileSync(join(dir, 'app.ts'), WITH_SDK);
    expect(compile(dir)).toBe('');
  });
});
