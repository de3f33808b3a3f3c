import { createHash, createHmac, randomUUID } from 'node:crypto';
import { In, IsNull, Not } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UniqueViolationError } from '../../../src';
import { encodeValue } from '../../../src/crypto/codec';
import { indexKeyContext } from '../../../src/keys/index-keys';
import { Account, BLIND_INDEX_MIGRATIONS, Invoice, Member } from '../../support/blind-index-entities';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/**
 * What an application replacing `WHERE email = $1` expects: the same query in its code, the same
 * answer, an index scan, and nothing in the database but equality. Asserted on what the
 * application gets and on the bytes PostgreSQL holds.
 */
const ROWS = 100_000;
const TENANT = 'ws-login';
let db: EncryptedTestDatabase;

beforeAll(async () => {
  db = await encryptedDatabase([Member, Account, Invoice], {
    prefix: 'bidx_search',
    migrations: BLIND_INDEX_MIGRATIONS,
  });
  const members = db.dataSource.getRepository(Member);
  for (let start = 0; start < ROWS; start += 2_000) {
    const chunk = Array.from({ length: Math.min(2_000, ROWS - start) }, (_, i) =>
      members.create({
        workspaceId: TENANT,
        email: `user${start + i}@example.com`,
        phone: null,
        note: null,
      }),
    );
    await members.insert(chunk);
  }
  await members.save(
    members.create({ workspaceId: TENANT, email: 'ada@example.com', phone: '+44 20 7946 0018', note: null }),
  );
  await rawQuery(db.schema.url, `ANALYZE ${members_table()}`);
}, 300_000);
afterAll(() => db?.close());

function members_table() {
  return `"${db.schema.schema}".bidx_members`;
}
const members = () => db.dataSource.getRepository(Member);
const stored = async (table: string, id: unknown) =>
  (
    await rawQuery(db.schema.url, `SELECT * FROM "${db.schema.schema}".${table} WHERE id = $1`, [id])
  )[0] as Record<string, unknown>;

/** The plan PostgreSQL chooses for the query TypeORM builds, with the query's own parameters. */
async function planOf(where: object): Promise<string> {
  const [sql, parameters] = members()
    .createQueryBuilder('m')
    .setFindOptions({ where })
    .getQueryAndParameters();
  const rows = (await db.dataSource.query(`EXPLAIN ${sql}`, parameters)) as Array<{ 'QUERY PLAN': string }>;
  return rows.map((r) => r['QUERY PLAN']).join('\n');
}

const emailIndexName = () =>
  db.dataSource
    .getMetadata(Member)
    .indices.find((i) => i.columns.some((c) => c.databaseName === 'email_bidx'))?.name as string;

