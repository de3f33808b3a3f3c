import { randomBytes } from 'node:crypto';
import { Client } from 'pg';
import { In } from 'typeorm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  type AuditEntry,
  type EncryptionContext,
  type GeneratedDataKey,
  KeyProviderError,
  KeyRegistry,
  LocalKeyProvider,
  type TenantKeyFactory,
} from '../../../src';
import { rawQuery } from '../../support/database';
import { type KmsEmulator, startKmsEmulator } from '../../support/kms-emulator';
import { TENANT_MIGRATIONS, TenantContact } from '../../support/tenant-entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/**
 * A tenant's key jobs end to end: onboarding from the application key to a customer-provided key,
 * rotation to a second one, revert; each job checked in the database (versions, ciphertext and IV
 * bytes, other tenants' rows), through TypeORM, in `tenants.status` and in the audit log.
 */

const newKey = () => randomBytes(32).toString('base64');
/** Every way a key could show up in text: base64, base64url, hex. */
const spellings = (key: string) => {
  const bytes = Buffer.from(key, 'base64');
  return [key, bytes.toString('base64url'), bytes.toString('hex')];
};

/**
 * Keys held "in an HSM" the test controls: the registry stores only a handle, and the provider a
 * factory makes from it fails every call while the HSM is down.
 */
class TestHsm {
  readonly keys = new Map<string, string>();
  down = false;

  factory(): TenantKeyFactory {
    const hsm = this;
    return {
      kind: 'test-hsm',
      async prepare(descriptor) {
        if (!hsm.keys.has(descriptor.handle as string)) throw new Error('unknown HSM handle');
        return { handle: descriptor.handle };
      },
      async create(stored) {
        return new HsmKeyProvider(hsm, hsm.keys.get(stored.handle as string) as string);
      },
    };
  }
}

class HsmKeyProvider extends LocalKeyProvider {
  constructor(
    readonly hsm: TestHsm,
    key: string,
  ) {
    super({ key });
  }
  #check() {
    if (this.hsm.down) throw new KeyProviderError('HSM unavailable (test fault)', this.errorContext());
  }
  protected override async _generateDataKey(context: EncryptionContext): Promise<GeneratedDataKey> {
    this.#check();
    return super._generateDataKey(context);
  }
  protected override async _wrapDataKey(plaintextKey: Buffer, context: EncryptionContext): Promise<Buffer> {
    this.#check();
    return super._wrapDataKey(plaintextKey, context);
  }
  protected override async _unwrapDataKey(wrappedKey: Buffer, context: EncryptionContext): Promise<Buffer> {
    this.#check();
    return super._unwrapDataKey(wrappedKey, context);
  }
}

const hsm = new TestHsm();
let db: EncryptedTestDatabase;
let kms: KmsEmulator;
const actorBefore = process.env.TYPEORM_ENVELOPE_ACTOR;

beforeAll(async () => {
  kms = await startKmsEmulator();
  db = await encryptedDatabase([TenantContact], {
    prefix: 'onboarding_jobs',
    migrations: TENANT_MIGRATIONS,
    encryption: {
      tenantKeys: {
        factories: [hsm.factory()],
        awsKms: { clientConfig: kms.clientConfig(), maxAttempts: 1 },
      },
    },
  });
});
afterAll(async () => {
  if (actorBefore === undefined) delete process.env.TYPEORM_ENVELOPE_ACTOR;
  else process.env.TYPEORM_ENVELOPE_ACTOR = actorBefore;
  await db?.close();
  await kms?.close();
});

const contacts = () => db.dataSource.getRepository(TenantContact);
const table = () => `"${db.schema.schema}".tenant_contacts`;
const audit = () => new KeyRegistry(db.dataSource, db.encryption);

interface StoredRow {
  id: number;
  workspaceId: string;
  email_ciphertext: Buffer;
  email_iv: Buffer;
  email_wrapped_key: Buffer;
  email_key_version: number;
  profile_ciphertext: Buffer | null;
  profile_iv: Buffer | null;
  profile_wrapped_key: Buffer | null;
  profile_key_version: number | null;
}

