import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UnsupportedOperationError } from '../../../src';
import { rawQuery } from '../../support/database';
import { Customer, Order } from '../../support/entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

let db: EncryptedTestDatabase;

beforeAll(async () => {
  db = await encryptedDatabase([Customer, Order], { prefix: 'write_paths' });
});
afterAll(() => db?.close());

const customers = () => db.dataSource.getRepository(Customer);

async function stored(id: number) {
  const [row] = await rawQuery<Record<string, Buffer | number | string | null>>(
    db.schema.url,
    `SELECT * FROM "${db.schema.schema}".customer WHERE id = $1`,
    [id],
  );
  if (!row) throw new Error(`row ${id} not found`);
  return row;
}

async function storedAll() {
  return rawQuery<Record<string, unknown>>(
    db.schema.url,
    `SELECT * FROM "${db.schema.schema}".customer ORDER BY id`,
  );
}

function rejectionOf(promise: Promise<unknown>): Promise<unknown> {
  return promise.then(
    () => undefined,
    (e: unknown) => e,
  );
}

/** TypeORM wraps driver errors in QueryFailedError; the refusal is its `driverError`. */
function refusal(error: unknown): unknown {
  return error instanceof UnsupportedOperationError
    ? error
    : (error as { driverError?: unknown })?.driverError;
}

describe('writes', () => {
  it('create() + save() encrypts', async () => {
    const c = customers().create({
      email: 'create@example.com',
      address: { street: 'S', city: 'C' },
      plan: 'p',
    });
    expect(c.email).toBe('create@example.com');
    await customers().save(c);
    const row = await stored(c.id);
    expect(row.email_ciphertext).toBeInstanceOf(Buffer);
    expect((row.email_ciphertext as Buffer).includes(Buffer.from('create@example.com'))).toBe(false);
    expect((await customers().findOneByOrFail({ id: c.id })).email).toBe('create@example.com');
  });

  it('create() copying a loaded entity keeps its plaintext', async () => {
    const saved = await customers().save(
      customers().create({ email: 'copy@example.com', plan: 'p', address: null }),
    );
    const loaded = await customers().findOneByOrFail({ id: saved.id });
    const copy = customers().create(loaded);
    expect(copy.email).toBe('copy@example.com');
    const merged = customers().merge(customers().create(), loaded);
    expect(merged.email).toBe('copy@example.com');
  });

  it('insert() encrypts and leaves the caller object holding plaintext only', async () => {
    const values = { email: 'insert@example.com', address: { street: 'I', city: 'Ithaca' }, plan: 'p' };
    const result = await customers().insert(values);
    expect(values).toMatchObject({
      email: 'insert@example.com',
      address: { street: 'I', city: 'Ithaca' },
      plan: 'p',
    });
    expect(Object.keys(values).filter((k) => k.includes('$') || k.includes('cipher'))).toEqual([]);
    const id = result.identifiers[0]?.id as number;
    const row = await stored(id);
    expect(row.email_key_version).toBe(1);
    expect((row.email_ciphertext as Buffer).includes(Buffer.from('insert@example.com'))).toBe(false);
    expect((await customers().findOneByOrFail({ id })).address).toEqual({ street: 'I', city: 'Ithaca' });
  });

  it('query-builder insert of several rows encrypts each', async () => {
    await customers()
      .createQueryBuilder()
      .insert()
      .values([
        { email: 'qb1@example.com', plan: 'qb', address: null },
        { email: 'qb2@example.com', plan: 'qb', address: null },
      ])
      .execute();
    const rows = await customers().find({ where: { plan: 'qb' }, order: { id: 'ASC' } });
    expect(rows.map((r) => r.email)).toEqual(['qb1@example.com', 'qb2@example.com']);
  });

  it('update() with a plaintext value writes all four columns and leaves the SET map as given', async () => {
    const saved = await customers().save(
      customers().create({ email: 'before@example.com', plan: 'p', address: null }),
    );
    const before = await stored(saved.id);
    const set = { email: 'after@example.com' };
    await customers().update({ id: saved.id }, set);
    expect(set).toEqual({ email: 'after@example.com' });
    const after = await stored(saved.id);
    for (const column of ['email_ciphertext', 'email_iv']) expect(after[column]).not.toEqual(before[column]);
    expect((after.email_ciphertext as Buffer).includes(Buffer.from('after@example.com'))).toBe(false);
    expect((await customers().findOneByOrFail({ id: saved.id })).email).toBe('after@example.com');
  });

  it('a failed update() leaves the SET object exactly as the caller gave it, and writes nothing', async () => {
    const saved = await customers().save(
      customers().create({ email: 'keep@example.com', plan: 'p', address: null }),
    );
    const before = await stored(saved.id);
    const set = { email: 'never@example.com', plan: 'x'.repeat(10) };
    const error = await rejectionOf(
      customers()
        .createQueryBuilder()
        .update()
        .set(set)
        .where('id = :id AND 1/0 = 1', { id: saved.id })
        .execute(),
    );
    expect(error).toBeDefined();
    expect(set).toEqual({ email: 'never@example.com', plan: 'xxxxxxxxxx' });
    expect(await stored(saved.id)).toEqual(before);
  });

  it('query-builder update().set() encrypts, also inside embedded objects', async () => {
    const saved = await customers().save(
      customers().create({ email: 'qbu@example.com', plan: 'p', address: null }),
    );
    await customers()
      .createQueryBuilder()
      .update()
      .set({ email: 'qbu2@example.com', contact: { phone: '+44 20 7946 0000' } })
      .where('id = :id', { id: saved.id })
      .execute();
    const loaded = await customers().findOneByOrFail({ id: saved.id });
    expect([loaded.email, loaded.contact.phone]).toEqual(['qbu2@example.com', '+44 20 7946 0000']);
    const row = await stored(saved.id);
    expect(row.contactPhone_ciphertext).toBeInstanceOf(Buffer);
    expect((row.contactPhone_ciphertext as Buffer).includes(Buffer.from('7946'))).toBe(false);
  });

  it('update() setting an encrypted property to null nulls all four columns', async () => {
    const saved = await customers().save(
      customers().create({ email: 'n@example.com', plan: 'p', address: { street: 'x', city: 'y' } }),
    );
    await customers().update(saved.id, { address: null });
    const row = await stored(saved.id);
    expect([
      row.address_ciphertext,
      row.address_iv,
      row.address_wrapped_key,
      row.address_key_version,
    ]).toEqual([null, null, null, null]);
    expect((await customers().findOneByOrFail({ id: saved.id })).address).toBeNull();
  });

  it('upsert() on a generated key inserts a new, readable row (TypeORM leaves generated keys to the database)', async () => {
    const first = await customers().save(
      customers().create({ email: 'up1@example.com', plan: 'p', address: null }),
    );
    await customers().upsert({ id: first.id, email: 'up2@example.com', plan: 'up', address: null }, ['id']);
    const rows = await customers().find({ where: [{ id: first.id }, { plan: 'up' }], order: { id: 'ASC' } });
    expect(rows.map((r) => r.email)).toEqual(['up1@example.com', 'up2@example.com']);
  });

  it('remove() and softRemove() work on encrypted entities', async () => {
    const [a, b] = await customers().save([
      customers().create({ email: 'rm@example.com', plan: 'rm', address: null }),
      customers().create({ email: 'soft@example.com', plan: 'rm', address: null }),
    ]);
    await customers().remove(a as Customer);
    await customers().softRemove(b as Customer);
    expect(await customers().findBy({ plan: 'rm' })).toEqual([]);
    const withDeleted = await customers().find({ where: { plan: 'rm' }, withDeleted: true });
    expect(withDeleted.map((c) => c.email)).toEqual(['soft@example.com']);
    expect(b?.email).toBe('soft@example.com');
  });

  it('manager.transaction: commits encrypt, rollbacks leave plaintext on the caller objects', async () => {
    const kept = customers().create({ email: 'tx@example.com', plan: 'tx', address: null });
    await db.dataSource.manager.transaction(async (manager) => {
      await manager.save(kept);
      const inside = await manager.findOneByOrFail(Customer, { id: kept.id });
      expect(inside.email).toBe('tx@example.com');
    });
    const lost = customers().create({ email: 'rollback@example.com', plan: 'tx', address: null });
    const error = await rejectionOf(
      db.dataSource.manager.transaction(async (manager) => {
        await manager.save(lost);
        throw new Error('abort');
      }),
    );
    expect((error as Error).message).toBe('abort');
    expect(lost.email).toBe('rollback@example.com');
    expect((await customers().findBy({ plan: 'tx' })).map((c) => c.email)).toEqual(['tx@example.com']);
  });

  it('a save that fails in the database leaves plaintext on the caller object', async () => {
    const order = db.dataSource.getRepository(Order).create({ cardNumber: '4000000000000002' });
    const error = await rejectionOf(db.dataSource.getRepository(Order).save(order)); // customer is NOT NULL
    expect(error).toBeDefined();
    expect(order.cardNumber).toBe('4000000000000002');
  });
});

