import type { DataSource, EntityMetadata, EntityTarget, ObjectLiteral } from 'typeorm';
import type { ValueBinding } from './crypto/associated-data';
import type { ValueType } from './crypto/codec';
import { ConfigError, withErrorContext } from './errors';
import { FieldEncryptor, type SealedValue } from './field-encryptor';
import {
  type AzureKeyVaultTenantOptions,
  azureKeyVaultKeyFactory,
} from './keys/azure-key-vault-tenant-key-factory';
import { DataKeyCache, type DataKeyCacheOptions } from './keys/data-key-cache';
import { type GcpKmsTenantOptions, gcpKmsKeyFactory } from './keys/gcp-kms-tenant-key-factory';
import { IndexKeys } from './keys/index-keys';
import type { KeyScope } from './keys/key-scope';
import { Keyring, type KeyringEntry } from './keys/keyring';
import {
  type AwsKmsTenantOptions,
  awsKmsKeyFactory,
  customerKeyFactory,
  TenantKeyFactories,
  type TenantKeyFactory,
} from './keys/tenant-key-factories';
import { type TenantKeyRecord, TenantKeyrings, type TenantRecord } from './keys/tenant-keyrings';
import {
  type VaultTransitTenantOptions,
  vaultTransitKeyFactory,
} from './keys/vault-transit-tenant-key-factory';
import { describeError } from './rotation/describe-error';
import { KeyRegistry } from './rotation/key-registry';
import {
  checkRegistryWatchOptions,
  type RegistryWatchOptions,
  watchRegistry,
} from './rotation/registry-watcher';
import { TenantAdmin } from './tenants/tenant-admin';
import { TenantRegistry } from './tenants/tenant-registry';
import { attachBlindIndexes, type BlindIndexHelperOptions, blindIndexesOf } from './typeorm/blind-index';
import { DataKeyTable } from './typeorm/data-key-table';
import { type EncryptedColumns, installEncryptedColumns } from './typeorm/encrypted-columns';
import { PropertyStateStore } from './typeorm/property-state';
import { guardEntity } from './typeorm/query-guards';
import { SidecarLoader } from './typeorm/sidecar-loader';
import { EncryptionSubscriber } from './typeorm/subscriber';