describe(`login by email among ${ROWS.toLocaleString('en')} rows`, () => {
  it('finds the row by a differently written email, through the index', async () => {
    const found = await members().findOneBy({ workspaceId: TENANT, email: ' Ada@Example.COM ' });
    expect(found?.email).toBe('ada@example.com'); // the value as stored, not its normalised form
    expect(found?.phone).toBe('+44 20 7946 0018');
    const plan = await planOf({ workspaceId: TENANT, email: 'ada@example.com' });
    expect(plan).toMatch(/Index Scan|Bitmap Index Scan/);
    expect(plan).toContain(emailIndexName());
    expect(plan).not.toMatch(/Seq Scan/);
    const row = await stored('bidx_members', found?.id);
    expect(row.email_bidx).toEqual(
      (await db.encryption.blindIndex(Member, 'email', 'ada@example.com', { tenant: TENANT }))[0],
    );
    expect(Buffer.from(row.email_ciphertext as Buffer).includes(Buffer.from('ada@example.com'))).toBe(false);
  });

  it('In() of 100 values returns exactly those rows, through the index', async () => {
    const wanted = Array.from({ length: 100 }, (_, i) => i * 997);
    const found = await members().findBy({
      workspaceId: TENANT,
      email: In(wanted.map((n, i) => (i % 2 ? `USER${n}@EXAMPLE.COM` : `user${n}@example.com`))),
    });
    expect(found.map((m) => m.email).sort()).toEqual(wanted.map((n) => `user${n}@example.com`).sort());
    const plan = await planOf({ workspaceId: TENANT, email: In(wanted.map((n) => `user${n}@example.com`)) });
    expect(plan).toContain(emailIndexName());
    expect(plan).not.toMatch(/Seq Scan/);
  });

  it('a changed email is found under the new value and not under the old', async () => {
    const ada = await members().findOneByOrFail({ workspaceId: TENANT, email: 'ada@example.com' });
    ada.email = 'ada.lovelace@example.com';
    await members().save(ada);
    expect((await members().findOneBy({ workspaceId: TENANT, email: 'Ada.Lovelace@example.com' }))?.id).toBe(
      ada.id,
    );
    expect(await members().findOneBy({ workspaceId: TENANT, email: 'ada@example.com' })).toBeNull();
    expect((await stored('bidx_members', ada.id)).email_bidx).toEqual(
      (await db.encryption.blindIndex(Member, 'email', 'ada.lovelace@example.com', { tenant: TENANT }))[0],
    );
  });

  it('counts, exists, and deletes by email; Not() and IsNull() answer as on a plaintext column', async () => {
    expect(await members().countBy({ workspaceId: TENANT, email: 'user7@example.com' })).toBe(1);
    expect(await members().existsBy({ workspaceId: TENANT, email: 'USER8@example.com' })).toBe(true);
    expect(await members().existsBy({ workspaceId: TENANT, email: 'nobody@example.com' })).toBe(false);
    const seven = await members().findOneByOrFail({ workspaceId: TENANT, email: 'user7@example.com' });
    expect(
      await members().sum('id', { workspaceId: TENANT, email: In(['user7@example.com', 'nobody@x']) }),
    ).toBe(seven.id);
    expect(await members().countBy({ workspaceId: TENANT, phone: IsNull() })).toBe(ROWS);
    expect(await members().countBy({ workspaceId: TENANT, phone: Not(IsNull()) })).toBe(1);
    expect((await members().findBy({ workspaceId: TENANT, phone: '442079460018' })).length).toBe(1); // digits normaliser
    expect(await members().countBy({ workspaceId: TENANT, email: Not('user9@example.com') })).toBe(ROWS);
    const deleted = await members().delete({ workspaceId: TENANT, email: 'user9@example.com' });
    expect(deleted.affected).toBe(1);
    expect(await members().countBy({ workspaceId: TENANT })).toBe(ROWS);
  });
});

