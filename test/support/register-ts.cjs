// Lets a plain `node` child process load the TypeScript sources (tests that run the CLI or kill a
// process): `node -r ./test/support/register-ts.cjs src/cli/main.ts ...`.
// Transpiled output is cached on disk by content, and TypeScript itself is loaded only on a miss:
// most of a child process's start-up was spent there.
const { createHash } = require('node:crypto');
const { mkdirSync, readFileSync, renameSync, writeFileSync } = require('node:fs');
const { tmpdir } = require('node:os');
const { join } = require('node:path');

const cacheDir = join(tmpdir(), 'typeorm-envelope-ts-cache');
mkdirSync(cacheDir, { recursive: true });
let ts;

const compilerOptions = () => ({
  module: ts.ModuleKind.CommonJS,
  target: ts.ScriptTarget.ES2022,
  experimentalDecorators: true,
  emitDecoratorMetadata: true,
  esModuleInterop: true,
});

require.extensions['.ts'] = (module, file) => {
  const source = readFileSync(file, 'utf8');
  const key = createHash('sha256').update('v1\0').update(file).update('\0').update(source).digest('hex');
  const cached = join(cacheDir, `${key}.js`);
  let outputText;
  try {
    outputText = readFileSync(cached, 'utf8');
  } catch {
    ts ??= require('typescript');
    outputText = ts.transpileModule(source, {
      fileName: file,
      compilerOptions: compilerOptions(),
    }).outputText;
    const partial = `${cached}.${process.pid}.tmp`;
    writeFileSync(partial, outputText);
    renameSync(partial, cached);
  }
  module._compile(outputText, file);
};
