import { ConfigError, EnvelopeError, type ErrorContext } from '../errors';
import { AwsKmsKeyProvider, type AwsKmsKeyProviderOptions } from './aws-kms-key-provider';
import type { AzureKeyVaultKeyDescriptor } from './azure-key-vault-tenant-key-factory';
import type { GcpKmsKeyDescriptor } from './gcp-kms-tenant-key-factory';
import type { EncryptionContext, KeyProvider } from './key-provider';
import { TENANT_CONTEXT_KEY } from './key-scope';
import type { Keyring } from './keyring';
import { LocalKeyProvider } from './local-key-provider';
import type { VaultTransitKeyDescriptor } from './vault-transit-tenant-key-factory';

/** A customer-provided 256-bit key, given as base64 of 32 bytes. Stored only wrapped by the application's keyring. */
export interface CustomerKeyDescriptor {
  kind: 'customer-key';
  /** Base64 of exactly 32 random bytes (`openssl rand -base64 32`). */
  key: string;
}

/** A symmetric KMS key in the customer's own AWS account, reached through the IAM role it created. */
export interface AwsKmsKeyDescriptor {
  kind: 'aws-kms';
  /** The key ARN (a key in another account needs its ARN). */
  keyId: string;
  /** The role in the customer's account to assume; its trust policy requires the External ID. */
  roleArn?: string;
  /** Default with `roleArn`: the tenant's own External ID (`tenants.externalIdFor(tenantId)`). */
  externalId?: string;
  /** The key's region. Default: the region in the key ARN, else the SDK's resolution. */
  region?: string;
}

/** A tenant key as given to `tenants.addKey`: one of the built-in kinds, or one a factory adds. */
export type TenantKeyDescriptor =
  | CustomerKeyDescriptor
  | AwsKmsKeyDescriptor
  | AzureKeyVaultKeyDescriptor
  | VaultTransitKeyDescriptor
  | GcpKmsKeyDescriptor
  | ({ kind: string } & Record<string, unknown>);

/** What a factory may use while it prepares or builds a tenant's provider. */
export interface TenantKeyFactoryContext {
  tenantId: string;
  /** The application's keyring, which wraps secrets such as customer-provided keys. */
  vendor: Keyring;
  /** The tenant's External ID for cross-account roles (known while a key is added). */
  externalId?: string;
}

/**
 * Turns a tenant key descriptor into a key provider. `prepare` makes what is stored (never a key
 * in the clear: a customer-provided key is stored wrapped by the application's keyring), and
 * `create` builds the provider from what was stored, in any instance that reads the registry.
 * Register one for another backend (Azure Key Vault, GCP KMS, Vault) with the `tenantKeys`
 * option of `EnvelopeEncryption`.
 */
export interface TenantKeyFactory {
  /** The descriptor `kind` this factory handles. */
  readonly kind: string;
  prepare(
    descriptor: Readonly<Record<string, unknown>>,
    context: TenantKeyFactoryContext,
  ): Promise<Record<string, unknown>>;
  create(stored: Readonly<Record<string, unknown>>, context: TenantKeyFactoryContext): Promise<KeyProvider>;
  /**
   * For kinds that store a secret wrapped by the application's keyring: the application keyring's
   * version that wraps it, so a rotation of that keyring can re-wrap it before the old version is
   * retired.
   */
  wrappedBy?(stored: Readonly<Record<string, unknown>>): number | undefined;
  /** Re-wraps the stored secret under the application keyring's `version`; returns what to store instead. */
  rewrap?(
    stored: Readonly<Record<string, unknown>>,
    context: TenantKeyFactoryContext,
    version: number,
  ): Promise<Record<string, unknown>>;
}

/** The factories of one `EnvelopeEncryption`, by kind. */
export class TenantKeyFactories {
  readonly #byKind = new Map<string, TenantKeyFactory>();

  constructor(factories: readonly TenantKeyFactory[]) {
    for (const factory of factories) {
      if (!factory || typeof factory.kind !== 'string' || typeof factory.create !== 'function') {
        throw new ConfigError('a tenant key factory needs a kind, prepare() and create()');
      }
      this.#byKind.set(factory.kind, factory);
    }
  }

  /** The factory of `kind`; an unknown kind is a `ConfigError` naming the known ones. */
  get(kind: string): TenantKeyFactory {
    const factory = this.#byKind.get(kind);
    if (!factory) {
      throw new ConfigError(
        `no tenant key factory for kind "${String(kind)}" (known: ${[...this.#byKind.keys()].join(', ')}); ` +
          'register one with the tenantKeys option of EnvelopeEncryption',
      );
    }
    return factory;
  }
}

/** The context that binds a customer-provided key, wrapped by the application's keyring, to its tenant. */
function secretContext(vendor: Keyring, tenantId: string): EncryptionContext {
  return { ...vendor.context, [TENANT_CONTEXT_KEY]: tenantId, 'typeorm-envelope:purpose': 'tenant-key' };
}

/**
 * Customer-provided keys: validated (base64 of 32 bytes), wrapped by the application keyring's
 * active version with the tenant bound in, and stored so; each instance unwraps it once, when the
 * tenant's rows are first used, and holds it in memory like any local master key.
 */
