// Writes dist/index.mjs: an ES module entry that re-exports the CommonJS build's named exports,
// so `import { Encrypted } from 'typeorm-envelope'` and `require('typeorm-envelope')` both work.

import { writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const names = Object.keys(require('../dist/src/index.js')).filter((name) => name !== '__esModule');
const source = ["import cjs from './src/index.js';", `export const { ${names.join(', ')} } = cjs;`, ''].join(
  '\n',
);
writeFileSync(new URL('../dist/index.mjs', import.meta.url), source);
console.log(`dist/index.mjs: ${names.length} exports`);
