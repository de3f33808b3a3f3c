import { inspect } from 'node:util';
import { In, type Repository } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AwsKmsKeyProvider, IntegrityError, KeyAccessDeniedError, TenantOffboardedError } from '../../../src';
import { rawQuery } from '../../support/database';
import { TENANT_MIGRATIONS, TenantContact } from '../../support/tenant-entities';
import {
  type CustomerAccount,
  createCustomerAccount,
  customerKey,
  expectNoneOf,
  keyForms,
  rejection,
  scanSchema,
  startTenantClouds,
  TENANT_CONTEXT,
  type TenantClouds,
  TenantNote,
  VENDOR_ACCOUNT,
} from '../../support/tenant-fixtures';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/**
 * Fifty tenants in one table, on three kinds of key: customer-provided keys, KMS keys in the
 * customers' own accounts (reached through a role each customer created, with its External ID),
 * and the application's key. Whatever happens to one tenant's key stays with that tenant.
 */
type Kind = 'customer-key' | 'aws-kms' | 'vendor';
interface Tenant {
  id: string;
  kind: Kind;
  /** The stored key version of its values: its own key's, or 1 (the application's key). */
  version: number;
  keyReference?: string;
  key?: string;
  account?: CustomerAccount;
}
interface Expected {
  tenant: string;
  email: string;
  profile: { phone: string } | null;
}

const TENANTS = 50;
const CONTACTS_PER_TENANT = 3;
const KINDS: Kind[] = ['customer-key', 'aws-kms', 'vendor'];

let clouds: TenantClouds;
let db: EncryptedTestDatabase;
const tenants: Tenant[] = [];
const contactsExpected = new Map<number, Expected>();
const notesExpected = new Map<number, { tenant: string; body: string }>();

const contacts = (): Repository<TenantContact> => db.dataSource.getRepository(TenantContact);
const notes = (): Repository<TenantNote> => db.dataSource.getRepository(TenantNote);
const table = (name: string) => `"${db.schema.schema}".${name}`;
const sql = <T = Record<string, unknown>>(text: string, params?: unknown[]) =>
  rawQuery<T>(db.schema.url, text, params);
const ofKind = (kind: Kind) => tenants.filter((t) => t.kind === kind);
const tenant = (id: string) => tenants.find((t) => t.id === id) as Tenant;

/** Every plaintext the tests wrote: what no error may ever show. */
const plaintexts = () => [
  ...[...contactsExpected.values()].flatMap((c) => [c.email, ...(c.profile ? [c.profile.phone] : [])]),
  ...[...notesExpected.values()].map((n) => n.body),
];
/** Every customer-provided key in every printable form. */
const keyTexts = () => ofKind('customer-key').flatMap((t) => keyForms(t.key as string));

function newContact(tenantId: string, tag: string): TenantContact {
  return contacts().create({
    workspaceId: tenantId,
    email: `${tag}@${tenantId}.example`,
    profile: tag.endsWith('1') ? null : { phone: `+1-555-${tenantId}-${tag}` },
  });
}

async function saveContacts(batch: TenantContact[]): Promise<TenantContact[]> {
  const saved = await contacts().save(batch);
  /* `create({ profile: null })` leaves the property undefined; the row stores NULL and reads back null. */
  for (const c of saved) {
    contactsExpected.set(c.id, { tenant: c.workspaceId, email: c.email, profile: c.profile ?? null });
  }
  return saved;
}

/** `found` is exactly the expected contacts (those of the tenants `only` accepts, or of `ids`). */
function expectContacts(
  found: TenantContact[],
  only?: (tenantId: string) => boolean,
  ids?: readonly number[],
): void {
  const wanted = [...contactsExpected].filter(
    ([id, c]) => (!only || only(c.tenant)) && (!ids || ids.includes(id)),
  );
  expect(found.length).toBe(wanted.length);
  const byId = new Map(found.map((c) => [c.id, c]));
  for (const [id, c] of wanted) {
    expect(byId.get(id), `contact ${id}`).toMatchObject({
      workspaceId: c.tenant,
      email: c.email,
      profile: c.profile,
    });
  }
}

