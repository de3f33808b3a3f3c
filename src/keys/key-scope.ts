import type { EncryptionContext, KeyProvider } from './key-provider';

/**
 * The master keys one value may use: the application's keyring, or one tenant's keys. Every
 * data key is generated, unwrapped and cached within a scope, so a key of one scope is never
 * used for another: the cache partitions its entries by `cacheId`, and `context` (bound into
 * every wrapped data key) names the keyring and the tenant.
 */
export interface KeyScope {
  /** Partitions the data-key cache; unique per keyring and tenant. */
  readonly cacheId: string;
  /** Bound into every data key wrapped in this scope (the KMS `EncryptionContext`). */
  readonly context: EncryptionContext;
  /** The tenant this scope serves, if any (for error context). */
  readonly tenant?: string;
  /** The master-key version new data keys of this scope are wrapped with. */
  readonly activeVersion: number;
  /** Why new encryptions in this scope are refused, if they are. */
  readonly writeRefusal: Error | undefined;
  /**
   * Why reads in this scope are refused whatever is in memory, if they are (an offboarded
   * tenant): also what needs no key to answer, such as a search no index key can match.
   */
  readonly readRefusal: Error | undefined;
  /** The provider of `version`, once it is known to be the right key for this scope. */
  checkedProvider(version: number): Promise<KeyProvider>;
}

/** The encryption-context entry naming the tenant of a wrapped data key. */
export const TENANT_CONTEXT_KEY = 'typeorm-envelope:tenant';
