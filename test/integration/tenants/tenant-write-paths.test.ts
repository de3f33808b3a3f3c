import { randomBytes, randomUUID } from 'node:crypto';
import 'reflect-metadata';
import { Column, Entity, PrimaryColumn, PrimaryGeneratedColumn } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  ConfigError,
  Encrypted,
  EncryptionTenant,
  IntegrityError,
  UnsupportedOperationError,
} from '../../../src';
import { rawQuery } from '../../support/database';
import { TENANT_MIGRATIONS, TenantContact } from '../../support/tenant-entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/** A tenant held in a uuid column, given by applications in any case. */
@Entity('uuid_tenant_notes')
class UuidTenantNote {
  @PrimaryColumn('uuid') id!: string;
  @EncryptionTenant() @Column('uuid') orgId!: string;
  @Encrypted() body!: string;
}

/** A nullable tenant: rows without one belong to the application itself. */
@Entity('optional_tenant_notes')
class OptionalTenantNote {
  @PrimaryGeneratedColumn() id!: number;
  @EncryptionTenant() @Column({ type: 'varchar', nullable: true }) orgId!: string | null;
  @Encrypted() body!: string;
}

let db: EncryptedTestDatabase;
beforeAll(async () => {
  db = await encryptedDatabase([TenantContact, UuidTenantNote, OptionalTenantNote], {
    prefix: 'tenant_paths',
    migrations: TENANT_MIGRATIONS,
  });
  await db.encryption.tenants.addKey('ws-own', {
    kind: 'customer-key',
    key: randomBytes(32).toString('base64'),
  });
});
afterAll(() => db?.close());

const contacts = () => db.dataSource.getRepository(TenantContact);
const stored = async (id: number) =>
  (
    await rawQuery(db.schema.url, `SELECT * FROM "${db.schema.schema}".tenant_contacts WHERE id = $1`, [id])
  )[0] as Record<string, unknown>;
const save = (workspaceId: string, email: string) =>
  contacts().save(contacts().create({ workspaceId, email, profile: { phone: `+${email.length}` } }));
const reread = async (id: number) => {
  db.encryption.purgeCache();
  return contacts().findOneByOrFail({ id });
};

