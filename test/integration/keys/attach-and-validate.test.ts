import 'reflect-metadata';
import { DataSource } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TypeormEnvelopeKeyRegistry1764300000000 } from '../../../migrations/1764300000000-TypeormEnvelopeKeyRegistry';
import { ConfigError, EnvelopeEncryption, KeyRegistry } from '../../../src';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';
import { Customer, Order } from '../../support/entities';

let schema: TestSchema;

beforeAll(async () => {
  schema = await createTestSchema('attach_validate');
});
afterAll(async () => {
  await schema?.drop();
});

const encryptionWith = (options: { registry?: boolean } = {}) =>
  new EnvelopeEncryption({
    keys: [{ version: 1, provider: new CountingKeyProvider() }],
    activeVersion: 1,
    ...options,
  });
const dataSource = (migrations: Array<new () => unknown> = []) =>
  new DataSource({
    type: 'postgres',
    url: schema.url,
    schema: schema.schema,
    entities: [Customer, Order],
    synchronize: true,
    migrations: migrations as never,
    migrationsRun: migrations.length > 0,
  });

describe('attach() on a DataSource that is already initialized', () => {
  for (const registry of [false, true]) {
    it(`is refused with a ConfigError${registry ? ' (registry option set)' : ''}, and installs nothing`, async () => {
      const encryption = encryptionWith({ registry });
      const initialized = dataSource();
      await initialized.initialize();
      try {
        const error = (() => {
          try {
            encryption.attach(initialized);
          } catch (e) {
            return e;
          }
          return new Error('attach() accepted an initialized DataSource');
        })();
        expect(error).toBeInstanceOf(ConfigError);
        expect(String((error as Error).message)).toContain('before dataSource.initialize()');
        expect(initialized.subscribers).toHaveLength(0);
        expect(() => encryption.encryptedEntities(initialized)).toThrow(ConfigError);
        // Nothing was validated: no key-provider call was made.
        expect(encryption.providerCalls).toEqual({ generated: 0, unwrapped: 0 });
      } finally {
        await initialized.destroy();
      }
      // The same encryption still attaches, as documented, before initialize().
      const fresh = dataSource();
      encryption.attach(fresh);
      await fresh.initialize();
      try {
        const repo = fresh.getRepository(Customer);
        const saved = await repo.save(
          repo.create({ email: 'early@example.com', plan: 'attach', address: null }),
        );
        const [row] = await rawQuery<{ ct: Buffer }>(
          schema.url,
          `SELECT email_ciphertext AS ct FROM "${schema.schema}".customer WHERE id = $1`,
          [saved.id],
        );
        expect(row?.ct.includes(Buffer.from('early@example.com'))).toBe(false);
        expect((await repo.findOneByOrFail({ id: saved.id })).email).toBe('early@example.com');
      } finally {
        await fresh.destroy();
      }
    });
  }
});

describe('validate() and the key registry', () => {
  it("says registry: 'absent' when there is no registry, then 'not-recorded' and 'matches' once there is", async () => {
    const encryption = encryptionWith();
    const plain = dataSource();
    encryption.attach(plain);
    await plain.initialize();
    try {
      expect(await encryption.validate()).toEqual([
        expect.objectContaining({ version: 1, active: true, kind: 'local', registry: 'absent' }),
      ]);
    } finally {
      await plain.destroy();
    }

    const withRegistry = dataSource([TypeormEnvelopeKeyRegistry1764300000000]);
    const second = encryptionWith();
    second.attach(withRegistry);
    await withRegistry.initialize();
    try {
      // The tables were made by this initialize(), after the references were read: read them again.
      const registry = new KeyRegistry(withRegistry, second);
      await registry.loadReferences();
      expect((await second.validate()).map((r) => r.registry)).toEqual(['not-recorded']);
      await registry.sync();
      expect((await registry.validate()).map((r) => r.registry)).toEqual(['matches']);
    } finally {
      await withRegistry.destroy();
    }
  });
});

describe('isAttachedTo()', () => {
  it('tells the DataSource attach() was called with from another one, before and after initialize()', async () => {
    // A schema of its own: the other tests leave a key registry that records other keys.
    const own = await createTestSchema('attached_to');
    const inOwn = () =>
      new DataSource({
        type: 'postgres',
        url: own.url,
        schema: own.schema,
        entities: [Customer, Order],
        synchronize: true,
      });
    const encryption = encryptionWith();
    const attached = inOwn();
    const replica = inOwn();
    expect(encryption.isAttachedTo(attached)).toBe(false);
    encryption.attach(attached);
    expect(encryption.isAttachedTo(attached)).toBe(true);
    expect(encryption.isAttachedTo(replica)).toBe(false);
    expect(encryptionWith().isAttachedTo(attached)).toBe(false);
    await attached.initialize();
    try {
      expect(encryption.isAttachedTo(attached)).toBe(true);
      const repo = attached.getRepository(Customer);
      const { id } = await repo.save(
        repo.create({ email: 'attached@example.com', plan: 'attached', address: null }),
      );
      const [row] = await rawQuery<{ ct: Buffer }>(
        own.url,
        `SELECT email_ciphertext AS ct FROM "${own.schema}".customer WHERE id = $1`,
        [id],
      );
      expect(row?.ct.includes(Buffer.from('attached@example.com'))).toBe(false);
    } finally {
      await attached.destroy();
      await own.drop();
    }
  });
});
