import { randomBytes } from 'node:crypto';
import { In } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TenantOffboardedError } from '../../../src';
import { rawQuery } from '../../support/database';
import { TenantContact } from '../../support/tenant-entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';
import { COMPACT_TENANT_MIGRATIONS, CompactTenantContact } from '../compact/compact-entities';
import { dataKeyIdOf, keyRows, onPglite } from '../compact/compact-support';

/**
 * Batches gather the values of one turn whatever their tenant: a `save([...])` interleaving
 * tenants, a result set of several tenants, queries of several tenants started together. With
 * every tenant's data key warm (the batched path), each value must still be sealed under its own
 * tenant's data key and opened under it, and one tenant's failure must stay that tenant's.
 */
const BYOK = ['bt-byok-1', 'bt-byok-2'];
const APP = ['bt-app-1', 'bt-app-2'];
const TENANTS = [...BYOK, ...APP];
const MARK = 'batched-tenant';

let db: EncryptedTestDatabase;
/** The key version each tenant's values carry: its own key's, or 1 (the application's key). */
const versionOf = new Map<string, number>();

beforeAll(async () => {
  db = await encryptedDatabase([TenantContact, ...(onPglite ? [] : [CompactTenantContact])], {
    prefix: 'batched_tenants',
    migrations: COMPACT_TENANT_MIGRATIONS,
  });
  for (const tenant of BYOK) {
    const added = await db.encryption.tenants.addKey(tenant, {
      kind: 'customer-key',
      key: randomBytes(32).toString('base64'),
    });
    versionOf.set(tenant, added.version);
  }
  for (const tenant of APP) versionOf.set(tenant, 1);
});
afterAll(() => db?.close());

const table = (name: string) => `"${db.schema.schema}".${name}`;
const sql = <T = Record<string, unknown>>(text: string, params?: unknown[]) =>
  rawQuery<T>(db.schema.url, text, params);

type Contact = TenantContact | CompactTenantContact;
type ContactClass = typeof TenantContact | typeof CompactTenantContact;
const LAYOUTS: Array<[string, ContactClass, string]> = [
  ['sidecars', TenantContact, 'tenant_contacts'],
  ['compact', CompactTenantContact, 'compact_tenant_contacts'],
];

const emailOf = (tenant: string, label: string) => `${MARK}.${label}@${tenant}.example`;
function contactOf(entity: ContactClass, tenant: string, label: string): Contact {
  return db.dataSource.getRepository<Contact>(entity).create({
    workspaceId: tenant,
    label,
    email: emailOf(tenant, label),
    profile: { phone: `+1-555-${tenant}-${label}` },
  });
}

/** One row of each tenant saved, so each tenant's encrypting data key is cached: the batched path. */
async function warm(entity: ContactClass): Promise<void> {
  await db.dataSource
    .getRepository<Contact>(entity)
    .save(TENANTS.map((tenant) => contactOf(entity, tenant, 'warm-up')));
}

/**
 * Which data key each stored value of `ids` is under, checked against its row's tenant: for
 * sidecars the key version is the tenant's and no wrapped key serves two tenants; for compact
 * values the key row names the tenant and its key version. No plaintext in any stored byte.
 */
async function expectEachUnderItsTenant(layout: string, tableName: string, ids: readonly number[]) {
  const rows = await sql(`SELECT * FROM ${table(tableName)} WHERE id = ANY($1) ORDER BY id`, [ids]);
  expect(rows.length).toBe(ids.length);
  const keys = layout === 'compact' ? new Map((await keyRows(db)).map((k) => [k.id, k])) : undefined;
  const tenantsOfKey = new Map<string, Set<string>>();
  for (const row of rows) {
    const tenant = row.workspaceId as string;
    for (const column of ['email', 'profile']) {
      const ciphertext = row[`${column}_ciphertext`] as Buffer;
      expect(ciphertext.includes(Buffer.from(MARK)), `row ${row.id} ${column}`).toBe(false);
      expect(ciphertext.includes(Buffer.from(tenant)), `row ${row.id} ${column}`).toBe(false);
      expect((ciphertext[1] ?? 0) & 0x04, 'tenant bound into the associated data').toBe(0x04);
      let keyId: string;
      if (keys) {
        keyId = dataKeyIdOf(ciphertext);
        const key = keys.get(keyId);
        expect([key?.tenant_id, key?.key_version], `row ${row.id} ${column}`).toEqual([
          tenant,
          versionOf.get(tenant),
        ]);
      } else {
        expect(row[`${column}_key_version`], `row ${row.id} ${column}`).toBe(versionOf.get(tenant));
        keyId = (row[`${column}_wrapped_key`] as Buffer).toString('base64');
      }
      const seen = tenantsOfKey.get(keyId) ?? new Set<string>();
      seen.add(tenant);
      tenantsOfKey.set(keyId, seen);
    }
  }
  for (const [, tenants] of tenantsOfKey) expect([...tenants]).toHaveLength(1);
  return rows;
}

