import { randomBytes } from 'node:crypto';
import { In } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  fillBlindIndexes,
  KeyRegistry,
  LocalKeyProvider,
  rewrapDataKeys,
  rotateIndexKey,
  UniqueViolationError,
  UnsupportedOperationError,
} from '../../../src';
import { Account, BLIND_INDEX_MIGRATIONS, Invoice, Member } from '../../support/blind-index-entities';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/**
 * Index keys under rotation: a master-key rotation (and a tenant's onboarding) re-wraps them and
 * recomputes nothing; rotating an index key recomputes its rows while both keys answer queries;
 * rows without an index get one.
 */
let db: EncryptedTestDatabase;
const members = () => db.dataSource.getRepository(Member);
const schema = () => `"${db.schema.schema}"`;

interface IndexKeyRow {
  tenant_id: string;
  version: number;
  state: string;
  key_version: number;
  wrapped_key: Buffer | null;
}
const indexKeys = (tenant?: string) =>
  rawQuery<IndexKeyRow>(
    db.schema.url,
    `SELECT tenant_id, version, state, key_version, wrapped_key FROM ${schema()}.typeorm_envelope_index_keys
     ${tenant === undefined ? '' : 'WHERE tenant_id = $1'} ORDER BY tenant_id, version`,
    tenant === undefined ? [] : [tenant],
  );
const indexesOf = async (tenant: string) =>
  new Map(
    (
      await rawQuery<{ id: number; email_bidx: Buffer }>(
        db.schema.url,
        `SELECT id, email_bidx FROM ${schema()}.bidx_members WHERE "workspaceId" = $1`,
        [tenant],
      )
    ).map((r) => [r.id, r.email_bidx.toString('hex')]),
  );

async function seed(tenant: string, count: number): Promise<string[]> {
  const emails = Array.from({ length: count }, (_, i) => `${tenant}-${i}@example.com`);
  await members().save(
    emails.map((email) => members().create({ workspaceId: tenant, email, phone: null, note: null })),
    { chunk: 200 },
  );
  return emails;
}

async function expectFound(tenant: string, emails: readonly string[]): Promise<void> {
  const found = await members().findBy({
    workspaceId: tenant,
    email: In(emails.map((e) => e.toUpperCase())),
  });
  expect(found.map((m) => m.email).sort()).toEqual([...emails].sort());
}

beforeAll(async () => {
  db = await encryptedDatabase([Member, Account, Invoice], {
    prefix: 'bidx_rotation',
    migrations: BLIND_INDEX_MIGRATIONS,
    extraKeys: [{ version: 2, provider: new LocalKeyProvider({ key: randomBytes(32).toString('base64') }) }],
    encryption: { tenantKeys: { refreshInterval: 1_000 } },
  });
});
afterAll(() => db?.close());

describe('rotating an index key', () => {
  it('recomputes every row of the tenant while both keys answer; writes meanwhile use the new key', async () => {
    const emails = await seed('ws-rot', 400);
    const bystanders = await seed('ws-other', 40);
    const othersBefore = await indexesOf('ws-other');
    const checks: Promise<void>[] = [];
    let wroteDuring = false;
    const result = await rotateIndexKey(db.dataSource, db.encryption, {
      tenant: 'ws-rot',
      batchSize: 50,
      settleTime: 0,
      onProgress: () => {
        /* Lookups while the job runs, of rows done and rows not yet done. */
        checks.push(
          expectFound(
            'ws-rot',
            emails.filter((_, i) => i % 37 === 0),
          ),
        );
        if (!wroteDuring) {
          wroteDuring = true;
          checks.push(
            (async () => {
              await members().save(
                members().create({
                  workspaceId: 'ws-rot',
                  email: 'during@example.com',
                  phone: null,
                  note: null,
                }),
              );
              const changed = await members().findOneByOrFail({
                workspaceId: 'ws-rot',
                email: emails[399] as string,
              });
              changed.email = 'changed-during@example.com';
              await members().save(changed);
            })(),
          );
        }
      },
    });
    await Promise.all(checks);
    expect(result.error).toBeUndefined();
    expect(result).toMatchObject({
      toVersion: 2,
      fromVersion: 1,
      resumed: false,
      rowsLeft: 0,
      previousRetired: true,
    });
    expect(result.properties.find((p) => p.property === 'email')?.rowsIndexed).toBeGreaterThanOrEqual(398);
    const stored = await rawQuery<{ v: number; n: number }>(
      db.schema.url,
      `SELECT get_byte(email_bidx, 1) AS v, count(*)::int AS n FROM ${schema()}.bidx_members WHERE "workspaceId" = 'ws-rot' GROUP BY 1`,
    );
    expect(stored).toEqual([{ v: 2, n: 401 }]);
    expect(await indexKeys('ws-rot')).toMatchObject([
      { version: 1, state: 'retired', wrapped_key: null },
      { version: 2, state: 'active' },
    ]);
    db.encryption.purgeCache();
    await expectFound('ws-rot', [
      ...emails.slice(0, 399),
      'during@example.com',
      'changed-during@example.com',
    ]);
    expect(await members().findOneBy({ workspaceId: 'ws-rot', email: emails[399] as string })).toBeNull();
    expect(await indexesOf('ws-other')).toEqual(othersBefore); // another tenant's index is untouched
    await expectFound('ws-other', bystanders);
  });

  it('gives a row without an index (written before the property was searchable) its index', async () => {
    const emails = await seed('ws-fill', 30);
    await rawQuery(
      db.schema.url,
      `UPDATE ${schema()}.bidx_members SET email_bidx = NULL WHERE "workspaceId" = 'ws-fill'`,
    );
    expect(await members().countBy({ workspaceId: 'ws-fill', email: emails[0] as string })).toBe(0);
    const result = await fillBlindIndexes(db.dataSource, db.encryption, { tenant: 'ws-fill', batchSize: 7 });
    expect(result.error).toBeUndefined();
    expect(result.properties.find((p) => p.property === 'email')?.rowsIndexed).toBe(30);
    expect(result.rowsLeft).toBe(0);
    await expectFound('ws-fill', emails);
    const [first] = await db.encryption.blindIndex(Member, 'email', emails[0] as string, {
      tenant: 'ws-fill',
    });
    const [row] = await rawQuery<{ email_bidx: Buffer }>(
      db.schema.url,
      `SELECT email_bidx FROM ${schema()}.bidx_members WHERE "workspaceId" = 'ws-fill' ORDER BY id LIMIT 1`,
    );
    expect(row?.email_bidx).toEqual(first);
  });
});

