import type { EnvelopeEncryption } from '../envelope-encryption';
import { describeError } from '../rotation/describe-error';
import type { RotationTarget } from '../rotation/rotation-target';
import { TenantRegistry } from './tenant-registry';

/** What {@link rewrapStoredTenantKeys} did. */
export interface StoredTenantKeysRewrap {
  /** Tenant keys whose stored secret was re-wrapped under the target version. */
  rewrapped: number;
  /** Tenant keys that could not be (they keep their old wrap), with the reason. */
  failures: Array<{ tenant: string; keyVersion: number; error: string }>;
}

/**
 * Re-wraps the secrets tenant keys store wrapped by the application's keyring (customer-provided
 * keys) under its version `toVersion`, each checked before it is stored and written only if the
 * record did not change meanwhile. Run by every re-wrap of the application keyring's rows, so that
 * the old version can be retired afterwards. A no-op without the tenant tables.
 */
export async function rewrapStoredTenantKeys(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  toVersion: number,
): Promise<StoredTenantKeysRewrap> {
  const outcome: StoredTenantKeysRewrap = { rewrapped: 0, failures: [] };
  const registry = new TenantRegistry(target, encryption);
  if (!(await registry.exists())) return outcome;
  const { factories } = encryption.tenantKeyrings;
  const { keys } = await registry.readAll();
  for (const key of keys) {
    if (key.state === 'destroyed') continue;
    let factory: ReturnType<typeof factories.get>;
    try {
      factory = factories.get(key.kind);
    } catch {
      continue; // a kind this instance has no factory for stores nothing it could re-wrap
    }
    const wrappedBy = factory.wrappedBy?.(key.descriptor);
    if (wrappedBy === undefined || wrappedBy === toVersion || !factory.rewrap) continue;
    try {
      const next = await factory.rewrap(
        key.descriptor,
        { tenantId: key.tenantId, vendor: encryption.keyring },
        toVersion,
      );
      const written = await registry.transaction(async (runner) => {
        const done = await registry.replaceDescriptor(runner, key.version, key.descriptor, next);
        if (done) {
          await registry.record(runner, 'tenant-key-rewrapped', key.tenantId, key.version, {
            keyReference: key.keyReference,
            from: wrappedBy,
            to: toVersion,
          });
        }
        return done;
      });
      if (written) outcome.rewrapped += 1;
    } catch (error) {
      outcome.failures.push({ tenant: key.tenantId, keyVersion: key.version, error: describeError(error) });
    }
  }
  return outcome;
}