describe('what the database holds', () => {
  it('an index is neither SHA-256 of the value nor an HMAC under an empty or constant key', async () => {
    const saved = await members().save(
      members().create({ workspaceId: 'ws-bytes', email: 'grace@example.com', phone: null, note: null }),
    );
    const index = (await stored('bidx_members', saved.id)).email_bidx as Buffer;
    expect(index.length).toBe(34);
    expect(index.readUInt16BE(0)).toBe(1); // index-key version 1
    const mac = index.subarray(2);
    const value = 'grace@example.com';
    for (const candidate of [
      createHash('sha256').update(value).digest(),
      createHash('sha256').update(encodeValue(value, 'string')).digest(),
      createHmac('sha256', Buffer.alloc(0)).update(value).digest(),
      createHmac('sha256', Buffer.alloc(0)).update(encodeValue(value, 'string')).digest(),
      createHmac('sha256', Buffer.alloc(32)).update(encodeValue(value, 'string')).digest(),
      createHmac('sha256', 'typeorm-envelope').update(value).digest(),
    ]) {
      expect(mac.equals(candidate)).toBe(false);
    }
  });

  it('the same value gives different indexes in two tenants and in two columns', async () => {
    const a = await members().save(
      members().create({ workspaceId: 'ws-a', email: 'same@example.com', phone: null, note: null }),
    );
    const b = await members().save(
      members().create({ workspaceId: 'ws-b', email: 'same@example.com', phone: null, note: null }),
    );
    const [rowA, rowB] = [await stored('bidx_members', a.id), await stored('bidx_members', b.id)];
    expect(rowA.email_bidx).not.toEqual(rowB.email_bidx);
    const accounts = db.dataSource.getRepository(Account);
    const id = randomUUID();
    await accounts.save(
      accounts.create({ id, email: 'same@example.com', recoveryEmail: 'same@example.com' }),
    );
    const account = await stored('bidx_accounts', id);
    expect(account.email_bidx).not.toEqual(account.recoveryEmail_bidx);
    expect(account.email_bidx).not.toEqual(rowA.email_bidx);
    expect((await accounts.findOneByOrFail({ recoveryEmail: 'SAME@example.com' })).id).toBe(id);
  });

  it('index keys are stored wrapped for their purpose: one per tenant, and no data key unwraps as one', async () => {
    const keys = await rawQuery<{
      tenant_id: string;
      version: number;
      state: string;
      key_version: number;
      wrapped_key: Buffer;
    }>(
      db.schema.url,
      `SELECT tenant_id, version, state, key_version, wrapped_key FROM "${db.schema.schema}".typeorm_envelope_index_keys ORDER BY tenant_id`,
    );
    expect(keys.map((k) => k.tenant_id)).toEqual(expect.arrayContaining(['', 'ws-a', 'ws-b', TENANT]));
    expect(new Set(keys.map((k) => k.wrapped_key.toString('hex'))).size).toBe(keys.length);
    const key = keys.find((k) => k.tenant_id === 'ws-a');
    const scope = db.encryption.keyScope('ws-a');
    const unwrapped = await db.provider.unwrapDataKey(key?.wrapped_key as Buffer, indexKeyContext(scope));
    expect(unwrapped.length).toBe(32);
    /* Under the data-key context (no purpose), or another tenant's, the same wrap is refused. */
    await expect(db.provider.unwrapDataKey(key?.wrapped_key as Buffer, scope.context)).rejects.toThrow();
    await expect(
      db.provider.unwrapDataKey(key?.wrapped_key as Buffer, indexKeyContext(db.encryption.keyScope('ws-b'))),
    ).rejects.toThrow();
    unwrapped.fill(0);
  });

  it('queries and logs never carry the value', async () => {
    db.logger.lines.length = 0;
    await members().findOneBy({ workspaceId: 'ws-a', email: 'same@example.com' });
    db.encryption.purgeCache();
    await members().findOneBy({ workspaceId: 'ws-a', email: 'same@example.com' }); // keys loaded for the query
    expect(db.logger.lines.join('\n')).not.toContain('same@example.com');
    expect(db.logger.lines.join('\n')).toContain('email_bidx');
  });
});