describe('writes of tenant entities', () => {
  it('refuses an insert that does not say its tenant, storing nothing', async () => {
    const before = await rawQuery(
      db.schema.url,
      `SELECT count(*)::int AS n FROM "${db.schema.schema}".tenant_contacts`,
    );
    await expect(
      contacts().save(contacts().create({ email: 'nobody@x.example', profile: null })),
    ).rejects.toBeInstanceOf(UnsupportedOperationError);
    const after = await rawQuery(
      db.schema.url,
      `SELECT count(*)::int AS n FROM "${db.schema.schema}".tenant_contacts`,
    );
    expect(after).toEqual(before);
  });

  it('moving a loaded entity to another tenant seals all its values for that tenant', async () => {
    const saved = await save('ws-vendor', 'mover@x.example');
    const loaded = await contacts().findOneByOrFail({ id: saved.id });
    loaded.workspaceId = 'ws-own';
    await contacts().save(loaded);
    const row = await stored(saved.id);
    expect(row.email_key_version).toBeGreaterThanOrEqual(1_000_000);
    expect(row.profile_key_version).toBeGreaterThanOrEqual(1_000_000);
    const back = await reread(saved.id);
    expect(back.email).toBe('mover@x.example');
    expect(back.profile).toEqual({ phone: '+15' });
  });

  it('refuses to move a partial object to another tenant (its other values would stay bound to the old one)', async () => {
    const saved = await save('ws-vendor', 'partial@x.example');
    await expect(
      contacts().save({ id: saved.id, workspaceId: 'ws-own', email: 'partial2@x.example' }),
    ).rejects.toBeInstanceOf(UnsupportedOperationError);
    expect((await reread(saved.id)).email).toBe('partial@x.example');
  });

  it('a query-builder update of encrypted values must name the tenant, and touches only its rows', async () => {
    const mine = await save('ws-own', 'qb@own.example');
    const theirs = await save('ws-vendor', 'qb@vendor.example');
    const builder = () => db.dataSource.createQueryBuilder().update(TenantContact);
    await expect(
      builder().set({ email: 'x@x.example' }).whereInIds([mine.id]).execute(),
    ).rejects.toBeInstanceOf(UnsupportedOperationError);
    // the caller's WHERE names both rows (with an OR); only the named tenant's row is written
    const result = await builder()
      .set({ workspaceId: 'ws-own', email: 'changed@own.example' })
      .where('id = :a', { a: mine.id })
      .orWhere('id = :b', { b: theirs.id })
      .execute();
    expect(result.affected).toBe(1);
    expect((await reread(mine.id)).email).toBe('changed@own.example');
    expect((await reread(theirs.id)).email).toBe('qb@vendor.example');
    expect((await stored(theirs.id)).workspaceId).toBe('ws-vendor');
  });

  it('refuses a query-builder update that changes the tenant column alone', async () => {
    const saved = await save('ws-vendor', 'stay@x.example');
    await expect(
      db.dataSource
        .createQueryBuilder()
        .update(TenantContact)
        .set({ workspaceId: 'ws-own' })
        .whereInIds([saved.id])
        .execute(),
    ).rejects.toBeInstanceOf(UnsupportedOperationError);
    expect((await stored(saved.id)).workspaceId).toBe('ws-vendor');
    expect((await reread(saved.id)).email).toBe('stay@x.example');
  });

  it('a partial select without the tenant column still decrypts (the tenant is read with the sidecars)', async () => {
    const saved = await save('ws-own', 'select@own.example');
    db.encryption.purgeCache();
    const [row] = await contacts().find({ select: { id: true, email: true }, where: { id: saved.id } });
    expect(row?.email).toBe('select@own.example');
  });

  it('an upsert on the primary key writes the tenant with the values it sealed', async () => {
    const repo = db.dataSource.getRepository(UuidTenantNote);
    const id = randomUUID();
    await repo.save(repo.create({ id, orgId: randomUUID(), body: 'before upsert' }));
    const org = randomUUID();
    await repo.upsert({ id, orgId: org, body: 'after upsert' }, ['id']);
    const rows = await rawQuery(
      db.schema.url,
      `SELECT "orgId"::text AS org FROM "${db.schema.schema}".uuid_tenant_notes WHERE id = $1`,
      [id],
    );
    expect(rows).toEqual([{ org }]);
    db.encryption.purgeCache();
    expect((await repo.findOneByOrFail({ id })).body).toBe('after upsert');
  });

  it('an upsert naming only an encrypted property in its update list writes the tenant too', async () => {
    const repo = db.dataSource.getRepository(UuidTenantNote);
    const id = randomUUID();
    await repo.save(repo.create({ id, orgId: randomUUID(), body: 'first' }));
    const org = randomUUID();
    await db.dataSource
      .createQueryBuilder()
      .insert()
      .into(UuidTenantNote)
      .values({ id, orgId: org, body: 'second' })
      .orUpdate(['body_ciphertext'], ['id'])
      .execute();
    db.encryption.purgeCache();
    const loaded = await repo.findOneByOrFail({ id });
    expect(loaded.orgId).toBe(org);
    expect(loaded.body).toBe('second');
  });

  it('binds a uuid tenant in the form PostgreSQL prints it, whatever the case given', async () => {
    const org = randomUUID();
    const repo = db.dataSource.getRepository(UuidTenantNote);
    const id = randomUUID();
    await repo.save(repo.create({ id, orgId: org.toUpperCase(), body: 'upper-case org' }));
    db.encryption.purgeCache();
    expect((await repo.findOneByOrFail({ id })).body).toBe('upper-case org');
    const rows = await rawQuery(
      db.schema.url,
      `SELECT "orgId"::text AS org FROM "${db.schema.schema}".uuid_tenant_notes WHERE id = $1`,
      [id],
    );
    expect(rows[0]?.org).toBe(org);
  });

  it('a row without a tenant (NULL) is the application’s own; giving it a tenant later re-seals it', async () => {
    const repo = db.dataSource.getRepository(OptionalTenantNote);
    const note = await repo.save(repo.create({ orgId: null, body: 'app-owned' }));
    const [row] = await rawQuery(
      db.schema.url,
      `SELECT body_ciphertext, body_key_version FROM "${db.schema.schema}".optional_tenant_notes WHERE id = $1`,
      [note.id],
    );
    expect(((row?.body_ciphertext as Buffer | undefined)?.[1] ?? 0) & 0x04).toBe(0);
    const loaded = await repo.findOneByOrFail({ id: note.id });
    loaded.orgId = 'ws-own';
    await repo.save(loaded);
    const [moved] = await rawQuery(
      db.schema.url,
      `SELECT body_ciphertext, body_key_version FROM "${db.schema.schema}".optional_tenant_notes WHERE id = $1`,
      [note.id],
    );
    expect(((moved?.body_ciphertext as Buffer | undefined)?.[1] ?? 0) & 0x04).toBe(0x04);
    expect(moved?.body_key_version).toBeGreaterThanOrEqual(1_000_000);
    db.encryption.purgeCache();
    expect((await repo.findOneByOrFail({ id: note.id })).body).toBe('app-owned');
    // a tenant's value put into a row whose tenant was set to NULL does not decrypt
    await rawQuery(
      db.schema.url,
      `UPDATE "${db.schema.schema}".optional_tenant_notes SET "orgId" = NULL WHERE id = $1`,
      [note.id],
    );
    db.encryption.purgeCache();
    await expect(repo.findOneByOrFail({ id: note.id })).rejects.toBeInstanceOf(Error);
  });

  it('a value sealed before the entity named its tenant is refused in a tenant row', async () => {
    const saved = await save('ws-vendor', 'legacy@x.example');
    const row = await stored(saved.id);
    // a value bound to table, column and key but not to a tenant, sealed outside TypeORM
    const sealed = await db.encryption.encryptValue('legacy@x.example', {
      table: 'tenant_contacts',
      schema: db.schema.schema,
      column: 'email',
      primaryKey: String(saved.id),
    });
    await rawQuery(
      db.schema.url,
      `UPDATE "${db.schema.schema}".tenant_contacts SET email_ciphertext = $1, email_iv = $2, email_wrapped_key = $3, email_key_version = $4 WHERE id = $5`,
      [sealed.ciphertext, sealed.iv, sealed.wrappedKey, sealed.keyVersion, saved.id],
    );
    expect((await stored(saved.id)).email_ciphertext).not.toEqual(row.email_ciphertext);
    await expect(reread(saved.id)).rejects.toBeInstanceOf(IntegrityError);
  });

  it('refuses @EncryptionTenant() on a column whose stored form is unknown', async () => {
    @Entity('bad_tenant_notes')
    class BadTenantNote {
      @PrimaryGeneratedColumn() id!: number;
      @EncryptionTenant() @Column('numeric') orgId!: string;
      @Encrypted() body!: string;
    }
    await expect(
      encryptedDatabase([BadTenantNote], { prefix: 'tenant_bad', encryption: {} }),
    ).rejects.toBeInstanceOf(ConfigError);
  });
});
