import { randomBytes } from 'node:crypto';
import { expect } from 'vitest';
import { type KeyringEntry, LocalKeyProvider } from '../../../src';
import type { EncryptedTestDatabase } from '../../support/typeorm';
import { LedgerAccount } from '../../support/worker-entities';

/** Master-key versions 1 and 2, local keys made here. */
export function generatedKeys(): KeyringEntry[] {
  return [1, 2].map((version) => ({
    version,
    provider: new LocalKeyProvider({ key: randomBytes(32).toString('base64') }),
  }));
}

/** The IBAN and holder of ledger row `n`, as it is saved. */
const ledgerValues = (n: number) => ({ iban: `DE${String(n).padStart(20, '0')}`, holder: `holder ${n}` });

/** Saves `rows` ledger accounts through TypeORM, numbered from 0. */
export async function seedLedger(db: EncryptedTestDatabase, rows: number): Promise<void> {
  const accounts = Array.from({ length: rows }, (_, n) =>
    Object.assign(new LedgerAccount(), { ...ledgerValues(n), n }),
  );
  await db.dataSource.getRepository(LedgerAccount).save(accounts, { chunk: 500 });
}

/** Every ledger row reads back through TypeORM as it was saved, with a cold cache. */
export async function expectLedgerReads(db: EncryptedTestDatabase, rows: number): Promise<void> {
  db.encryption.purgeCache();
  const read = await db.dataSource.getRepository(LedgerAccount).find({ order: { id: 'ASC' } });
  expect(read).toHaveLength(rows);
  const wrong = read.filter((r) => {
    const saved = ledgerValues(r.n);
    return r.iban !== saved.iban || r.holder !== saved.holder;
  });
  expect(wrong).toEqual([]);
}
