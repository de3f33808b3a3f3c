import { randomUUID } from 'node:crypto';
import { type EntitySubscriberInterface, In, type InsertEvent, Not } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UnsupportedOperationError, ValueTypeError } from '../../../src';
import {
  Account,
  BLIND_INDEX_MIGRATIONS,
  Invoice,
  Member,
  Voucher,
} from '../../support/blind-index-entities';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/**
 * What an application gets wrong first with searchable encrypted properties: a tenant entity
 * queried without its tenant, a query-builder update, a row copied or moved to another tenant, a
 * normaliser that throws, an upsert that changes the value. Each leaves the index in step with
 * the value, or is refused.
 */
let db: EncryptedTestDatabase;

beforeAll(async () => {
  db = await encryptedDatabase([Member, Voucher, Account, Invoice], {
    prefix: 'bidx_misuse',
    migrations: BLIND_INDEX_MIGRATIONS,
  });
});
afterAll(() => db?.close());

const members = () => db.dataSource.getRepository(Member);
const table = (name = 'bidx_members') => `"${db.schema.schema}".${name}`;
const row = async (id: number) =>
  (await rawQuery(db.schema.url, `SELECT * FROM ${table()} WHERE id = $1`, [id]))[0] as Record<
    string,
    unknown
  >;
const indexOf = async (email: string, tenant: string) => {
  const [index] = await db.encryption.blindIndex(Member, 'email', email, { tenant });
  return index as Buffer;
};
const member = (workspaceId: string, email: string, extra: Partial<Member> = {}) =>
  members().save(members().create({ workspaceId, email, phone: null, note: null, ...extra }));

describe('a where on a tenant entity must fix the tenant', () => {
  it('is refused without the tenant, naming the tenant property', async () => {
    await member('ws-where', 'where@example.com');
    const refused = await members()
      .findOneBy({ email: 'where@example.com' })
      .catch((error: unknown) => error);
    expect(refused).toBeInstanceOf(UnsupportedOperationError);
    expect((refused as Error).message).toMatch(/fix the tenant.*workspaceId/);
    expect((refused as Error).message).not.toContain('where@example.com');
    /* A query builder refuses where the condition is written, as TypeORM does with unknown properties. */
    expect(() => members().createQueryBuilder('m').where({ email: 'where@example.com' })).toThrow(
      UnsupportedOperationError,
    );
    await expect(
      members().count({ where: { workspaceId: In(['ws-where']), email: 'x@y' } }),
    ).rejects.toBeInstanceOf(UnsupportedOperationError);
    await expect(members().delete({ email: 'where@example.com' })).rejects.toBeInstanceOf(
      UnsupportedOperationError,
    );
    expect(await members().countBy({ workspaceId: 'ws-where' })).toBe(1); // nothing deleted
  });

  it('is answered with the tenant, in each branch of an OR', async () => {
    await member('ws-or-a', 'or@example.com');
    await member('ws-or-b', 'or@example.com');
    const found = await members().find({
      where: [
        { workspaceId: 'ws-or-a', email: 'OR@example.com' },
        { workspaceId: 'ws-or-b', email: ' or@example.com' },
      ],
    });
    expect(found.map((m) => m.workspaceId).sort()).toEqual(['ws-or-a', 'ws-or-b']);
    await expect(
      members().find({
        where: [{ workspaceId: 'ws-or-a', email: 'or@example.com' }, { email: 'or@example.com' }],
      }),
    ).rejects.toBeInstanceOf(UnsupportedOperationError);
  });
});

