import { ConfigError, IntegrityError, UnknownKeyVersionError } from '../errors';
import type { EncryptionContext, KeyProvider } from './key-provider';
import type { KeyScope } from './key-scope';

/**
 * Versions of the application's own keyring are below this; tenant key versions are allocated
 * from it upwards (see the tenant registry), so that a stored version names one key only.
 */
export const FIRST_TENANT_KEY_VERSION = 1_000_000;

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
export class Keyring implements KeyScope {
  readonly #providers = new Map<number, KeyProvider>();
  /** Key references a key registry recorded, by version. */
  readonly #recorded = new Map<number, string>();
  /** The comparison of each version's provider with its recorded reference, made once. */
  readonly #checks = new Map<number, { reference: string; check: Promise<void> }>();
  #registryRead = false;
  #active: number;
  #writeRefusal: ConfigError | undefined;
  /** The encryption context bound into every wrapped data key of this keyring. */
  readonly context: EncryptionContext;
  /** The keyring's own rows share one cache partition. */
  readonly cacheId = '';

  constructor(
    entries: readonly KeyringEntry[],
    activeVersion: number,
    readonly keyringId = 'default',
  ) {
    if (!Array.isArray(entries) || entries.length === 0) {
      throw new ConfigError('the keyring needs at least one key version');
    }
    if (typeof keyringId !== 'string' || keyringId === '') {
      throw new ConfigError(`keyringId must be a non-empty string, got ${describeValue(keyringId)}`);
    }
    for (const [index, entry] of entries.entries()) {
      if (!entry || typeof entry !== 'object' || Array.isArray(entry)) {
        throw new ConfigError(
          `key version entry ${index + 1} must be an object { version, provider }, got ${describeValue(entry)}`,
        );
      }
      const { version, provider } = entry;
      if (!Number.isSafeInteger(version) || version < 1) {
        throw new ConfigError(`key version must be a positive integer, got ${String(version)}`);
      }
      if (version >= FIRST_TENANT_KEY_VERSION) {
        throw new ConfigError(
          `key version must be below ${FIRST_TENANT_KEY_VERSION} (versions from there on are tenant keys), got ${version}`,
        );
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

  /** Makes `version` the active one (it must be configured); lifts a refusal of writes. */
  activate(version: number): void {
    this.#active = this.#checkedVersion(version, 'version to activate');
    this.#writeRefusal = undefined;
  }

  /**
   * Refuses every new encryption with `error` (reads keep working) until a version is activated:
   * set when no configured version is one the other instances can read (see the registry watch).
   */
  refuseWrites(error: ConfigError): void {
    this.#writeRefusal = error;
  }

  /** Why new encryptions are refused, if they are (see {@link refuseWrites}). */
  get writeRefusal(): ConfigError | undefined {
    return this.#writeRefusal;
  }

  /** The application's keyring refuses no read by its state: a key that fails, fails its values. */
  get readRefusal(): undefined {
    return undefined;
  }

  /** Whether `version` is configured. */
  has(version: number): boolean {
    return this.#providers.has(version);
  }

  /** The provider of `version`; an unconfigured version is an `UnknownKeyVersionError`. */
  provider(version: number): KeyProvider {
    const provider = this.#providers.get(version);
    if (!provider && version >= FIRST_TENANT_KEY_VERSION) {
      /* Only a tenant's rows hold tenant key versions: this value was put here from a tenant's row. */
      throw new IntegrityError('a tenant key version in a value that belongs to no tenant', {
        keyVersion: version,
      });
    }
    if (!provider) {
      throw new UnknownKeyVersionError(`key version ${version} is not in this keyring`, {
        keyVersion: version,
      });
    }
    return provider;
  }

  /**
   * Takes the key references a key registry recorded for its versions (the KMS key ARN, or a
   * fingerprint of a customer-provided key). From then on a version is used only once its
   * provider is shown to hold that key: see {@link checkedProvider}.
   */
  recordReferences(references: Iterable<readonly [version: number, keyReference: string]>): void {
    this.#registryRead = true;
    for (const [version, reference] of references) this.#recorded.set(version, reference);
  }

  /** Whether a key registry's references were given to this keyring (see {@link recordReferences}). */
  get registryRead(): boolean {
    return this.#registryRead;
  }

  /** The key reference a key registry recorded for `version`, if any. */
  recordedReference(version: number): string | undefined {
    return this.#recorded.get(version);
  }

  /**
   * The provider of `version`, after checking that its master key is the one the key registry
   * recorded for that version (when one did): a different key is a `ConfigError` naming the
   * version and both references, so nothing is written or read under a wrong key.
   */
  async checkedProvider(version: number): Promise<KeyProvider> {
    const provider = this.provider(version);
    const reference = this.#recorded.get(version);
    if (reference === undefined) return provider;
    let entry = this.#checks.get(version);
    if (!entry || entry.reference !== reference) {
      const made = { reference, check: compareReference(version, provider, reference) };
      this.#checks.set(version, made);
      /* A failed comparison (or a KMS call that failed) is made again at the next use. */
      made.check.catch(() => {
        if (this.#checks.get(version) === made) this.#checks.delete(version);
      });
      entry = made;
    }
    await entry.check;
    return provider;
  }

  #checkedVersion(version: number, what: string): number {
    if (!this.#providers.has(version)) {
      throw new ConfigError(`${what} ${String(version)} is not a configured key version`);
    }
    return version;
  }
}

/** A short description of a misconfigured value: its type, never its contents (it may be a key). */
function describeValue(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (value === '') return 'an empty string';
  return typeof value === 'object' ? 'an object' : `a ${typeof value}`;
}

async function compareReference(version: number, provider: KeyProvider, recorded: string): Promise<void> {
  if (await provider.hasKeyReference(recorded)) return;
  const configured = await provider.resolveKeyReference();
  throw new ConfigError(
    `the master key configured for version ${version} (${configured}) is not the one the key registry ` +
      `recorded for that version (${recorded}): data keys of version ${version} were wrapped by ${recorded}; ` +
      `configure that key for version ${version}, or give this key a new version`,
    { keyVersion: version, keyId: configured },
  );
}
