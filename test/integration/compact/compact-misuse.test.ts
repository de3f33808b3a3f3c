import { randomBytes } from 'node:crypto';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError, EnvelopeEncryption, IntegrityError, KeyAccessDeniedError } from '../../../src';
import type { EncryptionContext } from '../../../src/keys/key-provider';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase, RecordingLogger } from '../../support/typeorm';
import { COMPACT_MIGRATIONS, CompactBadge, CompactOrder, CompactPerson } from './compact-entities';
import {
  dataKeyIdOf,
  expectCompactValue,
  keyRows,
  keyTable,
  keyTableQueries,
  onPglite,
  storedRow,
} from './compact-support';

const ENTITIES = [CompactPerson, CompactOrder, CompactBadge];
const masterKey = randomBytes(32).toString('base64');
const versionTwo = new CountingKeyProvider();
let db: EncryptedTestDatabase;

beforeAll(async () => {
  if (onPglite) return;
  db = await encryptedDatabase(ENTITIES, {
    prefix: 'compact_misuse',
    migrations: COMPACT_MIGRATIONS,
    encryption: {
      keys: [
        { version: 1, provider: new CountingKeyProvider(masterKey) },
        { version: 2, provider: versionTwo },
      ],
    },
  });
});
afterAll(() => db?.close());

const people = (source: DataSource = db.dataSource) => source.getRepository(CompactPerson);
const person = (email: string, extra: Partial<CompactPerson> = {}) =>
  people().create({
    email,
    address: null,
    plan: 'misuse',
    contact: { phone: null, channel: null },
    ...extra,
  });

function rejectionOf(promise: Promise<unknown>): Promise<unknown> {
  return promise.then(
    () => undefined,
    (e: unknown) => e,
  );
}

/** A second DataSource on the same tables, with its own EnvelopeEncryption (another instance). */
async function secondInstance(provider = new CountingKeyProvider(masterKey)) {
  const encryption = new EnvelopeEncryption({ keys: [{ version: 1, provider }], activeVersion: 1 });
  const logger = new RecordingLogger();
  const dataSource = new DataSource({
    type: 'postgres',
    url: db.schema.url,
    schema: db.schema.schema,
    entities: ENTITIES,
    logging: true,
    logger,
  });
  encryption.attach(dataSource);
  await dataSource.initialize();
  return { dataSource, encryption, logger, provider };
}

