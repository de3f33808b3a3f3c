import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { IntegrityError, maskEntity, UnknownKeyVersionError } from '../../../src';
import { rawQuery } from '../../support/database';
import { Customer, Employee, Order } from '../../support/entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

let db: EncryptedTestDatabase;
const employeeTable = () => `"${db.schema.schema}".employee`;

beforeAll(async () => {
  db = await encryptedDatabase([Customer, Order, Employee], { prefix: 'integrity' });
});
afterAll(() => db?.close());

const employees = () => db.dataSource.getRepository(Employee);

function newEmployee(fullName: string, extra: Partial<Employee> = {}): Employee {
  return employees().create({
    id: randomUUID(),
    fullName,
    salary: 123456.78,
    birthDate: new Date('1990-02-03T04:05:06.789Z'),
    active: true,
    badge: 9007199254740993n,
    photo: Buffer.from([0, 1, 2, 250]),
    team: 'core',
    ...extra,
  });
}

describe('inherited properties and value types', () => {
  it('round-trips every type through an inherited and a declared property', async () => {
    const saved = await employees().save(newEmployee('Grace Hopper'));
    const loaded = await employees().findOneByOrFail({ id: saved.id });
    expect(loaded).toMatchObject({
      fullName: 'Grace Hopper',
      salary: 123456.78,
      active: true,
      badge: 9007199254740993n,
      team: 'core',
    });
    expect(loaded.birthDate?.toISOString()).toBe('1990-02-03T04:05:06.789Z');
    expect(Buffer.isBuffer(loaded.photo) && loaded.photo.equals(Buffer.from([0, 1, 2, 250]))).toBe(true);
    const [row] = await rawQuery<Record<string, Buffer>>(
      db.schema.url,
      `SELECT * FROM ${employeeTable()} WHERE id = $1`,
      [saved.id],
    );
    expect(row?.fullName_ciphertext?.includes(Buffer.from('Grace'))).toBe(false);
  });

  it('an empty string round-trips as an empty string, not null', async () => {
    const saved = await employees().save(newEmployee(''));
    expect((await employees().findOneByOrFail({ id: saved.id })).fullName).toBe('');
  });

  it('upsert() with a client-assigned key inserts and then updates, always readable', async () => {
    const id = randomUUID();
    await employees().upsert({ id, fullName: 'First Name', team: 'up' }, ['id']);
    await employees().upsert({ id, fullName: 'Second Name', team: 'up' }, ['id']);
    const loaded = await employees().findOneByOrFail({ id });
    expect(loaded.fullName).toBe('Second Name');
  });
});