describe('the first step of a rotation: the new key queried, not yet written', () => {
  it('a run that finds the new key queried but not written takes the rotation over from there', async () => {
    const emails = await seed('ws-next', 12);
    const scope = db.encryption.keyScope('ws-next');
    const { key, record } = await db.encryption.indexKeys.generate(scope, 2);
    key.destroy();
    await rawQuery(
      db.schema.url,
      `INSERT INTO ${schema()}.typeorm_envelope_index_keys (keyring_id, tenant_id, version, state, key_version, wrapped_key, activated_at)
       VALUES ('default', 'ws-next', 2, 'next', $1, $2, NULL)`,
      [record.keyVersion, record.wrappedKey],
    );
    db.encryption.indexKeys.refresh(scope);
    /* Writes still use the active key; queries match both. */
    const during = await members().save(
      members().create({ workspaceId: 'ws-next', email: 'next@example.com', phone: null, note: null }),
    );
    const [stored] = await rawQuery<{ email_bidx: Buffer }>(
      db.schema.url,
      `SELECT email_bidx FROM ${schema()}.bidx_members WHERE id = $1`,
      [during.id],
    );
    expect(stored?.email_bidx.readUInt16BE(0)).toBe(1);
    expect(
      await db.encryption.blindIndex(Member, 'email', 'next@example.com', { tenant: 'ws-next' }),
    ).toHaveLength(2);
    await expectFound('ws-next', [...emails, 'next@example.com']);
    const result = await rotateIndexKey(db.dataSource, db.encryption, { tenant: 'ws-next', settleTime: 0 });
    expect(result).toMatchObject({
      resumed: true,
      toVersion: 2,
      fromVersion: 1,
      rowsLeft: 0,
      previousRetired: true,
    });
    expect((await indexKeys('ws-next')).map((k) => [k.version, k.state])).toEqual([
      [1, 'retired'],
      [2, 'active'],
    ]);
    await expectFound('ws-next', [...emails, 'next@example.com']);
  });
});