/** Every row of the table as stored, by id. */
async function snapshot(): Promise<Map<number, StoredRow>> {
  const rows = await rawQuery<StoredRow>(db.schema.url, `SELECT * FROM ${table()} ORDER BY id`);
  return new Map(rows.map((r) => [r.id, r]));
}

/** The tenant's stored values (email, and profile where set) not under `version`. */
async function valuesNotUnder(tenant: string, version: number): Promise<number> {
  const [row] = await rawQuery<{ n: number }>(
    db.schema.url,
    `SELECT (count(*) FILTER (WHERE email_key_version <> $2)
           + count(*) FILTER (WHERE profile_key_version IS NOT NULL AND profile_key_version <> $2))::int AS n
     FROM ${table()} WHERE "workspaceId" = $1`,
    [tenant, version],
  );
  return row?.n ?? 0;
}

/** Seeds `count` rows for the tenant (every other one with a profile); returns their plaintext by id. */
async function seed(
  tenant: string,
  count: number,
): Promise<Map<number, { email: string; phone: string | null }>> {
  const saved = await contacts().save(
    Array.from({ length: count }, (_, i) =>
      contacts().create({
        workspaceId: tenant,
        email: `${tenant}-${i}@example.com`,
        profile: i % 2 === 0 ? { phone: `+1-${i}` } : null,
      }),
    ),
  );
  return new Map(saved.map((c) => [c.id, { email: c.email, phone: c.profile?.phone ?? null }]));
}

/** Reads the tenant's rows through TypeORM with nothing cached and compares them with `expected`. */
async function expectReadsBack(
  tenant: string,
  expected: Map<number, { email: string; phone: string | null }>,
): Promise<void> {
  db.encryption.purgeCache();
  const rows = await contacts().find({ where: { workspaceId: tenant }, order: { id: 'ASC' } });
  expect(rows.map((r) => [r.id, { email: r.email, phone: r.profile?.phone ?? null }])).toEqual([
    ...expected.entries(),
  ]);
}

/**
 * Runs the tenant's job and checks it did exactly what a re-wrap may: the tenant's values now all
 * under `version`, their ciphertext and IV byte for byte the same, every other row untouched.
 */
async function runAndCheck(tenant: string, version: number) {
  const before = await snapshot();
  const moving = await valuesNotUnder(tenant, version);
  expect(moving).toBeGreaterThan(0);
  const job = await db.encryption.tenants.runJob(tenant, { batchSize: 7 });
  expect(job).toMatchObject({ state: 'completed', rowsDone: moving, rowsTotal: moving, error: null });
  const after = await snapshot();
  expect([...after.keys()]).toEqual([...before.keys()]);
  for (const [id, row] of after) {
    const old = before.get(id) as StoredRow;
    if (row.workspaceId !== tenant) {
      expect(row).toEqual(old); // other tenants: byte-identical
      continue;
    }
    expect(row.email_key_version).toBe(version);
    expect(row.email_ciphertext).toEqual(old.email_ciphertext);
    expect(row.email_iv).toEqual(old.email_iv);
    if (old.email_key_version !== version) expect(row.email_wrapped_key).not.toEqual(old.email_wrapped_key);
    expect(row.profile_ciphertext).toEqual(old.profile_ciphertext);
    expect(row.profile_iv).toEqual(old.profile_iv);
    expect(row.profile_key_version).toBe(old.profile_key_version === null ? null : version);
  }
  return job;
}

