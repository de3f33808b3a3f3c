import { LRUCache } from 'lru-cache';
import { IntegrityError, TenantOffboardedError, UnknownKeyVersionError, withErrorContext } from '../errors';
import type { EncryptionContext, KeyProvider } from './key-provider';
import { type KeyScope, TENANT_CONTEXT_KEY } from './key-scope';
import { FIRST_TENANT_KEY_VERSION, type Keyring } from './keyring';
import type { TenantKeyFactories } from './tenant-key-factories';

const MAX_SCOPES = 100_000;

/** The lifecycle state of one tenant key. */
export type TenantKeyState = 'active' | 'decrypt-only' | 'destroyed';

/** One tenant key as the tenant registry records it (never key bytes in the clear). */
export interface TenantKeyRecord {
  /** A version from {@link FIRST_TENANT_KEY_VERSION} up, unique across every tenant and keyring. */
  version: number;
  tenantId: string;
  /** The provider kind (`customer-key`, `aws-kms`, …): which factory makes its provider. */
  kind: string;
  /** A KMS key ARN, or the fingerprint of a customer-provided key. */
  keyReference: string;
  state: TenantKeyState;
  /** What the factory needs to build the provider: a KMS key and role, or a wrapped key. */
  descriptor: Readonly<Record<string, unknown>>;
}

/** One tenant as the tenant registry records it. */
export interface TenantRecord {
  tenantId: string;
  /** `offboarded`: its keys were destroyed, its rows are unreadable, its writes refused. */
  state: 'active' | 'offboarded';
  /** The tenant key new data keys are wrapped with; `null` for the application's own keyring. */
  activeVersion: number | null;
  /** The External ID its cross-account role's trust policy requires. */
  externalId: string;
}

/** Loads the record of a tenant key version this instance has not seen yet (another instance added it). */
export type TenantKeyResolver = (
  version: number,
) => Promise<{ tenant: TenantRecord; key: TenantKeyRecord } | undefined>;

/**
 * Every tenant's keys, as the tenant registry records them, and one {@link KeyScope} per tenant.
 * A tenant's scope binds the tenant into every wrapped data key, partitions the cache by tenant,
 * and resolves a stored version to exactly one key: below {@link FIRST_TENANT_KEY_VERSION} the
 * application's keyring (a tenant without a key of its own, or rows not yet moved to it), from
 * there a tenant key, which must be this tenant's. Knows nothing of any ORM.
 */
export class TenantKeyrings {
  readonly #tenants = new Map<string, TenantRecord>();
  readonly #keys = new Map<number, TenantKeyRecord>();
  /**
   * Providers built from key records, by version: a customer-provided key unwrapped, a KMS client
   * behind the tenant's role. Bounded in count and age like cached data keys (least recently used
   * first; a customer-provided key leaving is zeroed), rebuilt from the record at the next use.
   */
  readonly #providers: LRUCache<number, Promise<KeyProvider>>;
  readonly #scopes = new Map<string, TenantScope>();
  #resolver: TenantKeyResolver | undefined;
  /**
   * Called for each tenant this instance learns was offboarded, by whichever read taught it (a
   * refresh, or a key version resolved on demand), so that its cached data keys are dropped then.
   */
  onOffboarded: ((tenantId: string) => void) | undefined;
  /** Reads of the registry so far, and the read that last set each tenant read alone. */
  #reads = 0;
  readonly #readOf = new Map<string, number>();