export function customerKeyFactory(): TenantKeyFactory {
  return {
    kind: 'customer-key',
    async prepare(descriptor, { tenantId, vendor }) {
      const provider = new LocalKeyProvider({ key: descriptor.key as string });
      try {
        const version = vendor.activeVersion;
        const wrapping = await vendor.checkedProvider(version);
        const wrapped = await provider.withKeyBytes((key) =>
          wrapping.wrapDataKey(key, secretContext(vendor, tenantId)),
        );
        return {
          wrappedKey: wrapped.toString('base64'),
          wrappedBy: version,
          fingerprint: provider.fingerprint,
        };
      } finally {
        provider.destroy();
      }
    },
    wrappedBy: (stored) => (typeof stored.wrappedBy === 'number' ? stored.wrappedBy : undefined),
    async rewrap(stored, { tenantId, vendor }, version) {
      const { wrappedKey, wrappedBy } = stored as { wrappedKey: string; wrappedBy: number };
      const context = secretContext(vendor, tenantId);
      const from = await vendor.checkedProvider(wrappedBy);
      const to = await vendor.checkedProvider(version);
      const old = Buffer.from(wrappedKey, 'base64');
      const rewrapped = await from.rewrapDataKey(old, context, to);
      /* Checked before it is stored: a wrong wrap would lose the customer's key for good. */
      const before = await from.unwrapDataKey(old, context);
      const after = await to.unwrapDataKey(rewrapped, context);
      const same = before.equals(after);
      before.fill(0);
      after.fill(0);
      if (!same) {
        throw new ConfigError('a re-wrapped customer-provided key does not unwrap to the same key', {
          tenant: tenantId,
        });
      }
      return { ...stored, wrappedKey: rewrapped.toString('base64'), wrappedBy: version };
    },
    async create(stored, { tenantId, vendor }) {
      const { wrappedKey, wrappedBy, fingerprint } = stored as {
        wrappedKey?: unknown;
        wrappedBy?: unknown;
        fingerprint?: unknown;
      };
      if (typeof wrappedKey !== 'string' || typeof wrappedBy !== 'number') {
        throw new ConfigError('the stored customer-provided key is incomplete', { tenant: tenantId });
      }
      const wrapping = await vendor.checkedProvider(wrappedBy);
      const key = await wrapping
        .unwrapDataKey(Buffer.from(wrappedKey, 'base64'), secretContext(vendor, tenantId))
        .catch((error: unknown) => {
          /* The key that failed to open is the tenant's: name it, not the application key that wraps it. */
          throw aboutTenantKey(
            error,
            `the stored customer-provided key could not be unwrapped with application key version ${wrappedBy}`,
            { tenant: tenantId, keyId: String(fingerprint) },
          );
        });
      const provider = LocalKeyProvider.fromKeyBytes(key);
      if (provider.fingerprint !== fingerprint) {
        provider.destroy();
        throw new ConfigError('the stored customer-provided key does not match its fingerprint', {
          tenant: tenantId,
          keyId: String(fingerprint),
        });
      }
      return provider;
    },
  };
}

/**
 * `error` restated about a tenant key: the same class, `what` before its detail, and `context`
 * replacing the provider's own key reference (which names the wrapping key, not the tenant's).
 */
function aboutTenantKey(error: unknown, what: string, context: ErrorContext): unknown {
  if (!(error instanceof EnvelopeError)) return error;
  const Class = error.constructor as new (
    message: string,
    context: ErrorContext,
    options: { cause?: unknown },
  ) => EnvelopeError;
  return new Class(`${what}: ${error.detail}`, { ...error.context, ...context }, { cause: error });
}

/**
 * Options of {@link awsKmsKeyFactory}: how this application reaches KMS and STS. Every tenant's
 * provider gets them; the key, role, External ID and region come from the tenant's descriptor.
 */
export type AwsKmsTenantOptions = Omit<
  AwsKmsKeyProviderOptions,
  'keyId' | 'roleArn' | 'externalId' | 'client'
>;

/**
 * Tenant keys in the customer's own AWS KMS, through the role the customer created for this
 * application (`AssumeRole` with the tenant's External ID), or directly when no role is given.
 */
export function awsKmsKeyFactory(options: AwsKmsTenantOptions = {}): TenantKeyFactory {
  return {
    kind: 'aws-kms',
    async prepare(descriptor, { externalId }) {
      const { keyId, roleArn, region } = descriptor as Partial<AwsKmsKeyDescriptor>;
      if (typeof keyId !== 'string' || keyId === '') {
        throw new ConfigError('an aws-kms tenant key needs keyId (the key ARN)');
      }
      if (roleArn !== undefined && typeof roleArn !== 'string')
        throw new ConfigError('roleArn must be a string');
      const given = (descriptor as Partial<AwsKmsKeyDescriptor>).externalId;
      /* An empty External ID would silently send none: the role's trust policy is the customer's only guard. */
      if (given !== undefined && (typeof given !== 'string' || given.trim() === '')) {
        throw new ConfigError(
          "externalId must be a non-empty string (or left out: the tenant's own is used)",
        );
      }
      const stored: Record<string, unknown> = { keyId };
      if (roleArn) {
        stored.roleArn = roleArn;
        stored.externalId = given ?? externalId;
      } else if (given !== undefined) {
        throw new ConfigError('externalId is only used with roleArn');
      }
      const keyRegion = region ?? regionOfArn(keyId);
      if (keyRegion) stored.region = keyRegion;
      return stored;
    },
    async create(stored) {
      const { keyId, roleArn, externalId, region } = stored as Partial<AwsKmsKeyDescriptor>;
      /* The STS options serve tenants with a role; a key without one is called with the application's own credentials. */
      const { stsEndpoint: _sts, roleSessionName: _session, ...direct } = options;
      return new AwsKmsKeyProvider({
        ...(roleArn ? options : direct),
        keyId: keyId as string,
        ...(region ? { region } : {}),
        ...(roleArn ? { roleArn, ...(externalId ? { externalId } : {}) } : {}),
      });
    },
  };
}

function regionOfArn(keyId: string): string | undefined {
  const parts = keyId.split(':');
  return parts[0] === 'arn' && parts[3] ? parts[3] : undefined;
}
