import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rawQuery } from '../../support/database';
import { TENANT_MIGRATIONS, TenantContact } from '../../support/tenant-entities';
import {
  createCustomerAccount,
  customerKey,
  startTenantClouds,
  type TenantClouds,
} from '../../support/tenant-fixtures';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/**
 * The data-key cache across many tenants: one data key per writing tenant, bounded, least
 * recently used tenants leaving first; one unwrap per (tenant, data key) for a read spanning many
 * tenants; a purge of one tenant touching nobody else. Provider calls are counted where they
 * arrive: the application key's provider (a counting local key) and the KMS emulator.
 */
type Kind = 'vendor' | 'customer-key' | 'aws-kms';
let clouds: TenantClouds;
let accountSeq = 0;

beforeAll(async () => {
  clouds = await startTenantClouds();
});
afterAll(async () => {
  await clouds?.close();
});

/** Gives tenant `i` a key of `kind` (the application key needs nothing). */
async function setUpTenant(db: EncryptedTestDatabase, tenantId: string, kind: Kind): Promise<void> {
  if (kind === 'customer-key') {
    await db.encryption.tenants.addKey(tenantId, { kind, key: customerKey() });
  } else if (kind === 'aws-kms') {
    const a = await createCustomerAccount(
      clouds,
      db.encryption,
      tenantId,
      String(700_000_000_000 + ++accountSeq),
    );
    await db.encryption.tenants.addKey(tenantId, { kind, keyId: a.keyArn, roleArn: a.roleArn });
  }
}

const newContact = (db: EncryptedTestDatabase, tenantId: string, n: number) =>
  db.dataSource
    .getRepository(TenantContact)
    .create({ workspaceId: tenantId, email: `${n}@${tenantId}.example`, profile: { phone: `+1-${n}` } });

/** Provider calls so far: at the application key's provider, at the KMS emulator, and as the cache counts them. */
function calls(db: EncryptedTestDatabase) {
  return {
    vendorGenerate: db.provider.calls.generate,
    vendorUnwrap: db.provider.calls.unwrap,
    kmsGenerate: clouds.kms.calls.GenerateDataKey ?? 0,
    kmsDecrypt: clouds.kms.calls.Decrypt ?? 0,
    assumeRole: clouds.sts.calls.AssumeRole ?? 0,
    ...Object.fromEntries(Object.entries(db.encryption.providerCalls).map(([k, v]) => [`cache_${k}`, v])),
  } as Record<string, number>;
}
function resetCalls(db: EncryptedTestDatabase): void {
  db.provider.reset();
  clouds.kms.resetCalls();
  clouds.sts.resetCalls();
}
function delta(before: Record<string, number>, after: Record<string, number>): Record<string, number> {
  return Object.fromEntries(Object.keys(after).map((k) => [k, (after[k] ?? 0) - (before[k] ?? 0)]));
}

