import { ConfigError, UnknownKeyVersionError } from '../errors';
import type { EncryptionContext, KeyProvider } from './key-provider';

/** One numbered master-key version. */
export interface KeyringEntry {
  /** A positive integer, stored with every data key it wraps. */
  version: number;
  /** The backend holding this version's master key. */
  provider: KeyProvider;
}

/**
 * Numbered master-key versions. Exactly one is active for new data keys; the others still unwrap
 * the data keys they wrapped, so an old key keeps working until a rotation has finished.
 */
export class Keyring {
  readonly #providers = new Map<number, KeyProvider>();
  #active: number;
  /** The encryption context bound into every wrapped data key of this keyring. */
  readonly context: EncryptionContext;

  constructor(
    entries: readonly KeyringEntry[],
    activeVersion: number,
    readonly keyringId = 'default',
  ) {
    if (!Array.isArray(entries) || entries.length === 0) {
      throw new ConfigError('the keyring needs at least one key version');
    }
    for (const { version, provider } of entries) {
      if (!Number.isSafeInteger(version) || version < 1) {
        throw new ConfigError(`key version must be a positive integer, got ${String(version)}`);
      }
      if (this.#providers.has(version)) throw new ConfigError(`key version ${version} is configured twice`);
      if (!provider || typeof provider.generateDataKey !== 'function') {
        throw new ConfigError(`key version ${version} has no key provider`);
      }
      this.#providers.set(version, provider);
    }
    this.#active = this.#checkedVersion(activeVersion, 'activeVersion');
    this.context = Object.freeze({ 'typeorm-envelope:keyring': keyringId });
  }

  /** The version new data keys are wrapped with. */
  get activeVersion(): number {
    return this.#active;
  }

  /** Every configured version, ascending. */
  get versions(): number[] {
    return [...this.#providers.keys()].sort((a, b) => a - b);
  }

  /** Makes `version` the active one (it must be configured). */
  activate(version: number): void {
    this.#active = this.#checkedVersion(version, 'version to activate');
  }

  /** Whether `version` is configured. */
  has(version: number): boolean {
    return this.#providers.has(version);
  }

  /** The provider of `version`; an unconfigured version is an `UnknownKeyVersionError`. */
  provider(version: number): KeyProvider {
    const provider = this.#providers.get(version);
    if (!provider) {
      throw new UnknownKeyVersionError(`key version ${version} is not in this keyring`, {
        keyVersion: version,
      });
    }
    return provider;
  }

  #checkedVersion(version: number, what: string): number {
    if (!this.#providers.has(version)) {
      throw new ConfigError(`${what} ${String(version)} is not a configured key version`);
    }
    return version;
  }
}