describe.skipIf(onPglite)('registration is committed before any value refers to it', () => {
  it('a transaction that rolls back after sealing leaves the key row, and later values under that key read', async () => {
    db.encryption.cache.renewEncryptionKey();
    const before = await keyRows(db);
    const error = await rejectionOf(
      db.dataSource.transaction(async (manager) => {
        await manager.save(person('rolled-back@example.com'));
        throw new Error('the application rolls back');
      }),
    );
    expect((error as Error).message).toBe('the application rolls back');
    const after = await keyRows(db);
    expect(after).toHaveLength(before.length + 1);
    const survivor = after[after.length - 1];
    const gone = await rawQuery(
      db.schema.url,
      `SELECT 1 FROM "${db.schema.schema}".compact_people WHERE plan = 'misuse'`,
    );
    expect(gone).toHaveLength(0);
    /* The key is still the encrypting one: the next value refers to the row that survived. */
    const later = await people().save(person('later@example.com'));
    const stored = (await storedRow(db, 'compact_people', later.id)).email_ciphertext as Buffer;
    expect(dataKeyIdOf(stored)).toBe(survivor?.id);
    db.encryption.purgeCache();
    expect((await people().findOneByOrFail({ id: later.id })).email).toBe('later@example.com');
  });

  it('many concurrent writes under a fresh data key register it once', async () => {
    db.encryption.cache.renewEncryptionKey();
    const from = db.logger.lines.length;
    const before = (await keyRows(db)).length;
    const saved = await Promise.all(
      Array.from({ length: 40 }, (_, i) =>
        people().save(person(`burst-${i}@example.com`, { plan: 'burst' })),
      ),
    );
    expect(keyTableQueries(db, from, 'INSERT')).toHaveLength(1);
    expect(await keyRows(db)).toHaveLength(before + 1);
    const ids = new Set(
      await Promise.all(
        saved.map(async (p) =>
          dataKeyIdOf((await storedRow(db, 'compact_people', p.id)).email_ciphertext as Buffer),
        ),
      ),
    );
    expect(ids.size).toBe(1);
  });

  it('two instances sealing concurrently neither duplicate nor lose key rows, and every value reads in both', async () => {
    const other = await secondInstance();
    try {
      db.encryption.cache.renewEncryptionKey();
      const before = (await keyRows(db)).length;
      const mine = Array.from({ length: 30 }, (_, i) =>
        people().save(person(`one-${i}@example.com`, { plan: 'two' })),
      );
      const theirs = Array.from({ length: 30 }, (_, i) =>
        people(other.dataSource).save(
          people(other.dataSource).create({ email: `two-${i}@example.com`, plan: 'two', address: null }),
        ),
      );
      await Promise.all([...mine, ...theirs]);
      const rows = await keyRows(db);
      /* One data key each: two rows, distinct. */
      expect(rows).toHaveLength(before + 2);
      const used = await rawQuery<{ id: string; n: string }>(
        db.schema.url,
        `SELECT ('x' || encode(substring(email_ciphertext from 3 for 8), 'hex'))::bit(64)::bigint::text AS id, count(*) AS n
         FROM "${db.schema.schema}".compact_people WHERE plan = 'two' GROUP BY 1`,
      );
      expect(used.map((u) => Number(u.n)).sort()).toEqual([30, 30]);
      for (const u of used) expect(rows.some((r) => r.id === u.id)).toBe(true);
      db.encryption.purgeCache();
      other.encryption.purgeCache();
      for (const source of [db.dataSource, other.dataSource]) {
        const all = await people(source).findBy({ plan: 'two' });
        expect(all.map((p) => p.email).sort()).toEqual(
          [
            ...Array.from({ length: 30 }, (_, i) => `one-${i}@example.com`),
            ...Array.from({ length: 30 }, (_, i) => `two-${i}@example.com`),
          ].sort(),
        );
      }
    } finally {
      await other.dataSource.destroy();
    }
  });

  it('one EnvelopeEncryption on two DataSources of one database registers a shared data key once', async () => {
    const second = new DataSource({
      type: 'postgres',
      url: db.schema.url,
      schema: db.schema.schema,
      entities: ENTITIES,
      logging: true,
      logger: new RecordingLogger(),
    });
    db.encryption.attach(second, { validate: false });
    await second.initialize();
    try {
      db.encryption.cache.renewEncryptionKey();
      const before = (await keyRows(db)).length;
      const saved = await Promise.all([
        ...Array.from({ length: 10 }, (_, i) =>
          people().save(person(`shared-a-${i}@example.com`, { plan: 'shared' })),
        ),
        ...Array.from({ length: 10 }, (_, i) =>
          people(second).save(person(`shared-b-${i}@example.com`, { plan: 'shared' })),
        ),
      ]);
      expect(await keyRows(db)).toHaveLength(before + 1);
      const ids = new Set(
        await Promise.all(
          saved.map(async (p) =>
            dataKeyIdOf((await storedRow(db, 'compact_people', p.id)).email_ciphertext as Buffer),
          ),
        ),
      );
      expect(ids.size).toBe(1);
    } finally {
      await second.destroy();
    }
  });

  it('a registration that fails fails the write: nothing is stored', async () => {
    db.encryption.cache.renewEncryptionKey();
    db.encryption.purgeCache();
    await rawQuery(db.schema.url, `ALTER TABLE ${keyTable(db)} RENAME TO moved_away`);
    try {
      const error = await rejectionOf(people().save(person('unregistered@example.com', { plan: 'failed' })));
      expect(error).toBeInstanceOf(ConfigError);
      expect((error as Error).message).toMatch(/data-key table/);
      expect((error as Error).message).toMatch(/TypeormEnvelopeDataKeys1764500000000/);
      expect((error as Error).message).not.toContain('unregistered');
    } finally {
      await rawQuery(
        db.schema.url,
        `ALTER TABLE "${db.schema.schema}".moved_away RENAME TO typeorm_envelope_data_keys`,
      );
    }
    expect(
      await rawQuery(
        db.schema.url,
        `SELECT 1 FROM "${db.schema.schema}".compact_people WHERE plan = 'failed'`,
      ),
    ).toHaveLength(0);
    /* Once the table is back, the same key registers and writes work. */
    const saved = await people().save(person('registered@example.com', { plan: 'failed' }));
    expectCompactValue(
      (await storedRow(db, 'compact_people', saved.id)).email_ciphertext,
      'registered@example.com',
      await keyRows(db),
    );
  });
});