beforeAll(async () => {
  clouds = await startTenantClouds();
  db = await encryptedDatabase([TenantContact, TenantNote], {
    prefix: 'tenant_isolation',
    migrations: TENANT_MIGRATIONS,
    encryption: { tenantKeys: { awsKms: clouds.awsKms() } },
  });
  for (let i = 0; i < TENANTS; i++) {
    const id = `ws-${String(i).padStart(2, '0')}`;
    const kind = KINDS[i % KINDS.length] as Kind;
    if (kind === 'customer-key') {
      const key = customerKey();
      const added = await db.encryption.tenants.addKey(id, { kind, key });
      tenants.push({ id, kind, key, version: added.version, keyReference: added.keyReference });
    } else if (kind === 'aws-kms') {
      const account = await createCustomerAccount(clouds, db.encryption, id, String(300_000_000_000 + i));
      const added = await db.encryption.tenants.addKey(id, {
        kind,
        keyId: account.keyArn,
        roleArn: account.roleArn,
      });
      expect(added.keyReference).toBe(account.keyArn);
      tenants.push({ id, kind, account, version: added.version, keyReference: added.keyReference });
    } else {
      tenants.push({ id, kind, version: 1 });
    }
  }
  /* Tenants interleaved in every statement: one save() writes rows of all fifty. */
  const batch: TenantContact[] = [];
  for (let n = 0; n < CONTACTS_PER_TENANT; n++)
    for (const t of tenants) batch.push(newContact(t.id, `c${n}`));
  await saveContacts(batch);
  const noteBatch = tenants.flatMap((t) =>
    [0, 1].map((n) => notes().create({ workspaceId: t.id, body: `note ${n} of ${t.id}` })),
  );
  for (const note of await notes().save(noteBatch))
    notesExpected.set(note.id, { tenant: note.workspaceId, body: note.body });
}, 180_000);

afterAll(async () => {
  await db?.close();
  await clouds?.close();
});

describe('fifty tenants in one table', () => {
  it('gives each tenant the key it was set up with: 17 customer-provided, 17 KMS in their own accounts, 16 on the application key', () => {
    expect(ofKind('customer-key').length).toBe(17);
    expect(ofKind('aws-kms').length).toBe(17);
    expect(ofKind('vendor').length).toBe(16);
    const versions = tenants.filter((t) => t.kind !== 'vendor').map((t) => t.version);
    expect(new Set(versions).size).toBe(versions.length); // no two keys share a version
    expect(versions.every((v) => v >= 1_000_000)).toBe(true);
  });

  it('every row reads back through TypeORM, each tenant on its own key', async () => {
    db.encryption.purgeCache();
    expectContacts(await contacts().find());
    const found = await notes().find();
    expect(found.length).toBe(notesExpected.size);
    for (const note of found)
      expect(notesExpected.get(note.id)).toEqual({ tenant: note.workspaceId, body: note.body });
  });

  it('the table read with SQL: each tenant’s key version, the tenant flag in every header, KMS blobs of the tenant’s own key', async () => {
    const rows = await sql<Record<string, unknown>>(`SELECT * FROM ${table('tenant_contacts')} ORDER BY id`);
    expect(rows.length).toBe(contactsExpected.size);
    const kmsKeyIds = ofKind('aws-kms').map((t) => Buffer.from(t.account?.keyUuid as string, 'ascii'));
    for (const row of rows) {
      const t = tenant(row.workspaceId as string);
      const expected = contactsExpected.get(row.id as number) as Expected;
      expect(row.workspaceId).toBe(expected.tenant);
      expect(row.email_key_version, `row ${row.id}`).toBe(t.version);
      const ciphertext = row.email_ciphertext as Buffer;
      expect((ciphertext[1] ?? 0) & 0x04).toBe(0x04); // tenant bound into the associated data
      expect(ciphertext.toString('latin1')).not.toContain(expected.email);
      if (expected.profile === null) expect(row.profile_ciphertext).toBeNull();
      else {
        expect(row.profile_key_version).toBe(t.version);
        expect(((row.profile_ciphertext as Buffer)[1] ?? 0) & 0x04).toBe(0x04);
      }
      const wrapped = row.email_wrapped_key as Buffer;
      const ownKmsKey = t.account ? Buffer.from(t.account.keyUuid, 'ascii') : undefined;
      for (const id of kmsKeyIds) expect(wrapped.includes(id)).toBe(ownKmsKey?.equals(id) ?? false);
    }
    const noteRows = await sql<Record<string, unknown>>(`SELECT * FROM ${table('tenant_notes')}`);
    for (const row of noteRows) {
      expect(row.body_key_version).toBe(tenant(row.workspaceId as string).version);
      expect(((row.body_ciphertext as Buffer)[1] ?? 0) & 0x04).toBe(0x04);
    }
  });

  it('every KMS call for a tenant went to that tenant’s key, as its role, with its tenant id in the context', () => {
    const byKey = new Map(ofKind('aws-kms').map((t) => [t.account?.keyArn as string, t]));
    const calls = clouds.kms.callLog.filter((c) => c.operation !== 'DescribeKey');
    expect(calls.length).toBeGreaterThan(0);
    for (const call of calls) {
      const t = byKey.get(call.keyId as string);
      expect(t, call.keyId).toBeDefined();
      expect(call.encryptionContext?.[TENANT_CONTEXT]).toBe(t?.id);
      expect(call.principal).toBe(
        `arn:aws:sts::${t?.account?.account}:assumed-role/saas-${t?.id}/typeorm-envelope`,
      );
    }
  });
});

