import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rotateIndexKey, TenantOffboardedError } from '../../../src';
import { BLIND_INDEX_MIGRATIONS, Member } from '../../support/blind-index-entities';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/**
 * Once a tenant is offboarded, its searchable values can no longer be looked up: not by a query
 * (which would tell whether a row holds a given email, without decrypting anything), not by a
 * count or an exists, not through `blindIndex()`, whether its index key was in memory or not, and
 * whether the tenant had a key of its own or was on the application's key. Other tenants are
 * untouched.
 */
let db: EncryptedTestDatabase;
beforeAll(async () => {
  db = await encryptedDatabase([Member], { prefix: 'bidx_offboard', migrations: BLIND_INDEX_MIGRATIONS });
});
afterAll(() => db?.close());

const members = () => db.dataSource.getRepository(Member);
const save = (workspaceId: string, email: string) =>
  members().save(members().create({ workspaceId, email, phone: '+1 555 0100', note: null }));
const rejection = (promise: Promise<unknown>) =>
  promise.then(
    (value) => ({ resolved: value }),
    (error: unknown) => error,
  );
const indexKeyRows = (tenant: string) =>
  rawQuery<{ state: string; wrapped_key: Buffer | null }>(
    db.schema.url,
    `SELECT state, wrapped_key FROM "${db.schema.schema}".typeorm_envelope_index_keys WHERE tenant_id = $1`,
    [tenant],
  );

describe.each([
  ['a key of its own', true],
  ['the application’s key', false],
])('an offboarded tenant on %s', (_, ownKey) => {
  it('cannot be searched by its blind indexes any more, with its index key in memory or not; others can', async () => {
    const gone = ownKey ? 'bo-own' : 'bo-app';
    const stays = `${gone}-stays`;
    if (ownKey) {
      await db.encryption.tenants.addKey(gone, {
        kind: 'customer-key',
        key: randomBytes(32).toString('base64'),
      });
    }
    await save(gone, 'leaving@example.com');
    await save(stays, 'staying@example.com');
    /* Searched once: the tenant's index key is in memory. */
    expect(await members().countBy({ workspaceId: gone, email: 'leaving@example.com' })).toBe(1);
    expect((await indexKeyRows(gone)).length).toBeGreaterThan(0);

    const result = await db.encryption.tenants.offboard(gone);
    expect([result.keysDestroyed, result.indexKeysErased]).toEqual([ownKey ? 1 : 0, 1]);
    for (const cold of [false, true]) {
      if (cold) db.encryption.purgeCache();
      const lookups = [
        members().countBy({ workspaceId: gone, email: 'leaving@example.com' }),
        members().existsBy({ workspaceId: gone, email: 'leaving@example.com' }),
        members().findOneBy({ workspaceId: gone, email: 'leaving@example.com' }),
        db.encryption.blindIndex(Member, 'email', 'leaving@example.com', { tenant: gone }),
      ];
      for (const [n, outcome] of (await Promise.all(lookups.map(rejection))).entries()) {
        expect(outcome, `lookup ${n}, cold: ${cold}`).toBeInstanceOf(TenantOffboardedError);
        expect(String((outcome as Error).message)).not.toContain('leaving');
      }
      expect(await members().countBy({ workspaceId: stays, email: 'staying@example.com' })).toBe(1);
    }
    /* Offboarding again erases nothing more; an index-key rotation for it is refused, making no key. */
    expect(await db.encryption.tenants.offboard(gone)).toMatchObject({
      keysDestroyed: 0,
      indexKeysErased: 0,
    });
    const keysBefore = (await indexKeyRows(gone)).length;
    const rotation = await rotateIndexKey(db.dataSource, db.encryption, { tenant: gone, settleTime: 0 });
    expect(rotation.error).toBeInstanceOf(TenantOffboardedError);
    expect((await indexKeyRows(gone)).length).toBe(keysBefore);
    /* Nothing left to compute its indexes with: the tenant's index keys are erased. */
    for (const key of await indexKeyRows(gone)) expect(key.wrapped_key).toBeNull();
    expect((await indexKeyRows(stays)).every((k) => k.wrapped_key !== null)).toBe(true);
  });
});
