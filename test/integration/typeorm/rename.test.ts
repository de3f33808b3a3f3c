import 'reflect-metadata';
import { randomUUID } from 'node:crypto';
import { DataSource, Entity, PrimaryColumn } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Encrypted, EnvelopeEncryption, IntegrityError, reencryptColumns } from '../../../src';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';

/** Renaming an encrypted property while keeping its columns: values are bound to the property name. */

@Entity('contact_rename')
class ContactBefore {
  @PrimaryColumn({ type: 'uuid' }) id!: string;
  @Encrypted() phone!: string;
}

@Entity('contact_rename')
class ContactRenaming {
  @PrimaryColumn({ type: 'uuid' }) id!: string;
  @Encrypted({ name: 'phone', renamedFrom: 'phone' }) mobile!: string;
}

@Entity('contact_rename')
class ContactAfter {
  @PrimaryColumn({ type: 'uuid' }) id!: string;
  @Encrypted({ name: 'phone' }) mobile!: string;
}

let schema: TestSchema;
const provider = new CountingKeyProvider();
const opened: DataSource[] = [];

async function open<T>(entity: new () => T, synchronize = false) {
  const encryption = new EnvelopeEncryption({ keys: [{ version: 1, provider }], activeVersion: 1 });
  const dataSource = new DataSource({
    type: 'postgres',
    url: schema.url,
    schema: schema.schema,
    entities: [entity],
    synchronize,
  });
  encryption.attach(dataSource);
  await dataSource.initialize();
  opened.push(dataSource);
  return { encryption, dataSource, repo: dataSource.getRepository(entity) };
}

beforeAll(async () => {
  schema = await createTestSchema('rename');
});
afterAll(async () => {
  for (const dataSource of opened) if (dataSource.isInitialized) await dataSource.destroy();
  await schema?.drop();
});

describe('renaming an encrypted property', () => {
  it('reads old rows with renamedFrom, re-encryption moves them to the new name, then the option can go', async () => {
    const before = await open(ContactBefore, true);
    const ids = Array.from({ length: 5 }, () => randomUUID());
    await before.repo.save(ids.map((id, i) => ({ id, phone: `+1 555 010${i}` })));
    const stored = await rawQuery(schema.url, `SELECT * FROM "${schema.schema}".contact_rename ORDER BY id`);

    const after = await open(ContactAfter);
    await expect(after.repo.findOneByOrFail({ id: ids[0] as string })).rejects.toBeInstanceOf(IntegrityError);

    const renaming = await open(ContactRenaming);
    const read = await renaming.repo.find();
    expect(new Map(read.map((c) => [c.id, c.mobile]))).toEqual(
      new Map(ids.map((id, i) => [id, `+1 555 010${i}`])),
    );
    /* Untouched by reading: the same bytes. */
    expect(await rawQuery(schema.url, `SELECT * FROM "${schema.schema}".contact_rename ORDER BY id`)).toEqual(
      stored,
    );

    const result = await reencryptColumns(renaming.dataSource, renaming.encryption);
    expect(result.error).toBeUndefined();
    after.encryption.purgeCache();
    const final = await after.repo.find();
    expect(new Map(final.map((c) => [c.id, c.mobile]))).toEqual(
      new Map(ids.map((id, i) => [id, `+1 555 010${i}`])),
    );
    /* Now nothing reads under the old name: the rows are bound to the new one. */
    before.encryption.purgeCache();
    await expect(before.repo.findOneByOrFail({ id: ids[0] as string })).rejects.toBeInstanceOf(
      IntegrityError,
    );
  });
});