type Part = 'ciphertext' | 'iv' | 'wrapped_key' | 'key_version';
const COPIES: Part[][] = [
  ['ciphertext', 'iv', 'wrapped_key', 'key_version'],
  ['ciphertext'],
  ['iv'],
  ['wrapped_key'],
  ['key_version'],
  ['wrapped_key', 'key_version'],
  ['ciphertext', 'iv'],
];

/**
 * Copies `parts` of `column`'s stored value from row `from` into row `to` (as an attacker with
 * write access to the table would), runs `check`, then puts row `to` back as it was.
 */
async function withCopied(
  tableName: string,
  column: string,
  from: number,
  to: number,
  parts: Part[],
  check: () => Promise<void>,
): Promise<boolean> {
  const names = parts.map((p) => `${column}_${p}`);
  const all = COPIES[0]?.map((p) => `${column}_${p}`) as string[];
  const select = (id: number) =>
    sql<Record<string, unknown>>(`SELECT ${all.join(', ')} FROM ${table(tableName)} WHERE id = $1`, [id]);
  const [source] = await select(from);
  const [original] = await select(to);
  if (!source || !original) throw new Error('rows to copy between are missing');
  /* A copy that changes nothing (both rows on version 1) is no copy. */
  if (
    names.every((n) =>
      Buffer.isBuffer(source[n])
        ? (source[n] as Buffer).equals(original[n] as Buffer)
        : source[n] === original[n],
    )
  )
    return false;
  const update = async (values: Record<string, unknown>, keys: string[]) =>
    sql(
      `UPDATE ${table(tableName)} SET ${keys.map((k, i) => `${k} = $${i + 1}`).join(', ')} WHERE id = $${keys.length + 1}`,
      [...keys.map((k) => values[k]), to],
    );
  await update(source, names);
  try {
    await check();
  } finally {
    await update(original, all);
  }
  return true;
}

const firstRowOf = async (tableName: string, tenantId: string, skip = 0) =>
  (
    await sql<{ id: number }>(
      `SELECT id FROM ${table(tableName)} WHERE "workspaceId" = $1 ORDER BY id OFFSET $2 LIMIT 1`,
      [tenantId, skip],
    )
  )[0]?.id as number;

