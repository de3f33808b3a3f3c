import { randomBytes } from 'node:crypto';
import fc from 'fast-check';
import { describe, expect, it, vi } from 'vitest';
import type { ValueBinding } from '../../src/crypto/associated-data';
import { IntegrityError, TenantOffboardedError, UnknownKeyVersionError } from '../../src/errors';
import { FieldEncryptor } from '../../src/field-encryptor';
import { DataKeyCache } from '../../src/keys/data-key-cache';
import { TENANT_CONTEXT_KEY } from '../../src/keys/key-scope';
import { FIRST_TENANT_KEY_VERSION, Keyring } from '../../src/keys/keyring';
import { LocalKeyProvider } from '../../src/keys/local-key-provider';
import { customerKeyFactory, TenantKeyFactories } from '../../src/keys/tenant-key-factories';
import { type TenantKeyRecord, TenantKeyrings, type TenantRecord } from '../../src/keys/tenant-keyrings';

const newKey = () => randomBytes(32).toString('base64');
const vendor = new Keyring([{ version: 1, provider: new LocalKeyProvider({ key: newKey() }) }], 1);

/** Registry records of one new customer-provided key per tenant, active, prepared as `addKey` does. */
async function customerKeyRecords(factories: TenantKeyFactories, tenants: string[]) {
  const records: TenantRecord[] = [];
  const keys: TenantKeyRecord[] = [];
  for (const [i, tenantId] of tenants.entries()) {
    const version = FIRST_TENANT_KEY_VERSION + i;
    const descriptor = await factories.get('customer-key').prepare({ key: newKey() }, { tenantId, vendor });
    records.push({ tenantId, state: 'active', activeVersion: version, externalId: `x-${i}` });
    const keyReference = String(descriptor.fingerprint);
    keys.push({ version, tenantId, kind: 'customer-key', keyReference, state: 'active', descriptor });
  }
  return { records, keys };
}

/** Tenant keyrings with customer-provided keys for the given tenants, prepared as `addKey` does. */
async function tenantKeyrings(tenants: string[]) {
  const factories = new TenantKeyFactories([customerKeyFactory()]);
  const keyrings = new TenantKeyrings(vendor, factories);
  const { records, keys } = await customerKeyRecords(factories, tenants);
  keyrings.update(records, keys);
  const cache = new DataKeyCache(vendor);
  const encryptor = new FieldEncryptor(cache, (tenant) =>
    tenant === undefined ? undefined : keyrings.scope(tenant),
  );
  return { keyrings, cache, encryptor, records, keys };
}

const place = (tenant?: string): ValueBinding => ({
  table: 't',
  schema: 'public',
  column: 'email',
  primaryKey: '7',
  ...(tenant ? { tenant } : {}),
});