describe.skipIf(onPglite)('damaged or misplaced key rows and values', () => {
  it('a deleted key row is an IntegrityError naming the data-key id, entity and column, with no plaintext', async () => {
    db.encryption.cache.renewEncryptionKey();
    const saved = await people().save(person('deleted-key@example.com', { plan: 'deleted' }));
    const id = dataKeyIdOf((await storedRow(db, 'compact_people', saved.id)).email_ciphertext as Buffer);
    await rawQuery(db.schema.url, `DELETE FROM ${keyTable(db)} WHERE id = $1`, [id]);
    db.encryption.purgeCache();
    const error = await rejectionOf(people().findOneByOrFail({ id: saved.id }));
    expect(error).toBeInstanceOf(IntegrityError);
    const message = (error as Error).message;
    expect(message).toContain(`data key ${id} is not in the data-key table`);
    expect(message).toMatch(/backup/);
    expect((error as IntegrityError).entity).toBe('CompactPerson');
    expect((error as IntegrityError).column).toBe('email');
    expect(message).not.toContain('deleted-key');
    await rawQuery(db.schema.url, `DELETE FROM "${db.schema.schema}".compact_people WHERE id = $1`, [
      saved.id,
    ]);
  });

  it('a corrupted wrapped key is an IntegrityError naming the data-key id', async () => {
    db.encryption.cache.renewEncryptionKey();
    const saved = await people().save(person('corrupt-key@example.com', { plan: 'corrupt' }));
    const id = dataKeyIdOf((await storedRow(db, 'compact_people', saved.id)).email_ciphertext as Buffer);
    await rawQuery(
      db.schema.url,
      `UPDATE ${keyTable(db)} SET wrapped_key = set_byte(wrapped_key, 20, get_byte(wrapped_key, 20) # 1) WHERE id = $1`,
      [id],
    );
    db.encryption.purgeCache();
    const error = await rejectionOf(people().findOneByOrFail({ id: saved.id }));
    expect(error).toBeInstanceOf(IntegrityError);
    expect((error as Error).message).toContain(`data key ${id}`);
    expect((error as Error).message).not.toContain('corrupt-key');
    await rawQuery(db.schema.url, `DELETE FROM "${db.schema.schema}".compact_people WHERE id = $1`, [
      saved.id,
    ]);
  });

  it('a value pointed at another key row fails authentication', async () => {
    db.encryption.cache.renewEncryptionKey();
    const a = await people().save(person('pointed@example.com', { plan: 'pointed' }));
    db.encryption.cache.renewEncryptionKey();
    const b = await people().save(person('other-key@example.com', { plan: 'pointed' }));
    const va = (await storedRow(db, 'compact_people', a.id)).email_ciphertext as Buffer;
    const vb = (await storedRow(db, 'compact_people', b.id)).email_ciphertext as Buffer;
    expect(dataKeyIdOf(va)).not.toBe(dataKeyIdOf(vb));
    const repointed = Buffer.from(va);
    vb.copy(repointed, 2, 2, 10);
    await rawQuery(
      db.schema.url,
      `UPDATE "${db.schema.schema}".compact_people SET email_ciphertext = $1 WHERE id = $2`,
      [repointed, a.id],
    );
    db.encryption.purgeCache();
    await expect(people().findOneByOrFail({ id: a.id })).rejects.toBeInstanceOf(IntegrityError);
    await rawQuery(db.schema.url, `DELETE FROM "${db.schema.schema}".compact_people WHERE plan = 'pointed'`);
  });

  it('a value copied to another row or another column is an IntegrityError', async () => {
    const [a, b] = await people().save([
      person('copy-a@example.com', { plan: 'copy' }),
      person('copy-b@example.com', { plan: 'copy' }),
    ]);
    /* A save() of a loaded row binds the values it writes to the row's primary key. */
    const loaded = await people().findOneByOrFail({ id: (a as CompactPerson).id });
    Object.assign(loaded, { email: 'bound-a@example.com', address: { street: 'x', city: 'y' } });
    await people().save(loaded);
    const ra = await storedRow(db, 'compact_people', (a as CompactPerson).id);
    expect(((ra.email_ciphertext as Buffer)[1] ?? 0) & 0x01).toBe(0x01);
    await rawQuery(
      db.schema.url,
      `UPDATE "${db.schema.schema}".compact_people SET email_ciphertext = $1 WHERE id = $2`,
      [ra.email_ciphertext, (b as CompactPerson).id],
    );
    db.encryption.purgeCache();
    await expect(people().findOneByOrFail({ id: (b as CompactPerson).id })).rejects.toBeInstanceOf(
      IntegrityError,
    );
    await rawQuery(
      db.schema.url,
      `UPDATE "${db.schema.schema}".compact_people SET address_ciphertext = email_ciphertext WHERE id = $1`,
      [(a as CompactPerson).id],
    );
    await expect(people().findOneByOrFail({ id: (a as CompactPerson).id })).rejects.toBeInstanceOf(
      IntegrityError,
    );
    await rawQuery(db.schema.url, `DELETE FROM "${db.schema.schema}".compact_people WHERE plan = 'copy'`);
  });

  it('a truncated value or one of an unknown format is an IntegrityError naming entity and column', async () => {
    const saved = await people().save(person('short@example.com', { plan: 'short' }));
    await rawQuery(
      db.schema.url,
      `UPDATE "${db.schema.schema}".compact_people SET email_ciphertext = substring(email_ciphertext from 1 for 20) WHERE id = $1`,
      [saved.id],
    );
    const error = await rejectionOf(people().findOneByOrFail({ id: saved.id }));
    expect(error).toBeInstanceOf(IntegrityError);
    expect((error as IntegrityError).column).toBe('email');
    await rawQuery(db.schema.url, `DELETE FROM "${db.schema.schema}".compact_people WHERE id = $1`, [
      saved.id,
    ]);
  });
});

