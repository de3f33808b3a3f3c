import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TenantAdmin } from '../../../src';
import { rawQuery } from '../../support/database';
import { TENANT_MIGRATIONS, TenantContact } from '../../support/tenant-entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/** Tenant keys changed inside a transaction that is then rolled back (a migration that fails). */
let db: EncryptedTestDatabase;
beforeAll(async () => {
  db = await encryptedDatabase([TenantContact], { prefix: 'adv_tx', migrations: TENANT_MIGRATIONS });
});
afterAll(() => db?.close());

const repo = () => db.dataSource.getRepository(TenantContact);

describe('tenant keys in a rolled-back transaction', () => {
  it('a key added in a transaction rolled back is not used for writes, which read back after a refresh', async () => {
    const runner = db.dataSource.createQueryRunner();
    await runner.startTransaction();
    try {
      await new TenantAdmin(runner, db.encryption).addKey('ws-tx', {
        kind: 'customer-key',
        key: randomBytes(32).toString('base64'),
      });
    } finally {
      await runner.rollbackTransaction();
      await runner.release();
    }
    const saved = await repo().save(
      repo().create({ workspaceId: 'ws-tx', email: 'tx@tx.example', profile: null }),
    );
    const [row] = await rawQuery(
      db.schema.url,
      `SELECT email_key_version AS v FROM "${db.schema.schema}".tenant_contacts WHERE id = $1`,
      [saved.id],
    );
    await db.encryption.tenants.refresh();
    db.encryption.purgeCache();
    expect((await repo().findOneByOrFail({ id: saved.id })).email).toBe('tx@tx.example');
    expect(row?.v).toBe(1);
  });
});
