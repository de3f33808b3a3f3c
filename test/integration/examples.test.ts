import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

const root = resolve(__dirname, '../..');
const scripts = (
  JSON.parse(readFileSync(resolve(root, 'package.json'), 'utf8')) as { scripts: Record<string, string> }
).scripts;
/** Every example script compiles one project, then runs one file: `tsc -p <project> && node <file>`. */
const EXAMPLE_SCRIPT = /^tsc -p (\S+) && node (\S+)$/;
/** Projects this file has compiled already (through `npm run`): later scripts run their file at once. */
const compiled = new Set<string>();

/**
 * Runs `npm run <script>` as a newcomer would, asserts it exits 0, and returns what it printed. The
 * examples share one TypeScript project: once a script compiled it, the next scripts run their
 * compiled file directly (the second half of the same script), instead of compiling it again.
 */
function runScript(script: string, env: NodeJS.ProcessEnv = {}): string {
  const [, project, file] = EXAMPLE_SCRIPT.exec(scripts[script] ?? '') ?? [];
  expect(project, `${script}: ${scripts[script]}`).toBeDefined();
  const command: [string, string[]] = compiled.has(project as string)
    ? [process.execPath, [file as string]]
    : ['npm', ['run', '--silent', script]];
  const run = spawnSync(command[0], command[1], {
    cwd: root,
    encoding: 'utf8',
    timeout: 180_000,
    env: Object.fromEntries(
      Object.entries({ ...process.env, NO_COLOR: '1', ...env }).filter(([, value]) => value !== undefined),
    ),
    shell: process.platform === 'win32',
  });
  const output = `${run.stdout ?? ''}\n${run.stderr ?? ''}`;
  expect(run.error, output).toBeUndefined();
  expect(run.status, output).toBe(0);
  compiled.add(project as string);
  return output;
}