describe.skipIf(onPglite)('re-wrapped key rows', () => {
  it('an entity loaded before its key row is re-wrapped and saved after keeps reading, and writes only what changed', async () => {
    db.encryption.cache.renewEncryptionKey();
    const saved = await people().save(
      person('rewrap@example.com', { plan: 'rewrap', address: { street: 'R', city: 'W' } }),
    );
    const loaded = await people().findOneByOrFail({ id: saved.id });
    const before = await storedRow(db, 'compact_people', saved.id);
    const id = dataKeyIdOf(before.email_ciphertext as Buffer);
    /* Re-wrap the key row under version 2, as rotation does: data rows untouched. */
    const [row] = (await keyRows(db)).filter((r) => r.id === id);
    const context = { 'typeorm-envelope:keyring': 'default' };
    const plaintextKey = await db.encryption.keyring
      .provider(1)
      .unwrapDataKey(row?.wrapped_key as Buffer, context);
    const rewrapped = await versionTwo.wrapDataKey(plaintextKey, context);
    plaintextKey.fill(0);
    await rawQuery(
      db.schema.url,
      `UPDATE ${keyTable(db)} SET wrapped_key = $1, key_version = 2, rewrapped_at = now() WHERE id = $2`,
      [rewrapped, id],
    );
    /* Unchanged: no write at all. */
    const from = db.logger.lines.length;
    await people().save(loaded);
    expect(db.logger.lines.slice(from).some((l) => l.startsWith('UPDATE'))).toBe(false);
    /* One property changed: the other keeps its stored value, pointing at the re-wrapped row. */
    loaded.email = 'rewrap-changed@example.com';
    await people().save(loaded);
    const after = await storedRow(db, 'compact_people', saved.id);
    expect(after.address_ciphertext).toEqual(before.address_ciphertext);
    const rows = await keyRows(db);
    expect(rows.find((r) => r.id === id)?.fingerprint).toEqual(row?.fingerprint);
    /* An instance that has only version 2 reads both values through the re-wrapped row. */
    const onlyTwo = new EnvelopeEncryption({
      keys: [{ version: 2, provider: versionTwo }],
      activeVersion: 2,
    });
    const dataSource = new DataSource({
      type: 'postgres',
      url: db.schema.url,
      schema: db.schema.schema,
      entities: ENTITIES,
    });
    onlyTwo.attach(dataSource, { validate: false });
    await dataSource.initialize();
    try {
      versionTwo.reset();
      const back = await people(dataSource).findOneByOrFail({ id: saved.id });
      expect(back.address).toEqual({ street: 'R', city: 'W' });
      if (dataKeyIdOf(after.email_ciphertext as Buffer) === id)
        expect(back.email).toBe('rewrap-changed@example.com');
      expect(versionTwo.calls.unwrap).toBeGreaterThanOrEqual(1);
    } finally {
      await dataSource.destroy();
    }
    db.encryption.purgeCache();
    const cold = await people().findOneByOrFail({ id: saved.id });
    expect([cold.email, cold.address]).toEqual(['rewrap-changed@example.com', { street: 'R', city: 'W' }]);
  });
});

