import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rawQuery } from '../../support/database';
import { Customer, Order } from '../../support/entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

let db: EncryptedTestDatabase;
const table = () => `"${db.schema.schema}"."customer"`;

beforeAll(async () => {
  db = await encryptedDatabase([Customer, Order], { prefix: 'write_read' });
});
afterAll(() => db?.close());

function newCustomer(email: string, extra: Partial<Customer> = {}): Customer {
  return Object.assign(new Customer(), {
    email,
    address: { street: '1 Main St', city: 'Springfield' },
    plan: 'pro',
    contact: { phone: '+1 555 0100', preferredChannel: 'sms' },
    ...extra,
  });
}

async function storedRow(id: number) {
  const [row] = await rawQuery<Record<string, unknown>>(
    db.schema.url,
    `SELECT * FROM ${table()} WHERE id = $1`,
    [id],
  );
  return row;
}

/** The row holds no column with the plaintext, and no byte sequence of it anywhere. */
function expectNoPlaintext(row: Record<string, unknown> | undefined, ...plaintexts: string[]) {
  expect(row).toBeDefined();
  const bytes = Buffer.concat(
    Object.values(row ?? {}).map((v) => (Buffer.isBuffer(v) ? v : Buffer.from(String(v)))),
  );
  for (const p of plaintexts) expect(bytes.includes(Buffer.from(p))).toBe(false);
}

describe('save and load', () => {
  it('stores four sidecar columns and no plaintext column', async () => {
    const columns = await rawQuery<{ column_name: string; data_type: string }>(
      db.schema.url,
      `SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'customer' ORDER BY column_name`,
      [db.schema.schema],
    );
    const byName = Object.fromEntries(columns.map((c) => [c.column_name, c.data_type]));
    expect(byName).toMatchObject({
      email_ciphertext: 'bytea',
      email_iv: 'bytea',
      email_wrapped_key: 'bytea',
      email_key_version: 'integer',
      address_ciphertext: 'bytea',
    });
    expect(byName).not.toHaveProperty('email');
    expect(byName).not.toHaveProperty('address');
  });

  it('encrypts on save, decrypts on find, leaves plaintext on the caller object', async () => {
    const customer = newCustomer('alice@example.com');
    await db.dataSource.getRepository(Customer).save(customer);
    expect(customer.email).toBe('alice@example.com');
    expect(customer.address).toEqual({ street: '1 Main St', city: 'Springfield' });

    const row = await storedRow(customer.id);
    expectNoPlaintext(row, 'alice@example.com', 'Springfield', '555 0100');
    expect(Buffer.isBuffer(row?.email_ciphertext)).toBe(true);
    expect(row?.email_iv).toHaveLength(12);
    expect(row?.email_key_version).toBe(1);

    const loaded = await db.dataSource.getRepository(Customer).findOneByOrFail({ id: customer.id });
    expect(loaded.email).toBe('alice@example.com');
    expect(loaded.address).toEqual({ street: '1 Main St', city: 'Springfield' });
    expect(loaded.contact.phone).toBe('+1 555 0100');
    expect(loaded.contact.preferredChannel).toBe('sms');
    expect(Object.keys(loaded)).not.toContain('email$iv');
  });

  it('save of an unchanged loaded entity issues no UPDATE and encrypts nothing', async () => {
    const repo = db.dataSource.getRepository(Customer);
    const saved = await repo.save(newCustomer('bob@example.com'));
    const loaded = await repo.findOneByOrFail({ id: saved.id });
    const before = await storedRow(saved.id);
    db.logger.lines.length = 0;
    await repo.save(loaded);
    expect(db.logger.lines.filter((l) => l.startsWith('UPDATE'))).toEqual([]);
    const after = await storedRow(saved.id);
    expect(after).toEqual(before);
  });

  it('changing one encrypted property re-encrypts only that property', async () => {
    const repo = db.dataSource.getRepository(Customer);
    const saved = await repo.save(newCustomer('carol@example.com'));
    const loaded = await repo.findOneByOrFail({ id: saved.id });
    const before = await storedRow(saved.id);
    loaded.email = 'carol@example.org';
    await repo.save(loaded);
    const after = await storedRow(saved.id);
    expect(after?.email_ciphertext).not.toEqual(before?.email_ciphertext);
    expect(after?.email_iv).not.toEqual(before?.email_iv);
    expect(after?.address_ciphertext).toEqual(before?.address_ciphertext);
    expect(after?.address_iv).toEqual(before?.address_iv);
    expect(loaded.email).toBe('carol@example.org');
    expect((await repo.findOneByOrFail({ id: saved.id })).email).toBe('carol@example.org');
    expectNoPlaintext(after, 'carol@example.org');
  });

  it('notices changes made inside a JSON value', async () => {
    const repo = db.dataSource.getRepository(Customer);
    const saved = await repo.save(newCustomer('dave@example.com'));
    const loaded = await repo.findOneByOrFail({ id: saved.id });
    (loaded.address as { city: string }).city = 'Shelbyville';
    await repo.save(loaded);
    expect((await repo.findOneByOrFail({ id: saved.id })).address?.city).toBe('Shelbyville');
  });

  it('stores null as four null columns and loads it as null', async () => {
    const repo = db.dataSource.getRepository(Customer);
    const saved = await repo.save(newCustomer('erin@example.com', { address: null }));
    const row = await storedRow(saved.id);
    expect([
      row?.address_ciphertext,
      row?.address_iv,
      row?.address_wrapped_key,
      row?.address_key_version,
    ]).toEqual([null, null, null, null]);
    expect((await repo.findOneByOrFail({ id: saved.id })).address).toBeNull();
  });

  it('saves arrays in chunks', async () => {
    const repo = db.dataSource.getRepository(Customer);
    const many = Array.from({ length: 25 }, (_, i) => newCustomer(`chunk${i}@example.com`));
    await repo.save(many, { chunk: 10 });
    expect(many.map((c) => c.email)).toEqual(many.map((_, i) => `chunk${i}@example.com`));
    const loaded = await repo.find({ where: { plan: 'pro' }, order: { id: 'ASC' } });
    const emails = new Set(loaded.map((c) => c.email));
    for (let i = 0; i < 25; i++) expect(emails.has(`chunk${i}@example.com`)).toBe(true);
    expectNoPlaintext(await storedRow(many[0]?.id ?? 0), 'chunk0@example.com');
  });

  it('never logs plaintext', () => {
    const log = db.logger.lines.join('\n');
    expect(log).not.toContain('alice@example.com');
    expect(log).not.toContain('Springfield');
  });
});
