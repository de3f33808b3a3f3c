import { ConfigError } from '../errors';
import { type GcpKmsClient, GcpKmsKeyProvider, type GcpKmsKeyProviderOptions } from './gcp-kms-key-provider';
import type { TenantKeyFactory } from './tenant-key-factories';

/** A symmetric crypto key in the customer's own Google Cloud project, granted to the application's identity. */
export interface GcpKmsKeyDescriptor {
  kind: 'gcp-kms';
  /**
   * The crypto key, `projects/P/locations/L/keyRings/R/cryptoKeys/K` (its primary version wraps the
   * tenant's new data keys, so the customer's rotation in Cloud KMS applies to them at once), or one
   * of its versions, `…/cryptoKeyVersions/N` (that version alone wraps and unwraps: added as the
   * tenant's next key after a rotation, its job moves every data key onto the new version).
   */
  keyName: string;
}

/**
 * Options of {@link gcpKmsKeyFactory}: how this application reaches Cloud KMS (credentials,
 * endpoint, timeouts, retries). Every tenant's provider gets them; the key comes from the
 * tenant's descriptor. One client is built for all tenants, on first use.
 */
export type GcpKmsTenantOptions = Omit<GcpKmsKeyProviderOptions, 'keyName'>;

/**
 * Tenant keys in the customer's own Cloud KMS. Nothing secret is stored: the descriptor is the
 * key's name; the credentials are the application's (`authClient`, else application default
 * credentials), which the customer grants `roles/cloudkms.cryptoKeyEncrypterDecrypter` (and
 * `roles/cloudkms.viewer` for validation) on that key alone.
 */
export function gcpKmsKeyFactory(options: GcpKmsTenantOptions = {}): TenantKeyFactory {
  let shared: GcpKmsClient | undefined;
  return {
    kind: 'gcp-kms',
    async prepare(descriptor) {
      const { keyName } = descriptor as Partial<GcpKmsKeyDescriptor>;
      if (typeof keyName !== 'string' || keyName === '') {
        throw new ConfigError(
          'a gcp-kms tenant key needs keyName (projects/P/locations/L/keyRings/R/cryptoKeys/K, or …/cryptoKeyVersions/N)',
        );
      }
      return { keyName };
    },
    async create(stored) {
      const { client, authClient, apiEndpoint, port, protocol, clientOptions, ...calls } = options;
      shared ??=
        client ?? GcpKmsKeyProvider.createClient({ authClient, apiEndpoint, port, protocol, clientOptions });
      return new GcpKmsKeyProvider({ ...calls, keyName: stored.keyName as string, client: shared });
    },
  };
}
