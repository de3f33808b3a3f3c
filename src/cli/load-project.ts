import { existsSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { DataSource } from 'typeorm';
import { EnvelopeEncryption } from '../envelope-encryption';
import { ConfigError } from '../errors';

/** The user's DataSource and EnvelopeEncryption, loaded from their module. */
export interface Project {
  dataSource: DataSource;
  encryption: EnvelopeEncryption;
  /** Absolute path of the module they came from. */
  file: string;
  /** The name `encryption` is exported under (`default` for a default export). */
  encryptionExport: string;
}

/**
 * Loads a module that exports a DataSource and an EnvelopeEncryption (any export names, default
 * export included), like TypeORM's CLI `-d`. ES modules (top-level `await` included) and CommonJS
 * modules are loaded with `import()`. TypeScript files are compiled to CommonJS on the fly (by a
 * hook already registered, such as ts-node's, else with the `typescript` package); one with
 * top-level await needs a TypeScript loader for ES modules (`node --import tsx`). Of several exported
 * DataSources (a read replica beside the primary) the one the EnvelopeEncryption is attached to is
 * used; none attached is a `ConfigError`, and so is a top-level await that never settles. The
 * DataSource is initialized unless `initialize` is false.
 */
export async function loadProject(file: string, options: { initialize?: boolean } = {}): Promise<Project> {
  const path = resolve(file);
  if (!existsSync(path)) throw new ConfigError(`data source file not found: ${path}`);
  const loaded = (await settledBeforeExit(loadModule(path, file), file)) as Record<string, unknown>;
  const exported = [
    ...Object.entries(loaded),
    ...Object.entries((loaded.default as Record<string, unknown>) ?? {}),
  ];
  if (loaded.default instanceof DataSource || loaded.default instanceof EnvelopeEncryption) {
    exported.push(['default', loaded.default]);
  }
  const dataSources = [...new Set(exported.map(([, v]) => v).filter((v) => v instanceof DataSource))];
  const encryptions = exported.filter(
    (entry): entry is [string, EnvelopeEncryption] => entry[1] instanceof EnvelopeEncryption,
  );
  if (!dataSources.length) throw new ConfigError(`${file} exports no DataSource`);
  if (!encryptions.length) throw new ConfigError(`${file} exports no EnvelopeEncryption`);
  /* A file may export other DataSources (a read replica): use the one the encryption is attached to. */
  let chosen: { dataSource: DataSource; entry: [string, EnvelopeEncryption] } | undefined;
  for (const entry of encryptions) {
    const dataSource = dataSources.find((candidate) => entry[1].isAttachedTo(candidate));
    if (dataSource) {
      chosen = { dataSource, entry };
      break;
    }
  }
  if (!chosen) {
    throw new ConfigError(
      `the EnvelopeEncryption that ${file} exports is not attached to any DataSource it exports: ` +
        'call encryption.attach(dataSource) in that file, before the DataSource is initialized',
    );
  }
  const { dataSource, entry } = chosen;
  if (options.initialize !== false && !dataSource.isInitialized) await dataSource.initialize();
  return { dataSource, encryption: entry[1], file: path, encryptionExport: entry[0] };
}

/**
 * Rejects when the process would exit before `loading` settles: an ES module whose top-level
 * `await` never settles leaves nothing for Node to run, and the CLI would otherwise end with
 * status 0 and no output.
 */
function settledBeforeExit<T>(loading: Promise<T>, file: string): Promise<T> {
  return new Promise<T>((resolvePromise, reject) => {
    const onBeforeExit = () => {
      process.off('beforeExit', onBeforeExit);
      reject(
        new ConfigError(
          `${file} never finished loading: its top-level await waits on a promise that never settles ` +
            '(nothing is left for it to wait on), so it exports nothing yet',
        ),
      );
    };
    process.on('beforeExit', onBeforeExit);
    loading.then(
      (value) => {
        process.off('beforeExit', onBeforeExit);
        resolvePromise(value);
      },
      (error: unknown) => {
        process.off('beforeExit', onBeforeExit);
        reject(error);
      },
    );
  });
}

/*
 * A real `import()`: TypeScript compiles `import()` in a CommonJS build to `require()`, which
 * cannot load an ES module with top-level await (ERR_REQUIRE_ASYNC_MODULE).
 */
const dynamicImport = new Function('specifier', 'return import(specifier)') as (
  specifier: string,
) => Promise<unknown>;

async function loadModule(path: string, file: string): Promise<unknown> {
  const url = pathToFileURL(path).href;
  if (!/\.[cm]?ts$/.test(path)) return dynamicImport(url);
  // TypeScript: compiled to CommonJS (ours or an already registered hook). Trying `import()`
  // first would leave a half-loaded entry in Node's module cache that breaks the `require()`.
  registerTypeScript();
  try {
    return require(path);
  } catch (error) {
    if (!usesTopLevelAwait(error)) throw error;
    try {
      // Works when a TypeScript loader for ES modules is registered (node --import tsx).
      return await dynamicImport(url);
    } catch (importError) {
      throw new ConfigError(
        `${file} uses top-level await, which a TypeScript file compiled to CommonJS cannot: compile it to an ES module (.mjs, or .js with "type": "module") and pass that, or run the CLI under a TypeScript loader for ES modules (node --import tsx)`,
        {},
        { cause: importError },
      );
    }
  }
}

function usesTopLevelAwait(error: unknown): boolean {
  if ((error as { code?: unknown }).code === 'ERR_REQUIRE_ASYNC_MODULE') return true;
  return error instanceof SyntaxError && /\bawait\b/.test(error.message);
}

let registered = false;

/** Compiles required `.ts` files with the TypeScript compiler (decorator metadata included). */
function registerTypeScript(): void {
  if (registered) return;
  // biome-ignore lint/suspicious/noExplicitAny: Node's loader hook table is untyped
  const extensions = (require as any).extensions as Record<string, unknown>;
  // A hook registered before us (ts-node, the test suite's) already compiles TypeScript.
  if (extensions['.ts']) {
    registered = true;
    return;
  }
  let ts: typeof import('typescript');
  try {
    ts = require('typescript');
  } catch {
    throw new ConfigError(
      'loading a .ts data source file needs the typescript package; or compile it to .js first',
    );
  }
  const compile = (module: NodeModule & { _compile(code: string, file: string): void }, file: string) => {
    const { outputText } = ts.transpileModule(readFileSync(file, 'utf8'), {
      fileName: file,
      compilerOptions: {
        module: ts.ModuleKind.CommonJS,
        target: ts.ScriptTarget.ES2022,
        experimentalDecorators: true,
        emitDecoratorMetadata: true,
        esModuleInterop: true,
      },
    });
    module._compile(outputText, file);
  };
  extensions['.ts'] = compile;
  registered = true;
}
