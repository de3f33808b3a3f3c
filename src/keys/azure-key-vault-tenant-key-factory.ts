import { ConfigError } from '../errors';
import {
  AzureKeyVaultKeyProvider,
  type AzureKeyVaultKeyProviderOptions,
  type AzureTokenCredential,
  defaultAzureCredential,
} from './azure-key-vault-key-provider';
import type { TenantKeyFactory } from './tenant-key-factories';

/**
 * An RSA (≥ 3072 bits) or Managed HSM `oct-HSM` key in the customer's own Azure Key Vault, on
 * which the customer granted the application's identity the role
 * `Key Vault Crypto Service Encryption User`. Stored as its versioned key id, never with a secret.
 */
export interface AzureKeyVaultKeyDescriptor {
  kind: 'azure-key-vault';
  /**
   * `https://<vault>.vault.azure.net/keys/<name>/<version>`. Without a version, the key's current
   * version is looked up when the key is added, and that versioned id is what is stored.
   */
  keyId: string;
}

/**
 * Options of {@link azureKeyVaultKeyFactory}: how this application reaches Key Vault (its
 * credential, timeouts, retries, client options). Every tenant's provider gets them; the key comes
 * from the tenant's record. Without `credential`, one `DefaultAzureCredential` serves all tenants.
 */
export type AzureKeyVaultTenantOptions = Omit<AzureKeyVaultKeyProviderOptions, 'keyId'>;

/**
 * Tenant keys in the customers' own Azure Key Vaults, reached with the application's identity
 * (for vaults in other Entra tenants: a multi-tenant application whose credential allows them).
 * `prepare` resolves a version-less key id to the current version (one GET), so the record names
 * exactly one key version; moving a tenant to a new version is adding that version as a new key.
 */
export function azureKeyVaultKeyFactory(options: AzureKeyVaultTenantOptions = {}): TenantKeyFactory {
  /* One credential for every tenant, made when the first tenant key is: its token cache is shared. */
  let shared: AzureTokenCredential | undefined;
  const credential = (): AzureTokenCredential => {
    shared ??= options.credential ?? defaultAzureCredential();
    return shared;
  };
  const provider = (keyId: string) =>
    new AzureKeyVaultKeyProvider({ ...options, keyId, credential: credential() });
  return {
    kind: 'azure-key-vault',
    async prepare(descriptor) {
      const { keyId } = descriptor as Partial<AzureKeyVaultKeyDescriptor>;
      if (typeof keyId !== 'string' || keyId === '') {
        throw new ConfigError(
          'an azure-key-vault tenant key needs keyId (https://<vault>.vault.azure.net/keys/<name>/<version>)',
        );
      }
      const extra = Object.keys(descriptor).filter((field) => field !== 'kind' && field !== 'keyId');
      if (extra.length > 0) {
        throw new ConfigError(`an azure-key-vault tenant key takes only keyId, not ${extra.join(', ')}`);
      }
      return { keyId: await provider(keyId).resolveKeyReference() };
    },
    async create(stored) {
      const { keyId } = stored as Partial<AzureKeyVaultKeyDescriptor>;
      if (typeof keyId !== 'string')
        throw new ConfigError('the stored azure-key-vault tenant key has no keyId');
      return provider(keyId);
    },
  };
}