describe('tenant key jobs: onboarding, rotation, revert', () => {
  it('moves only the tenant’s data keys at each step, visibly in status and the audit log', async () => {
    const tenant = 'ws-journey';
    const actor = `ops-${randomBytes(4).toString('hex')}`;
    process.env.TYPEORM_ENVELOPE_ACTOR = actor;
    const journey = await seed(tenant, 30);
    const vendorRows = await seed('ws-neighbour', 8);
    const byokRows = await seed('ws-neighbour-byok', 8);
    const neighbourKey = newKey();
    await db.encryption.tenants.addKey('ws-neighbour-byok', { kind: 'customer-key', key: neighbourKey });
    await db.encryption.tenants.runJob('ws-neighbour-byok');
    const vendorReference = (await db.encryption.tenants.status(tenant)).activeKeyReference;
    expect(vendorReference).toMatch(/^sha256:/);

    // Onboarding: vendor key → the customer's first key
    const first = newKey();
    const added = await db.encryption.tenants.addKey(tenant, { kind: 'customer-key', key: first });
    expect(added.keyReference).toBe(new LocalKeyProvider({ key: first }).fingerprint);
    expect(added.job).toMatchObject({ kind: 'onboarding', state: 'pending', toVersion: added.version });
    expect((await db.encryption.tenants.status(tenant)).job).toMatchObject({
      kind: 'onboarding',
      state: 'pending',
      rowsDone: 0,
    });
    const onboarding = await runAndCheck(tenant, added.version);
    expect(onboarding.kind).toBe('onboarding');
    expect((await db.encryption.tenants.status(tenant)).job).toMatchObject({
      kind: 'onboarding',
      state: 'completed',
      rowsDone: onboarding.rowsDone,
    });
    await expectReadsBack(tenant, journey);

    // Rotation: the first customer key → a second one
    const second = newKey();
    const rotated = await db.encryption.tenants.addKey(tenant, { kind: 'customer-key', key: second });
    expect(rotated.job).toMatchObject({ kind: 'rotation', state: 'pending', toVersion: rotated.version });
    expect((await db.encryption.tenants.status(tenant)).job?.state).toBe('pending');
    const rotation = await runAndCheck(tenant, rotated.version);
    expect((await db.encryption.tenants.status(tenant)).job).toMatchObject({
      kind: 'rotation',
      state: 'completed',
      rowsDone: rotation.rowsDone,
    });
    await expectReadsBack(tenant, journey);

    // Revert: back to the application key, audited under another actor
    const revertActor = `${actor}-revert`;
    process.env.TYPEORM_ENVELOPE_ACTOR = revertActor;
    const reverted = await db.encryption.tenants.revert(tenant);
    expect(reverted).toMatchObject({ kind: 'revert', state: 'pending', toVersion: null });
    const status = await db.encryption.tenants.status(tenant);
    expect(status).toMatchObject({ activeVersion: null, activeKeyReference: vendorReference });
    expect(status.job?.state).toBe('pending');
    const revert = await runAndCheck(tenant, 1);
    expect((await db.encryption.tenants.status(tenant)).job).toMatchObject({
      kind: 'revert',
      state: 'completed',
      rowsDone: revert.rowsDone,
    });
    await expectReadsBack(tenant, journey);
    await expectReadsBack('ws-neighbour', vendorRows);
    await expectReadsBack('ws-neighbour-byok', byokRows);

    // The audit log tells the story, naming the key reference and never the key
    const entries = await audit().auditLog({ tenant });
    expect(entries.every((e) => e.tenant === tenant)).toBe(true);
    const tenantEvents = entries.filter((e) => e.event.startsWith('tenant-'));
    const story = tenantEvents.map((e) => [e.event, e.keyVersion]);
    expect(story).toEqual([
      ['tenant-key-added', added.version],
      ['tenant-key-validated', added.version],
      ['tenant-key-activated', added.version],
      ['tenant-job-started', added.version],
      ['tenant-job-finished', added.version],
      ['tenant-key-added', rotated.version],
      ['tenant-key-validated', rotated.version],
      ['tenant-key-activated', rotated.version],
      ['tenant-job-started', rotated.version],
      ['tenant-job-finished', rotated.version],
      ['tenant-reverted', null],
      ['tenant-job-started', 1],
      ['tenant-job-finished', 1],
    ]);
    const referenceOf = (version: number | null) =>
      version === added.version
        ? added.keyReference
        : version === rotated.version
          ? rotated.keyReference
          : vendorReference;
    for (const entry of tenantEvents) {
      expect(entry.details.keyReference, `${entry.event} names its key`).toBe(referenceOf(entry.keyVersion));
    }
    const finished = tenantEvents.filter((e) => e.event === 'tenant-job-finished');
    expect(finished.map((e) => e.details.rowsRewrapped)).toEqual([
      onboarding.rowsDone,
      rotation.rowsDone,
      revert.rowsDone,
    ]);
    expect(
      tenantEvents.find((e) => e.event === 'tenant-key-activated' && e.keyVersion === rotated.version),
    ).toMatchObject({ details: { from: added.version } });
    expect(tenantEvents.find((e) => e.event === 'tenant-reverted')?.details.from).toBe(rotated.version);
    const text = JSON.stringify(entries);
    for (const key of [first, second])
      for (const spelling of spellings(key)) expect(text).not.toContain(spelling);

    // Filters: tenant, event, actor, time
    const others = await audit().auditLog({ tenant: 'ws-neighbour-byok' });
    expect(others.length).toBeGreaterThan(0);
    expect(others.every((e) => e.tenant === 'ws-neighbour-byok')).toBe(true);
    expect(others.map((e) => e.id).some((id) => entries.some((e) => e.id === id))).toBe(false);
    expect((await audit().auditLog({ tenant, event: 'tenant-key-added' })).map((e) => e.keyVersion)).toEqual([
      added.version,
      rotated.version,
    ]);
    expect(
      (await audit().auditLog({ tenant, event: ['tenant-reverted', 'tenant-job-finished'] })).map(
        (e) => e.event,
      ),
    ).toEqual(['tenant-job-finished', 'tenant-job-finished', 'tenant-reverted', 'tenant-job-finished']);
    const byRevertActor = await audit().auditLog({ tenant, actor: revertActor });
    expect(byRevertActor.length).toBeGreaterThan(0);
    expect(byRevertActor.every((e) => e.actor === revertActor)).toBe(true);
    expect(byRevertActor.filter((e) => e.event.startsWith('tenant-')).map((e) => e.event)).toEqual([
      'tenant-reverted',
      'tenant-job-started',
      'tenant-job-finished',
    ]);
    const byActor = await audit().auditLog({ tenant, actor });
    expect(byActor.length + byRevertActor.length).toBe(entries.length);
    const boundary = (entries.find((e) => e.event === 'tenant-reverted') as AuditEntry).at;
    const since = await audit().auditLog({ tenant, since: boundary });
    const until = await audit().auditLog({ tenant, until: boundary });
    expect(since.map((e) => e.event)).toContain('tenant-reverted');
    expect(since.every((e) => e.at.getTime() >= boundary.getTime())).toBe(true);
    expect(until.every((e) => e.at.getTime() <= boundary.getTime())).toBe(true);
    expect(until.map((e) => e.event)).not.toContain('tenant-reverted');
    expect([...until, ...since].map((e) => e.id).sort((a, b) => a - b)).toEqual(
      entries.map((e) => e.id).sort((a, b) => a - b),
    );
    expect(await audit().auditLog({ tenant, until: new Date(0) })).toEqual([]);
  });

  it('keeps live writes made while the job runs, and writes them under the new key', async () => {
    const tenant = 'ws-live';
    const expected = await seed(tenant, 200);
    await seed('ws-live-neighbour', 20);
    const before = await snapshot();
    const added = await db.encryption.tenants.addKey(tenant, { kind: 'customer-key', key: newKey() });
    let running = true;
    const observed: Array<{ state: string; rowsDone: number; rowsTotal: number }> = [];
    const job = db.encryption.tenants.runJob(tenant, { batchSize: 3 }).finally(() => {
      running = false;
    });
    const ids = [...expected.keys()];
    const writtenDuringJob = new Set<number>();
    const versionsWritten: number[] = [];
    let n = 0;
    /* Four writers, each owning its own rows, so "last written" is well defined per row. */
    const writer = async (own: number[]) => {
      while (running) {
        n += 1;
        const i = n;
        let id: number;
        if (i % 3 === 0) {
          const c = await contacts().save(
            contacts().create({
              workspaceId: tenant,
              email: `new-${i}@live.example`,
              profile: { phone: `n${i}` },
            }),
          );
          id = c.id;
          expected.set(id, { email: c.email, phone: `n${i}` });
        } else {
          id = own[Math.floor(Math.random() * own.length)] as number;
          const c = await contacts().findOneByOrFail({ id });
          c.email = `rewritten-${i}@live.example`;
          if (i % 2 === 0) c.profile = { phone: `r${i}` };
          await contacts().save(c);
          expected.set(id, { email: c.email, phone: c.profile?.phone ?? null });
        }
        writtenDuringJob.add(id);
        const [written] = await rawQuery<{ v: number }>(
          db.schema.url,
          `SELECT email_key_version AS v FROM ${table()} WHERE id = $1`,
          [id],
        );
        versionsWritten.push(written?.v ?? -1);
        const status = await db.encryption.tenants.status(tenant);
        if (status.job) observed.push(status.job);
      }
    };
    await Promise.all([0, 1, 2, 3].map((w) => writer(ids.filter((_, i) => i % 4 === w))));
    const result = await job;
    expect(writtenDuringJob.size).toBeGreaterThan(0); // the writes did overlap the job
    expect(result.state).toBe('completed');
    // New writes during the job use the tenant's new key at once
    expect(versionsWritten.every((v) => v === added.version)).toBe(true);
    // The job's count was visible while it ran
    expect(observed.some((j) => j.state === 'rewrapping' && j.rowsDone > 0 && j.rowsDone < j.rowsTotal)).toBe(
      true,
    );
    const after = await snapshot();
    for (const [id, row] of after) {
      const old = before.get(id);
      if (row.workspaceId !== tenant) {
        expect(row).toEqual(old);
        continue;
      }
      expect(row.email_key_version).toBe(added.version);
      if (row.profile_key_version !== null) expect(row.profile_key_version).toBe(added.version);
      if (old && !writtenDuringJob.has(id)) {
        expect(row.email_ciphertext).toEqual(old.email_ciphertext);
        expect(row.email_iv).toEqual(old.email_iv);
      }
    }
    expect(await valuesNotUnder(tenant, added.version)).toBe(0);
    await expectReadsBack(tenant, new Map([...expected.entries()].sort((a, b) => a[0] - b[0])));
  });

  it('a job whose key fails validation ends failed with the reason, changes nothing, and completes once fixed', async () => {
    const tenant = 'ws-hsm';
    const expected = await seed(tenant, 20);
    await seed('ws-hsm-neighbour', 5);
    const handle = `hsm-${randomBytes(4).toString('hex')}`;
    const key = newKey();
    hsm.keys.set(handle, key);
    const added = await db.encryption.tenants.addKey(tenant, { kind: 'test-hsm', handle });
    expect(added.keyReference).toBe(new LocalKeyProvider({ key }).fingerprint);
    const before = await snapshot();
    hsm.down = true;
    let failed: Awaited<ReturnType<typeof db.encryption.tenants.runJob>>;
    try {
      db.encryption.purgeCache(tenant);
      failed = await db.encryption.tenants.runJob(tenant, { batchSize: 4 });
    } finally {
      hsm.down = false;
    }
    expect(failed.state).toBe('failed');
    expect(failed.error).toContain('HSM unavailable');
    expect(failed.error).toContain(`tenant ${tenant}`);
    expect(failed.error).toContain(added.keyReference);
    for (const spelling of spellings(key)) expect(failed.error).not.toContain(spelling);
    const status = await db.encryption.tenants.status(tenant);
    expect(status.job).toMatchObject({ state: 'failed', error: failed.error, toVersion: added.version });
    expect(await snapshot()).toEqual(before); // nothing moved
    await expectReadsBack(tenant, expected); // still readable under the application key
    const failures = await audit().auditLog({
      tenant,
      event: ['tenant-key-validation-failed', 'tenant-job-failed'],
    });
    expect(failures.map((e) => e.event)).toEqual(['tenant-key-validation-failed', 'tenant-job-failed']);
    for (const entry of failures) {
      expect(entry.details.keyReference).toBe(added.keyReference);
      expect(String(entry.details.error)).toContain('HSM unavailable');
    }

    // The fault is fixed: the same job runs again and completes
    const done = await runAndCheck(tenant, added.version);
    expect(done).toMatchObject({ kind: 'onboarding', state: 'completed', error: null });
    await expectReadsBack(tenant, expected);
  });

  it('a job onto a KMS key that was disabled after it was added fails, and completes once it is enabled', async () => {
    const tenant = 'ws-kms-job';
    const expected = await seed(tenant, 12);
    const keyId = kms.createKey({ description: `${tenant} key` }).Arn;
    const added = await db.encryption.tenants.addKey(tenant, { kind: 'aws-kms', keyId });
    expect(added.keyReference).toBe(keyId);
    const before = await snapshot();
    kms.disableKey(keyId);
    db.encryption.purgeCache(tenant);
    const failed = await db.encryption.tenants.runJob(tenant);
    kms.enableKey(keyId);
    expect(failed.state).toBe('failed');
    expect(failed.error).toMatch(/disabled/i);
    expect(failed.error).toContain(keyId);
    expect(await snapshot()).toEqual(before);
    await expectReadsBack(tenant, expected);
    const done = await runAndCheck(tenant, added.version);
    expect(done.state).toBe('completed');
    await expectReadsBack(tenant, expected);
  });
});

