import type { DataSource } from 'typeorm';
import type { EnvelopeEncryption } from '../envelope-encryption';
import { ConfigError } from '../errors';
import { KeyRegistry, type KeyVersionRecord } from './key-registry';

/** The shortest `refreshInterval` (ms): a shorter one would query the registry in a tight loop. */
export const MIN_REFRESH_INTERVAL = 1_000;

/** Options of the registry watch (see `EnvelopeEncryptionOptions.registry`). */
export interface RegistryWatchOptions {
  /** How often the registry is read, in ms: finite and at least 1,000. Default 60,000. */
  refreshInterval?: number;
  /** Where warnings go. Default `console.warn`. */
  warn?: (message: string) => void;
}

/** Refuses watch options that would hammer the database or cannot be called: a `ConfigError`. */
export function checkRegistryWatchOptions(options: RegistryWatchOptions): void {
  if (!options || typeof options !== 'object') {
    throw new ConfigError('registry option must be true, false or an object { refreshInterval?, warn? }');
  }
  const { refreshInterval, warn } = options;
  if (
    refreshInterval !== undefined &&
    !(
      typeof refreshInterval === 'number' &&
      Number.isFinite(refreshInterval) &&
      refreshInterval >= MIN_REFRESH_INTERVAL
    )
  ) {
    throw new ConfigError(
      `registry option refreshInterval must be a finite number of ms, at least ${MIN_REFRESH_INTERVAL}, got ${String(refreshInterval)}`,
    );
  }
  if (warn !== undefined && typeof warn !== 'function') {
    throw new ConfigError('registry option warn must be a function');
  }
}

/**
 * Follows the registry's active version: reads it now, then every `refreshInterval`. When the
 * registry names a version this instance is not configured with, or configured with another master
 * key than the one recorded for it, the instance writes with the newest configured version that
 * the registry records, that is not retired and whose master key is the recorded one (a version
 * the other instances read), and warns. When it has none, it refuses writes with a `ConfigError`
 * naming the versions (reads keep working) until the registry and the configuration agree.
 * Each read also hands the recorded key references to the keyring, which refuses to use a version
 * whose master key differs from its record. Returns a function that stops the watch. The timer
 * never keeps the process alive.
 */
export async function watchRegistry(
  dataSource: DataSource,
  encryption: EnvelopeEncryption,
  options: RegistryWatchOptions = {},
): Promise<() => void> {
  checkRegistryWatchOptions(options);
  const registry = new KeyRegistry(dataSource, encryption);
  const warn = options.warn ?? ((message: string) => console.warn(message));
  let warned: string | undefined;
  const warnOnce = (what: string, message: string) => {
    if (warned === what) return;
    warned = what;
    warn(message);
  };
  /** Whether `version`'s configured master key is the recorded one (`false` when it differs). */
  const matchesRecord = (version: number) =>
    encryption.keyring.checkedProvider(version).then(
      () => true,
      (error: unknown) => (error instanceof ConfigError ? false : Promise.reject(error)),
    );
  /**
   * Writes with a version the others read, or refuses writes: `problem` says why the named
   * version is not used, `excluded` is that version when it is configured (with a wrong key).
   */
  const fallBack = async (records: KeyVersionRecord[], named: number, problem: string, excluded?: number) => {
    const { keyring } = encryption;
    const state = new Map(records.map((r) => [r.version, r.state]));
    const skipped: string[] = [];
    for (const version of [...keyring.versions].reverse()) {
      if (version === excluded) continue;
      const recorded = state.get(version);
      if (recorded === undefined) skipped.push(`version ${version} is not recorded in the registry`);
      else if (recorded === 'retired') skipped.push(`version ${version} is retired`);
      else if (!(await matchesRecord(version)))
        skipped.push(`version ${version}'s master key is not the recorded one`);
      else {
        keyring.activate(version);
        warnOnce(
          `${problem}:${named}:${version}`,
          `typeorm-envelope: the key registry names version ${named} active, but ${problem}; ` +
            `writing with version ${version} until the configuration is updated`,
        );
        return;
      }
    }
    const reasons = skipped.length ? `: ${skipped.reverse().join(', ')}` : '';
    const message =
      `writes are refused: the key registry names version ${named} active, but ${problem}, and no other ` +
      `configured version (${keyring.versions.join(', ')}) is one the other instances read${reasons}; ` +
      `configure version ${named} (reads keep working meanwhile)`;
    keyring.refuseWrites(new ConfigError(message, { keyVersion: named }));
    warnOnce(`refused:${problem}:${named}:${skipped.join()}`, `typeorm-envelope: ${message}`);
  };
  const apply = async () => {
    if (!dataSource.isInitialized) return;
    const records = await registry.loadReferences();
    const named = records.find((r) => r.state === 'active')?.version;
    if (named === undefined) return;
    const { keyring } = encryption;
    if (!keyring.has(named)) {
      await fallBack(records, named, 'this instance is not configured with it');
      return;
    }
    if (await matchesRecord(named)) {
      keyring.activate(named);
      warned = undefined;
      return;
    }
    await fallBack(records, named, "this instance's master key for it is not the recorded one", named);
  };
  await apply();
  const timer = setInterval(() => {
    apply().catch(() => undefined); // a failed read keeps the version this instance has
  }, options.refreshInterval ?? 60_000);
  timer.unref();
  return () => clearInterval(timer);
}