  constructor(
    readonly vendor: Keyring,
    readonly factories: TenantKeyFactories,
    bounds: { maxProviders?: number; providerTtl?: number } = {},
  ) {
    this.#providers = new LRUCache<number, Promise<KeyProvider>>({
      max: bounds.maxProviders ?? 1_000,
      ttl: bounds.providerTtl ?? 30 * 60_000,
      ttlAutopurge: true,
      dispose: (provider, _version, reason) => {
        /* Dropped on purpose (offboarding, purge): destroyed at once by #dropProvider. Evicted or
           expired: a call may still be using it, so it is destroyed a little later. */
        if (reason !== 'delete') destroyLater(provider);
      },
    });
  }

  /** Where records of versions not seen yet are read from (the tenant registry). */
  set resolver(resolver: TenantKeyResolver | undefined) {
    this.#resolver = resolver;
  }

  /** The key scope of `tenantId`'s rows. */
  scope(tenantId: string): KeyScope {
    let scope = this.#scopes.get(tenantId);
    if (!scope) {
      /* Scopes hold no state of their own (it is in the records and the cache): a bound costs nothing. */
      if (this.#scopes.size >= MAX_SCOPES) this.#scopes.clear();
      scope = new TenantScope(this, tenantId);
      this.#scopes.set(tenantId, scope);
    }
    return scope;
  }

  /** The cache partition prefix of one tenant's scope (see `DataKeyCache.purge`). */
  static cachePrefix(tenantId: string): string {
    return `tenant\0${tenantId}\0`;
  }

  /** The encryption context of `tenantId`'s data keys under `vendor`. */
  contextOf(tenantId: string): EncryptionContext {
    return Object.freeze({ ...this.vendor.context, [TENANT_CONTEXT_KEY]: tenantId });
  }

  /** What is recorded of `tenantId`, if anything (a tenant without a record uses the application's keyring). */
  tenant(tenantId: string): TenantRecord | undefined {
    return this.#tenants.get(tenantId);
  }

  /** The recorded key of `version`, if this instance knows it. */
  key(version: number): TenantKeyRecord | undefined {
    return this.#keys.get(version);
  }

  /** Every tenant record this instance holds. */
  get tenants(): TenantRecord[] {
    return [...this.#tenants.values()];
  }

  /**
   * Numbers a read of the registry, taken before the read starts: {@link update} then never lets
   * an older read of all tenants undo a newer read of one (a key this instance just added, while a
   * periodic refresh was under way).
   */
  beginRead(): number {
    this.#reads += 1;
    return this.#reads;
  }

  /**
   * Takes the registry's records as they are now (all of them, or those of one tenant when
   * `onlyTenant` is given), as read by the read numbered `read` (default: a new one). Providers of
   * keys whose record changed or went away are dropped (and the keys they hold zeroed where the
   * provider can), so an offboarded key stops working here.
   */
  update(
    tenants: readonly TenantRecord[],
    keys: readonly TenantKeyRecord[],
    onlyTenant?: string,
    read = this.beginRead(),
  ): void {
    /* Tenants read alone after this read started keep what that newer read found. */
    const newer = (tenantId: string) => (this.#readOf.get(tenantId) ?? 0) > read;
    const inScope = (tenantId: string) =>
      (onlyTenant === undefined || tenantId === onlyTenant) && !newer(tenantId);
    if (onlyTenant !== undefined && !newer(onlyTenant)) this.#readOf.set(onlyTenant, read);
    if (onlyTenant === undefined) {
      for (const [tenantId, seen] of this.#readOf) if (seen <= read) this.#readOf.delete(tenantId);
    }
    const fresh = new Map(keys.map((k) => [k.version, k]));
    for (const [version, old] of this.#keys) {
      if (!inScope(old.tenantId)) continue;
      const next = fresh.get(version);
      if (!next || next.state === 'destroyed' || !sameDescriptor(old, next)) this.#dropProvider(version);
      if (!next) this.#keys.delete(version);
    }
    for (const key of keys) if (inScope(key.tenantId)) this.#keys.set(key.version, key);
    const offboarded = tenants.filter(
      (t) =>
        inScope(t.tenantId) &&
        t.state === 'offboarded' &&
        this.#tenants.get(t.tenantId)?.state !== 'offboarded',
    );
    for (const [tenantId] of this.#tenants) if (inScope(tenantId)) this.#tenants.delete(tenantId);
    for (const tenant of tenants) if (inScope(tenant.tenantId)) this.#tenants.set(tenant.tenantId, tenant);
    for (const tenant of offboarded) this.onOffboarded?.(tenant.tenantId);
  }

  /** Drops the providers built for `tenantId`'s keys (zeroing what they hold); the next use rebuilds them. */
  forget(tenantId?: string): void {
    for (const [version, key] of this.#keys) {
      if (tenantId === undefined || key.tenantId === tenantId) this.#dropProvider(version);
    }
  }

  /** The provider of a tenant key, built once from its record by the factory of its kind. */
  provider(record: TenantKeyRecord): Promise<KeyProvider> {
    let provider = this.#providers.get(record.version);
    if (!provider) {
      const made = this.factories
        .get(record.kind)
        .create(record.descriptor, { tenantId: record.tenantId, vendor: this.vendor });
      provider = made;
      this.#providers.set(record.version, made);
      /* A failed build (the KMS or the vendor key unreachable) is tried again at the next use. */
      made.catch(() => {
        if (this.#providers.peek(record.version) === made) this.#providers.delete(record.version);
      });
    }
    return provider;
  }

  /** The record of `version`, read from the registry when this instance has not seen it. */
  async resolve(version: number): Promise<TenantKeyRecord | undefined> {
    const known = this.#keys.get(version);
    if (known || !this.#resolver) return known;
    const read = this.beginRead();
    const found = await this.#resolver(version);
    if (!found) return undefined;
    if (!this.#keys.has(found.key.version)) {
      this.update([found.tenant], [found.key], found.tenant.tenantId, read);
    }
    return this.#keys.get(version) ?? found.key;
  }

  #dropProvider(version: number): void {
    const provider = this.#providers.peek(version);
    if (!provider) return;
    this.#providers.delete(version);
    destroy(provider);
  }
}

/** Zeroes what a provider holds (a local key) or closes it (a KMS client), once it is built. */
function destroy(provider: Promise<KeyProvider>): void {
  provider.then(
    (p) => (p as { destroy?: () => void }).destroy?.(),
    () => undefined,
  );
}

/** Long enough for a key-provider call that took the provider to finish; never keeps the process alive. */
const DESTROY_GRACE_MS = 15_000;

function destroyLater(provider: Promise<KeyProvider>): void {
  setTimeout(() => destroy(provider), DESTROY_GRACE_MS).unref();
}

function sameDescriptor(a: TenantKeyRecord, b: TenantKeyRecord): boolean {
  return a.kind === b.kind && JSON.stringify(a.descriptor) === JSON.stringify(b.descriptor);
}

/** One tenant's key scope: its own keys from the registry, and the application's keyring. */
class TenantScope implements KeyScope {
  readonly cacheId: string;
  readonly context: EncryptionContext;

  constructor(
    readonly keyrings: TenantKeyrings,
    readonly tenant: string,
  ) {
    this.cacheId = TenantKeyrings.cachePrefix(tenant);
    this.context = keyrings.contextOf(tenant);
  }

  get activeVersion(): number {
    return this.keyrings.tenant(this.tenant)?.activeVersion ?? this.keyrings.vendor.activeVersion;
  }

  get readRefusal(): Error | undefined {
    return this.keyrings.tenant(this.tenant)?.state === 'offboarded' ? this.#offboarded() : undefined;
  }

  get writeRefusal(): Error | undefined {
    const record = this.keyrings.tenant(this.tenant);
    if (record?.state === 'offboarded') return this.#offboarded();
    return record?.activeVersion == null ? this.keyrings.vendor.writeRefusal : undefined;
  }

  async checkedProvider(version: number): Promise<KeyProvider> {
    if (version < FIRST_TENANT_KEY_VERSION) {
      if (this.keyrings.tenant(this.tenant)?.state === 'offboarded') throw this.#offboarded(version);
      return this.keyrings.vendor.checkedProvider(version);
    }
    const key = await this.keyrings.resolve(version);
    const context = { tenant: this.tenant, keyVersion: version };
    if (!key) {
      throw new UnknownKeyVersionError('key version is not a tenant key the registry records', context);
    }
    if (key.tenantId !== this.tenant) {
      /* A wrapped key (or version) copied from another tenant's row: never use that tenant's key here. */
      throw new IntegrityError(
        'key version belongs to another tenant, not to the tenant of this row',
        context,
      );
    }
    if (key.state === 'destroyed' || this.keyrings.tenant(this.tenant)?.state === 'offboarded') {
      throw this.#offboarded(version, key.keyReference);
    }
    try {
      return await this.keyrings.provider(key);
    } catch (error) {
      throw withErrorContext(error, { ...context, keyId: key.keyReference });
    }
  }

  #offboarded(version?: number, keyId?: string): TenantOffboardedError {
    return new TenantOffboardedError(
      'the tenant was offboarded: its keys were destroyed, its rows cannot be read and writes are refused',
      {
        tenant: this.tenant,
        ...(version === undefined ? {} : { keyVersion: version }),
        ...(keyId === undefined ? {} : { keyId }),
      },
    );
  }
}