describe('unique values while an index key is rotated', () => {
  it('refuses a value another row holds under the previous key, which the unique index cannot see', async () => {
    await seed('ws-urot', 5);
    /* The state a rotation leaves between activating the new key and recomputing the rows. */
    const scope = db.encryption.keyScope('ws-urot');
    const { key, record } = await db.encryption.indexKeys.generate(scope, 2);
    key.destroy();
    await rawQuery(
      db.schema.url,
      `UPDATE ${schema()}.typeorm_envelope_index_keys SET state = 'previous' WHERE tenant_id = 'ws-urot'`,
    );
    await rawQuery(
      db.schema.url,
      `INSERT INTO ${schema()}.typeorm_envelope_index_keys (keyring_id, tenant_id, version, state, key_version, wrapped_key)
       VALUES ('default', 'ws-urot', 2, 'active', $1, $2)`,
      [record.keyVersion, record.wrappedKey],
    );
    db.encryption.indexKeys.refresh(scope);
    const duplicate = members().create({
      workspaceId: 'ws-urot',
      email: 'WS-UROT-3@example.com',
      phone: null,
      note: null,
    });
    await expect(members().save(duplicate)).rejects.toBeInstanceOf(UniqueViolationError);
    const saved = await members().save(
      members().create({ workspaceId: 'ws-urot', email: 'fresh@example.com', phone: null, note: null }),
    );
    const old = await members().findOneByOrFail({ workspaceId: 'ws-urot', email: 'ws-urot-1@example.com' });
    old.label = 'saved unchanged over itself';
    await members().save(old); // its own row is no duplicate
    expect(await members().countBy({ workspaceId: 'ws-urot' })).toBe(6);
    const result = await rotateIndexKey(db.dataSource, db.encryption, { tenant: 'ws-urot', settleTime: 0 });
    expect(result).toMatchObject({ resumed: true, rowsLeft: 0, previousRetired: true });
    expect(result.properties.flatMap((p) => p.duplicates)).toEqual([]);
    expect((await members().findOneByOrFail({ workspaceId: 'ws-urot', email: 'fresh@example.com' })).id).toBe(
      saved.id,
    );
  });
});

describe('rotating master keys', () => {
  it('re-wraps index keys under the new master key without recomputing any index', async () => {
    const emails = await seed('ws-master', 20);
    /* A write rolled back after its tenant's index key was made: the key stays, committed. */
    await db.dataSource
      .transaction(async (manager) => {
        await manager.save(
          manager.create(Member, {
            workspaceId: 'ws-orphan',
            email: 'o@example.com',
            phone: null,
            note: null,
          }),
        );
        throw new Error('rolled back');
      })
      .catch(() => undefined);
    const before = await indexKeys();
    expect(before.find((k) => k.tenant_id === 'ws-orphan')).toMatchObject({
      state: 'active',
      key_version: 1,
    });
    const indexesBefore = await indexesOf('ws-master');
    await db.encryption.activate(2);
    const result = await rewrapDataKeys(db.dataSource, db.encryption, { toVersion: 2 });
    expect(result.error).toBeUndefined();
    const live = before.filter((k) => k.wrapped_key !== null);
    expect(result.indexKeys).toEqual({ rewrapped: live.length, failures: [] });
    const after = await indexKeys();
    for (const key of after.filter((k) => k.wrapped_key !== null)) {
      expect(key.key_version).toBe(2);
      const old = before.find((k) => k.tenant_id === key.tenant_id && k.version === key.version);
      expect(key.wrapped_key?.equals(old?.wrapped_key as Buffer)).toBe(false);
    }
    expect(await indexesOf('ws-master')).toEqual(indexesBefore); // no index recomputed
    db.encryption.purgeCache();
    await expectFound('ws-master', emails);

    /* A key put back under version 1 (a restore) keeps that version from being retired. */
    const orphan = before.find((k) => k.tenant_id === 'ws-orphan') as IndexKeyRow;
    await rawQuery(
      db.schema.url,
      `UPDATE ${schema()}.typeorm_envelope_index_keys SET key_version = 1, wrapped_key = $1 WHERE tenant_id = 'ws-orphan'`,
      [orphan.wrapped_key],
    );
    const registry = new KeyRegistry(db.dataSource, db.encryption);
    await registry.sync();
    const refused = await registry.retire(1).catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(UnsupportedOperationError);
    expect((refused as Error).message).toMatch(/1 index keys .* still wrapped by this key version/);
    expect((await rewrapDataKeys(db.dataSource, db.encryption, { toVersion: 2 })).indexKeys?.rewrapped).toBe(
      1,
    );
    await registry.retire(1);
  });

  it('a tenant onboarding its own key moves its index key under it; its indexes stay as they are', async () => {
    const emails = await seed('ws-byok', 15);
    const indexesBefore = await indexesOf('ws-byok');
    const added = await db.encryption.tenants.addKey('ws-byok', {
      kind: 'customer-key',
      key: randomBytes(32).toString('base64'),
    });
    const job = await db.encryption.tenants.runJob('ws-byok');
    expect(job.state).toBe('completed');
    expect(await indexKeys('ws-byok')).toMatchObject([
      { version: 1, state: 'active', key_version: added.version },
    ]);
    expect(await indexesOf('ws-byok')).toEqual(indexesBefore);
    db.encryption.purgeCache();
    await expectFound('ws-byok', emails);
    /* Another tenant's index keys stay under the application's key. */
    expect((await indexKeys('ws-master'))[0]?.key_version).toBe(2);
  });
});