describe('1,000 tenants writing, maxEncryptingKeys 100', () => {
  const TENANTS = 1_000;
  const BOUND = 100;
  let db: EncryptedTestDatabase;
  const kinds = new Map<string, Kind>();
  const ids = Array.from({ length: TENANTS }, (_, i) => `ws-${i}`);

  beforeAll(async () => {
    db = await encryptedDatabase([TenantContact], {
      prefix: 'tenant_cache_1000',
      migrations: TENANT_MIGRATIONS,
      encryption: { tenantKeys: { awsKms: clouds.awsKms() }, cache: { maxEncryptingKeys: BOUND } },
    });
    for (const [i, id] of ids.entries()) {
      const kind: Kind = i % 50 === 7 ? 'aws-kms' : i % 50 === 3 || i % 50 === 29 ? 'customer-key' : 'vendor';
      kinds.set(id, kind);
      await setUpTenant(db, id, kind);
    }
  }, 180_000);
  afterAll(() => db?.close());

  it('costs at most one GenerateDataKey per tenant, and the cache never holds more than the bound', async () => {
    expect([...kinds.values()].filter((k) => k === 'aws-kms').length).toBe(20);
    expect([...kinds.values()].filter((k) => k === 'customer-key').length).toBe(40);
    db.encryption.purgeCache();
    resetCalls(db);
    const before = calls(db);
    const repo = db.dataSource.getRepository(TenantContact);
    let peak = 0;
    for (let start = 0; start < TENANTS; start += 50) {
      await repo.save(ids.slice(start, start + 50).map((id) => newContact(db, id, 0)));
      peak = Math.max(peak, db.encryption.cache.encryptingKeyCount);
      expect(db.encryption.cache.encryptingKeyCount).toBeLessThanOrEqual(BOUND);
    }
    const made = delta(before, calls(db));
    const kmsTenants = [...kinds.values()].filter((k) => k === 'aws-kms').length;
    const vendorTenants = [...kinds.values()].filter((k) => k === 'vendor').length;
    /* Counted where the calls arrive: the application key generated one per tenant on it, KMS one per KMS tenant. */
    expect(made.vendorGenerate).toBe(vendorTenants);
    expect(made.kmsGenerate).toBe(kmsTenants);
    expect(made.cache_generated).toBeLessThanOrEqual(TENANTS);
    expect(made.cache_generated).toBe(TENANTS);
    expect(peak).toBe(BOUND);
    const [row] = await rawQuery<{ rows: number; keys: number }>(
      db.schema.url,
      `SELECT count(*)::int AS rows, count(DISTINCT email_wrapped_key)::int AS keys FROM "${db.schema.schema}".tenant_contacts`,
    );
    expect(row).toEqual({ rows: TENANTS, keys: TENANTS }); // one data key per tenant
  });

  it('the least recently used tenants’ keys left first: the oldest writer generates again, the newest does not', async () => {
    const repo = db.dataSource.getRepository(TenantContact);
    const recent = ids.at(-1) as string;
    const oldest = ids[0] as string;
    expect(kinds.get(recent)).toBe('vendor');
    expect(kinds.get(oldest)).toBe('vendor');
    let before = calls(db);
    await repo.save(newContact(db, recent, 1));
    expect(delta(before, calls(db)).vendorGenerate).toBe(0); // still cached
    before = calls(db);
    await repo.save(newContact(db, oldest, 1));
    expect(delta(before, calls(db)).vendorGenerate).toBe(1); // evicted long ago
    /* Each of the last BOUND - 1 writers before `recent` is still cached; the one before them is not. */
    before = calls(db);
    await repo.save(ids.slice(TENANTS - BOUND + 1, TENANTS - 1).map((id) => newContact(db, id, 1)));
    expect(delta(before, calls(db)).cache_generated).toBe(0);
    before = calls(db);
    await repo.save(newContact(db, ids[TENANTS - BOUND - 1] as string, 1));
    expect(delta(before, calls(db)).cache_generated).toBe(1);
    expect(db.encryption.cache.encryptingKeyCount).toBeLessThanOrEqual(BOUND);
    /* Every row still reads. */
    db.encryption.purgeCache();
    const all = await repo.find();
    expect(all.length).toBe(TENANTS + BOUND + 1);
    for (const c of all) expect(c.email).toMatch(new RegExp(`^[01]@${c.workspaceId}\\.example$`));
  });
});

