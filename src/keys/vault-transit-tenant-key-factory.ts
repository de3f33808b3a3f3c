import { ConfigError } from '../errors';
import type { TenantKeyFactory } from './tenant-key-factories';
import type { VaultAuth } from './vault-auth';
import { vaultOrigin, vaultPath } from './vault-http';
import {
  parseKeyName,
  VaultTransitKeyProvider,
  type VaultTransitKeyProviderOptions,
} from './vault-transit-key-provider';

/**
 * A Transit key in the customer's own Vault or OpenBao. Stored as it is: it holds no secret (the
 * application's credentials for that Vault come from `tenantKeys.vaultTransit.auth`).
 */
export interface VaultTransitKeyDescriptor {
  kind: 'vault-transit';
  /** The Vault server's origin, e.g. `https://vault.customer.example:8200`. */
  address: string;
  /** The Transit key (`aes256-gcm96` or `chacha20-poly1305`, `derived=true`, not exportable). */
  keyName: string;
  /** The Transit mount. Default `transit`. */
  mount?: string;
  /** The namespace, if any. */
  namespace?: string;
}

/** Where a tenant's key is, as the `auth` function of {@link VaultTransitTenantOptions} is told. */
export interface VaultTransitTenantTarget {
  tenantId: string;
  address: string;
  namespace?: string;
  mount: string;
  keyName: string;
}

/**
 * Options of {@link vaultTransitKeyFactory}: how this application reaches tenants' Vaults. The
 * address, mount, namespace and key come from each tenant's descriptor.
 */
export type VaultTransitTenantOptions = Omit<
  VaultTransitKeyProviderOptions,
  'address' | 'keyName' | 'mount' | 'namespace' | 'auth'
> & {
  /**
   * The application's credentials for a tenant's Vault: one `VaultAuth` for every tenant (a
   * Vault the application operates), or a function returning the tenant's own (an AppRole the
   * customer created for the application, kept in the application's secret store). Never stored.
   */
  auth: VaultAuth | ((target: VaultTransitTenantTarget) => VaultAuth | Promise<VaultAuth>);
  /**
   * The Vault origins tenants may name. Required when `auth` is one value for every tenant: its
   * token is sent to the descriptor's address, which must not be one a tenant chose. With an
   * `auth` function, optional (and enforced when given).
   */
  addresses?: readonly string[];
};

const KIND = 'vault-transit';

/**
 * Tenant keys in the customer's own Vault or OpenBao Transit (`kind: 'vault-transit'`). The
 * descriptor names the server, namespace, mount and key; the credentials come from `options`.
 * Every wrapped data key is bound to its tenant through Transit's `context` on a derived key.
 */
export function vaultTransitKeyFactory(options?: VaultTransitTenantOptions): TenantKeyFactory {
  const allowed = allowedAddresses(options);
  const target = (stored: Readonly<Record<string, unknown>>, tenantId: string): VaultTransitTenantTarget => {
    const needer = 'a vault-transit tenant key';
    const address = vaultOrigin(stored.address, needer);
    if (allowed && !allowed.has(address)) {
      throw new ConfigError(
        `the Vault address ${address} is not in tenantKeys.vaultTransit.addresses; add it there to let tenants use it`,
        { tenant: tenantId, keyId: address },
      );
    }
    const namespace =
      stored.namespace === undefined ? undefined : vaultPath(stored.namespace, 'namespace', needer);
    return {
      tenantId,
      address,
      ...(namespace ? { namespace } : {}),
      mount: vaultPath(stored.mount ?? 'transit', 'mount', needer),
      keyName: parseKeyName(stored.keyName),
    };
  };
  return {
    kind: KIND,
    async prepare(descriptor, { tenantId }) {
      requireOptions(options);
      const { address, namespace, mount, keyName } = target(descriptor, tenantId);
      return { address, mount, keyName, ...(namespace ? { namespace } : {}) };
    },
    async create(stored, { tenantId }) {
      const { auth, addresses: _addresses, ...rest } = requireOptions(options);
      const where = target(stored, tenantId);
      const credentials = typeof auth === 'function' ? await auth(where) : auth;
      const { tenantId: _tenant, ...location } = where;
      return new VaultTransitKeyProvider({ ...rest, ...location, auth: credentials });
    },
  };
}

function requireOptions(options: VaultTransitTenantOptions | undefined): VaultTransitTenantOptions {
  if (!options?.auth) {
    throw new ConfigError(
      'vault-transit tenant keys need the tenantKeys.vaultTransit option of EnvelopeEncryption: ' +
        'auth (and addresses, when auth is one value for every tenant)',
    );
  }
  return options;
}

function allowedAddresses(options: VaultTransitTenantOptions | undefined): Set<string> | undefined {
  if (!options?.auth) return undefined;
  if (options.addresses === undefined) {
    if (typeof options.auth === 'function') return undefined;
    throw new ConfigError(
      'tenantKeys.vaultTransit.addresses is required when auth is one value for every tenant: ' +
        "that token would otherwise be sent to whatever address a tenant's descriptor names",
    );
  }
  if (!Array.isArray(options.addresses))
    throw new ConfigError('tenantKeys.vaultTransit.addresses must be an array');
  return new Set(options.addresses.map((a) => vaultOrigin(a, 'tenantKeys.vaultTransit.addresses')));
}
