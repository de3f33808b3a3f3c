import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TenantOffboardedError } from '../../../src';
import { rawQuery } from '../../support/database';
import { TENANT_MIGRATIONS, TenantContact } from '../../support/tenant-entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/**
 * Two instances of one application. The second refreshes the tenant registry once a minute, but
 * learns of a tenant's offboarding sooner when it meets a key version it has not seen: from then
 * on, none of that tenant's rows may decrypt there, also those whose data keys it holds in memory.
 */
const customerKey = () => randomBytes(32).toString('base64');
let admin: EncryptedTestDatabase;
let reader: EncryptedTestDatabase;
beforeAll(async () => {
  admin = await encryptedDatabase([TenantContact], { prefix: 'adv_offboard', migrations: TENANT_MIGRATIONS });
  reader = await encryptedDatabase([TenantContact], {
    schema: admin.schema,
    migrations: TENANT_MIGRATIONS,
    encryption: { keys: [{ version: 1, provider: admin.provider }], tenantKeys: { refreshInterval: 60_000 } },
  });
});
afterAll(async () => {
  await reader?.close();
  await admin?.close();
});

const repo = (db: EncryptedTestDatabase) => db.dataSource.getRepository(TenantContact);

describe('offboarding learnt from an unseen key version', () => {
  it('refuses every row of the tenant at once, also those whose data keys were cached', async () => {
    const tenant = 'ws-leaving';
    await admin.encryption.tenants.addKey(tenant, { kind: 'customer-key', key: customerKey() });
    const old = await repo(admin).save(
      repo(admin).create({ workspaceId: tenant, email: 'old@leaving.example', profile: null }),
    );
    const neighbour = await repo(admin).save(
      repo(admin).create({ workspaceId: 'ws-staying', email: 'n@staying.example', profile: null }),
    );
    await reader.encryption.tenants.refresh();
    // the reader reads (and caches the data key of) the tenant's row
    expect((await repo(reader).findOneByOrFail({ id: old.id })).email).toBe('old@leaving.example');
    // meanwhile the tenant gets another key, writes under it, and is offboarded
    await admin.encryption.tenants.addKey(tenant, { kind: 'customer-key', key: customerKey() });
    const fresh = await repo(admin).save(
      repo(admin).create({ workspaceId: tenant, email: 'new@leaving.example', profile: null }),
    );
    await admin.encryption.tenants.offboard(tenant);
    // the reader meets the unseen version: it learns the tenant is offboarded
    await expect(repo(reader).findOneByOrFail({ id: fresh.id })).rejects.toBeInstanceOf(
      TenantOffboardedError,
    );
    // and refuses the row whose data key it still held
    await expect(repo(reader).findOneByOrFail({ id: old.id })).rejects.toBeInstanceOf(TenantOffboardedError);
    await expect(
      repo(reader).save(
        repo(reader).create({ workspaceId: tenant, email: 'x@leaving.example', profile: null }),
      ),
    ).rejects.toBeInstanceOf(TenantOffboardedError);
    expect((await repo(reader).findOneByOrFail({ id: neighbour.id })).email).toBe('n@staying.example');
    const rows = await rawQuery(
      admin.schema.url,
      `SELECT count(*)::int AS n FROM "${admin.schema.schema}".tenant_contacts WHERE "workspaceId" = $1`,
      [tenant],
    );
    expect(rows[0]?.n).toBe(2);
  });
});
