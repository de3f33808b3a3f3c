import { randomBytes } from 'node:crypto';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { TypeormEnvelopeKeyRegistry1764300000000 } from '../../../migrations/1764300000000-TypeormEnvelopeKeyRegistry';
import {
  ConfigError,
  EnvelopeEncryption,
  IntegrityError,
  LocalKeyProvider,
  UnsupportedOperationError,
} from '../../../src';
import { KeyRegistry } from '../../../src/rotation/key-registry';
import { rewrapDataKeys } from '../../../src/rotation/rewrap';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';
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
/** Versions 2 and 3 as every correctly configured instance has them. */
const sharedKeys = () => [
  { version: 2, provider: v2 },
  { version: 3, provider: v3Key },
];

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
      encryption: {
        keys: [
          { version: 1, provider: db.provider },
          { version: 2, provider: v2 },
        ],
        registry: { refreshInterval: 1_000, warn: (m) => warnings.push(m) },
      },
    });
    try {
      expect(follower.encryption.keyring.activeVersion).toBe(2); // read from the registry at start-up

      // Version 3 is activated by an instance that has it; the follower lacks it.
      const leader = await encryptedDatabase([Customer, Order], {
        schema: db.schema,
        encryption: { keys: [{ version: 1, provider: db.provider }, ...sharedKeys()] },
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

describe('master keys that differ from the ones the registry recorded', () => {
  const otherKey = () => new LocalKeyProvider({ key: randomBytes(32).toString('base64') });
  /** Another application instance on the same tables, with these versions beside the shared version 1. */
  const instance = async (
    keys: Array<{ version: number; provider: LocalKeyProvider }>,
    activeVersion: number,
    validate = true,
  ) => {
    const encryption = new EnvelopeEncryption({
      keys: [{ version: 1, provider: db.provider }, ...keys],
      activeVersion,
    });
    const dataSource = new DataSource({
      type: 'postgres',
      url: db.schema.url,
      schema: db.schema.schema,
      entities: [Customer, Order],
    });
    encryption.attach(dataSource, { validate });
    await dataSource.initialize();
    return {
      dataSource,
      encryption,
      close: async () => {
        if (dataSource.isInitialized) await dataSource.destroy();
      },
    };
  };
  const sidecars = () =>
    rawQuery<{ id: number; version: number; wrapped: string; ct: string }>(
      db.schema.url,
      `SELECT id, email_key_version AS version, encode(email_wrapped_key, 'hex') AS wrapped,
              encode(email_ciphertext, 'hex') AS ct
       FROM "${db.schema.schema}".customer ORDER BY id`,
    );
  let underThree: number;

  beforeAll(async () => {
    // A row written under version 3 by a correctly configured instance.
    const good = await instance(sharedKeys(), 3);
    try {
      const repo = good.dataSource.getRepository(Customer);
      underThree = (
        await repo.save(repo.create({ email: 'v3@example.com', plan: 'wrong-keys', address: null }))
      ).id;
    } finally {
      await good.close();
    }
    const [row] = await sidecars().then((rows) => rows.filter((r) => r.id === underThree));
    expect(row?.version).toBe(3);
  });

  it('an instance started with another valid key for version 3 fails initialize(), naming the version and both keys', async () => {
    const wrong = otherKey();
    const before = await sidecars();
    const error = await instance(
      [
        { version: 2, provider: v2 },
        { version: 3, provider: wrong },
      ],
      3,
    ).then(
      async (started) => {
        await started.close();
        return new Error('initialize() succeeded');
      },
      (e: unknown) => e,
    );
    expect(error).toBeInstanceOf(ConfigError);
    expect(error).toMatchObject({ keyVersion: 3 });
    const message = String((error as Error).message);
    expect(message).toContain('version 3');
    expect(message).toContain(v3Key.fingerprint);
    expect(message).toContain(wrong.fingerprint);
    expect(await sidecars()).toEqual(before);
    const [recorded] = await rawQuery<{ ref: string }>(
      db.schema.url,
      `SELECT key_reference AS ref FROM "${db.schema.schema}".typeorm_envelope_key_versions WHERE version = 3`,
    );
    expect(recorded?.ref).toBe(v3Key.fingerprint);
  });

  it('without validation, an instance with a wrong version 3 refuses to write or read under it', async () => {
    const wrong = await instance(
      [
        { version: 2, provider: v2 },
        { version: 3, provider: otherKey() },
      ],
      3,
      false,
    );
    try {
      const repo = wrong.dataSource.getRepository(Customer);
      const before = await sidecars();
      const write = await repo
        .save(repo.create({ email: 'never@example.com', plan: 'wrong-keys', address: null }))
        .catch((e: unknown) => e);
      expect(write).toBeInstanceOf(ConfigError);
      expect(write).toMatchObject({ keyVersion: 3 });
      expect(await sidecars()).toEqual(before);
      wrong.encryption.keyring.activate(2); // a correct version still writes
      await repo.save(repo.create({ email: 'under-two@example.com', plan: 'wrong-keys', address: null }));
      const read = await repo.findOneBy({ id: underThree }).catch((e: unknown) => e);
      expect(read).toBeInstanceOf(ConfigError);
      expect(read).not.toBeInstanceOf(IntegrityError);
      expect(String((read as Error).message)).toContain(v3Key.fingerprint);
    } finally {
      await wrong.close();
    }
  });

  it('an instance with a wrong version 2 can neither activate(2) nor re-wrap rows to it, nor re-wrap from it', async () => {
    const wrong = await instance(
      [
        { version: 2, provider: otherKey() },
        { version: 3, provider: v3Key },
      ],
      3,
      false,
    );
    try {
      const before = await sidecars();
      const wrongRegistry = new KeyRegistry(wrong.dataSource, wrong.encryption);
      await expect(wrongRegistry.activate(2)).rejects.toBeInstanceOf(ConfigError);
      await expect(wrong.encryption.activate(2)).rejects.toThrow(/version 2/);
      expect(wrong.encryption.keyring.activeVersion).toBe(3);
      expect((await wrongRegistry.list()).find((r) => r.state === 'active')?.version).toBe(3);

      const toTwo = await rewrapDataKeys(wrong.dataSource, wrong.encryption, { toVersion: 2 });
      expect(toTwo.error).toBeInstanceOf(ConfigError);
      expect(toTwo.rewrapCalls).toBe(0);
      expect(await sidecars()).toEqual(before);
      await expect(wrongRegistry.validate()).rejects.toBeInstanceOf(ConfigError);
    } finally {
      await wrong.close();
    }
    // Rows under version 2 cannot be re-wrapped out of it by an instance whose version 2 is wrong either.
    const writer = await instance(sharedKeys(), 2);
    try {
      const repo = writer.dataSource.getRepository(Customer);
      await repo.save(repo.create({ email: 'v2-row@example.com', plan: 'wrong-keys', address: null }));
    } finally {
      await writer.close();
    }
    const wrongSource = await instance(
      [
        { version: 2, provider: otherKey() },
        { version: 3, provider: v3Key },
      ],
      3,
      false,
    );
    try {
      const before = await sidecars();
      const fromTwo = await rewrapDataKeys(wrongSource.dataSource, wrongSource.encryption, {
        toVersion: 3,
        entities: [Customer],
      });
      const failures = fromTwo.properties.flatMap((p) => p.failures);
      expect(failures.length).toBeGreaterThan(0);
      expect(failures.every((f) => f.keyVersion === 2 && /version 2/.test(f.error))).toBe(true);
      expect(await sidecars()).toEqual(before);
    } finally {
      await wrongSource.close();
    }
  });

  it('correctly configured instances validate against the registry and keep reading every row', async () => {
    const good = await instance(sharedKeys(), 3);
    try {
      const results = await new KeyRegistry(good.dataSource, good.encryption).validate();
      expect(results.map((r) => [r.version, r.registry])).toEqual([
        [1, 'matches'],
        [2, 'matches'],
        [3, 'matches'],
      ]);
      const loaded = await good.dataSource.getRepository(Customer).findBy({ plan: 'wrong-keys' });
      expect(loaded.map((c) => c.email).sort()).toEqual([
        'under-two@example.com',
        'v2-row@example.com',
        'v3@example.com',
      ]);
    } finally {
      await good.close();
    }
  });
});

describe('registry watch options', () => {
  const keys = () => [{ version: 1, provider: new CountingKeyProvider() }];
  it.each([0, -5, 999, Number.NaN, Number.POSITIVE_INFINITY, '60000' as unknown as number])(
    'refuses refreshInterval = %s at construction: it must be finite and at least 1,000 ms',
    (refreshInterval) => {
      const make = () =>
        new EnvelopeEncryption({ keys: keys(), activeVersion: 1, registry: { refreshInterval } });
      expect(make).toThrow(ConfigError);
      expect(make).toThrow(/refreshInterval must be a finite number of ms, at least 1000/);
    },
  );

  it('accepts refreshInterval = 1,000 ms', () => {
    expect(
      () => new EnvelopeEncryption({ keys: keys(), activeVersion: 1, registry: { refreshInterval: 1_000 } }),
    ).not.toThrow();
  });
});

describe('an instance whose configuration lacks the registry active version', () => {
  const k1 = new CountingKeyProvider();
  const k2 = new CountingKeyProvider();
  const k3 = new CountingKeyProvider();
  let schema: TestSchema;
  const open: EncryptedTestDatabase[] = [];
  /** An instance on the shared tables; `registry` makes it follow the registry. */
  const instance = async (
    keys: Array<{ version: number; provider: CountingKeyProvider }>,
    activeVersion: number,
    registry?: { warn: (m: string) => void },
  ) => {
    const started = await encryptedDatabase([Customer, Order], {
      schema,
      migrations: [TypeormEnvelopeKeyRegistry1764300000000],
      encryption: {
        keys,
        activeVersion,
        ...(registry ? { registry: { refreshInterval: 1_000, ...registry } } : {}),
      },
    });
    open.push(started);
    return started;
  };
  const versionsOf = (plan: string) =>
    rawQuery<{ email: string; version: number }>(
      schema.url,
      `SELECT encode(email_ciphertext, 'hex') AS email, email_key_version AS version
       FROM "${schema.schema}".customer WHERE plan = $1 ORDER BY id`,
      [plan],
    );
  const save = (db: EncryptedTestDatabase, email: string, plan: string) => {
    const repo = db.dataSource.getRepository(Customer);
    return repo.save(repo.create({ email, plan, address: null }));
  };

  beforeAll(async () => {
    schema = await createTestSchema('registry_fallback');
  });
  afterAll(async () => {
    for (const db of open.reverse()) await db.close();
    await schema?.drop();
  });

  it('writes with a configured version the registry records, not with an unrecorded newer one', async () => {
    const a = await instance(
      [
        { version: 1, provider: k1 },
        { version: 2, provider: k2 },
      ],
      1,
    );
    const registryA = new KeyRegistry(a.dataSource, a.encryption);
    await registryA.sync();
    await registryA.activate(2);
    // Version 3 is staged in this deployment but recorded nowhere; version 2 is missing from it.
    const warnings: string[] = [];
    const b = await instance(
      [
        { version: 1, provider: k1 },
        { version: 3, provider: k3 },
      ],
      1,
      { warn: (m) => warnings.push(m) },
    );
    expect(b.encryption.keyring.activeVersion).toBe(1);
    expect(warnings).toEqual([expect.stringMatching(/names version 2 active.*writing with version 1/)]);
    const { id } = await save(b, 'from-b@example.com', 'fallback');
    expect((await versionsOf('fallback')).map((r) => r.version)).toEqual([1]);
    expect(JSON.stringify(await versionsOf('fallback'))).not.toContain(
      Buffer.from('from-b@example.com').toString('hex'),
    );
    // The instance that has the registry's versions reads the row.
    expect((await a.dataSource.getRepository(Customer).findOneByOrFail({ id })).email).toBe(
      'from-b@example.com',
    );
  });

  it('refuses writes (reads keep working) while none of its versions is recorded and not retired, then writes once one is', async () => {
    const a = open[0] as EncryptedTestDatabase;
    const registryA = new KeyRegistry(a.dataSource, a.encryption);
    expect((await rewrapDataKeys(a.dataSource, a.encryption)).error).toBeUndefined();
    await registryA.retire(1);
    // An instance that follows no registry writes a row under version 3, recorded nowhere yet.
    const w = await instance(
      [
        { version: 2, provider: k2 },
        { version: 3, provider: k3 },
      ],
      3,
    );
    const { id: underThree } = await save(w, 'under-three@example.com', 'refused');

    const onlyRetired = await instance([{ version: 1, provider: k1 }], 1, { warn: () => undefined });
    const retiredWrite = await save(onlyRetired, 'retired@example.com', 'refused').catch((e: unknown) => e);
    expect(retiredWrite).toBeInstanceOf(ConfigError);
    expect(String((retiredWrite as Error).message)).toMatch(/version 1 is retired/);

    const warnings: string[] = [];
    const c = await instance(
      [
        { version: 1, provider: k1 },
        { version: 3, provider: k3 },
      ],
      1,
      { warn: (m) => warnings.push(m) },
    );
    const before = await versionsOf('refused');
    const refused = await save(c, 'refused@example.com', 'refused').catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(ConfigError);
    expect(refused).toMatchObject({ entity: 'Customer', column: 'email' });
    const message = String((refused as Error).message);
    expect(message).toContain('writes are refused');
    expect(message).toContain('names version 2 active');
    expect(message).toContain('version 1 is retired');
    expect(message).toContain('version 3 is not recorded');
    expect(warnings).toEqual([expect.stringContaining('writes are refused')]);
    expect(await versionsOf('refused')).toEqual(before);
    expect(before.map((r) => r.version)).toEqual([3]);
    // Reads keep working.
    expect((await c.dataSource.getRepository(Customer).findOneByOrFail({ id: underThree })).email).toBe(
      'under-three@example.com',
    );

    // Version 3 gets recorded: at its next registry read the instance writes with it.
    await new KeyRegistry(w.dataSource, w.encryption).sync();
    await vi.waitFor(() => expect(c.encryption.keyring.writeRefusal).toBeUndefined(), { timeout: 10_000 });
    await save(c, 'after@example.com', 'refused');
    expect((await versionsOf('refused')).map((r) => r.version)).toEqual([3, 3]);
  });
});