describe('fail closed', () => {
  it('a save with listeners disabled is refused, nothing stored', async () => {
    const before = (await storedAll()).length;
    const c = customers().create({ email: 'nolisteners@example.com', plan: 'p', address: null });
    const error = await rejectionOf(customers().save(c, { listeners: false }));
    expect(refusal(error)).toBeInstanceOf(UnsupportedOperationError);
    expect((await storedAll()).length).toBe(before);
    expect(c.email).toBe('nolisteners@example.com');
  });

  it('a query-builder insert and update without listeners are refused', async () => {
    const insert = await rejectionOf(
      customers()
        .createQueryBuilder()
        .insert()
        .values({ email: 'raw@example.com', plan: 'p', address: null })
        .callListeners(false)
        .execute(),
    );
    expect(refusal(insert)).toBeInstanceOf(UnsupportedOperationError);
    const update = await rejectionOf(
      customers()
        .createQueryBuilder()
        .update()
        .set({ email: 'raw@example.com' })
        .callListeners(false)
        .execute(),
    );
    expect(refusal(update)).toBeInstanceOf(UnsupportedOperationError);
    const dump = JSON.stringify(await storedAll());
    expect(dump).not.toContain('raw@example.com');
  });

  it('a value of the wrong type is refused', async () => {
    const c = customers().create({ email: 42 as unknown as string, plan: 'p', address: null });
    const error = await rejectionOf(customers().save(c));
    expect((error as Error).name).toBe('ValueTypeError');
  });

  it('no plaintext in the query log', () => {
    const log = db.logger.lines.join('\n');
    for (const secret of [
      'create@example.com',
      'insert@example.com',
      'after@example.com',
      'up2@example.com',
      'tx@example.com',
      '+44 20 7946 0000',
    ]) {
      expect(log).not.toContain(secret);
    }
  });
});