describe.each(LAYOUTS)('batched writes and reads across tenants (%s)', (layout, entity, tableName) => {
  const skip = layout === 'compact' && onPglite;
  const repo = () => db.dataSource.getRepository<Contact>(entity);

  it.skipIf(skip)(
    'a save([...]) interleaving four tenants, every key warm: each row under its own tenant’s data key, read back warm and cold',
    async () => {
      await warm(entity);
      const generatedBefore = db.provider.calls.generate;
      const batch: Contact[] = [];
      for (let n = 0; n < 10; n++)
        for (const tenant of TENANTS) batch.push(contactOf(entity, tenant, `i${n}`));
      const saved = await repo().save(batch);
      /* The application's tenants wrote with cached keys: the batched path, no new data key. */
      expect(db.provider.calls.generate).toBe(generatedBefore);
      const ids = saved.map((c) => c.id);
      await expectEachUnderItsTenant(layout, tableName, ids);
      const expected = new Map(saved.map((c) => [c.id, [c.workspaceId, c.email, c.profile?.phone]]));
      for (const cold of [false, true]) {
        if (cold) db.encryption.purgeCache();
        const found = await repo().findBy({ id: In(ids) });
        expect(found.length).toBe(ids.length);
        for (const c of found) expect([c.workspaceId, c.email, c.profile?.phone]).toEqual(expected.get(c.id));
      }
    },
  );

  it.skipIf(skip)(
    'loaded rows moved to other tenants in one save([...]): the moved ones are sealed anew for their new tenant, the others kept byte for byte',
    async () => {
      await warm(entity);
      const saved = await repo().save(
        Array.from({ length: 12 }, (_, n) => contactOf(entity, 'bt-byok-1', `m${n}`)),
      );
      const ids = saved.map((c) => c.id);
      const before = new Map(
        (await sql(`SELECT * FROM ${table(tableName)} WHERE id = ANY($1)`, [ids])).map((r) => [r.id, r]),
      );
      const loaded = await repo().findBy({ id: In(ids) });
      const moved = new Map<number, string>();
      loaded.forEach((c, n) => {
        if (n % 3 === 0) return;
        const to = n % 3 === 1 ? 'bt-byok-2' : 'bt-app-1';
        c.workspaceId = to;
        moved.set(c.id, to);
      });
      await repo().save(loaded);
      const after = await expectEachUnderItsTenant(layout, tableName, ids);
      for (const row of after) {
        const old = before.get(row.id) as Record<string, unknown>;
        const id = row.id as number;
        expect(row.workspaceId).toBe(moved.get(id) ?? 'bt-byok-1');
        const same = (row.email_ciphertext as Buffer).equals(old.email_ciphertext as Buffer);
        expect(same, `row ${id} email`).toBe(!moved.has(id));
      }
      db.encryption.purgeCache();
      const back = await repo().findBy({ id: In(ids) });
      expect(back.length).toBe(ids.length);
      for (const c of back) {
        const original = saved.find((s) => s.id === c.id) as Contact;
        expect([c.workspaceId, c.email, c.profile?.phone]).toEqual([
          moved.get(c.id) ?? 'bt-byok-1',
          original.email,
          original.profile?.phone,
        ]);
      }
    },
  );
});

describe.skipIf(onPglite)('one tenant’s failure in a shared batch', () => {
  it('queries of an offboarded tenant and of others started in the same turn: only the offboarded tenant’s query fails', async () => {
    const gone = 'bt-gone';
    await db.encryption.tenants.addKey(gone, {
      kind: 'customer-key',
      key: randomBytes(32).toString('base64'),
    });
    for (const [, entity] of LAYOUTS) {
      const repo = db.dataSource.getRepository<Contact>(entity);
      await repo.save([gone, ...TENANTS].map((tenant) => contactOf(entity, tenant, 'shared-turn')));
      /* Every key warm: the reads below take the batched path together. */
      expect(await repo.countBy({ label: 'shared-turn' })).toBe(TENANTS.length + 1);
      await repo.find({ where: { label: 'shared-turn' } });
    }
    await db.encryption.tenants.offboard(gone);
    for (const [layout, entity] of LAYOUTS) {
      const repo = db.dataSource.getRepository<Contact>(entity);
      const results = await Promise.allSettled([
        repo.findBy({ workspaceId: gone, label: 'shared-turn' }),
        ...TENANTS.map((tenant) => repo.findBy({ workspaceId: tenant, label: 'shared-turn' })),
      ]);
      const [offboarded, ...others] = results;
      expect(offboarded?.status, layout).toBe('rejected');
      expect((offboarded as PromiseRejectedResult).reason).toBeInstanceOf(TenantOffboardedError);
      others.forEach((result, n) => {
        const tenant = TENANTS[n] as string;
        expect(result.status, `${layout} ${tenant}`).toBe('fulfilled');
        const found = (result as PromiseFulfilledResult<Contact[]>).value;
        expect(found.map((c) => [c.workspaceId, c.email])).toEqual([
          [tenant, emailOf(tenant, 'shared-turn')],
        ]);
      });
      /* A result set holding the offboarded tenant's row fails as a whole, naming no plaintext. */
      const mixed = await repo.find({ where: { label: 'shared-turn' } }).then(
        () => undefined,
        (error: unknown) => error as Error,
      );
      expect(mixed, layout).toBeInstanceOf(TenantOffboardedError);
      expect(String(mixed?.message)).not.toContain(MARK);
    }
  });
});
