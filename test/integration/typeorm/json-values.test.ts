import 'reflect-metadata';
import { Column, Entity, PrimaryGeneratedColumn } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Encrypted, ValueTypeError } from '../../../src';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

@Entity('profile')
class Profile {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ type: 'json', nullable: true }) settings!: unknown;
  @Column({ type: 'varchar' }) label!: string;
}

let db: EncryptedTestDatabase;
const table = () => `"${db.schema.schema}".profile`;

beforeAll(async () => {
  db = await encryptedDatabase([Profile], { prefix: 'json' });
});
afterAll(() => db?.close());

function cyclic(): Record<string, unknown> {
  const value: Record<string, unknown> = { secret: 'cycle-secret-1' };
  value.self = value;
  return value;
}

const refused = (): Array<[string, () => unknown]> => [
  ['a cycle', cyclic],
  ['a bigint inside', () => ({ secret: 'bigint-secret-2', amount: 12345678901234567890n })],
  ['a bigint inside an array', () => ['array-secret-3', 7n]],
  ['a Map (JSON keeps none of its entries)', () => ({ m: new Map([['map-secret-4', 1]]) })],
  ['a Set (JSON keeps none of its members)', () => [new Set(['set-secret-5'])]],
];

async function expectRefused(write: () => Promise<unknown>) {
  const error = await write().then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(ValueTypeError);
  const e = error as ValueTypeError;
  expect(e).toMatchObject({ entity: 'Profile', column: 'settings' });
  expect(`${e.message} ${String(e.cause ?? '')}`).not.toMatch(/secret/);
  return e;
}

describe('json values that JSON cannot represent', () => {
  it.each(refused())(
    'refuses %s on insert with a ValueTypeError naming entity and column',
    async (_, make) => {
      const repo = db.dataSource.getRepository(Profile);
      await expectRefused(() => repo.save(repo.create({ settings: make(), label: 'insert' })));
      expect(await rawQuery(db.schema.url, `SELECT id FROM ${table()} WHERE label = 'insert'`)).toEqual([]);
    },
  );

  it.each(refused())(
    'refuses %s on update of a loaded entity, leaving the row as it was',
    async (_, make) => {
      const repo = db.dataSource.getRepository(Profile);
      const saved = await repo.save(repo.create({ settings: { plain: true }, label: 'update' }));
      const [before] = await rawQuery(db.schema.url, `SELECT * FROM ${table()} WHERE id = $1`, [saved.id]);
      const loaded = await repo.findOneByOrFail({ id: saved.id });
      loaded.settings = make();
      await expectRefused(() => repo.save(loaded));
      const [after] = await rawQuery(db.schema.url, `SELECT * FROM ${table()} WHERE id = $1`, [saved.id]);
      expect(after).toEqual(before);
      expect((await repo.findOneByOrFail({ id: saved.id })).settings).toEqual({ plain: true });
    },
  );

  it.each(refused())('refuses %s in repository.update()', async (_, make) => {
    const repo = db.dataSource.getRepository(Profile);
    const saved = await repo.save(repo.create({ settings: { plain: 1 }, label: 'set' }));
    await expectRefused(() => repo.update({ id: saved.id }, { settings: make() as object }));
    expect((await repo.findOneByOrFail({ id: saved.id })).settings).toEqual({ plain: 1 });
  });
});

describe('json values in JSON form', () => {
  it('a Date inside comes back as its ISO string and a Buffer as { type, data }, as documented', async () => {
    const repo = db.dataSource.getRepository(Profile);
    const at = new Date('2024-02-29T12:34:56.789Z');
    const saved = await repo.save(
      repo.create({ settings: { at, bytes: Buffer.from('hi'), note: 'json-form-secret' }, label: 'forms' }),
    );
    const loaded = await repo.findOneByOrFail({ id: saved.id });
    expect(loaded.settings).toEqual({
      at: '2024-02-29T12:34:56.789Z',
      bytes: { type: 'Buffer', data: [104, 105] },
      note: 'json-form-secret',
    });
    const [row] = await rawQuery<Record<string, unknown>>(
      db.schema.url,
      `SELECT settings_ciphertext FROM ${table()} WHERE id = $1`,
      [saved.id],
    );
    expect(Buffer.from(row?.settings_ciphertext as Buffer).toString('latin1')).not.toContain(
      'json-form-secret',
    );
  });
});
