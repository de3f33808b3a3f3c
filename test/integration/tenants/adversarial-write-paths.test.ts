import { randomBytes } from 'node:crypto';
import 'reflect-metadata';
import {
  AfterLoad,
  Brackets,
  ChildEntity,
  Column,
  DeleteDateColumn,
  Entity,
  In,
  JoinColumn,
  ManyToOne,
  OneToMany,
  PrimaryColumn,
  PrimaryGeneratedColumn,
  TableInheritance,
} from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Encrypted, EncryptionTenant, IntegrityError, UnsupportedOperationError } from '../../../src';
import { rawQuery } from '../../support/database';
import { TENANT_MIGRATIONS } from '../../support/tenant-entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/** A SaaS's workspace (the tenant itself) and its contacts, saved together by cascade. */
@Entity('adv_workspaces')
class Workspace {
  @PrimaryColumn('varchar') id!: string;
  @Column() name!: string;
  @OneToMany(
    () => WorkspaceContact,
    (c) => c.workspace,
    { cascade: true },
  )
  contacts!: WorkspaceContact[];
}

class Address {
  @Column({ default: '' }) city!: string;
  @Encrypted({ nullable: true }) street!: string | null;
}

@Entity('adv_workspace_contacts')
class WorkspaceContact {
  @PrimaryGeneratedColumn() id!: number;
  @EncryptionTenant() @Column('varchar') workspaceId!: string;
  @ManyToOne(
    () => Workspace,
    (w) => w.contacts,
  )
  @JoinColumn({ name: 'workspaceId' })
  workspace!: Workspace;
  @Column({ unique: true }) ref!: string;
  @Encrypted() email!: string;
  @Encrypted({ type: 'json', nullable: true }) profile!: { phone: string } | null;
  @Column(() => Address) address!: Address;
  @DeleteDateColumn() deletedAt!: Date | null;
  seenInListener: string | undefined;
  @AfterLoad() remember() {
    this.seenInListener = this.email;
  }
}

/** Single-table inheritance with the tenant on the parent. */
@Entity('adv_parties')
@TableInheritance({ column: { type: 'varchar', name: 'kind' } })
class Party {
  @PrimaryGeneratedColumn() id!: number;
  @EncryptionTenant() @Column('varchar') workspaceId!: string;
  @Encrypted() name!: string;
}
@ChildEntity('person')
class Person extends Party {
  @Encrypted({ nullable: true }) ssn!: string | null;
}

const customerKey = () => randomBytes(32).toString('base64');
let db: EncryptedTestDatabase;
beforeAll(async () => {
  db = await encryptedDatabase([Workspace, WorkspaceContact, Party, Person], {
    prefix: 'adv_writes',
    migrations: TENANT_MIGRATIONS,
  });
  await db.encryption.tenants.addKey('ws-a', { kind: 'customer-key', key: customerKey() });
  await db.encryption.tenants.addKey('ws-b', { kind: 'customer-key', key: customerKey() });
  await db.dataSource.getRepository(Workspace).save([
    { id: 'ws-a', name: 'A' },
    { id: 'ws-b', name: 'B' },
    { id: 'ws-plain', name: 'Plain' },
  ]);
});
afterAll(() => db?.close());

const sql = (text: string, params?: unknown[]) => rawQuery(db.schema.url, text, params);
const t = (name: string) => `"${db.schema.schema}".${name}`;
const contacts = () => db.dataSource.getRepository(WorkspaceContact);
let refs = 0;
const ref = () => `ref-${++refs}`;
const row = async (id: number) =>
  (await sql(`SELECT * FROM ${t('adv_workspace_contacts')} WHERE id = $1`, [id]))[0] as Record<
    string,
    unknown
  >;
const cold = () => db.encryption.purgeCache();
/** A contact of tenant ws-b with every encrypted property set, under the natural key `ref`. */
const saveTenantBContact = (r: string) =>
  contacts().save(
    contacts().create({
      workspaceId: 'ws-b',
      ref: r,
      email: 'b@b.example',
      profile: { phone: 'b-phone' },
      address: { city: 'B city', street: 'b street' },
    }),
  );