describe('a value, its sidecars or its wrapped key copied from tenant A’s row into tenant B’s', () => {
  const pairs: Array<[Kind, Kind]> = [
    ['customer-key', 'customer-key'],
    ['aws-kms', 'aws-kms'],
    ['vendor', 'vendor'],
    ['customer-key', 'vendor'],
    ['vendor', 'customer-key'],
    ['aws-kms', 'customer-key'],
    ['customer-key', 'aws-kms'],
    ['aws-kms', 'vendor'],
    ['vendor', 'aws-kms'],
  ];

  it.each(pairs)(
    '%s → %s: never decrypts there (IntegrityError), warm or cold cache',
    async (kindA, kindB) => {
      const a = ofKind(kindA)[0] as Tenant;
      const b = ofKind(kindB)[1] as Tenant;
      const from = await firstRowOf('tenant_contacts', a.id);
      const to = await firstRowOf('tenant_contacts', b.id);
      let copies = 0;
      for (const parts of COPIES) {
        const copied = await withCopied('tenant_contacts', 'email', from, to, parts, async () => {
          for (const cold of [false, true]) {
            if (cold) db.encryption.purgeCache(b.id);
            const error = await rejection(contacts().findOneByOrFail({ id: to }));
            expect(error, `${parts.join('+')} ${cold ? 'cold' : 'warm'}`).toBeInstanceOf(IntegrityError);
            expect((error as IntegrityError).tenant).toBe(b.id);
            expectNoneOf([...plaintexts(), ...keyTexts()], error);
          }
        });
        if (copied) copies += 1;
      }
      expect(copies).toBe(kindA === 'vendor' && kindB === 'vendor' ? 6 : 7);
      /* Both rows read as before. */
      expect((await contacts().findOneByOrFail({ id: to })).email).toBe(contactsExpected.get(to)?.email);
      expect((await contacts().findOneByOrFail({ id: from })).email).toBe(contactsExpected.get(from)?.email);
    },
  );

  it.each(pairs)(
    'bindPrimaryKey: false, %s → %s: the tenant binding alone refuses the copy',
    async (kindA, kindB) => {
      const a = ofKind(kindA)[2] as Tenant;
      const b = ofKind(kindB)[3] as Tenant;
      const from = await firstRowOf('tenant_notes', a.id);
      const to = await firstRowOf('tenant_notes', b.id);
      for (const parts of COPIES) {
        await withCopied('tenant_notes', 'body', from, to, parts, async () => {
          db.encryption.purgeCache(b.id);
          const error = await rejection(notes().findOneByOrFail({ id: to }));
          expect(error, parts.join('+')).toBeInstanceOf(IntegrityError);
          expect((error as IntegrityError).tenant).toBe(b.id);
          expectNoneOf(plaintexts(), error);
        });
      }
    },
  );

  it.each(KINDS)(
    'control: within one %s tenant, an unbound note copied to another row does decrypt',
    async (kind) => {
      const t = ofKind(kind)[4] as Tenant;
      const from = await firstRowOf('tenant_notes', t.id);
      const to = await firstRowOf('tenant_notes', t.id, 1);
      await withCopied('tenant_notes', 'body', from, to, COPIES[0] as Part[], async () => {
        db.encryption.purgeCache(t.id);
        expect((await notes().findOneByOrFail({ id: to })).body).toBe(notesExpected.get(from)?.body);
      });
    },
  );
});

/** Ways a customer (or a mistake) can take a KMS tenant's key away, and how to give it back. */
const REVOCATIONS: Array<{ name: string; revoke(t: Tenant): void; restore(t: Tenant): void }> = [
  {
    name: 'the key disabled',
    revoke: (t) => clouds.kms.disableKey(t.account?.keyArn as string),
    restore: (t) => clouds.kms.enableKey(t.account?.keyArn as string),
  },
  {
    name: 'the role removed from the key policy',
    revoke: (t) =>
      clouds.kms.putKeyPolicy(t.account?.keyArn as string, t.account?.policy({ roleActions: [] }) ?? []),
    restore: (t) => clouds.kms.putKeyPolicy(t.account?.keyArn as string, t.account?.policy() ?? []),
  },
  {
    name: 'the trust policy’s External ID changed',
    revoke: (t) =>
      clouds.sts.setTrustPolicy(t.account?.roleArn as string, {
        principals: [VENDOR_ACCOUNT],
        externalId: 'someone-elses-external-id',
      }),
    restore: (t) =>
      clouds.sts.setTrustPolicy(t.account?.roleArn as string, {
        principals: [VENDOR_ACCOUNT],
        externalId: t.account?.externalId as string,
      }),
  },
];