describe('tampering and moved values', () => {
  async function tamper(id: string, column: string, sql: string) {
    await rawQuery(db.schema.url, `UPDATE ${employeeTable()} SET "${column}" = ${sql} WHERE id = $1`, [id]);
  }

  it.each([
    ['fullName_ciphertext', (c: string) => `set_byte("${c}", 3, get_byte("${c}", 3) # 1)`],
    [
      'fullName_ciphertext',
      (c: string) => `set_byte("${c}", length("${c}") - 1, get_byte("${c}", length("${c}") - 1) # 128)`,
    ],
    ['fullName_ciphertext', (c: string) => `set_byte("${c}", 1, get_byte("${c}", 1) # 1)`],
    ['fullName_iv', (c: string) => `set_byte("${c}", 0, get_byte("${c}", 0) # 1)`],
    ['fullName_wrapped_key', (c: string) => `set_byte("${c}", 20, get_byte("${c}", 20) # 4)`],
    ['fullName_ciphertext', (c: string) => `substring("${c}" from 1 for length("${c}") - 1)`],
  ])(
    'a changed byte in %s is an IntegrityError naming entity, column and primary key',
    async (column, change) => {
      const saved = await employees().save(newEmployee('Ada Lovelace'));
      db.encryption.purgeCache();
      await tamper(saved.id, column, change(column));
      const error = await employees()
        .findOneByOrFail({ id: saved.id })
        .then(
          () => undefined,
          (e: unknown) => e,
        );
      expect(error).toBeInstanceOf(IntegrityError);
      expect(error).toMatchObject({ entity: 'Employee', column: 'fullName', primaryKey: saved.id });
      expect(String(error)).not.toContain('Ada');
    },
  );

  it('a changed key version is refused (unknown version)', async () => {
    const saved = await employees().save(newEmployee('Alan Turing'));
    await tamper(saved.id, 'fullName_key_version', '7');
    const error = await employees()
      .findOneByOrFail({ id: saved.id })
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(UnknownKeyVersionError);
    expect(error).toMatchObject({
      entity: 'Employee',
      column: 'fullName',
      primaryKey: saved.id,
      keyVersion: 7,
    });
  });

  it('a ciphertext copied whole to another row does not decrypt there', async () => {
    const [a, b] = await employees().save([newEmployee('Row A'), newEmployee('Row B')]);
    await rawQuery(
      db.schema.url,
      `UPDATE ${employeeTable()} AS t SET "fullName_ciphertext" = s."fullName_ciphertext", "fullName_iv" = s."fullName_iv",
         "fullName_wrapped_key" = s."fullName_wrapped_key", "fullName_key_version" = s."fullName_key_version"
       FROM ${employeeTable()} AS s WHERE s.id = $1 AND t.id = $2`,
      [a?.id, b?.id],
    );
    await expect(employees().findOneByOrFail({ id: b?.id as string })).rejects.toBeInstanceOf(IntegrityError);
    expect((await employees().findOneByOrFail({ id: a?.id as string })).fullName).toBe('Row A');
  });

  it('a ciphertext copied to another column does not decrypt there', async () => {
    const customers = db.dataSource.getRepository(Customer);
    const saved = await customers.save(
      customers.create({ email: 'x@example.com', address: { street: 's', city: 'c' }, plan: 'p' }),
    );
    await rawQuery(
      db.schema.url,
      `UPDATE "${db.schema.schema}".customer SET address_ciphertext = email_ciphertext, address_iv = email_iv,
         address_wrapped_key = email_wrapped_key, address_key_version = email_key_version WHERE id = $1`,
      [saved.id],
    );
    await expect(customers.findOneByOrFail({ id: saved.id })).rejects.toMatchObject({
      name: 'IntegrityError',
      column: 'address',
    });
  });

  it('a half-null set of sidecar columns is an IntegrityError', async () => {
    const saved = await employees().save(newEmployee('Half Null'));
    await tamper(saved.id, 'salary_iv', 'NULL');
    await expect(employees().findOneByOrFail({ id: saved.id })).rejects.toMatchObject({
      name: 'IntegrityError',
      column: 'salary',
    });
    await tamper(saved.id, 'salary_ciphertext', 'NULL');
    await expect(employees().findOneByOrFail({ id: saved.id })).rejects.toBeInstanceOf(IntegrityError);
  });
});

describe('masking', () => {
  it('maskEntity shows masked values for logs and leaves the entity unchanged', async () => {
    const customers = db.dataSource.getRepository(Customer);
    const saved = await customers.save(
      customers.create({
        email: 'jane.doe@example.com',
        address: { street: '1 Road', city: 'Town' },
        plan: 'pro',
        contact: { phone: '+1 555 010 9988', preferredChannel: 'sms' },
      }),
    );
    const loaded = await customers.findOneByOrFail({ id: saved.id });
    const masked = maskEntity(loaded);
    expect(masked).toMatchObject({ email: 'j***@***.com', address: '****', plan: 'pro' });
    expect(masked.contact).toMatchObject({ phone: '*** *** **88', preferredChannel: 'sms' });
    expect(JSON.stringify(masked)).not.toMatch(/jane|Road|Town|9988/);
    expect(loaded.email).toBe('jane.doe@example.com');
    const order = db.dataSource
      .getRepository(Order)
      .create({ cardNumber: '4111111111111111', customer: loaded });
    expect(maskEntity(order).cardNumber).toBe('****1111');
  });
});
