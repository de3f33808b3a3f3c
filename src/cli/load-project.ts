import { existsSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { DataSource } from 'typeorm';
import { EnvelopeEncryption } from '../envelope-encryption';
import { ConfigError } from '../errors';

/** The user's DataSource and EnvelopeEncryption, loaded from their module. */
export interface Project {
  dataSource: DataSource;
  encryption: EnvelopeEncryption;
}

/**
 * Loads a module that exports a DataSource and an EnvelopeEncryption (any export names, default
 * export included), like TypeORM's CLI `-d`. TypeScript files are compiled on the fly when the
 * `typescript` package is installed. The DataSource is initialized here.
 */
export async function loadProject(file: string): Promise<Project> {
  const path = resolve(file);
  if (!existsSync(path)) throw new ConfigError(`data source file not found: ${path}`);
  if (/\.[cm]?ts$/.test(path)) registerTypeScript();
  const loaded = (await import(path)) as Record<string, unknown>;
  const exported = [
    ...Object.values(loaded),
    ...Object.values((loaded.default as Record<string, unknown>) ?? {}),
  ];
  const dataSource =
    exported.find((v): v is DataSource => v instanceof DataSource) ??
    (loaded.default instanceof DataSource ? loaded.default : undefined);
  const encryption = exported.find((v): v is EnvelopeEncryption => v instanceof EnvelopeEncryption);
  if (!dataSource) throw new ConfigError(`${file} exports no DataSource`);
  if (!encryption) throw new ConfigError(`${file} exports no EnvelopeEncryption`);
  if (!dataSource.isInitialized) await dataSource.initialize();
  return { dataSource, encryption };
}

let registered = false;

/** Compiles required `.ts` files with the TypeScript compiler (decorator metadata included). */
function registerTypeScript(): void {
  if (registered) return;
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
  // biome-ignore lint/suspicious/noExplicitAny: Node's loader hook table is untyped
  (require as any).extensions['.ts'] = compile;
  registered = true;
}
