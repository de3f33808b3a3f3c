import type { DataSource } from 'typeorm';
import type { EnvelopeEncryption } from '../envelope-encryption';
import { ConfigError } from '../errors';
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
 * registry names a version this instance is not configured with, or configured with another master
 * key than the one recorded for it, the instance writes with the newest version it has (that is
 * not known to be wrong) and warns, so it never writes with a version the others cannot read.
 * Each read also hands the recorded key references to the keyring, which refuses to use a version
 * whose master key differs from its record. Returns a function that stops the watch. The timer
 * never keeps the process alive.
 */
export async function watchRegistry(
  dataSource: DataSource,
  encryption: EnvelopeEncryption,
  options: RegistryWatchOptions = {},
): Promise<() => void> {
  const registry = new KeyRegistry(dataSource, encryption);
  const warn = options.warn ?? ((message: string) => console.warn(message));
  let warned: string | undefined;
  const warnOnce = (what: string, message: string) => {
    if (warned === what) return;
    warned = what;
    warn(message);
  };
  const apply = async () => {
    if (!dataSource.isInitialized) return;
    const records = await registry.loadReferences();
    const named = records.find((r) => r.state === 'active')?.version;
    if (named === undefined) return;
    const { keyring } = encryption;
    if (keyring.has(named)) {
      const mismatch = await keyring.checkedProvider(named).then(
        () => undefined,
        (error: unknown) => (error instanceof ConfigError ? error : Promise.reject(error)),
      );
      if (!mismatch) {
        keyring.activate(named);
        warned = undefined;
        return;
      }
      warnOnce(
        `wrong:${named}`,
        `typeorm-envelope: the key registry names version ${named} active, but this instance's master key for it ` +
          `is not the recorded one (${mismatch.detail}); writing with version ${keyring.activeVersion} ` +
          'until the configuration is fixed',
      );
      return;
    }
    const newest = Math.max(...keyring.versions);
    keyring.activate(newest);
    warnOnce(
      `missing:${named}`,
      `typeorm-envelope: the key registry names version ${named} active, but this instance is not configured ` +
        `with it; writing with version ${newest} until the configuration is updated`,
    );
  };
  await apply();
  const timer = setInterval(() => {
    apply().catch(() => undefined); // a failed read keeps the version this instance has
  }, options.refreshInterval ?? 60_000);
  timer.unref();
  return () => clearInterval(timer);
}
