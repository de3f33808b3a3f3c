import { spawnSync } from 'node:child_process';
import { resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

const root = resolve(__dirname, '../..');

describe('examples/quickstart (npm run demo)', () => {
  it('runs end to end on embedded PostgreSQL and exits 0', () => {
    const run = spawnSync('npm', ['run', '--silent', 'demo'], {
      cwd: root,
      encoding: 'utf8',
      timeout: 180_000,
      env: { ...process.env, NO_COLOR: '1' },
      shell: process.platform === 'win32',
    });
    const output = `${run.stdout ?? ''}\n${run.stderr ?? ''}`;
    expect(run.error, output).toBeUndefined();
    expect(run.status, output).toBe(0);

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