describe('unique per tenant', () => {
  it('refuses a duplicate, however written, with a typed error carrying no value and no index', async () => {
    await members().save(
      members().create({ workspaceId: 'ws-u', email: 'unique@example.com', phone: null, note: null }),
    );
    const error = await members()
      .save(members().create({ workspaceId: 'ws-u', email: ' UNIQUE@example.com', phone: null, note: null }))
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(UniqueViolationError);
    expect(error).toMatchObject({ entity: 'Member', column: 'email' });
    const [index] = await db.encryption.blindIndex(Member, 'email', 'unique@example.com', { tenant: 'ws-u' });
    const text = `${(error as Error).message} ${JSON.stringify(error)} ${String((error as Error).stack)}`;
    expect(text).not.toMatch(/unique@example\.com/i);
    expect(text).not.toContain((index as Buffer).toString('hex'));
    expect((error as Error).cause).toBeUndefined();
    expect(await members().countBy({ workspaceId: 'ws-u' })).toBe(1);
  });

  it('allows the same value in another tenant', async () => {
    await members().save(
      members().create({ workspaceId: 'ws-u2', email: 'unique@example.com', phone: null, note: null }),
    );
    expect(await members().countBy({ workspaceId: 'ws-u2', email: 'unique@example.com' })).toBe(1);
  });

  it('refuses duplicates across concurrent inserts: exactly one wins', async () => {
    const attempts = await Promise.allSettled(
      Array.from({ length: 8 }, () =>
        db.dataSource.transaction((manager) =>
          manager.save(
            manager.create(Member, {
              workspaceId: 'ws-race',
              email: 'race@example.com',
              phone: null,
              note: null,
            }),
          ),
        ),
      ),
    );
    expect(attempts.filter((a) => a.status === 'fulfilled')).toHaveLength(1);
    for (const failed of attempts.filter((a) => a.status === 'rejected')) {
      expect((failed as PromiseRejectedResult).reason).toBeInstanceOf(UniqueViolationError);
    }
    const [{ n }] = (await rawQuery(
      db.schema.url,
      `SELECT count(*)::int AS n FROM ${members_table()} WHERE "workspaceId" = 'ws-race'`,
    )) as [{ n: number }];
    expect(n).toBe(1);
  });

  it('an update onto another row’s value is refused too', async () => {
    const first = await members().save(
      members().create({ workspaceId: 'ws-u3', email: 'x@example.com', phone: null, note: null }),
    );
    const second = await members().save(
      members().create({ workspaceId: 'ws-u3', email: 'y@example.com', phone: null, note: null }),
    );
    second.email = 'X@example.com';
    await expect(members().save(second)).rejects.toBeInstanceOf(UniqueViolationError);
    await expect(
      members().update({ id: second.id }, { workspaceId: 'ws-u3', email: 'x@example.com' }),
    ).rejects.toBeInstanceOf(UniqueViolationError);
    expect((await members().findOneByOrFail({ id: second.id })).email).toBe('y@example.com');
    expect((await members().findOneByOrFail({ workspaceId: 'ws-u3', email: 'x@example.com' })).id).toBe(
      first.id,
    );
  });
});

describe('relations, embedded objects and query builders', () => {
  it('finds through a relation, an embedded path and a query-builder object where', async () => {
    const accounts = db.dataSource.getRepository(Account);
    const invoices = db.dataSource.getRepository(Invoice);
    const id = randomUUID();
    const account = await accounts.save(
      accounts.create({
        id,
        email: 'billing@example.com',
        recoveryEmail: null,
        address: { street: '1 Rue', city: 'Paris' },
      }),
    );
    await invoices.save(invoices.create({ total: 42, account }));
    const byRelation = await invoices.find({
      where: { account: { email: 'Billing@Example.com' } },
      relations: { account: true },
    });
    expect(byRelation.map((i) => [i.total, i.account.email])).toEqual([[42, 'billing@example.com']]);
    expect((await accounts.findOneByOrFail({ address: { city: 'PARIS' } })).id).toBe(id);
    const byBuilder = await invoices
      .createQueryBuilder('i')
      .innerJoinAndSelect('i.account', 'account')
      .where({ account: { email: 'billing@example.com' } })
      .getMany();
    expect(byBuilder.map((i) => i.total)).toEqual([42]);
    const direct = await accounts.createQueryBuilder('a').where({ email: 'BILLING@example.com' }).getOne();
    expect(direct?.address.city).toBe('Paris');
  });

  it('a string condition uses the helper’s indexes', async () => {
    const emails = await db.encryption.blindIndex(Member, 'email', 'USER11@example.com', { tenant: TENANT });
    const found = await members()
      .createQueryBuilder('m')
      .where('m.workspaceId = :ws AND m.email_bidx = ANY(:emails)', { ws: TENANT, emails })
      .getMany();
    expect(found.map((m) => m.email)).toEqual(['user11@example.com']);
    await expect(db.encryption.blindIndex(Member, 'email', 'x@y')).rejects.toThrow(/tenant/);
    await expect(db.encryption.blindIndex(Member, 'note', 'x', { tenant: TENANT })).rejects.toThrow(
      /not searchable/,
    );
  });
});
