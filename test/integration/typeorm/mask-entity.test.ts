import { inspect } from 'node:util';
import 'reflect-metadata';
import {
  Column,
  Entity,
  JoinTable,
  ManyToMany,
  ManyToOne,
  OneToMany,
  PrimaryGeneratedColumn,
  type Relation,
} from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Encrypted, maskEntity } from '../../../src';
import { rawQuery } from '../../support/database';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/** An embedded object with an encrypted property. */
class Billing {
  @Encrypted({ mask: 'last4', nullable: true }) iban!: string | null;
  @Column({ type: 'varchar', nullable: true }) country!: string | null;
}

@Entity('mask_tag')
class MaskTag {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted() label!: string;
}

@Entity('mask_product')
class MaskProduct {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ mask: (value) => `sku:${String(value).length}` }) sku!: string;
}

/** No encrypted property of its own, but its product has one. */
@Entity('mask_line')
class MaskLine {
  @PrimaryGeneratedColumn() id!: number;
  @Column({ type: 'int' }) quantity!: number;
  @ManyToOne(
    () => MaskParent,
    (p) => p.lines,
  )
  parent!: Relation<MaskParent>;
  @ManyToOne(() => MaskProduct, { eager: false }) product!: MaskProduct;
}

@Entity('mask_child')
class MaskChild {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ mask: 'last4' }) card!: string;
  @Column({ type: 'varchar' }) nickname!: string;
  @ManyToOne(
    () => MaskParent,
    (p) => p.children,
  )
  parent!: Relation<MaskParent>;
  @ManyToMany(() => MaskTag)
  @JoinTable({ name: 'mask_child_tags' })
  tags!: MaskTag[];
}

@Entity('mask_parent')
class MaskParent {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ mask: 'email' }) email!: string;
  @Column({ type: 'varchar' }) plan!: string;
  @Column(() => Billing) billing!: Billing;
  @OneToMany(
    () => MaskChild,
    (c) => c.parent,
  )
  children!: MaskChild[];
  @OneToMany(
    () => MaskLine,
    (l) => l.parent,
  )
  lines!: MaskLine[];
  @ManyToMany(() => MaskTag)
  @JoinTable({ name: 'mask_parent_tags' })
  tags!: MaskTag[];
}

const SECRETS = [
  'parent.secret@example.com',
  'DE89370400440532013000',
  '4111111111111111',
  '5500005555555559',
  'tag-secret-alpha',
  'tag-secret-beta',
  'SKU-SECRET-42',
];

let db: EncryptedTestDatabase;
let parentId: number;

beforeAll(async () => {
  db = await encryptedDatabase([MaskParent, MaskChild, MaskTag, MaskLine, MaskProduct], { prefix: 'mask' });
  const m = db.dataSource.manager;
  const [alpha, beta] = await m.save([
    m.create(MaskTag, { label: 'tag-secret-alpha' }),
    m.create(MaskTag, { label: 'tag-secret-beta' }),
  ]);
  const product = await m.save(m.create(MaskProduct, { sku: 'SKU-SECRET-42' }));
  const parent = await m.save(
    m.create(MaskParent, {
      email: 'parent.secret@example.com',
      plan: 'pro',
      billing: { iban: 'DE89370400440532013000', country: 'DE' },
      tags: [alpha as MaskTag],
    }),
  );
  parentId = parent.id;
  await m.save([
    m.create(MaskChild, {
      card: '4111111111111111',
      nickname: 'first',
      parent,
      tags: [alpha as MaskTag, beta as MaskTag],
    }),
    m.create(MaskChild, { card: '5500005555555559', nickname: 'second', parent, tags: [beta as MaskTag] }),
  ]);
  await m.save(m.create(MaskLine, { quantity: 3, parent, product }));
});
afterAll(() => db?.close());

async function loadGraph(): Promise<MaskParent> {
  return db.dataSource.getRepository(MaskParent).findOneOrFail({
    where: { id: parentId },
    relations: { children: { tags: true, parent: true }, tags: true, lines: { product: true } },
    order: { children: { id: 'ASC' } },
  });
}

const everything = (value: unknown) => inspect(value, { depth: Number.POSITIVE_INFINITY, showHidden: true });