describe('tenant key scopes', () => {
  it('seals under the tenant key, binds the tenant, and never opens under another tenant', async () => {
    const { encryptor } = await tenantKeyrings(['a', 'b']);
    await fc.assert(
      fc.asyncProperty(fc.string(), fc.constantFrom('a', 'b', 'vendor-only'), async (value, tenant) => {
        const sealed = await encryptor.seal(value, place(tenant));
        expect(((sealed.ciphertext[1] ?? 0) & 0x04) !== 0).toBe(true);
        expect(sealed.keyVersion >= FIRST_TENANT_KEY_VERSION).toBe(tenant !== 'vendor-only');
        expect(await encryptor.open(sealed, place(tenant))).toBe(value);
        for (const other of ['a', 'b', 'vendor-only', 'A', 'a ']) {
          if (other === tenant) continue;
          await expect(encryptor.open(sealed, place(other))).rejects.toBeInstanceOf(IntegrityError);
        }
        await expect(encryptor.open(sealed, place())).rejects.toBeInstanceOf(IntegrityError);
      }),
      { numRuns: 40 },
    );
  });

  it('a tenant value whose ciphertext is re-bound to another tenant fails even with the right data key', async () => {
    const { encryptor } = await tenantKeyrings([]);
    // Both on the vendor key: the data key is bound to its tenant, so it does not even unwrap for the other.
    const a = await encryptor.seal('mine', place('a'));
    const error = await encryptor.open(a, place('b')).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(IntegrityError);
    expect((error as IntegrityError).tenant).toBe('b');
  });

  it('a version of another tenant is refused before any key is used', async () => {
    const { encryptor, keyrings } = await tenantKeyrings(['a', 'b']);
    const sealed = await encryptor.seal('x', place('a'));
    const scopeB = keyrings.scope('b');
    await expect(scopeB.checkedProvider(sealed.keyVersion)).rejects.toThrow(/belongs to another tenant/);
    await expect(encryptor.open(sealed, place('b'))).rejects.toBeInstanceOf(IntegrityError);
  });

  it('an unknown tenant version is an UnknownKeyVersionError naming the tenant', async () => {
    const { keyrings } = await tenantKeyrings(['a']);
    const error = await keyrings
      .scope('a')
      .checkedProvider(FIRST_TENANT_KEY_VERSION + 99)
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(UnknownKeyVersionError);
    expect((error as UnknownKeyVersionError).tenant).toBe('a');
  });

  it('binds the tenant into the wrapped data key context, beside the keyring', async () => {
    const { keyrings } = await tenantKeyrings(['a']);
    expect(keyrings.scope('a').context).toEqual({
      'typeorm-envelope:keyring': 'default',
      [TENANT_CONTEXT_KEY]: 'a',
    });
  });

  it('an offboarded tenant refuses writes and reads; the others keep working from the same cache', async () => {
    const { encryptor, keyrings, records, keys } = await tenantKeyrings(['a', 'b']);
    await encryptor.seal('a-value', place('a'));
    const b = await encryptor.seal('b-value', place('b'));
    keyrings.update(
      records.map((r) =>
        r.tenantId === 'a' ? { ...r, state: 'offboarded' as const, activeVersion: null } : r,
      ),
      keys.map((k) => (k.tenantId === 'a' ? { ...k, state: 'destroyed' as const, descriptor: {} } : k)),
    );
    await expect(encryptor.seal('new', place('a'))).rejects.toBeInstanceOf(TenantOffboardedError);
    expect(await encryptor.open(b, place('b'))).toBe('b-value');
    expect(await encryptor.seal('b2', place('b'))).toBeDefined();
    // a data key still cached for A is not used either once the cache is purged for it
    keyrings.forget('a');
  });

  it('customer-provided keys are stored wrapped, bound to their tenant', async () => {
    const factory = customerKeyFactory();
    const key = newKey();
    const stored = await factory.prepare({ key }, { tenantId: 'a', vendor });
    const text = JSON.stringify(stored);
    expect(text).not.toContain(key);
    expect(text).not.toContain(Buffer.from(key, 'base64').toString('hex'));
    const provider = await factory.create(stored, { tenantId: 'a', vendor });
    expect((provider as LocalKeyProvider).fingerprint).toBe(new LocalKeyProvider({ key }).fingerprint);
    await expect(factory.create(stored, { tenantId: 'b', vendor })).rejects.toBeInstanceOf(IntegrityError);
  });

  it('a read of all tenants that started before a read of one never undoes it', async () => {
    const factories = new TenantKeyFactories([customerKeyFactory()]);
    const keyrings = new TenantKeyrings(vendor, factories);
    const { records, keys } = await customerKeyRecords(factories, ['a', 'b']);
    const periodic = keyrings.beginRead(); // a refresh of all tenants starts, sees no key yet
    const own = keyrings.beginRead(); // this instance adds a's key, reads a alone
    keyrings.update([records[0] as TenantRecord], [keys[0] as TenantKeyRecord], 'a', own);
    keyrings.update([{ ...(records[1] as TenantRecord), activeVersion: null }], [], undefined, periodic);
    expect(keyrings.tenant('a')?.activeVersion).toBe(FIRST_TENANT_KEY_VERSION);
    expect(keyrings.key(FIRST_TENANT_KEY_VERSION)?.tenantId).toBe('a');
    expect(keyrings.tenant('b')?.activeVersion).toBeNull();
    // a read of all tenants that started later wins, as the registry is then
    keyrings.update(records, keys, undefined, keyrings.beginRead());
    expect(keyrings.tenant('b')?.activeVersion).toBe(FIRST_TENANT_KEY_VERSION + 1);
    keyrings.update([], [], undefined, keyrings.beginRead());
    expect(keyrings.tenant('a')).toBeUndefined();
  });

  it('refuses application key versions in the tenant range', () => {
    expect(
      () =>
        new Keyring(
          [{ version: FIRST_TENANT_KEY_VERSION, provider: new LocalKeyProvider({ key: newKey() }) }],
          FIRST_TENANT_KEY_VERSION,
        ),
    ).toThrow(/below 1000000/);
  });

  it('a destroyed local key refuses every use', async () => {
    const provider = new LocalKeyProvider({ key: newKey() });
    const { wrappedKey } = await provider.generateDataKey({});
    provider.destroy();
    await expect(provider.unwrapDataKey(wrappedKey, {})).rejects.toThrow(/destroyed/);
  });
});

describe('tenant keys held in memory', () => {
  it('are bounded: the least recently used leaves (zeroed once no call can still use it) and is rebuilt at its next use', async () => {
    vi.useFakeTimers({ toFake: ['setTimeout'] });
    try {
      const built: Array<{ tenantId: string; provider: LocalKeyProvider }> = [];
      const base = customerKeyFactory();
      const counting = {
        ...base,
        async create(
          stored: Readonly<Record<string, unknown>>,
          context: { tenantId: string; vendor: Keyring },
        ) {
          const provider = (await base.create(stored, context)) as LocalKeyProvider;
          built.push({ tenantId: context.tenantId, provider });
          return provider;
        },
      };
      const factories = new TenantKeyFactories([counting]);
      const keyrings = new TenantKeyrings(vendor, factories, { maxProviders: 2 });
      const tenants = ['a', 'b', 'c'];
      const { records, keys } = await customerKeyRecords(factories, tenants);
      keyrings.update(records, keys);
      const encryptor = new FieldEncryptor(new DataKeyCache(vendor), (t) =>
        t === undefined ? undefined : keyrings.scope(t),
      );
      const sealed = [];
      for (const tenant of tenants) sealed.push(await encryptor.seal(`value of ${tenant}`, place(tenant)));
      expect(built.map((b) => b.tenantId)).toEqual(['a', 'b', 'c']);
      const first = built[0]?.provider as LocalKeyProvider;
      const { wrappedKey } = await first.generateDataKey({});
      vi.advanceTimersByTime(15_000);
      await Promise.resolve();
      await Promise.resolve();
      await expect(first.unwrapDataKey(wrappedKey, {})).rejects.toThrow(/destroyed/);
      // tenant a's next use of its key (a cold cache) builds its provider again from the record
      const cold = new FieldEncryptor(new DataKeyCache(vendor), (t) =>
        t === undefined ? undefined : keyrings.scope(t),
      );
      expect(await cold.open(sealed[0] as never, place('a'))).toBe('value of a');
      expect(built.map((b) => b.tenantId)).toEqual(['a', 'b', 'c', 'a']);
    } finally {
      vi.useRealTimers();
    }
  });
});