/** Options of tenant keys (see `encryption.tenants` and `@EncryptionTenant()`). */
export interface TenantKeysOptions {
  /**
   * How this application reaches KMS and STS for tenants' `aws-kms` keys (endpoint, credentials
   * that call `AssumeRole`, timeouts…). The key, role, External ID and region come from each
   * tenant's record.
   */
  awsKms?: AwsKmsTenantOptions;
  /**
   * How this application reaches Azure Key Vault for tenants' `azure-key-vault` keys: its
   * `credential` (default `DefaultAzureCredential`, one for all tenants), timeouts, retries. The key
   * comes from each tenant's record.
   */
  azureKeyVault?: AzureKeyVaultTenantOptions;
  /**
   * How this application reaches Google Cloud KMS for tenants' `gcp-kms` keys: its `authClient`
   * (default application default credentials; one client for all tenants), endpoint, timeouts,
   * retries. The key comes from each tenant's record.
   */
  gcpKms?: GcpKmsTenantOptions;
  /**
   * How this application reaches tenants' Vault or OpenBao Transit keys (`vault-transit`): its
   * `auth` (one for all tenants, with the `addresses` tenants may name, or a function giving each
   * tenant's own), timeouts, retries. The server, mount, namespace and key come from each tenant's
   * record; credentials are never stored.
   */
  vaultTransit?: VaultTransitTenantOptions;
  /** Factories of further key kinds (or replacements of the built-in `customer-key` and `aws-kms`). */
  factories?: readonly TenantKeyFactory[];
  /**
   * How often the tenant registry is read again, in ms (at least 1,000). Default: the `registry`
   * option's `refreshInterval`, else 60,000. A tenant key added, activated or offboarded by another
   * instance is used here within this time.
   */
  refreshInterval?: number;
  /**
   * How many tenant keys are held in memory at most, ready to use: a customer-provided key
   * unwrapped, a KMS client behind a tenant's role. Default 1,000. Each is also rebuilt from its
   * record after the cache's `unwrappedKeyTtl`; the least recently used leave first (a
   * customer-provided key is zeroed).
   */
  maxTenantKeys?: number;
}

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
  /**
   * Tenant keys: rows of entities with an `@EncryptionTenant()` column are sealed under their
   * tenant's own key when the tenant registry records one (see {@link EnvelopeEncryption.tenants}),
   * else under this keyring, with the tenant bound in either way.
   */
  tenantKeys?: TenantKeysOptions;
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
  /** Every tenant's keys, as the tenant registry records them. */
  readonly tenantKeyrings: TenantKeyrings;
  readonly cache: DataKeyCache;
  /** The index keys of searchable properties held in memory (bounded like unwrapped data keys). */
  readonly indexKeys: IndexKeys;
  readonly #encryptor: FieldEncryptor;
  readonly #installed = new WeakMap<DataSource, Map<EntityMetadata, EncryptedColumns[]>>();
  /** The data-key table of each DataSource (compact layout), made on first use. */
  readonly #dataKeys = new WeakMap<DataSource, DataKeyTable>();
  readonly #registry: RegistryWatchOptions | undefined;
  readonly #tenantRefreshInterval: number;
  /** The first DataSource attached: the one `tenants` works on. */
  #primary: DataSource | undefined;

  constructor(options: EnvelopeEncryptionOptions) {
    if (!options || typeof options !== 'object') throw new ConfigError('EnvelopeEncryption needs options');
    this.keyring = new Keyring(options.keys, options.activeVersion, options.keyringId);
    this.cache = new DataKeyCache(this.keyring, options.cache);
    const tenantKeys = options.tenantKeys ?? {};
    this.tenantKeyrings = new TenantKeyrings(
      this.keyring,
      new TenantKeyFactories([
        customerKeyFactory(),
        awsKmsKeyFactory(tenantKeys.awsKms),
        azureKeyVaultKeyFactory(tenantKeys.azureKeyVault),
        vaultTransitKeyFactory(tenantKeys.vaultTransit),
        gcpKmsKeyFactory(tenantKeys.gcpKms),
        ...(tenantKeys.factories ?? []),
      ]),
      {
        maxProviders: checkedCount('tenantKeys.maxTenantKeys', tenantKeys.maxTenantKeys),
        providerTtl: options.cache?.unwrappedKeyTtl,
      },
    );
    /* However this instance learns of an offboarding, the tenant's cached keys stop working then. */
    this.tenantKeyrings.onOffboarded = (tenantId) => this.purgeCache(tenantId);
    this.#encryptor = new FieldEncryptor(this.cache, (tenant) =>
      tenant === undefined ? undefined : this.tenantKeyrings.scope(tenant),
    );
    this.#registry = options.registry === true ? {} : options.registry || undefined;
    if (this.#registry) checkRegistryWatchOptions(this.#registry);
    this.#tenantRefreshInterval = tenantKeys.refreshInterval ?? this.#registry?.refreshInterval ?? 60_000;
    checkRegistryWatchOptions({ refreshInterval: this.#tenantRefreshInterval });
    /* Index-key versions are followed as tenants are: a rotation elsewhere is seen within the interval. */
    this.indexKeys = new IndexKeys({
      ttl: options.cache?.unwrappedKeyTtl ?? 30 * 60_000,
      max: options.cache?.maxUnwrappedKeys ?? 1_000,
      refreshInterval: this.#tenantRefreshInterval,
    });
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
    this.#primary ??= dataSource;
    const encryption = this;
    const store = new PropertyStateStore();
    const columns = new Map<EntityMetadata, EncryptedColumns[]>();
    this.#installed.set(dataSource, columns);
    const subscriber = new EncryptionSubscriber(
      (metadata) => columns.get(metadata),
      this.#encryptor,
      store,
      new SidecarLoader(store),
      this.#dataKeysOf(dataSource),
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
      subscriber.openBeforeSubscribers(dataSource.subscribers);
      attachBlindIndexes(dataSource, columns, {
        indexKeys: encryption.indexKeys,
        keyringId: encryption.keyring.keyringId,
        scopeOf: (tenant) => encryption.keyScope(tenant),
        plaintextOf: (value) => store.originOf(value),
      });
    };
    /* initialize() rebuilds metadata and subscribers; install right after it has. */
    const target = dataSource as unknown as { buildMetadatas(): Promise<void> };
    const buildMetadatas = target.buildMetadatas;
    const validate = options.validate ?? true;
    target.buildMetadatas = async function (this: unknown) {
      await buildMetadatas.call(this);
      install();
      /* A compact property needs a server that serves a second session during a transaction. */
      if (
        [...columns.values()].some((found) =>
          found.some((c) => c.layout === 'compact' || c.migrateFrom === 'compact'),
        )
      )
        await encryption.#dataKeysOf(dataSource).checkServer();
      /* Recorded references first: validation and every first use compare the keys with them. */
      await new KeyRegistry(dataSource, encryption).loadReferences();
      await encryption.#followTenants(dataSource);
      if (validate) await encryption.validate();
      if (encryption.#registry)
        encryption.#onDestroy(dataSource, await watchRegistry(dataSource, encryption, encryption.#registry));
    };
    return this;
  }

  /** The data-key table of `dataSource`, closed with it. */
  #dataKeysOf(dataSource: DataSource): DataKeyTable {
    let table = this.#dataKeys.get(dataSource);
    if (!table) {
      const created = new DataKeyTable(dataSource, this.cache);
      this.#dataKeys.set(dataSource, created);
      const destroy = dataSource.destroy;
      dataSource.destroy = async function (this: DataSource) {
        await created.close();
        return destroy.call(this);
      };
      table = created;
    }
    return table;
  }

  /** Runs `stop` when the DataSource is destroyed. */
  #onDestroy(dataSource: DataSource, stop: () => void): void {
    const destroy = dataSource.destroy;
    dataSource.destroy = function (this: DataSource) {
      stop();
      return destroy.call(this);
    };
  }

  /**
   * Reads the tenant registry (when its tables exist) and follows it: every `refreshInterval`, and
   * at once for a key version this instance has not seen (another instance added it).
   */
  async #followTenants(dataSource: DataSource): Promise<void> {
    if (dataSource !== this.#primary) return;
    const registry = new TenantRegistry(dataSource, this);
    const admin = new TenantAdmin(dataSource, this);
    await admin.refresh();
    this.tenantKeyrings.resolver = async (version) =>
      dataSource.isInitialized && (await registry.exists()) ? registry.readVersion(version) : undefined;
    const warn = this.#registry?.warn ?? ((message: string) => console.warn(message));
    let failing = false;
    const timer = setInterval(() => {
      if (!dataSource.isInitialized) return;
      /* A failed read keeps what this instance has; it is said once, not at every interval. */
      admin.refresh().then(
        () => {
          failing = false;
        },
        (error: unknown) => {
          if (!failing)
            warn(
              `typeorm-envelope: reading the tenant registry failed (${describeError(error)}); keeping the tenant keys read before`,
            );
          failing = true;
        },
      );
    }, this.#tenantRefreshInterval);
    timer.unref();
    this.#onDestroy(dataSource, () => clearInterval(timer));
  }

  /**
   * Tenant keys at run time: add, validate, activate, list, offboard (see {@link TenantAdmin}).
   * Works on the first DataSource attached; needs the tenant registry's tables.
   */
  get tenants(): TenantAdmin {
    if (!this.#primary) throw new ConfigError('encryption.tenants needs a DataSource: attach() one first');
    return new TenantAdmin(this.#primary, this);
  }

  /** The tenant API working on `dataSource` (for tools given several DataSources). */
  tenantsOf(dataSource: DataSource): TenantAdmin {
    return new TenantAdmin(dataSource, this);
  }

  /** The key scope of a tenant's values (`undefined` or `null`: the application keyring's own). */
  keyScope(tenant?: string | null): KeyScope {
    return tenant === undefined || tenant === null ? this.keyring : this.tenantKeyrings.scope(tenant);
  }

  /**
   * Takes tenant records as the registry holds them (all, or one tenant's with `onlyTenant`), as
   * read by the read `tenantKeyrings.beginRead()` numbered; the cached keys of tenants that were
   * offboarded, or whose keys changed, are dropped and zeroed.
   */
  applyTenantRecords(
    tenants: readonly TenantRecord[],
    keys: readonly TenantKeyRecord[],
    onlyTenant?: string,
    read?: number,
  ): void {
    this.tenantKeyrings.update(tenants, keys, onlyTenant, read);
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

  /**
   * Encrypts one value outside TypeORM as a compact (format 2) value for the place `binding`
   * names: its data key's row is committed in `dataSource`'s data-key table before this resolves.
   * For maintenance jobs that write compact columns themselves.
   */
  async sealCompact(
    dataSource: DataSource,
    value: unknown,
    binding: ValueBinding,
    type?: ValueType,
  ): Promise<Buffer> {
    const sealed = await this.#encryptor.sealCompact(value, binding, type, this.#dataKeysOf(dataSource));
    return sealed.ciphertext;
  }

  /** Decrypts a value made by {@link encryptValue} (or stored by the TypeORM integration). */
  decryptValue(sealed: SealedValue, binding: ValueBinding): Promise<unknown> {
    return this.#encryptor.open(sealed, binding);
  }

  /**
   * Drops and zeroes every cached data key (with `tenantId`, only that tenant's, and the
   * customer-provided key unwrapped for it), so a revoked master key stops decrypting at once
   * instead of when the cached keys expire. Other tenants' cached keys are left alone.
   */
  purgeCache(tenantId?: string): void {
    this.indexKeys.purge(tenantId === undefined ? undefined : TenantKeyrings.cachePrefix(tenantId));
    if (tenantId === undefined) {
      this.cache.purge();
      this.tenantKeyrings.forget();
      return;
    }
    this.cache.purge(TenantKeyrings.cachePrefix(tenantId));
    this.tenantKeyrings.forget(tenantId);
  }

  /**
   * The blind indexes that match `value` in the searchable `property` of `entity`, for query-builder
   * conditions written as strings (object conditions are rewritten without it): one per index key
   * queries match (two while an index key is rotated), to compare with `= ANY(…)`. A tenant
   * entity's query must fix the same tenant as `options.tenant`.
   *
   * @example
   * ```ts
   * const emails = await encryption.blindIndex(Contact, 'email', 'ada@example.com', { tenant: 'ws-1' });
   * await dataSource.getRepository(Contact).createQueryBuilder('c')
   *   .where('c.workspaceId = :ws AND c.email_bidx = ANY(:emails)', { ws: 'ws-1', emails })
   *   .getMany();
   * ```
   */
  blindIndex(
    entity: EntityTarget<ObjectLiteral>,
    property: string,
    value: unknown,
    options: BlindIndexHelperOptions = {},
  ): Promise<Buffer[]> {
    const dataSource = options.dataSource ?? this.#primary;
    if (!dataSource) throw new ConfigError('blindIndex() needs a DataSource: attach() one first');
    return blindIndexesOf(dataSource, entity, property, value, options);
  }

  /** Key-provider calls made so far: data keys generated and unwrapped. */
  get providerCalls(): { generated: number; unwrapped: number } {
    return { ...this.cache.stats };
  }
}

function checkedCount(name: string, value: number | undefined): number | undefined {
  if (value === undefined) return undefined;
  if (!Number.isSafeInteger(value) || value < 1 || value > 1_000_000) {
    throw new ConfigError(`${name} must be an integer from 1 to 1,000,000, got ${String(value)}`);
  }
  return value;
}