describe('examples/quickstart (npm run demo)', () => {
  it('runs end to end on embedded PostgreSQL and exits 0', () => {
    const output = runScript('demo');

    // The application side shows the plaintext.
    for (const email of ['alice@example.com', 'bob@example.org', 'carol@example.net']) {
      expect(output).toContain(email);
    }
    expect(output).toMatch(/fingerprint sha256:[0-9a-f]{16}/);
    expect(output).toContain('plaintext email or city anywhere in the stored rows: no');
    expect(output).toContain('UnsupportedOperationError:');
    // The tampered row is refused, naming where the failure is.
    expect(output).toMatch(/IntegrityError: .*\(entity Customer, column email, primary key \d+/);

    // The master key is never printed (its base64 form is 44 characters ending in '=').
    expect(output).not.toMatch(/(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{43}=/);
  }, 240_000);
});

describe('examples/aws-kms (npm run example:aws-kms)', () => {
  it('runs end to end on the KMS emulator, shows one GenerateDataKey and revocation, and exits 0', () => {
    const output = runScript('example:aws-kms', { KMS_KEY_ID: undefined }); // the emulator, never real AWS

    for (const email of ['alice@example.com', 'bob@example.org', 'carol@example.net']) {
      expect(output).toContain(email);
    }
    expect(output).toContain('alias/typeorm-envelope-demo');
    expect(output).toContain('plaintext email or city anywhere in the stored rows: no');
    // Start-up validation makes one GenerateDataKey; all the writes share one more.
    expect(output).toMatch(/^\s*GenerateDataKey\s+1\s+1\s+0\s*$/m);
    expect(output).toMatch(/^\s*Decrypt\s+1\s+0\s+1\s*$/m);
    // Disabled key: cached reads go on, then purgeCache() makes the next read fail.
    expect(output).toContain('still works from the cached data key -> alice@example.com');
    expect(output).toMatch(/read after purgeCache\(\) -> KeyAccessDeniedError: .*disabled/);
  }, 240_000);
});

describe('examples/vault-transit (npm run example:vault-transit)', () => {
  it('runs on the Vault emulator: one datakey for the writes, rotation by Transit rewrap, revocation, and exits 0', () => {
    const output = runScript('example:vault-transit', {
      VAULT_ADDR: undefined,
      VAULT_TRANSIT_KEY: undefined,
    });

    for (const email of ['alice@example.com', 'bob@example.org', 'carol@example.net']) {
      expect(output).toContain(email);
    }
    expect(output).toContain('plaintext email or city anywhere in the stored rows: no');
    // All the writes share one datakey; a cold read of every row one decrypt.
    expect(output).toMatch(/^\s*datakey\s+1\s+1\s+0\s*$/m);
    expect(output).toMatch(/^\s*decrypt\s+1\s+0\s+1\s*$/m);
    // rotate, then a re-wrap inside Vault: wrapped keys move from vault:v1 to vault:v2, data unchanged.
    expect(output).toMatch(/rewrapDataKeys: 1 Transit rewrap call\(s\)/);
    expect(output).toMatch(/wrapped keys before: vault:v1:/);
    expect(output).toMatch(/wrapped keys after: {2}vault:v2:/);
    expect(output).toContain('email_ciphertext of all 1003 rows unchanged: yes');
    expect(output).toContain('min_decryption_version=2 (version 1 retired): all rows still read: yes');
    // Revocation: cached reads go on, then purgeCache() makes the next read fail.
    expect(output).toContain('still works from the cached data key -> alice@example.com');
    expect(output).toMatch(/read after purgeCache\(\) -> KeyAccessDeniedError: Vault denied decrypt/);
    // No token or secret id printed (Vault tokens start with hvs.).
    expect(output).not.toMatch(/hvs\.[A-Za-z0-9_-]{8,}/);
  }, 240_000);
});

describe('examples/azure-key-vault (npm run example:azure-key-vault)', () => {
  it('runs end to end on the Key Vault emulator, shows one wrapkey, one unwrapkey and revocation, and exits 0', () => {
    const output = runScript('example:azure-key-vault', { AZURE_KEY_VAULT_KEY_ID: undefined }); // the emulator, never real Azure

    for (const email of ['alice@example.com', 'bob@example.org', 'carol@example.net']) {
      expect(output).toContain(email);
    }
    // The version-less key id resolved to a versioned one at start-up.
    expect(output).toMatch(
      /key validated at start-up .*: http:\/\/127\.0\.0\.1:\d+\/keys\/typeorm-envelope-demo\/[0-9a-f]{32}$/m,
    );
    expect(output).toContain('plaintext email or city anywhere in the stored rows: no');
    // Start-up validation wraps and unwraps once; all the writes share one wrap; cold reads one unwrap.
    expect(output).toMatch(/^\s*wrapkey\s+1\s+1\s+0\s*$/m);
    expect(output).toMatch(/^\s*unwrapkey\s+1\s+0\s+1\s*$/m);
    // Role assignment removed: cached reads go on, then purgeCache() makes the next read fail.
    expect(output).toContain('still works from the cached data key -> alice@example.com');
    expect(output).toMatch(/read after purgeCache\(\) -> KeyAccessDeniedError: .*ForbiddenByRbac/);
  }, 240_000);
});

describe('examples/gcp-kms (npm run example:gcp-kms)', () => {
  it('runs end to end on the Cloud KMS emulator: one Encrypt, one Decrypt, the version named, rotation and revocation, exit 0', () => {
    const output = runScript('example:gcp-kms', { GCP_KMS_KEY_NAME: undefined }); // the emulator, never real Cloud KMS

    for (const email of ['alice@example.com', 'bob@example.org', 'carol@example.net']) {
      expect(output).toContain(email);
    }
    expect(output).toContain('plaintext email or city anywhere in the stored rows: no');
    // Start-up reads the key and makes a round trip; all the writes share one Encrypt; cold reads one Decrypt.
    expect(output).toMatch(/^\s*GetCryptoKey\s+1\s+0\s+0\s*$/m);
    expect(output).toMatch(/^\s*Encrypt\s+1\s+1\s+0\s*$/m);
    expect(output).toMatch(/^\s*Decrypt\s+1\s+0\s+1\s*$/m);
    // Each stored wrapped key names the key version that wrapped it; the rotation moves them to version 2.
    expect(output).toMatch(
      /^\s*wrapped by projects\/[^/]+\/locations\/global\/keyRings\/demo\/cryptoKeys\/customer-data\/cryptoKeyVersions\/1$/m,
    );
    expect(output).toMatch(/ciphertext unchanged: yes; wrapped keys now name \S+\/cryptoKeyVersions\/2$/m);
    expect(output).toContain('version 1 disabled: every customer still reads -> yes');
    // IAM binding removed: cached reads go on, then purgeCache() makes the next read fail.
    expect(output).toContain('still works from the cached data key -> alice@example.com');
    expect(output).toMatch(/read after purgeCache\(\) -> KeyAccessDeniedError: .*PERMISSION_DENIED/);
    expect(output).not.toMatch(/ya29\.[A-Za-z0-9_-]{8,}/); // no access token printed
  }, 240_000);
});

describe('examples/nestjs (npm run example:nestjs)', () => {
  it('runs a NestJS application context whose TypeORM DataSource encrypts, and exits 0', () => {
    const output = runScript('example:nestjs');

    // The service reads back what it saved, the changed email included.
    for (const email of ['alice@example.org', 'bob@example.org', 'carol@example.net']) {
      expect(output).toContain(email);
    }
    expect(output).toContain("changed customer 1's email");
    // The database holds ciphertext only, under key version 1.
    expect(output).toMatch(
      /^\s*1\s+01[0-9a-f]+… \(\d+ B\)\s+[0-9a-f]+… \(12 B\)\s+[0-9a-f]+… \(61 B\)\s+1\s+pro$/m,
    );
    expect(output).toContain('plaintext email or city anywhere in the stored rows: no');
    // The start-up validation and the writes went through the attached EnvelopeEncryption.
    expect(output).toMatch(/Key-provider calls: [1-9]\d* data key\(s\) generated/);
    expect(output).not.toMatch(/(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{43}=/);
  }, 240_000);
});

describe('examples/multi-tenant (npm run example:multi-tenant)', () => {
  it('runs workspaces on customer-provided, cross-account KMS and vendor keys, isolated, and exits 0', () => {
    const output = runScript('example:multi-tenant');

    // Every expectation the example checks held (it also exits non-zero otherwise).
    expect(output).not.toContain('FAILED');
    expect(output).toMatch(/All \d+ expectations held\./);
    // Per workspace: the key reference, never the key, and the stored key version.
    expect(output).toMatch(/^\s*acme\s+customer-key\s+sha256:[0-9a-f]{16}\s+(1\d{6}) \(3 rows\)$/m);
    expect(output).toMatch(
      /^\s*initech\s+aws-kms\s+arn:aws:kms:[a-z0-9-]+:111122223333:key\/[0-9a-f-]{36}\s+1\d{6} \(3 rows\)$/m,
    );
    expect(output).toMatch(/^\s*umbrella\s+vendor key\s+sha256:[0-9a-f]{16}\s+1 \(3 rows\)$/m);
    // Isolation, revocation and offboarding, each with the typed error naming the tenant.
    expect(output).toMatch(/copied into umbrella's contact \d+ -> IntegrityError: .*\(tenant umbrella, /);
    expect(output).toMatch(/copied into hooli's contact \d+ -> IntegrityError: .*\(tenant hooli, /);
    expect(output).toMatch(/find\(\) across all workspaces -> KeyAccessDeniedError: .*\(tenant initech, /);
    expect(output).toMatch(/find\(\) of the other workspaces -> 12 contacts/);
    expect(output).toMatch(/reading its contacts -> TenantOffboardedError: .*\(tenant globex, /);
    expect(output).toContain('customer-provided keys (bytes, base64, hex) anywhere: no');
    // No key printed (base64 of 32 bytes: 44 characters ending in '=').
    expect(output).not.toMatch(/(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{43}=/);
  }, 240_000);
});