describe('a find() spanning 200 tenants', () => {
  const TENANTS = 200;
  const ROWS_PER_TENANT = 3;
  let db: EncryptedTestDatabase;
  const kinds = new Map<string, Kind>();
  const ids = Array.from({ length: TENANTS }, (_, i) => `ws-${i}`);
  /** The distinct (tenant, data key) pairs of the table, by kind of tenant. */
  let dataKeys: Record<Kind, number>;

  const kindOf = (i: number): Kind => (i % 10 === 1 ? 'aws-kms' : i % 10 === 2 ? 'customer-key' : 'vendor');

  beforeAll(async () => {
    db = await encryptedDatabase([TenantContact], {
      prefix: 'tenant_cache_200',
      migrations: TENANT_MIGRATIONS,
      encryption: { tenantKeys: { awsKms: clouds.awsKms() } },
    });
    for (const [i, id] of ids.entries()) {
      kinds.set(id, kindOf(i));
      await setUpTenant(db, id, kindOf(i));
    }
    const repo = db.dataSource.getRepository(TenantContact);
    for (let n = 0; n < ROWS_PER_TENANT; n++) {
      await repo.save(ids.map((id) => newContact(db, id, n)));
      /* Every fourth tenant gets a second data key for its later rows. */
      if (n === 0)
        for (const [i, id] of ids.entries())
          if (i % 4 === 0) db.encryption.cache.renewEncryptionKey(db.encryption.keyScope(id));
    }
    const pairs = await rawQuery<{ tenant: string; keys: number }>(
      db.schema.url,
      `SELECT tenant, count(DISTINCT k)::int AS keys FROM (
         SELECT "workspaceId" AS tenant, email_wrapped_key AS k FROM "${db.schema.schema}".tenant_contacts
         UNION ALL SELECT "workspaceId", profile_wrapped_key FROM "${db.schema.schema}".tenant_contacts
       ) v GROUP BY tenant`,
    );
    expect(pairs.length).toBe(TENANTS);
    dataKeys = { vendor: 0, 'customer-key': 0, 'aws-kms': 0 };
    for (const p of pairs) dataKeys[kinds.get(p.tenant) as Kind] += p.keys;
  }, 180_000);
  afterAll(() => db?.close());

  const findAll = async () => {
    const found = await db.dataSource.getRepository(TenantContact).find();
    expect(found.length).toBe(TENANTS * ROWS_PER_TENANT);
    for (const c of found) {
      expect(c.email).toMatch(new RegExp(`^\\d@${c.workspaceId}\\.example$`));
      expect(c.profile?.phone).toBe(`+1-${c.email.split('@')[0]}`);
    }
  };

  it('on a cold cache makes exactly one unwrap per (tenant, data key)', async () => {
    const total = dataKeys.vendor + dataKeys['customer-key'] + dataKeys['aws-kms'];
    expect(total).toBe(TENANTS + TENANTS / 4); // one key each, a second for every fourth tenant
    db.encryption.purgeCache();
    resetCalls(db);
    const before = calls(db);
    await findAll();
    const made = delta(before, calls(db));
    const customerKeyTenants = [...kinds.values()].filter((k) => k === 'customer-key').length;
    const kmsTenants = [...kinds.values()].filter((k) => k === 'aws-kms').length;
    expect(made.cache_unwrapped).toBe(total);
    expect(made.kmsDecrypt).toBe(dataKeys['aws-kms']);
    /* The application key unwraps its tenants' data keys, and once each customer-provided key. */
    expect(made.vendorUnwrap).toBe(dataKeys.vendor + customerKeyTenants);
    expect(made.assumeRole).toBe(kmsTenants); // one session per KMS tenant
    expect(made.cache_generated).toBe(0);
    expect(made.vendorGenerate + made.kmsGenerate).toBe(0);
  });

  it('with maxUnwrappedKeys 50, reads every row and never holds more than 50 unwrapped keys', async () => {
    const small = await encryptedDatabase([TenantContact], {
      schema: db.schema,
      migrations: TENANT_MIGRATIONS,
      encryption: {
        keys: [{ version: 1, provider: db.provider }],
        tenantKeys: { awsKms: clouds.awsKms() },
        cache: { maxUnwrappedKeys: 50 },
      },
    });
    try {
      const found = await small.dataSource.getRepository(TenantContact).find();
      expect(found.length).toBe(TENANTS * ROWS_PER_TENANT);
      for (const c of found) expect(c.email).toMatch(new RegExp(`^\\d@${c.workspaceId}\\.example$`));
      expect(small.encryption.cache.unwrappedKeyCount).toBeLessThanOrEqual(50);
    } finally {
      await small.close();
    }
  });

  it('warm, makes none', async () => {
    const before = calls(db);
    await findAll();
    const made = delta(before, calls(db));
    expect(Object.values(made).every((n) => n === 0)).toBe(true);
  });

  it.each([
    ['ws-1', 'aws-kms'],
    ['ws-2', 'customer-key'],
    ['ws-4', 'vendor'],
  ] as const)(
    'purgeCache(%s) (%s) makes the next read call the provider for that tenant only',
    async (tenantId, kind) => {
      expect(kinds.get(tenantId)).toBe(kind);
      const [own] = await rawQuery<{ keys: number }>(
        db.schema.url,
        `SELECT count(DISTINCT k)::int AS keys FROM (
         SELECT email_wrapped_key AS k FROM "${db.schema.schema}".tenant_contacts WHERE "workspaceId" = $1
         UNION ALL SELECT profile_wrapped_key FROM "${db.schema.schema}".tenant_contacts WHERE "workspaceId" = $1
       ) v`,
        [tenantId],
      );
      const keys = own?.keys ?? 0;
      expect(keys).toBeGreaterThan(0);
      /* Warm everyone (reads and a write each), then purge one tenant. */
      await findAll();
      const repo = db.dataSource.getRepository(TenantContact);
      const writers = ['ws-3', 'ws-5', 'ws-11', 'ws-12'];
      const extra = await repo.save(writers.map((id) => newContact(db, id, 9)));
      db.encryption.purgeCache(tenantId);
      const before = calls(db);
      const more = await repo.save(writers.map((id) => newContact(db, id, 8))); // other tenants' encrypting keys stay
      expect(delta(before, calls(db))).toMatchObject({ cache_generated: 0, cache_unwrapped: 0 });
      await rawQuery(db.schema.url, `DELETE FROM "${db.schema.schema}".tenant_contacts WHERE id = ANY($1)`, [
        [...extra, ...more].map((c) => c.id),
      ]);
      await findAll();
      const made = delta(before, calls(db));
      expect(made.cache_unwrapped).toBe(keys);
      expect(made.cache_generated).toBe(0);
      expect(made.kmsDecrypt).toBe(kind === 'aws-kms' ? keys : 0);
      expect(made.assumeRole).toBe(kind === 'aws-kms' ? 1 : 0);
      expect(made.vendorUnwrap).toBe(kind === 'vendor' ? keys : kind === 'customer-key' ? 1 : 0);
    },
  );
});
