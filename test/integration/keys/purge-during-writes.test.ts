import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { EnvelopeEncryption } from '../../../src';
import type { EncryptionContext, GeneratedDataKey } from '../../../src/keys/key-provider';
import { CountingKeyProvider } from '../../support/counting-key-provider';
import { createTestSchema, rawQuery, type TestSchema } from '../../support/database';
import { Customer, Order } from '../../support/entities';
import { type EncryptedTestDatabase, encryptedDatabase } from '../../support/typeorm';

/**
 * A real local provider that, while each of its next `purges` data keys is being generated (after
 * the other writers have joined that generation), has another task call `purgeCache()`.
 */
class PurgedWhileGenerating extends CountingKeyProvider {
  purges = 0;
  purge?: () => void;

  protected override async _generateDataKey(context: EncryptionContext): Promise<GeneratedDataKey> {
    // Like a remote KMS: the call takes a moment, so the other writers join it meanwhile.
    await new Promise((resolve) => setTimeout(resolve, 5));
    if (this.purges > 0) {
      this.purges -= 1;
      this.purge?.();
    }
    return super._generateDataKey(context);
  }
}

let schema: TestSchema;
const opened: EncryptedTestDatabase[] = [];
beforeAll(async () => {
  schema = await createTestSchema('purge_writes');
});
afterAll(async () => {
  for (const db of opened) await db.close();
  await schema?.drop();
});

async function writers(options: { purges: number; maxUses?: number; count: number; plan: string }) {
  const provider = new PurgedWhileGenerating();
  const db = await encryptedDatabase([Customer, Order], {
    schema,
    encryption: {
      keys: [{ version: 1, provider }],
      ...(options.maxUses ? { cache: { dataKeyMaxUses: options.maxUses } } : {}),
    },
  });
  opened.push(db);
  const encryption: EnvelopeEncryption = db.encryption;
  provider.purge = () => encryption.purgeCache();
  provider.purges = options.purges;
  const repo = db.dataSource.getRepository(Customer);
  const emails = Array.from({ length: options.count }, (_, i) => `${options.plan}-${i}@example.com`);
  const settled = await Promise.allSettled(
    emails.map((email) => repo.save(repo.create({ email, plan: options.plan, address: null }))),
  );
  const failures = settled.flatMap((s) => (s.status === 'rejected' ? [String(s.reason)] : []));
  const stored = await rawQuery<{ n: number; versions: number[]; plaintext: number }>(
    schema.url,
    `SELECT count(*)::int AS n, array_agg(DISTINCT email_key_version) AS versions,
            count(*) FILTER (WHERE position($2::bytea IN email_ciphertext) > 0)::int AS plaintext
     FROM "${schema.schema}".customer WHERE plan = $1`,
    [options.plan, Buffer.from(options.plan)],
  );
  encryption.purgeCache();
  const loaded = await repo.find({ where: { plan: options.plan } });
  return {
    failures,
    stored: stored[0],
    loaded: loaded.map((c) => c.email).sort(),
    emails: emails.sort(),
    provider,
  };
}

describe('purgeCache() while concurrent writes wait for one data key', () => {
  it('every writer that joined the purged generation gets a key and its row is stored encrypted', async () => {
    const r = await writers({ purges: 1, count: 10, plan: 'once' });
    expect(r.failures).toEqual([]);
    expect(r.stored).toEqual({ n: 10, versions: [1], plaintext: 0 });
    expect(r.loaded).toEqual(r.emails);
    // The key generated across the purge was dropped: a fresh one was generated after it.
    expect(r.provider.calls.generate).toBeGreaterThanOrEqual(2);
  });

  it('writers keep retrying through repeated purges, with keys that last 2 uses', async () => {
    const r = await writers({ purges: 12, maxUses: 2, count: 40, plan: 'repeated' });
    expect(r.failures).toEqual([]);
    expect(r.stored).toEqual({ n: 40, versions: [1], plaintext: 0 });
    expect(r.loaded).toEqual(r.emails);
  });
});