describe('one KMS tenant’s key taken away: every other tenant keeps working', () => {
  it.each(REVOCATIONS.map((r, i) => [r.name, i] as const))('%s', async (_name, index) => {
    const revocation = REVOCATIONS[index] as (typeof REVOCATIONS)[number];
    const victim = ofKind('aws-kms')[5 + index] as Tenant;
    const others = tenants.filter((t) => t.id !== victim.id).map((t) => t.id);
    const isOther = (id: string) => id !== victim.id;
    /* Warm: every tenant's keys cached. */
    expectContacts(await contacts().find());
    revocation.revoke(victim);
    try {
      /* A revocation reaches a running instance when its cached keys expire; purgeCache ends them now. */
      db.encryption.purgeCache(victim.id);

      const across = await rejection(contacts().find());
      expect(across).toBeInstanceOf(KeyAccessDeniedError);
      expect(across).toMatchObject({
        tenant: victim.id,
        keyId: victim.account?.keyArn,
        entity: 'TenantContact',
      });
      expect(across.message).toContain(victim.id);
      expect(across.message).toContain(victim.account?.keyArn);
      expectNoneOf([...plaintexts(), ...keyTexts(), ...clouds.secrets()], across, inspect(across));

      /* The same query, filtered to the other tenants: reads fine, in this process, this table. */
      expectContacts(await contacts().find({ where: { workspaceId: In(others) } }), isOther);
      const viaBuilder = await contacts()
        .createQueryBuilder('c')
        .where('c.workspaceId <> :victim', { victim: victim.id })
        .getMany();
      expectContacts(viaBuilder, isOther);

      /* Writes of every other tenant work, each under its own key; the victim's are refused. */
      const saved = await saveContacts(others.map((id) => newContact(id, `after-${index}-0`)));
      const stored = await sql<{ id: number; workspaceId: string; email_key_version: number }>(
        `SELECT id, "workspaceId", email_key_version FROM ${table('tenant_contacts')} WHERE id = ANY($1)`,
        [saved.map((c) => c.id)],
      );
      expect(stored.length).toBe(others.length);
      for (const row of stored) expect(row.email_key_version).toBe(tenant(row.workspaceId).version);
      db.encryption.purgeCache();
      const savedIds = saved.map((c) => c.id);
      expectContacts(await contacts().findBy({ id: In(savedIds) }), isOther, savedIds);
      const before = await sql<{ n: number }>(`SELECT count(*)::int AS n FROM ${table('tenant_contacts')}`);
      const refused = await rejection(contacts().save(newContact(victim.id, `refused-${index}`)));
      expect(refused).toBeInstanceOf(KeyAccessDeniedError);
      expect(refused).toMatchObject({ tenant: victim.id, keyId: victim.account?.keyArn });
      expect(await sql(`SELECT count(*)::int AS n FROM ${table('tenant_contacts')}`)).toEqual(before);
      expectNoneOf([...plaintexts(), ...clouds.secrets()], refused);
    } finally {
      revocation.restore(victim);
    }
    /* Given back, the victim's rows read again. */
    db.encryption.purgeCache(victim.id);
    expectContacts(await contacts().find());
  });
});

