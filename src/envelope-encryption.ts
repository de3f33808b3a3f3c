import type { DataSource, EntityMetadata } from 'typeorm';
import type { ValueBinding } from './crypto/associated-data';
import type { ValueType } from './crypto/codec';
import { ConfigError, withErrorContext } from './errors';
import { FieldEncryptor, type SealedValue } from './field-encryptor';
import { DataKeyCache, type DataKeyCacheOptions } from './keys/data-key-cache';
import { Keyring, type KeyringEntry } from './keys/keyring';
import { KeyRegistry } from './rotation/key-registry';
import {
  checkRegistryWatchOptions,
  type RegistryWatchOptions,
  watchRegistry,
} from './rotation/registry-watcher';
import { type EncryptedColumns, installEncryptedColumns } from './typeorm/encrypted-columns';
import { PropertyStateStore } from './typeorm/property-state';
import { guardEntity } from './typeorm/query-guards';
import { SidecarLoader } from './typeorm/sidecar-loader';
import { EncryptionSubscriber } from './typeorm/subscriber';

/** Options of {@link EnvelopeEncryption}. */
export interface EnvelopeEncryptionOptions {
  /** The master-key versions; each wraps the data keys stored with its version number. */
  keys: KeyringEntry[];
  /** The version that wraps new data keys. */
  activeVersion: number;
  /**
   * Names this keyring in every wrapped data key (the KMS encryption context), so a wrapped key
   * taken from another application's keyring does not unwrap here. A non-empty string; default
   * `'default'`. Changing it makes every stored value unreadable (its data keys were wrapped under
   * the old id).
   */
  keyringId?: string;
  /** Bounds of the in-memory data-key cache. */
  cache?: DataKeyCacheOptions;
  /**
   * Follow the key registry (the `TypeormEnvelopeKeyRegistry` migration's tables), when they exist:
   * the registry's active version wins over `activeVersion`, re-read every `refreshInterval` (a
   * finite number of ms, at least 1,000; default 60,000). An instance not configured with the
   * registry's active version writes with its newest version that the registry records and has not
   * retired, or, with none, refuses writes (`ConfigError`) until the two agree. Without the tables,
   * `activeVersion` decides.
   */
  registry?: RegistryWatchOptions | boolean;
}

/** Options of {@link EnvelopeEncryption.attach}. */
export interface AttachOptions {
  /**
   * Validate the master keys (see {@link EnvelopeEncryption.validate}) when the DataSource
   * initializes, so a missing, disabled or wrong key fails at start-up rather than on the first
   * write. Default `true`.
   */
  validate?: boolean;
}

/**
 * How a version's master key compares with the key registry's record of it:
 * - `matches`: the registry recorded this version with this very key;
 * - `not-recorded`: the registry has no record of this version yet (it is recorded by the next
 *   `KeyRegistry.sync()`, e.g. `typeorm-envelope validate` or `activate`);
 * - `absent`: this instance has read no key registry (the `TypeormEnvelopeKeyRegistry` migration's
 *   tables do not exist), so nothing tells it whether this key is the one other instances use.
 *
 * A key that differs from its record is not a status: validation fails with a `ConfigError`.
 */
export type RegistryCheck = 'matches' | 'not-recorded' | 'absent';

/** The outcome of validating one master-key version. */
export interface KeyValidation {
  /** The master-key version. */
  version: number;
  /** Whether it is the active version (validated with a full generate/unwrap round trip). */
  active: boolean;
  /** The provider kind (`local`, `aws-kms`, …). */
  kind: string;
  /** The key's reference (KMS key ARN, or fingerprint of a customer-provided key), never the key. */
  keyReference: string;
  /** How the key compares with the key registry's record of this version. */
  registry: RegistryCheck;
}

const attached = new WeakSet<DataSource>();

/** An entity with encrypted properties, as installed in one DataSource. */
export interface EncryptedEntity {
  metadata: EntityMetadata;
  columns: readonly EncryptedColumns[];
}

