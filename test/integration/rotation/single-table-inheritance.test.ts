import 'reflect-metadata';
import { ChildEntity, Entity, PrimaryGeneratedColumn, TableInheritance } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Encrypted, reencryptColumns, verifyEncryptedColumns } from '../../../src';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

@Entity()
@TableInheritance({ column: { type: 'varchar', name: 'kind' } })
class Document {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted() title!: string;
}

@ChildEntity()
class Memo extends Document {
  @Encrypted({ nullable: true }) body!: string | null;
}

let db: EncryptedTestDatabase;
beforeAll(async () => {
  db = await encryptedDatabase([Document, Memo], { prefix: 'sti_jobs' });
  await db.dataSource.getRepository(Document).save([{ title: 'd1' }, { title: 'd2' }]);
  await db.dataSource.getRepository(Memo).save({ title: 'm1', body: 'b1' });
});
afterAll(() => db?.close());

describe('jobs over a single-table inheritance', () => {
  it('work on each stored column once', async () => {
    const verified = await verifyEncryptedColumns(db.dataSource, db.encryption);
    expect(verified).toMatchObject({ failed: 0, rowsChecked: 4 });
    const before = await rawQuery<{ title_ciphertext: Buffer }>(
      db.schema.url,
      `SELECT title_ciphertext FROM "${db.schema.schema}".document ORDER BY id`,
    );
    const result = await reencryptColumns(db.dataSource, db.encryption);
    expect(result.error).toBeUndefined();
    expect(result.properties.map((p) => p.property).sort()).toEqual(['body', 'title']);
    const after = await rawQuery<{ title_ciphertext: Buffer }>(
      db.schema.url,
      `SELECT title_ciphertext FROM "${db.schema.schema}".document ORDER BY id`,
    );
    expect(after.every((row, i) => !row.title_ciphertext.equals(before[i]?.title_ciphertext as Buffer))).toBe(
      true,
    );
    db.encryption.purgeCache();
    const memos = await db.dataSource.getRepository(Memo).find();
    expect(memos.map((m) => [m.title, m.body])).toEqual([['m1', 'b1']]);
    expect((await db.dataSource.getRepository(Document).find()).map((d) => d.title).sort()).toEqual([
      'd1',
      'd2',
      'm1',
    ]);
  });
});