describe('a job replaced while it runs', () => {
  /**
   * Holds a lock on the tenant's last row, so the job's UPDATE of it waits until `release`; resolves
   * once PostgreSQL shows that UPDATE waiting for the lock.
   */
  async function blockLastRow(tenant: string) {
    const client = new Client({ connectionString: db.schema.url });
    await client.connect();
    await client.query('BEGIN');
    const [holder] = (await client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows;
    await client.query(
      `SELECT id FROM ${table()} WHERE id = (SELECT max(id) FROM ${table()} WHERE "workspaceId" = $1) FOR UPDATE`,
      [tenant],
    );
    /*
     * Polled from another connection: a transaction sees one snapshot of pg_stat_activity. Only
     * an UPDATE waiting on this lock counts: other test files update their own tenant_contacts.
     */
    const blocked = async () => {
      for (;;) {
        const [row] = await rawQuery<{ n: number }>(
          db.schema.url,
          `SELECT count(*)::int AS n FROM pg_stat_activity
           WHERE $1 = ANY(pg_blocking_pids(pid)) AND query LIKE 'UPDATE%tenant_contacts%'`,
          [holder?.pid],
        );
        if ((row?.n ?? 0) > 0) return;
        await new Promise((r) => setTimeout(r, 10));
      }
    };
    return {
      blocked,
      release: async () => {
        await client.query('COMMIT');
        await client.end();
      },
    };
  }

  it('a key activated while the job runs is not hidden by the old job finishing', async () => {
    const tenant = 'ws-replaced';
    const expected = await seed(tenant, 40);
    await db.encryption.tenants.addKey(tenant, { kind: 'customer-key', key: newKey() });
    const lock = await blockLastRow(tenant);
    let old: Promise<Awaited<ReturnType<typeof db.encryption.tenants.runJob>>>;
    let second: Awaited<ReturnType<typeof db.encryption.tenants.addKey>>;
    try {
      old = db.encryption.tenants.runJob(tenant, { batchSize: 5 });
      await lock.blocked(); // the old job is part-way, waiting on the last row
      second = await db.encryption.tenants.addKey(tenant, { kind: 'customer-key', key: newKey() });
      expect((await db.encryption.tenants.status(tenant)).job).toMatchObject({
        state: 'pending',
        toVersion: second.version,
      });
    } finally {
      await lock.release();
    }
    const ended = await old;
    // Its target is no longer the tenant's key: it ends failed, saying why, without being persisted
    expect(ended.state).toBe('failed');
    expect(ended.error).toContain('replaced while it ran');
    const [failedEntry] = await audit().auditLog({ tenant, event: 'tenant-job-failed' });
    expect(failedEntry?.details.error).toBe(ended.error);
    // The job for the new key is still there to run, and running it moves every row there
    expect((await db.encryption.tenants.status(tenant)).job).toMatchObject({
      kind: 'rotation',
      state: 'pending',
      toVersion: second.version,
    });
    expect(await valuesNotUnder(tenant, second.version)).toBeGreaterThan(0);
    expect((await db.encryption.tenants.runJob(tenant)).state).toBe('completed');
    expect(await valuesNotUnder(tenant, second.version)).toBe(0);
    await expectReadsBack(tenant, expected);
  });

  it('offboarding while the job runs is not undone by the job', async () => {
    const tenant = 'ws-offboarded-mid-job';
    await seed(tenant, 40);
    await db.encryption.tenants.addKey(tenant, { kind: 'customer-key', key: newKey() });
    const lock = await blockLastRow(tenant);
    let job: Promise<Awaited<ReturnType<typeof db.encryption.tenants.runJob>>>;
    try {
      job = db.encryption.tenants.runJob(tenant, { batchSize: 5 });
      await lock.blocked();
      await db.encryption.tenants.offboard(tenant);
    } finally {
      await lock.release();
    }
    expect(await job).toMatchObject({
      state: 'failed',
      error: expect.stringContaining('replaced while it ran'),
    });
    const [row] = await rawQuery<{ state: string; job: unknown }>(
      db.schema.url,
      `SELECT state, job FROM "${db.schema.schema}".typeorm_envelope_tenants WHERE tenant_id = $1`,
      [tenant],
    );
    expect(row).toEqual({ state: 'offboarded', job: null });
    expect((await db.encryption.tenants.status(tenant)).job).toBeNull();
  });
});

describe('rotation interval per tenant', () => {
  const ago = (tenant: string, days: number) =>
    rawQuery(
      db.schema.url,
      `UPDATE "${db.schema.schema}".typeorm_envelope_tenants SET key_activated_at = now() - make_interval(days => $2)
       WHERE tenant_id = $1`,
      [tenant, days],
    );
  const dueIds = async () => (await db.encryption.tenants.due()).map((t) => t.tenantId);

  it('reports a tenant due once its key is older than its interval (default 365 days)', async () => {
    const tenant = 'ws-due';
    await seed(tenant, 2);
    await db.encryption.tenants.addKey(tenant, { kind: 'customer-key', key: newKey() });
    const fresh = await db.encryption.tenants.status(tenant);
    expect(fresh).toMatchObject({ rotationIntervalDays: 365, dueForRotation: false });
    expect(fresh.keyActivatedAt).toBeInstanceOf(Date);
    expect(await dueIds()).not.toContain(tenant);

    await ago(tenant, 364);
    expect((await db.encryption.tenants.status(tenant)).dueForRotation).toBe(false);
    await ago(tenant, 366);
    expect((await db.encryption.tenants.status(tenant)).dueForRotation).toBe(true);
    expect(await dueIds()).toContain(tenant);

    await db.encryption.tenants.setRotationInterval(tenant, 400);
    expect(await db.encryption.tenants.status(tenant)).toMatchObject({
      rotationIntervalDays: 400,
      dueForRotation: false,
    });
    expect(await dueIds()).not.toContain(tenant);
    await db.encryption.tenants.setRotationInterval(tenant, 30);
    await ago(tenant, 31);
    expect(await dueIds()).toContain(tenant);
    const [stored] = await rawQuery<{ days: number }>(
      db.schema.url,
      `SELECT rotation_interval_days AS days FROM "${db.schema.schema}".typeorm_envelope_tenants WHERE tenant_id = $1`,
      [tenant],
    );
    expect(stored?.days).toBe(30);
    const set = await audit().auditLog({ tenant, event: 'tenant-rotation-interval-set' });
    expect(set.map((e) => e.details.days)).toEqual([400, 30]);

    // Rotating (a new key activated) makes it not due again
    await db.encryption.tenants.addKey(tenant, { kind: 'customer-key', key: newKey() });
    expect(await dueIds()).not.toContain(tenant);
  });

  it('a tenant on the application key is never due for a key of its own', async () => {
    const tenant = 'ws-due-vendor';
    await seed(tenant, 1);
    await db.encryption.tenants.setRotationInterval(tenant, 1);
    await ago(tenant, 10);
    expect((await db.encryption.tenants.status(tenant)).dueForRotation).toBe(false);
    expect(await dueIds()).not.toContain(tenant);
    expect(await contacts().countBy({ workspaceId: In([tenant]) })).toBe(1);
  });
});