describe('a key policy that requires the tenant’s own id in the encryption context', () => {
  it('allows the tenant, and refuses its key for a data key of another tenant', async () => {
    const [a, b] = ofKind('aws-kms') as [Tenant, Tenant];
    const account = a.account as CustomerAccount;
    expect(account.policy().some((s) => s.encryptionContextEquals?.[TENANT_CONTEXT] === a.id)).toBe(true);
    /* The provider exactly as the application builds it for tenant A. */
    const provider = new AwsKmsKeyProvider({
      ...clouds.awsKms(),
      keyId: account.keyArn,
      roleArn: account.roleArn,
      externalId: account.externalId,
    });
    try {
      const contextOf = (id: string) => db.encryption.tenantKeyrings.contextOf(id);
      const own = await provider.generateDataKey(contextOf(a.id));
      expect((await provider.unwrapDataKey(own.wrappedKey, contextOf(a.id))).equals(own.plaintextKey)).toBe(
        true,
      );

      /* A bug that asks tenant A's key for tenant B's data keys: KMS refuses it. */
      const generate = await rejection(provider.generateDataKey(contextOf(b.id)));
      expect(generate).toBeInstanceOf(KeyAccessDeniedError);
      expect(generate.message).toContain('AccessDeniedException');
      const [row] = await sql<{ email_wrapped_key: Buffer }>(
        `SELECT email_wrapped_key FROM ${table('tenant_contacts')} WHERE "workspaceId" = $1 LIMIT 1`,
        [a.id],
      );
      const unwrap = await rejection(
        provider.unwrapDataKey(row?.email_wrapped_key as Buffer, contextOf(b.id)),
      );
      expect(unwrap).toBeInstanceOf(KeyAccessDeniedError); // refused by the policy, before any decryption
      expect(clouds.kms.callLog.at(-1)).toMatchObject({ operation: 'Decrypt', keyId: account.keyArn });
    } finally {
      provider.destroy();
    }
  });

  it('a registry record of tenant B pointing at tenant A’s key (a confused deputy) is refused by A’s key; A is unaffected', async () => {
    const [a, b] = [ofKind('aws-kms')[10], ofKind('aws-kms')[11]] as [Tenant, Tenant];
    const keys = table('typeorm_envelope_tenant_keys');
    const [record] = await sql<{ descriptor: Record<string, unknown> }>(
      `SELECT descriptor FROM ${keys} WHERE version = $1`,
      [b.version],
    );
    const wrong = {
      ...record?.descriptor,
      keyId: a.account?.keyArn,
      roleArn: a.account?.roleArn,
      externalId: a.account?.externalId,
    };
    await sql(`UPDATE ${keys} SET descriptor = $1 WHERE version = $2`, [JSON.stringify(wrong), b.version]);
    try {
      await db.encryption.tenants.refresh(b.id);
      db.encryption.purgeCache(b.id);
      const write = await rejection(contacts().save(newContact(b.id, 'deputy')));
      expect(write).toBeInstanceOf(KeyAccessDeniedError);
      expect(write).toMatchObject({ tenant: b.id });
      const last = clouds.kms.callLog.at(-1);
      expect(last).toMatchObject({ operation: 'GenerateDataKey', keyId: a.account?.keyArn });
      expect(last?.encryptionContext?.[TENANT_CONTEXT]).toBe(b.id);
      const read = await rejection(contacts().findBy({ workspaceId: b.id }));
      expect(read).toBeInstanceOf(KeyAccessDeniedError);
      expect(read).toMatchObject({ tenant: b.id });
      db.encryption.purgeCache(a.id);
      expectContacts(await contacts().findBy({ workspaceId: a.id }), (id) => id === a.id);
    } finally {
      await sql(`UPDATE ${keys} SET descriptor = $1 WHERE version = $2`, [
        JSON.stringify(record?.descriptor),
        b.version,
      ]);
      await db.encryption.tenants.refresh(b.id);
      db.encryption.purgeCache(b.id);
    }
    expectContacts(await contacts().findBy({ workspaceId: b.id }), (id) => id === b.id);
  });
});

