import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { sharedPackage } from '../support/packed-package';

const root = resolve(__dirname, '../..');
const tsc = join(root, 'node_modules/typescript/bin/tsc');
let work: string;
let tarball: string;

/** What an application using the library writes, KMS options included, without the AWS SDK installed. */
const APPLICATION = `
import 'reflect-metadata';
import { DataSource, Entity, PrimaryGeneratedColumn } from 'typeorm';
import {
  AwsKmsKeyProvider,
  type AwsKmsKeyProviderOptions,
  Encrypted,
  EnvelopeEncryption,
  type KeyValidation,
  LocalKeyProvider,
  rewrapDataKeys,
} from 'typeorm-envelope';

@Entity()
export class Customer {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted() email!: string;
}

export const kmsOptions: AwsKmsKeyProviderOptions = {
  keyId: 'alias/app-data',
  region: 'eu-west-1',
  connectTimeout: 2_000,
  requestTimeout: 5_000,
};

export async function main(): Promise<KeyValidation[]> {
  const encryption = new EnvelopeEncryption({
    keys: [{ version: 1, provider: new LocalKeyProvider({ key: process.env.MASTER_KEY ?? '' }) }],
    activeVersion: 1,
  });
  const dataSource = new DataSource({ type: 'postgres', url: process.env.DATABASE_URL, entities: [Customer] });
  encryption.attach(dataSource);
  await dataSource.initialize();
  await rewrapDataKeys(dataSource, encryption, { dryRun: true });
  const usesKms: typeof AwsKmsKeyProvider | undefined = process.env.KMS ? AwsKmsKeyProvider : undefined;
  void usesKms;
  return encryption.validate();
}
`;

/** The same library with the AWS SDK installed: its own client and configuration types fit the options. */
const WITH_SDK = `
import { KMSClient, type KMSClientConfig } from '@aws-sdk/client-kms';
import { AwsKmsKeyProvider } from 'typeorm-envelope';

const config: KMSClientConfig = { region: 'eu-west-1', maxAttempts: 3 };
export const withConfig = new AwsKmsKeyProvider({ keyId: 'alias/app-data', clientConfig: config });
export const withClient = new AwsKmsKeyProvider({ keyId: 'alias/app-data', client: new KMSClient(config) });
export const region = (withClient.client as KMSClient).config.region;
withConfig.client.middlewareStack.add((next, context) => (args) => {
  void context.commandName;
  return next(args);
}, { step: 'initialize', name: 'countCalls' });
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
function project(name: string, packages: string[], source: string): string {
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
  writeFileSync(join(dir, 'app.ts'), source);
  return dir;
}

function compile(dir: string): { status: number; output: string } {
  try {
    execFileSync(process.execPath, [tsc, '-p', dir], { cwd: dir, encoding: 'utf8', stdio: 'pipe' });
    return { status: 0, output: '' };
  } catch (error) {
    const { status, stdout, stderr } = error as { status: number; stdout: string; stderr: string };
    return { status, output: `${stdout}${stderr}` };
  }
}

beforeAll(async () => {
  work = mkdtempSync(join(tmpdir(), 'typeorm-envelope-types-'));
  tarball = await sharedPackage(inject('packageDir'));
}, 180_000);
afterAll(() => {
  if (work) rmSync(work, { recursive: true, force: true });
});

describe('published type declarations', () => {
  it('compile with skipLibCheck: false in a project without @aws-sdk/client-kms', () => {
    const dir = project('without-sdk', ['typeorm', 'pg', 'reflect-metadata', '@types/node'], APPLICATION);
    const result = compile(dir);
    expect(result.output).not.toContain('TS2307');
    expect(result.output).toBe('');
    expect(result.status).toBe(0);
  });

  it("accept the AWS SDK's own KMSClient and KMSClientConfig where it is installed", () => {
    const dir = project(
      'with-sdk',
      ['typeorm', 'pg', 'reflect-metadata', '@types/node', '@aws-sdk', '@smithy'],
      WITH_SDK,
    );
    const result = compile(dir);
    expect(result.output).toBe('');
    expect(result.status).toBe(0);
  });
});
