import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { TypeormEnvelopeKeyRegistry1764300000000 } from '../../../migrations/1764300000000-TypeormEnvelopeKeyRegistry';
import { LocalKeyProvider, UnsupportedOperationError } from '../../../src';
import { KeyRegistry } from '../../../src/rotation/key-registry';
import { rewrapDataKeys } from '../../../src/rotation/rewrap';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { rawQuery } from '../../support/database';
import { Customer, Order } from '../../support/entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

let db: EncryptedTestDatabase;
let registry: KeyRegistry;
const v2 = new CountingKeyProvider();
const v3Key = new LocalKeyProvider({ key: Buffer.alloc(32, 3).toString('base64') });

beforeAll(async () => {
  process.env.TYPEORM_ENVELOPE_ACTOR = 'registry-test';
  db = await encryptedDatabase([Customer, Order], {
    prefix: 'registry',
    extraKeys: [{ version: 2, provider: v2 }],
    migrations: [TypeormEnvelopeKeyRegistry1764300000000],
  });
  registry = new KeyRegistry(db.dataSource, db.encryption);
});
afterAll(async () => {
  delete process.env.TYPEORM_ENVELOPE_ACTOR;
  await db?.close();
});

const customers = () => db.dataSource.getRepository(Customer);

describe('key registry and audit log', () => {
  it('records the configured versions, with a key reference that is not the key', async () => {
    expect(await registry.exists()).toBe(true);
    const records = await registry.sync();
    expect(records.map((r) => [r.version, r.state, r.providerKind])).toEqual([
      [1, 'active', 'local'],
      [2, 'decrypt-only', 'local'],
    ]);
    expect(records[0]?.keyReference).toMatch(/^sha256:[0-9a-f]{16}$/);
    const stored = JSON.stringify(
      await rawQuery(db.schema.url, `SELECT * FROM "${db.schema.schema}".typeorm_envelope_key_versions`),
    );
    expect(records[0]?.keyReference).toBe(db.provider.fingerprint);
    expect(stored).toContain(db.provider.fingerprint);
  });

  it('activates a version after validating it, and records who did it', async () => {
    await customers().save(customers().create({ email: 'v1@example.com', plan: 'reg', address: null }));
    await registry.activate(2);
    expect(db.encryption.keyring.activeVersion).toBe(2);
    expect((await registry.list()).map((r) => r.state)).toEqual(['decrypt-only', 'active']);
    const log = await registry.auditLog();
    expect(log.map((e) => e.event)).toEqual(
      expect.arrayContaining(['key-created', 'key-validated', 'key-activated']),
    );
    expect(log.every((e) => e.actor === 'registry-test')).toBe(true);
    const saved = await customers().save(
      customers().create({ email: 'v2@example.com', plan: 'reg', address: null }),
    );
    const [row] = await rawQuery<{ v: number }>(
      db.schema.url,
      `SELECT email_key_version AS v FROM "${db.schema.schema}".customer WHERE id = $1`,
      [saved.id],
    );
    expect(row?.v).toBe(2);
  });

  it('refuses to retire a version that rows still use; retires it after the re-wrap; keeps it on record', async () => {
    await expect(registry.retire(2)).rejects.toBeInstanceOf(UnsupportedOperationError);
    await expect(registry.retire(1)).rejects.toThrow(/still use this key version/);
    const result = await rewrapDataKeys(db.dataSource, db.encryption);
    expect(result.error).toBeUndefined();
    await registry.retire(1);
    const records = await registry.list();
    expect(records.find((r) => r.version === 1)?.state).toBe('retired');
    const log = await registry.auditLog();
    const finished = log.find((e) => e.event === 'rotation-finished');
    expect(finished?.details).toMatchObject({ rowsRewrapped: 1, failures: 0 });
    expect(log.at(-1)?.event).toBe('key-retired');
    expect((await customers().findBy({ plan: 'reg' })).map((c) => c.email).sort()).toEqual([
      'v1@example.com',
      'v2@example.com',
    ]);
  });

  it('other instances follow the registry; one without the active version writes with its newest and warns', async () => {
    const warnings: string[] = [];
    const follower = await encryptedDatabase([Customer, Order], {
      schema: db.schema,
      extraKeys: [{ version: 2, provider: v2 }],
      encryption: { registry: { refreshInterval: 20, warn: (m) => warnings.push(m) } },
    });
    try {
      expect(follower.encryption.keyring.activeVersion).toBe(2); // read from the registry at start-up

      // Version 3 is activated by an instance that has it; the follower lacks it.
      const leader = await encryptedDatabase([Customer, Order], {
        schema: db.schema,
        extraKeys: [
          { version: 2, provider: v2 },
          { version: 3, provider: v3Key },
        ],
      });
      try {
        await new KeyRegistry(leader.dataSource, leader.encryption).activate(3);
      } finally {
        await leader.close();
      }
      await vi.waitFor(() => expect(warnings).toHaveLength(1), { timeout: 10_000 });
      expect(warnings[0]).toContain('version 3');
      expect(follower.encryption.keyring.activeVersion).toBe(2);
    } finally {
      await follower.close();
    }
  });
});

describe('retired versions', () => {
  it('cannot be activated again, and the refusal leaves the active version as it was', async () => {
    const active = db.encryption.keyring.activeVersion;
    await expect(registry.activate(1)).rejects.toThrow(/retired key version cannot be activated/);
    expect(db.encryption.keyring.activeVersion).toBe(active);
  });
});