describe('tenant entities as applications write them', () => {
  it('a workspace saved with its contacts by cascade: each contact sealed under the workspace key, read back', async () => {
    const ws = db.dataSource.getRepository(Workspace);
    // children that do not say their tenant are refused before anything is written
    await expect(
      ws.save(
        ws.create({
          id: 'ws-c',
          name: 'C',
          contacts: [
            { ref: ref(), email: 'c@c.example', profile: null, address: { city: '', street: null } },
          ],
        }),
      ),
    ).rejects.toBeInstanceOf(UnsupportedOperationError);
    expect(await sql(`SELECT id FROM ${t('adv_workspaces')} WHERE id = 'ws-c'`)).toEqual([]);
    await ws.save(
      ws.create({
        id: 'ws-a',
        name: 'A',
        contacts: [
          {
            workspaceId: 'ws-a',
            ref: ref(),
            email: 'one@a.example',
            profile: { phone: '1' },
            address: { city: 'X', street: 'Main 1' },
          },
          {
            workspaceId: 'ws-a',
            ref: ref(),
            email: 'two@a.example',
            profile: null,
            address: { city: 'Y', street: null },
          },
        ],
      }),
    );
    const stored = await sql(
      `SELECT "workspaceId" AS w, email_key_version AS v, "addressStreet_key_version" AS sv FROM ${t('adv_workspace_contacts')} WHERE "workspaceId" = 'ws-a'`,
    );
    expect(stored).toHaveLength(2);
    const version = (await db.encryption.tenants.status('ws-a')).activeVersion;
    for (const s of stored) expect(s.v).toBe(version);
    cold();
    const loaded = await ws.findOneOrFail({ where: { id: 'ws-a' }, relations: { contacts: true } });
    expect(loaded.contacts.map((c) => c.email).sort()).toEqual(['one@a.example', 'two@a.example']);
    expect(loaded.contacts.find((c) => c.email === 'one@a.example')?.address.street).toBe('Main 1');
    expect(loaded.contacts.map((c) => c.seenInListener).sort()).toEqual(['one@a.example', 'two@a.example']);
  });

  it('an embedded value copied into another tenant row does not decrypt there', async () => {
    const a = await contacts().save(
      contacts().create({
        workspaceId: 'ws-a',
        ref: ref(),
        email: 'e@a.example',
        profile: null,
        address: { city: '', street: 'secret street' },
      }),
    );
    const b = await contacts().save(
      contacts().create({
        workspaceId: 'ws-b',
        ref: ref(),
        email: 'e@b.example',
        profile: null,
        address: { city: '', street: 'b street' },
      }),
    );
    const source = await row(a.id);
    await sql(
      `UPDATE ${t('adv_workspace_contacts')} SET "addressStreet_ciphertext" = $1, "addressStreet_iv" = $2, "addressStreet_wrapped_key" = $3, "addressStreet_key_version" = $4 WHERE id = $5`,
      [
        source.addressStreet_ciphertext,
        source.addressStreet_iv,
        source.addressStreet_wrapped_key,
        source.addressStreet_key_version,
        b.id,
      ],
    );
    cold();
    await expect(contacts().findOneByOrFail({ id: b.id })).rejects.toBeInstanceOf(IntegrityError);
  });

  it('an upsert naming the tenant and one encrypted property keeps the row’s other encrypted values', async () => {
    const r = ref();
    const saved = await saveTenantBContact(r);
    const before = await row(saved.id);
    await contacts().upsert({ workspaceId: 'ws-b', ref: r, email: 'b2@b.example' }, ['ref']);
    const after = await row(saved.id);
    expect(after.profile_ciphertext).toEqual(before.profile_ciphertext);
    expect(after.addressStreet_ciphertext).toEqual(before.addressStreet_ciphertext);
    expect(after.email_ciphertext).not.toEqual(before.email_ciphertext);
    cold();
    const back = await contacts().findOneByOrFail({ id: saved.id });
    expect([back.email, back.profile, back.address.street, back.address.city]).toEqual([
      'b2@b.example',
      { phone: 'b-phone' },
      'b street',
      'B city',
    ]);
  });

  it('a partial upsert conflicting with another tenant’s row leaves that row as it is; a full one moves it, readable', async () => {
    const r = ref();
    const theirs = await saveTenantBContact(r);
    const before = await row(theirs.id);
    await contacts().upsert({ workspaceId: 'ws-a', ref: r, email: 'a@a.example' }, ['ref']);
    expect(await row(theirs.id)).toEqual(before);
    cold();
    const back = await contacts().findOneByOrFail({ id: theirs.id });
    expect([back.workspaceId, back.email, back.profile, back.address.street]).toEqual([
      'ws-b',
      'b@b.example',
      { phone: 'b-phone' },
      'b street',
    ]);
    // every encrypted property given: the row moves to the new tenant with all its values sealed for it
    await contacts().upsert(
      {
        workspaceId: 'ws-a',
        ref: r,
        email: 'a@a.example',
        profile: { phone: 'a-phone' },
        address: { city: 'A city', street: 'a street' },
      },
      ['ref'],
    );
    const moved = await row(theirs.id);
    const a = (await db.encryption.tenants.status('ws-a')).activeVersion;
    expect([moved.workspaceId, moved.email_key_version, moved.profile_key_version]).toEqual(['ws-a', a, a]);
    cold();
    const read = await contacts().findOneByOrFail({ id: theirs.id });
    expect([read.email, read.profile, read.address.street]).toEqual([
      'a@a.example',
      { phone: 'a-phone' },
      'a street',
    ]);
  });

  it('repository.update(id, { email }) without the tenant is refused; with it, only that tenant’s row changes', async () => {
    const mine = await contacts().save(
      contacts().create({
        workspaceId: 'ws-a',
        ref: ref(),
        email: 'u@a.example',
        profile: null,
        address: { city: '', street: null },
      }),
    );
    await expect(contacts().update(mine.id, { email: 'x@a.example' })).rejects.toBeInstanceOf(
      UnsupportedOperationError,
    );
    const wrongTenant = await contacts().update(mine.id, { workspaceId: 'ws-b', email: 'x@b.example' });
    expect(wrongTenant.affected).toBe(0);
    expect((await row(mine.id)).workspaceId).toBe('ws-a');
    await contacts().update(
      { id: mine.id, workspaceId: 'ws-a' },
      { workspaceId: 'ws-a', email: 'y@a.example' },
    );
    cold();
    expect((await contacts().findOneByOrFail({ id: mine.id })).email).toBe('y@a.example');
  });

  it('a query-builder update with Brackets and orWhere touches only the named tenant’s rows', async () => {
    const a = await contacts().save(
      contacts().create({
        workspaceId: 'ws-a',
        ref: ref(),
        email: 'qa@a.example',
        profile: null,
        address: { city: 'Z', street: null },
      }),
    );
    const b = await contacts().save(
      contacts().create({
        workspaceId: 'ws-b',
        ref: ref(),
        email: 'qb@b.example',
        profile: null,
        address: { city: 'Z', street: null },
      }),
    );
    const result = await db.dataSource
      .createQueryBuilder()
      .update(WorkspaceContact)
      .set({ workspaceId: 'ws-a', email: 'changed@a.example' })
      .where(new Brackets((q) => q.where('id = :a', { a: a.id }).orWhere('id = :b', { b: b.id })))
      .orWhere('"addressCity" = :city', { city: 'Z' })
      .execute();
    expect(result.affected).toBe(1);
    cold();
    expect((await contacts().findOneByOrFail({ id: a.id })).email).toBe('changed@a.example');
    expect((await contacts().findOneByOrFail({ id: b.id })).email).toBe('qb@b.example');
    expect((await row(b.id)).workspaceId).toBe('ws-b');
  });

  it('insert().values([...]) of several tenants: each row under its tenant’s key', async () => {
    const values = ['ws-a', 'ws-b', 'ws-plain'].map((workspaceId) => ({
      workspaceId,
      ref: ref(),
      email: `bulk@${workspaceId}.example`,
      profile: null,
      address: { city: '', street: `street of ${workspaceId}` },
    }));
    cold();
    const inserted = await db.dataSource
      .createQueryBuilder()
      .insert()
      .into(WorkspaceContact)
      .values(values)
      .execute();
    const ids = inserted.identifiers.map((i) => i.id as number);
    const stored = await sql(
      `SELECT id, "workspaceId" AS w, email_key_version AS v FROM ${t('adv_workspace_contacts')} WHERE id = ANY($1)`,
      [ids],
    );
    const a = (await db.encryption.tenants.status('ws-a')).activeVersion;
    const b = (await db.encryption.tenants.status('ws-b')).activeVersion;
    expect(new Map(stored.map((s) => [s.w, s.v]))).toEqual(
      new Map([
        ['ws-a', a],
        ['ws-b', b],
        ['ws-plain', 1],
      ]),
    );
    cold();
    const back = await contacts().findBy({ id: In(ids) });
    expect(back.map((c) => c.address.street).sort()).toEqual(
      ['street of ws-a', 'street of ws-b', 'street of ws-plain'].sort(),
    );
  });

  it('softRemove and restore keep every value readable', async () => {
    const saved = await contacts().save(
      contacts().create({
        workspaceId: 'ws-b',
        ref: ref(),
        email: 'soft@b.example',
        profile: { phone: 's' },
        address: { city: '', street: 'soft st' },
      }),
    );
    const before = await row(saved.id);
    await contacts().softRemove(saved);
    await contacts().restore(saved.id);
    const after = await row(saved.id);
    expect(after.email_ciphertext).toEqual(before.email_ciphertext);
    cold();
    const back = await contacts().findOneByOrFail({ id: saved.id });
    expect([back.email, back.profile, back.address.street]).toEqual([
      'soft@b.example',
      { phone: 's' },
      'soft st',
    ]);
  });

  it('find with select and relations decrypts the selected values of each tenant', async () => {
    cold();
    const found = await contacts().find({
      select: { id: true, email: true, workspace: { id: true, name: true } },
      relations: { workspace: true },
      where: { workspaceId: 'ws-a' },
    });
    expect(found.length).toBeGreaterThan(0);
    for (const c of found) expect(c.email).toMatch(/@(ws-)?a\.example$/);
  });

  it('single-table inheritance with the tenant on the parent: child values sealed for the tenant', async () => {
    const people = db.dataSource.getRepository(Person);
    const saved = await people.save(people.create({ workspaceId: 'ws-b', name: 'Bea', ssn: '123-45' }));
    const stored = (
      await sql(`SELECT name_key_version AS n, ssn_key_version AS s FROM ${t('adv_parties')} WHERE id = $1`, [
        saved.id,
      ])
    )[0];
    const b = (await db.encryption.tenants.status('ws-b')).activeVersion;
    expect(stored).toEqual({ n: b, s: b });
    cold();
    const viaParent = await db.dataSource.getRepository(Party).findOneByOrFail({ id: saved.id });
    expect(viaParent.name).toBe('Bea');
    expect((viaParent as Person).ssn).toBe('123-45');
  });
});