describe('query-builder updates keep the index in step', () => {
  it('a set() of the value rewrites its index: found under the new value, not the old', async () => {
    const saved = await member('ws-qb', 'before@example.com');
    const before = (await row(saved.id)).email_bidx as Buffer;
    await members()
      .createQueryBuilder()
      .update(Member)
      .set({ workspaceId: 'ws-qb', email: 'After@Example.com' })
      .where('id = :id', { id: saved.id })
      .execute();
    const stored = await row(saved.id);
    expect(stored.email_bidx).toEqual(await indexOf('after@example.com', 'ws-qb'));
    expect(stored.email_bidx).not.toEqual(before);
    expect((await members().findOneBy({ workspaceId: 'ws-qb', email: 'after@example.com' }))?.id).toBe(
      saved.id,
    );
    expect(await members().findOneBy({ workspaceId: 'ws-qb', email: 'before@example.com' })).toBeNull();
  });

  it('repository.update() by a searchable criterion rewrites both the criterion and the index', async () => {
    const saved = await member('ws-upd', 'one@example.com');
    const result = await members().update(
      { workspaceId: 'ws-upd', email: 'ONE@example.com' },
      { workspaceId: 'ws-upd', email: 'two@example.com', label: 'renamed' },
    );
    expect(result.affected).toBe(1);
    expect((await row(saved.id)).email_bidx).toEqual(await indexOf('two@example.com', 'ws-upd'));
    const found = await members().findOneByOrFail({ workspaceId: 'ws-upd', email: 'two@example.com' });
    expect(found).toMatchObject({ id: saved.id, email: 'two@example.com', label: 'renamed' });
  });

  it('an update that does not name the value leaves its index alone', async () => {
    const saved = await member('ws-label', 'same@example.com');
    const before = (await row(saved.id)).email_bidx;
    await members().update({ id: saved.id }, { label: 'only the label' });
    expect((await row(saved.id)).email_bidx).toEqual(before);
  });
});

describe('rows copied or moved to another tenant', () => {
  it('a copy saved into another tenant is indexed under that tenant’s key', async () => {
    const original = await member('ws-src', 'copied@example.com');
    const loaded = await members().findOneByOrFail({ id: original.id });
    const copy = await members().save(members().create({ ...loaded, id: undefined, workspaceId: 'ws-dst' }));
    const [a, b] = [await row(original.id), await row(copy.id)];
    expect(a.email_bidx).not.toEqual(b.email_bidx);
    expect(b.email_bidx).toEqual(await indexOf('copied@example.com', 'ws-dst'));
    expect((await members().findOneBy({ workspaceId: 'ws-dst', email: 'copied@example.com' }))?.id).toBe(
      copy.id,
    );
    expect((await members().findOneBy({ workspaceId: 'ws-src', email: 'copied@example.com' }))?.id).toBe(
      original.id,
    );
  });

  it('a row moved to another tenant is found there, and no longer in its old tenant', async () => {
    const saved = await member('ws-from', 'moved@example.com');
    const loaded = await members().findOneByOrFail({ id: saved.id });
    loaded.workspaceId = 'ws-to';
    await members().save(loaded);
    expect((await row(saved.id)).email_bidx).toEqual(await indexOf('moved@example.com', 'ws-to'));
    expect((await members().findOneBy({ workspaceId: 'ws-to', email: 'moved@example.com' }))?.id).toBe(
      saved.id,
    );
    expect(await members().findOneBy({ workspaceId: 'ws-from', email: 'moved@example.com' })).toBeNull();
  });
});

describe('writes that change the value on the way', () => {
  it('a partial entity saved over its row is indexed under the row’s tenant', async () => {
    const saved = await member('ws-partial', 'partial-old@example.com');
    await members().save({ id: saved.id, email: 'partial-new@example.com' });
    expect((await row(saved.id)).email_bidx).toEqual(await indexOf('partial-new@example.com', 'ws-partial'));
    expect(
      (await members().findOneBy({ workspaceId: 'ws-partial', email: 'partial-new@example.com' }))?.id,
    ).toBe(saved.id);
  });

  it('a value another subscriber normalises before the write is indexed as it is stored', async () => {
    const vouchers = db.dataSource.getRepository(Voucher);
    const trim: EntitySubscriberInterface<Voucher> = {
      listenTo: () => Voucher,
      beforeInsert(event: InsertEvent<Voucher>) {
        event.entity.code = event.entity.code.replace(/-/g, '');
      },
    };
    db.dataSource.subscribers.push(trim);
    try {
      const saved = await vouchers.save(vouchers.create({ code: 'ab-cd' }));
      expect((await vouchers.findOneByOrFail({ code: 'abcd' })).id).toBe(saved.id);
      expect(await vouchers.findOneBy({ code: 'ab-cd' })).toBeNull();
    } finally {
      db.dataSource.subscribers.splice(db.dataSource.subscribers.indexOf(trim as never), 1);
    }
  });
});

