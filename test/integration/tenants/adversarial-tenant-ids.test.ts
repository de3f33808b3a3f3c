import { randomBytes, randomUUID } from 'node:crypto';
import 'reflect-metadata';
import { Column, Entity, In, PrimaryGeneratedColumn } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError, Encrypted, EncryptionTenant, TenantOffboardedError } from '../../../src';
import { rawQuery } from '../../support/database';
import { TENANT_MIGRATIONS } from '../../support/tenant-entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/**
 * Tenant ids as applications hold them: GUIDs printed in upper case in a text column (as .NET and
 * SQL Server print them), integers in an integer column given to the tenant API as text, and ids
 * with spaces, unicode or SQL in them. The tenant API must name the same tenant as the rows do.
 */
@Entity('guid_text_notes')
class GuidTextNote {
  @PrimaryGeneratedColumn() id!: number;
  @EncryptionTenant() @Column('varchar') accountId!: string;
  @Encrypted() body!: string;
}

@Entity('int_tenant_notes')
class IntTenantNote {
  @PrimaryGeneratedColumn() id!: number;
  @EncryptionTenant() @Column('int') orgId!: number;
  @Encrypted() body!: string;
}

const customerKey = () => randomBytes(32).toString('base64');
let db: EncryptedTestDatabase;
beforeAll(async () => {
  db = await encryptedDatabase([GuidTextNote, IntTenantNote], {
    prefix: 'adv_tenant_ids',
    migrations: TENANT_MIGRATIONS,
  });
});
afterAll(() => db?.close());

const sql = (text: string, params?: unknown[]) => rawQuery(db.schema.url, text, params);
const t = (name: string) => `"${db.schema.schema}".${name}`;

describe('tenant ids as the rows hold them', () => {
  it('an upper-case GUID in a text column: its own key seals its rows, the job moves them, offboarding refuses them', async () => {
    const tenant = randomUUID().toUpperCase();
    const repo = db.dataSource.getRepository(GuidTextNote);
    const old = await repo.save(repo.create({ accountId: tenant, body: 'before the key' }));
    const added = await db.encryption.tenants.addKey(tenant, { kind: 'customer-key', key: customerKey() });
    expect(added.tenantId).toBe(tenant);
    const fresh = await repo.save(repo.create({ accountId: tenant, body: 'after the key' }));
    const version = async (id: number) =>
      (await sql(`SELECT body_key_version AS v FROM ${t('guid_text_notes')} WHERE id = $1`, [id]))[0]?.v;
    expect(await version(fresh.id)).toBe(added.version);
    const job = await db.encryption.tenants.runJob(tenant);
    expect(job.state).toBe('completed');
    expect(await version(old.id)).toBe(added.version);
    await db.encryption.tenants.offboard(tenant);
    db.encryption.purgeCache();
    await expect(repo.findOneByOrFail({ id: old.id })).rejects.toBeInstanceOf(TenantOffboardedError);
    await expect(
      repo.save(repo.create({ accountId: tenant, body: 'after offboarding' })),
    ).rejects.toBeInstanceOf(TenantOffboardedError);
  });

  it('two GUIDs differing only in case in a text column are two tenants: one key never serves the other', async () => {
    const lower = randomUUID();
    const upper = lower.toUpperCase();
    const repo = db.dataSource.getRepository(GuidTextNote);
    const other = await repo.save(repo.create({ accountId: upper, body: 'the other tenant' }));
    const added = await db.encryption.tenants.addKey(lower, { kind: 'customer-key', key: customerKey() });
    const mine = await repo.save(repo.create({ accountId: lower, body: 'mine' }));
    const again = await repo.save(repo.create({ accountId: upper, body: 'the other tenant again' }));
    const rows = await sql(
      `SELECT id, body_key_version AS v FROM ${t('guid_text_notes')} WHERE id = ANY($1)`,
      [[other.id, mine.id, again.id]],
    );
    const v = new Map(rows.map((r) => [r.id, r.v]));
    expect(v.get(mine.id)).toBe(added.version);
    expect(v.get(again.id)).toBe(1);
    await db.encryption.tenants.offboard(lower);
    db.encryption.purgeCache();
    expect((await repo.findOneByOrFail({ id: again.id })).body).toBe('the other tenant again');
  });

  it('an integer tenant: "0042" is 42 where only integer columns hold tenants, and ambiguous beside a text column', async () => {
    // beside a varchar tenant column, "0042" is another tenant than 42: refused, nothing recorded
    await expect(
      db.encryption.tenants.addKey('0042', { kind: 'customer-key', key: customerKey() }),
    ).rejects.toBeInstanceOf(ConfigError);
    expect(await sql(`SELECT 1 FROM ${t('typeorm_envelope_tenants')} WHERE tenant_id = '0042'`)).toEqual([]);
    const repo = db.dataSource.getRepository(IntTenantNote);
    const old = await repo.save(repo.create({ orgId: 42, body: 'org 42' }));
    const added = await db.encryption.tenants.addKey('42', { kind: 'customer-key', key: customerKey() });
    const fresh = await repo.save(repo.create({ orgId: '42' as unknown as number, body: 'org 42 later' }));
    const version = async (id: number) =>
      (await sql(`SELECT body_key_version AS v FROM ${t('int_tenant_notes')} WHERE id = $1`, [id]))[0]?.v;
    expect(await version(fresh.id)).toBe(added.version);
    // an application whose only tenant column is an integer: "0042" names tenant 42
    const intOnly = await encryptedDatabase([IntTenantNote], {
      schema: db.schema,
      migrations: TENANT_MIGRATIONS,
      encryption: { keys: [{ version: 1, provider: db.provider }] },
    });
    try {
      const job = await intOnly.encryption.tenantsOf(intOnly.dataSource).runJob('0042');
      expect(job.error).toBeNull();
      expect(job.state).toBe('completed');
      expect(job.rowsDone).toBe(1);
    } finally {
      await intOnly.close();
    }
    expect(await version(old.id)).toBe(added.version);
    db.encryption.purgeCache();
    expect((await repo.findOneByOrFail({ id: old.id })).body).toBe('org 42');
  });

  it('ids with spaces, quotes, unicode and SQL in them: each its own tenant, read back and isolated', async () => {
    const repo = db.dataSource.getRepository(GuidTextNote);
    const ids = [
      ' padded ',
      "o'brien; DROP TABLE x; --",
      'ünïcødé-工作区-🚀',
      'a'.repeat(200),
      '%',
      '_',
      'tenant\\0',
    ];
    const versions = new Map<string, number>();
    for (const id of ids) {
      versions.set(
        id,
        (await db.encryption.tenants.addKey(id, { kind: 'customer-key', key: customerKey() })).version,
      );
    }
    const saved = await repo.save(
      ids.map((accountId) => repo.create({ accountId, body: `body of ${accountId}` })),
    );
    const rows = await sql(
      `SELECT id, "accountId" AS tenant, body_key_version AS v FROM ${t('guid_text_notes')} WHERE id = ANY($1)`,
      [saved.map((s) => s.id)],
    );
    for (const row of rows) expect(row.v).toBe(versions.get(row.tenant as string));
    // a LIKE-pattern tenant id ('%') does not reach other tenants' rows in the job
    const job = await db.encryption.tenants.runJob('%');
    expect(job.state).toBe('completed');
    expect(job.rowsDone).toBe(0);
    db.encryption.purgeCache();
    const back = await repo.findBy({ id: In(saved.map((s) => s.id)) });
    expect(new Map(back.map((b) => [b.accountId, b.body]))).toEqual(
      new Map(ids.map((id) => [id, `body of ${id}`])),
    );
  });
});
