import type { DataSource } from 'typeorm';
import type { EnvelopeEncryption } from '../envelope-encryption';
import { KeyRegistry } from './key-registry';

/** Options of the registry watch (see `EnvelopeEncryptionOptions.registry`). */
export interface RegistryWatchOptions {
  /** How often the registry is read, in ms. Default 60,000. */
  refreshInterval?: number;
  /** Where warnings go. Default `console.warn`. */
  warn?: (message: string) => void;
}

/**
 * Follows the registry's active version: reads it now, then every `refreshInterval`. When the
 * registry names a version this instance is not configured with, the instance writes with the
 * newest version it has and warns, so it never writes with a version the others cannot read.
 * Returns a function that stops the watch. The timer never keeps the process alive.
 */
export async function watchRegistry(
  dataSource: DataSource,
  encryption: EnvelopeEncryption,
  options: RegistryWatchOptions = {},
): Promise<() => void> {
  const registry = new KeyRegistry(dataSource, encryption);
  const warn = options.warn ?? ((message: string) => console.warn(message));
  let warned: number | undefined;
  const apply = async () => {
    if (!dataSource.isInitialized || !(await registry.exists())) return;
    const named = await registry.activeVersion();
    if (named === undefined) return;
    const { keyring } = encryption;
    if (keyring.has(named)) {
      keyring.activate(named);
      warned = undefined;
      return;
    }
    const newest = Math.max(...keyring.versions);
    keyring.activate(newest);
    if (warned !== named) {
      warned = named;
      warn(
        `typeorm-envelope: the key registry names version ${named} active, but this instance is not configured ` +
          `with it; writing with version ${newest} until the configuration is updated`,
      );
    }
  };
  await apply();
  const timer = setInterval(() => {
    apply().catch(() => undefined); // a failed read keeps the version this instance has
  }, options.refreshInterval ?? 60_000);
  timer.unref();
  return () => clearInterval(timer);
}