describe('a normaliser that throws', () => {
  it('refuses the write with a typed error that names the property and quotes nothing; nothing is stored', async () => {
    const vouchers = db.dataSource.getRepository(Voucher);
    const count = async () =>
      (
        (await rawQuery(db.schema.url, `SELECT count(*)::int AS n FROM ${table('bidx_vouchers')}`)) as [
          { n: number },
        ]
      )[0].n;
    const before = await count();
    const error = await vouchers.save(vouchers.create({ code: 'secret!code' })).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ValueTypeError);
    expect(error).toMatchObject({ entity: 'Voucher', column: 'code' });
    /* Neither the message nor any cause carries the normaliser's own error, which quotes the value. */
    for (let e: unknown = error; e; e = (e as Error).cause) {
      expect((e as Error).message).not.toContain('secret');
      expect(e).toBeInstanceOf(ValueTypeError);
    }
    expect(await count()).toBe(before);
    const queried = await vouchers.findOneBy({ code: 'other!secret' }).catch((e: unknown) => e);
    expect(queried).toBeInstanceOf(ValueTypeError);
    expect((queried as Error).message).not.toContain('secret');
    const saved = await vouchers.save(vouchers.create({ code: 'fine' }));
    expect((await vouchers.findOneByOrFail({ code: 'FINE' })).id).toBe(saved.id);
    expect((await vouchers.findOneByOrFail({ code: 'FINE' })).code).toBe('fine'); // the value itself is not normalised
  });
});

describe('upsert with a changed value', () => {
  it('updates the index with the value: found under the new value, not the old', async () => {
    const accounts = db.dataSource.getRepository(Account);
    const id = randomUUID();
    await accounts.save(accounts.create({ id, email: 'old-upsert@example.com', recoveryEmail: null }));
    await accounts.upsert({ id, email: 'new-upsert@example.com' }, ['id']);
    const [stored] = await rawQuery(db.schema.url, `SELECT * FROM ${table('bidx_accounts')} WHERE id = $1`, [
      id,
    ]);
    const [expected] = await db.encryption.blindIndex(Account, 'email', 'new-upsert@example.com');
    expect(stored?.email_bidx).toEqual(expected);
    expect((await accounts.findOneBy({ email: 'new-upsert@example.com' }))?.id).toBe(id);
    expect(await accounts.findOneBy({ email: 'old-upsert@example.com' })).toBeNull();
    expect((await accounts.findOneByOrFail({ id })).email).toBe('new-upsert@example.com');
  });

  it('a query-builder upsert whose update list names only the value column writes its index too', async () => {
    const accounts = db.dataSource.getRepository(Account);
    const id = randomUUID();
    await accounts.save(accounts.create({ id, email: 'qb-old@example.com', recoveryEmail: null }));
    await accounts
      .createQueryBuilder()
      .insert()
      .into(Account)
      .values({ id, email: 'qb-new@example.com' })
      .orUpdate(['email_ciphertext'], ['id'])
      .execute();
    expect((await accounts.findOneBy({ email: 'qb-new@example.com' }))?.id).toBe(id);
    expect(await accounts.findOneBy({ email: 'qb-old@example.com' })).toBeNull();
  });
});

describe('conditions the index cannot answer say why', () => {
  it('refuses LIKE, ranges and ordering', async () => {
    const { Like, MoreThan, Between } = await import('typeorm');
    for (const condition of [Like('%@example.com'), MoreThan('a'), Between('a', 'b')]) {
      const error = await members()
        .findBy({ workspaceId: 'ws-x', email: condition as never })
        .catch((e: unknown) => e);
      expect(error).toBeInstanceOf(UnsupportedOperationError);
      expect((error as Error).message).toMatch(/equality/);
    }
    const sorted = await members()
      .find({ where: { workspaceId: 'ws-x' }, order: { email: 'ASC' } })
      .catch((e: unknown) => e);
    expect(sorted).toBeInstanceOf(UnsupportedOperationError);
    expect((sorted as Error).message).toMatch(/order/);
    await expect(members().findBy({ workspaceId: 'ws-x', note: 'plain' })).rejects.toBeInstanceOf(
      UnsupportedOperationError,
    ); // not searchable: refused as before
    expect(await members().findBy({ workspaceId: 'ws-x', email: Not('nobody@example.com') })).toEqual([]);
  });
});
