import { ConfigError } from '../errors';

/**
 * Loads an optional peer dependency when the provider that needs it is built, so the library (and
 * its type declarations) work without it. A missing package is a `ConfigError` naming the package
 * to install; any other failure to load it is rethrown as it is.
 */
export function loadOptionalDependency<T>(name: string, needer: string): T {
  try {
    return require(name) as T;
  } catch (error) {
    const missing =
      (error as NodeJS.ErrnoException)?.code === 'MODULE_NOT_FOUND' &&
      String((error as Error).message).includes(`'${name}'`);
    if (!missing) throw error;
    throw new ConfigError(
      `${needer} needs the optional peer dependency ${name}: npm install ${name}`,
      {},
      { cause: error },
    );
  }
}