describe('maskEntity over a loaded graph', () => {
  it('masks encrypted properties of relations, arrays and embedded objects at every depth', async () => {
    const raw = await rawQuery<Record<string, unknown>>(
      db.schema.url,
      `SELECT * FROM "${db.schema.schema}".mask_child ORDER BY id`,
    );
    expect(raw.every((r) => Buffer.isBuffer(r.card_ciphertext) && !('card' in r))).toBe(true);

    const parent = await loadGraph();
    expect(parent.children[0]?.card).toBe('4111111111111111'); // the graph really holds plaintext
    const before = everything(parent);
    const masked = maskEntity(parent) as unknown as MaskParent;

    expect(masked).toMatchObject({
      email: 'p***@***.com',
      plan: 'pro',
      billing: { iban: '****3000', country: 'DE' },
    });
    expect(masked.children.map((c) => [c.card, c.nickname])).toEqual([
      ['****1111', 'first'],
      ['****5559', 'second'],
    ]);
    expect(masked.children[0]?.tags.map((t) => t.label)).toEqual(['****', '****']);
    expect(masked.children[0]?.parent.email).toBe('p***@***.com');
    expect(masked.tags.map((t) => t.label)).toEqual(['****']);
    expect(masked.lines[0]).toMatchObject({ quantity: 3, product: { sku: 'sku:13' } });
    const printed = `${everything(masked)}\n${JSON.stringify(masked)}`;
    for (const secret of SECRETS) expect(printed).not.toContain(secret);

    // The loaded graph itself is unchanged.
    expect(everything(parent)).toBe(before);
    expect(parent.children[1]?.tags[0]?.label).toBe('tag-secret-beta');
  });

  it('handles cycles: an object met again is the same masked copy', async () => {
    const parent = await loadGraph();
    const [first, second] = parent.children as [MaskChild, MaskChild];
    first.parent = parent; // parent → children[0] → parent
    second.tags.push(second.tags[0] as MaskTag); // the same object twice in one array
    const shared = parent.tags[0] as MaskTag;
    first.tags[0] = shared; // one object reached along two paths

    const masked = maskEntity(parent) as unknown as MaskParent;
    const [maskedFirst, maskedSecond] = masked.children as [MaskChild, MaskChild];
    expect(maskedFirst.parent).toBe(masked);
    expect(maskedSecond.tags[1]).toBe(maskedSecond.tags[0]);
    expect(maskedFirst.tags[0]).toBe(masked.tags[0]);
    expect(maskedFirst.tags[0]?.label).toBe('****');
    const printed = everything(masked);
    for (const secret of SECRETS) expect(printed).not.toContain(secret);
    expect(first.parent).toBe(parent);
  });

  it('masks plain objects given for relations and embedded objects, by the entity metadata', () => {
    const parent = db.dataSource
      .getRepository(MaskParent)
      .create({ email: 'parent.secret@example.com', plan: 'p' });
    /* Objects a caller built by hand (not class instances) in relation and embedded properties. */
    Object.assign(parent, {
      billing: { iban: 'DE89370400440532013000', country: 'DE' },
      children: [{ card: '4111111111111111', nickname: 'plain', tags: [{ label: 'tag-secret-alpha' }] }],
      lines: [{ quantity: 1, product: { sku: 'SKU-SECRET-42' } }],
    });
    const masked = maskEntity(parent) as unknown as MaskParent;
    expect(masked.billing.iban).toBe('****3000');
    expect(masked.children[0]).toMatchObject({
      card: '****1111',
      nickname: 'plain',
      tags: [{ label: '****' }],
    });
    expect(masked.lines[0]?.product.sku).toBe('sku:13');
    const printed = everything(masked);
    for (const secret of SECRETS) expect(printed).not.toContain(secret);
  });

  it('keeps other values as they are: dates, buffers, nulls, numbers', () => {
    const line = db.dataSource.getRepository(MaskLine).create({ quantity: 2 });
    const when = new Date(0);
    Object.assign(line, { at: when, bytes: Buffer.from('ab'), product: null });
    const masked = maskEntity(line) as unknown as Record<string, unknown>;
    expect(masked).toEqual({ quantity: 2, at: when, bytes: Buffer.from('ab'), product: null });
    /* A promise (a lazy relation) would print its resolved value: it is not kept. */
    const child = db.dataSource.getRepository(MaskChild).create({ card: '4111111111111111', nickname: 'n' });
    Object.assign(line, { later: Promise.resolve(child) });
    expect((maskEntity(line) as unknown as Record<string, unknown>).later).toBe('[Promise]');
    expect(masked.at).toBe(when);
  });
});