/** A master key that its owner can disable, as a KMS key is disabled after a rotation. */
class DisablableKeyProvider extends CountingKeyProvider {
  disabled = false;

  protected override _unwrapDataKey(wrappedKey: Buffer, context: EncryptionContext): Promise<Buffer> {
    if (this.disabled) return Promise.reject(new KeyAccessDeniedError('the master key is disabled'));
    return super._unwrapDataKey(wrappedKey, context);
  }
}

describe.skipIf(onPglite)('a copy of a key row held from an earlier read', () => {
  it('is read again when it no longer opens (re-wrapped elsewhere, old master key disabled)', async () => {
    const oldKey = new DisablableKeyProvider();
    const newKey = new CountingKeyProvider();
    const small = await encryptedDatabase(ENTITIES, {
      prefix: 'compact_stale',
      migrations: COMPACT_MIGRATIONS,
      encryption: {
        keys: [
          { version: 1, provider: oldKey },
          { version: 2, provider: newKey },
        ],
        /* One unwrapped key at a time: reading under a second key evicts the first. */
        cache: { maxUnwrappedKeys: 1 },
      },
    });
    try {
      const repo = small.dataSource.getRepository(CompactPerson);
      const make = (email: string) => repo.create({ email, address: null, plan: 'stale' });
      const first = await repo.save(make('first@example.com'));
      small.encryption.cache.renewEncryptionKey();
      const second = await repo.save(make('second@example.com'));
      small.encryption.purgeCache();
      /* Both rows are now held; only the second data key is. */
      expect((await repo.findOneByOrFail({ id: first.id })).email).toBe('first@example.com');
      expect((await repo.findOneByOrFail({ id: second.id })).email).toBe('second@example.com');
      const id = dataKeyIdOf((await storedRow(small, 'compact_people', first.id)).email_ciphertext as Buffer);
      const [row] = (await keyRows(small)).filter((r) => r.id === id);
      const context = { 'typeorm-envelope:keyring': 'default' };
      const plaintextKey = await oldKey.unwrapDataKey(row?.wrapped_key as Buffer, context);
      const rewrapped = await newKey.wrapDataKey(plaintextKey, context);
      plaintextKey.fill(0);
      await rawQuery(
        small.schema.url,
        `UPDATE ${keyTable(small)} SET wrapped_key = $1, key_version = 2 WHERE id = $2`,
        [rewrapped, id],
      );
      oldKey.disabled = true;
      newKey.reset();
      const from = small.logger.lines.length;
      expect((await repo.findOneByOrFail({ id: first.id })).email).toBe('first@example.com');
      expect(keyTableQueries(small, from, 'SELECT')).toHaveLength(1);
      expect(newKey.calls.unwrap).toBe(1);
      /* A failure the table cannot explain stays a failure: the second key's row is unchanged. */
      small.encryption.purgeCache();
      await expect(repo.findOneByOrFail({ id: second.id })).rejects.toBeInstanceOf(KeyAccessDeniedError);
    } finally {
      await small.close();
    }
  });
});