describe('errors for a tenant key', () => {
  it('a customer-provided key that no longer unwraps: the error names the tenant and the key’s fingerprint, never key bytes; others read', async () => {
    const victim = ofKind('customer-key')[6] as Tenant;
    const keys = table('typeorm_envelope_tenant_keys');
    const [record] = await sql<{ descriptor: Record<string, unknown> }>(
      `SELECT descriptor FROM ${keys} WHERE version = $1`,
      [victim.version],
    );
    const wrappedKey = Buffer.from(record?.descriptor.wrappedKey as string, 'base64');
    const damaged = Buffer.from(wrappedKey);
    damaged[damaged.length - 1] = (damaged[damaged.length - 1] ?? 0) ^ 0x01;
    await sql(`UPDATE ${keys} SET descriptor = $1 WHERE version = $2`, [
      JSON.stringify({ ...record?.descriptor, wrappedKey: damaged.toString('base64') }),
      victim.version,
    ]);
    try {
      await db.encryption.tenants.refresh(victim.id);
      db.encryption.purgeCache(victim.id);
      const error = await rejection(contacts().find());
      expect(error).toBeInstanceOf(IntegrityError);
      expect(error).toMatchObject({
        tenant: victim.id,
        keyId: victim.keyReference,
        keyVersion: victim.version,
      });
      expect(error.message).toContain('customer-provided key');
      expect(error.message).toContain(victim.id);
      expect(error.message).toContain(victim.keyReference);
      expectNoneOf([...plaintexts(), ...keyTexts(), wrappedKey.toString('base64')], error, inspect(error));
      expectContacts(
        await contacts().find({
          where: { workspaceId: In(tenants.filter((t) => t !== victim).map((t) => t.id)) },
        }),
        (id) => id !== victim.id,
      );
    } finally {
      await sql(`UPDATE ${keys} SET descriptor = $1 WHERE version = $2`, [
        JSON.stringify(record?.descriptor),
        victim.version,
      ]);
      await db.encryption.tenants.refresh(victim.id);
      db.encryption.purgeCache(victim.id);
    }
    expectContacts(await contacts().findBy({ workspaceId: victim.id }), (id) => id === victim.id);
  });

  it('offboarding one customer-key tenant: its rows refuse (TenantOffboardedError), every other tenant reads and writes', async () => {
    const victim = ofKind('customer-key')[7] as Tenant;
    await db.encryption.tenants.offboard(victim.id);
    const error = await rejection(contacts().find());
    expect(error).toBeInstanceOf(TenantOffboardedError);
    expect(error).toMatchObject({ tenant: victim.id });
    expectNoneOf([...plaintexts(), ...keyTexts()], error);
    const others = tenants.filter((t) => t !== victim).map((t) => t.id);
    expectContacts(await contacts().findBy({ workspaceId: In(others) }), (id) => id !== victim.id);
    const saved = await saveContacts(others.map((id) => newContact(id, 'after-offboard-0')));
    db.encryption.purgeCache();
    const savedIds = saved.map((c) => c.id);
    expectContacts(await contacts().findBy({ id: In(savedIds) }), undefined, savedIds);
    for (const [id, c] of contactsExpected) if (c.tenant === victim.id) contactsExpected.delete(id);
  });
});

describe('customer-provided keys at rest', () => {
  it('appear nowhere in the database: every table scanned as text (base64, hex) and every bytea column for the raw bytes', async () => {
    const all = ofKind('customer-key');
    expect(all.length).toBe(17);
    const found = await scanSchema(
      db.schema.url,
      db.schema.schema,
      all.flatMap((t) => keyForms(t.key as string)),
      all.map((t) => Buffer.from(t.key as string, 'base64')),
    );
    expect(found).toEqual([]);
    /* The registry holds them wrapped and names them by fingerprint. */
    const records = await sql<{ key_reference: string; descriptor: Record<string, unknown> }>(
      `SELECT key_reference, descriptor FROM ${table('typeorm_envelope_tenant_keys')} WHERE provider_kind = 'customer-key' AND state <> 'destroyed'`,
    );
    expect(records.length).toBe(16);
    for (const r of records) {
      expect(r.key_reference).toMatch(/^sha256:/);
      expect(typeof r.descriptor.wrappedKey).toBe('string');
    }
  });
});