/**
 * Envelope encryption for TypeORM: values are sealed with AES-256-GCM under data keys, and the
 * data keys are wrapped by the customer's master key.
 *
 * @example
 * ```ts
 * const encryption = new EnvelopeEncryption({
 *   keys: [{ version: 1, provider: new LocalKeyProvider({ key: process.env.MASTER_KEY! }) }],
 *   activeVersion: 1,
 * });
 * const dataSource = new DataSource({ type: 'postgres', url, entities: [Customer] });
 * encryption.attach(dataSource); // before initialize()
 * await dataSource.initialize();
 * ```
 */
export class EnvelopeEncryption {
  readonly keyring: Keyring;
  readonly cache: DataKeyCache;
  readonly #encryptor: FieldEncryptor;
  readonly #installed = new WeakMap<DataSource, Map<EntityMetadata, EncryptedColumns[]>>();
  readonly #registry: RegistryWatchOptions | undefined;

  constructor(options: EnvelopeEncryptionOptions) {
    if (!options || typeof options !== 'object') throw new ConfigError('EnvelopeEncryption needs options');
    this.keyring = new Keyring(options.keys, options.activeVersion, options.keyringId);
    this.cache = new DataKeyCache(this.keyring, options.cache);
    this.#encryptor = new FieldEncryptor(this.cache);
    this.#registry = options.registry === true ? {} : options.registry || undefined;
    if (this.#registry) checkRegistryWatchOptions(this.#registry);
  }

  /**
   * Makes `dataSource` encrypt and decrypt its `@Encrypted()` properties. Call it before
   * `initialize()`: `initialize()` then installs encryption once TypeORM has built its metadata,
   * reads the key registry's recorded key references (when its tables exist), validates the keys
   * (unless `validate: false`) and starts following the registry (with the `registry` option), and
   * fails if any of that fails.
   *
   * A DataSource that is already initialized is refused with a `ConfigError`: none of those steps
   * could run before its first query. With NestJS, attach in `dataSourceFactory`, before
   * `dataSource.initialize()`.
   */
  attach(dataSource: DataSource, options: AttachOptions = {}): this {
    if (attached.has(dataSource)) {
      throw new ConfigError('an EnvelopeEncryption is already attached to this DataSource');
    }
    if (dataSource.isInitialized) {
      throw new ConfigError(
        'attach() needs a DataSource that is not initialized yet: call encryption.attach(dataSource) before ' +
          'dataSource.initialize(), so that initialize() validates the keys, checks them against the key ' +
          'registry and follows it before any query runs',
      );
    }
    attached.add(dataSource);
    const encryption = this;
    const store = new PropertyStateStore();
    const columns = new Map<EntityMetadata, EncryptedColumns[]>();
    this.#installed.set(dataSource, columns);
    const subscriber = new EncryptionSubscriber(
      (metadata) => columns.get(metadata),
      this.#encryptor,
      store,
      new SidecarLoader(store),
    );
    const install = () => {
      columns.clear();
      for (const metadata of dataSource.entityMetadatas) {
        const found = installEncryptedColumns(metadata, store);
        if (!found.length) continue;
        columns.set(metadata, found);
        guardEntity(metadata, found);
        subscriber.openBeforeListeners(metadata, found);
      }
      if (!dataSource.subscribers.includes(subscriber)) dataSource.subscribers.push(subscriber);
    };
    /* initialize() rebuilds metadata and subscribers; install right after it has. */
    const target = dataSource as unknown as { buildMetadatas(): Promise<void> };
    const buildMetadatas = target.buildMetadatas;
    const validate = options.validate ?? true;
    target.buildMetadatas = async function (this: unknown) {
      await buildMetadatas.call(this);
      install();
      /* Recorded references first: validation and every first use compare the keys with them. */
      await new KeyRegistry(dataSource, encryption).loadReferences();
      if (validate) await encryption.validate();
      if (encryption.#registry) await encryption.#watch(dataSource, encryption.#registry);
    };
    return this;
  }

  /** Follows the registry's active version until the DataSource is destroyed. */
  async #watch(dataSource: DataSource, options: RegistryWatchOptions): Promise<void> {
    const stop = await watchRegistry(dataSource, this, options);
    const destroy = dataSource.destroy;
    dataSource.destroy = function (this: DataSource) {
      stop();
      return destroy.call(this);
    };
  }

  /**
   * Checks every configured master-key version: first that its master key is the one the key
   * registry recorded for that version (a different key is a `ConfigError` naming the version and
   * both references), then the active one with a full round trip (generate a data key, unwrap
   * it), the others without using them (KMS `DescribeKey`: exists, enabled, symmetric). Throws at
   * the first failure, naming the version, the key and the check that failed. Each result says
   * how the key compares with the registry (`registry: 'absent'` when there is none).
   */
  async validate(): Promise<KeyValidation[]> {
    const results: KeyValidation[] = [];
    for (const version of this.keyring.versions) {
      const active = version === this.keyring.activeVersion;
      results.push(await this.#validateVersion(version, active));
    }
    return results;
  }

  /**
   * Makes `version` the one new data keys are wrapped with, after validating it (its recorded key
   * reference, then a full round trip). Values already stored keep their version until they are
   * re-wrapped.
   */
  async activate(version: number): Promise<KeyValidation> {
    const result = await this.#validateVersion(version, true);
    this.keyring.activate(version);
    return result;
  }

  async #validateVersion(version: number, roundTrip: boolean): Promise<KeyValidation> {
    const provider = this.keyring.provider(version);
    try {
      await this.keyring.checkedProvider(version);
      if (roundTrip) await provider.validate(this.keyring.context);
      else await provider.checkKey();
    } catch (error) {
      throw withErrorContext(error, { keyVersion: version, keyId: provider.describe().keyReference });
    }
    const registry: RegistryCheck = !this.keyring.registryRead
      ? 'absent'
      : this.keyring.recordedReference(version) === undefined
        ? 'not-recorded'
        : 'matches';
    return { version, active: roundTrip, ...provider.describe(), registry };
  }

  /**
   * The entities of `dataSource` that have encrypted properties, with their columns, once the
   * DataSource is initialized. For rotation and maintenance tools.
   */
  encryptedEntities(dataSource: DataSource): EncryptedEntity[] {
    const installed = this.#installed.get(dataSource);
    if (!installed || !dataSource.isInitialized) {
      throw new ConfigError(
        'this EnvelopeEncryption is not attached to that DataSource, or it is not initialized',
      );
    }
    return [...installed].map(([metadata, columns]) => ({ metadata, columns }));
  }

  /**
   * Whether {@link attach} was called with `dataSource` on this EnvelopeEncryption (initialized or
   * not yet). For tools handed several DataSources, such as a read replica beside the primary.
   */
  isAttachedTo(dataSource: DataSource): boolean {
    return this.#installed.has(dataSource);
  }

  /** The field encryptor, for rotation and maintenance tools. */
  get encryptor(): FieldEncryptor {
    return this.#encryptor;
  }

  /** Encrypts one value outside TypeORM, for the place `binding` names. */
  encryptValue(value: unknown, binding: ValueBinding, type?: ValueType): Promise<SealedValue> {
    return this.#encryptor.seal(value, binding, type);
  }

  /** Decrypts a value made by {@link encryptValue} (or stored by the TypeORM integration). */
  decryptValue(sealed: SealedValue, binding: ValueBinding): Promise<unknown> {
    return this.#encryptor.open(sealed, binding);
  }

  /**
   * Drops and zeroes every cached data key, so a revoked master key stops decrypting at once
   * instead of when the cached keys expire.
   */
  purgeCache(): void {
    this.cache.purge();
  }

  /** Key-provider calls made so far: data keys generated and unwrapped. */
  get providerCalls(): { generated: number; unwrapped: number } {
    return { ...this.cache.stats };
  }
}
