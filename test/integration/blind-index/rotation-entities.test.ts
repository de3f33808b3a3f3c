import { randomUUID } from 'node:crypto';
import { In } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rotateIndexKey, UniqueViolationError } from '../../../src';
import { Account, BLIND_INDEX_MIGRATIONS, Voucher } from '../../support/blind-index-entities';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/**
 * An index key serves every searchable entity of its scope. Rotating it for some entities only
 * (`entities`) must not retire it while rows of the others are still indexed under it: they
 * would no longer be found, and a unique property would accept their duplicates. It is retired
 * once a later run has moved the rest.
 */
let db: EncryptedTestDatabase;
beforeAll(async () => {
  db = await encryptedDatabase([Account, Voucher], {
    prefix: 'bidx_rotation_entities',
    migrations: BLIND_INDEX_MIGRATIONS,
  });
});
afterAll(() => db?.close());

const sql = <T = Record<string, unknown>>(text: string) => rawQuery<T>(db.schema.url, text);
const table = (name: string) => `"${db.schema.schema}".${name}`;
const versionsOf = async (name: string, column: string) =>
  (
    await sql<{ v: number }>(
      `SELECT DISTINCT get_byte(${column}, 0) * 256 + get_byte(${column}, 1) AS v FROM ${table(name)} WHERE ${column} IS NOT NULL ORDER BY v`,
    )
  ).map((r) => r.v);
const indexKeys = () =>
  sql<{ version: number; state: string; has_key: boolean }>(
    `SELECT version, state, wrapped_key IS NOT NULL AS has_key FROM ${table('typeorm_envelope_index_keys')} WHERE tenant_id = '' ORDER BY version`,
  );

describe('rotating the index key for some entities of its scope', () => {
  it('keeps the old key while another entity’s rows use it; a run for the rest retires it', async () => {
    const accounts = db.dataSource.getRepository(Account);
    const vouchers = db.dataSource.getRepository(Voucher);
    const emails = Array.from({ length: 30 }, (_, i) => `holder${i}@example.com`);
    await accounts.save(
      emails.map((email) =>
        accounts.create({ id: randomUUID(), email, recoveryEmail: null, address: { city: 'Turku' } }),
      ),
    );
    const codes = Array.from({ length: 30 }, (_, i) => `CODE-${i}`);
    await vouchers.save(codes.map((code) => vouchers.create({ code })));
    const found = async () => ({
      accounts: (await accounts.findBy({ email: In(emails) })).length,
      vouchers: (await vouchers.findBy({ code: In(codes.map((c) => c.toLowerCase())) })).length,
    });
    expect(await found()).toEqual({ accounts: 30, vouchers: 30 });

    const first = await rotateIndexKey(db.dataSource, db.encryption, { entities: [Account], settleTime: 0 });
    expect(first.error).toBeUndefined();
    expect(first.previousRetired).toBe(false);
    expect(await versionsOf('bidx_accounts', 'email_bidx')).toEqual([2]);
    expect(await versionsOf('bidx_vouchers', 'code_bidx')).toEqual([1]);
    expect((await indexKeys()).map((k) => [k.version, k.state, k.has_key])).toEqual([
      [1, 'previous', true],
      [2, 'active', true],
    ]);
    expect(await found()).toEqual({ accounts: 30, vouchers: 30 });
    db.encryption.purgeCache();
    expect(await found()).toEqual({ accounts: 30, vouchers: 30 });

    const rest = await rotateIndexKey(db.dataSource, db.encryption, { entities: [Voucher], settleTime: 0 });
    expect(rest.error).toBeUndefined();
    expect([rest.resumed, rest.previousRetired]).toEqual([true, true]);
    expect(await versionsOf('bidx_vouchers', 'code_bidx')).toEqual([2]);
    expect((await indexKeys()).map((k) => [k.version, k.state, k.has_key])).toEqual([
      [1, 'retired', false],
      [2, 'active', true],
    ]);
    db.encryption.purgeCache();
    expect(await found()).toEqual({ accounts: 30, vouchers: 30 });
    await expect(
      accounts.save(
        accounts.create({
          id: randomUUID(),
          email: 'HOLDER3@example.com',
          recoveryEmail: null,
          address: { city: 'Oulu' },
        }),
      ),
    ).rejects.toBeInstanceOf(UniqueViolationError);
  });
});
