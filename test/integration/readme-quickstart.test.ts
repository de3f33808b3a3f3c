import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { createTestSchema, rawQuery, type TestSchema } from '../support/database';
import { compileTypeScript, installTarball, run, sharedPackage } from '../support/packed-package';

const root = resolve(__dirname, '../..');

/** The first ```ts block under the README's "## Quickstart" heading, exactly as written. */
function quickstartSource(): string {
  const readme = readFileSync(join(root, 'README.md'), 'utf8');
  const section = readme.split(/^## Quickstart$/m)[1]?.split(/^## /m)[0];
  const block = section && /^```ts\n([\s\S]*?)^```$/m.exec(section)?.[1];
  if (!block) throw new Error('README.md has no ```ts block under "## Quickstart"');
  return block;
}

/** A default CommonJS TypeScript project, with the two flags the README names. */
const TSCONFIG = {
  compilerOptions: {
    target: 'ES2022',
    module: 'commonjs',
    strict: true,
    esModuleInterop: true,
    skipLibCheck: true,
    outDir: 'dist',
    experimentalDecorators: true,
    emitDecoratorMetadata: true,
  },
  include: ['main.ts'],
};

let db: TestSchema;
let work: string;

beforeAll(async () => {
  db = await createTestSchema('readme_quickstart');
  work = mkdtempSync(join(tmpdir(), 'readme-quickstart-'));
});
afterAll(async () => {
  await db?.drop();
  if (work) rmSync(work, { recursive: true, force: true });
});

describe('README Quickstart', () => {
  it('compiles and runs as written against the packed package, storing the row encrypted', async () => {
    const tarball = await sharedPackage(inject('packageDir'));
    const app = join(work, 'app');
    mkdirSync(app);
    writeFileSync(
      join(app, 'package.json'),
      JSON.stringify({
        name: 'quickstart-app',
        private: true,
        dependencies: { 'typeorm-envelope': tarball },
      }),
    );
    writeFileSync(join(app, 'tsconfig.json'), JSON.stringify(TSCONFIG, null, 2));
    writeFileSync(join(app, 'main.ts'), quickstartSource());
    installTarball(app, tarball);
    compileTypeScript(app);

    // The program's own tables go into the test's schema (search_path), not into public.
    const separator = db.url.includes('?') ? '&' : '?';
    const url = `${db.url}${separator}options=${encodeURIComponent(`-c search_path=${db.schema}`)}`;
    const masterKey = randomBytes(32).toString('base64');
    const { stdout, stderr } = run(process.execPath, ['dist/main.js'], {
      cwd: app,
      env: { ...process.env, DATABASE_URL: url, MASTER_KEY: masterKey },
    });

    // What the application read back.
    expect(stdout).toContain('ada@example.com London');
    expect(`${stdout}${stderr}`).not.toContain(masterKey);

    // What the database holds: sidecar columns only, no plaintext anywhere in the row.
    const rows = await rawQuery<Record<string, unknown>>(db.url, `SELECT * FROM "${db.schema}".customer`);
    expect(rows).toHaveLength(1);
    const [row] = rows as [Record<string, unknown>];
    expect(Object.keys(row).sort()).toEqual(
      [
        'id',
        'plan',
        'email_ciphertext',
        'email_iv',
        'email_wrapped_key',
        'email_key_version',
        'address_ciphertext',
        'address_iv',
        'address_wrapped_key',
        'address_key_version',
      ].sort(),
    );
    expect(row.plan).toBe('pro');
    expect(row.email_key_version).toBe(1);
    expect(row.email_ciphertext).toBeInstanceOf(Buffer);
    const stored = Buffer.concat(Object.values(row).filter((v): v is Buffer => Buffer.isBuffer(v))).toString(
      'latin1',
    );
    expect(stored).not.toContain('ada@example.com');
    expect(stored).not.toContain('London');
  }, 300_000);
});
