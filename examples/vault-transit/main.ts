/**
 * typeorm-envelope with HashiCorp Vault or OpenBao Transit as the master key:
 * `npm run example:vault-transit`.
 *
 * The quickstart's application (same entity, same embedded PostgreSQL), with the master key in
 * Vault Transit. By default it runs with no Vault: a Vault emulator (test/support/vault-emulator.ts)
 * holds a derived `aes256-gcm96` key `app-data`, the policy of ./policy.hcl and an AppRole with
 * it, and the application logs in with that AppRole. Set `VAULT_ADDR` and `VAULT_TRANSIT_KEY`
 * (with `VAULT_TOKEN`, `VAULT_TOKEN_FILE` or `VAULT_ROLE_ID` + `VAULT_SECRET_ID`) to use a real
 * Vault or OpenBao instead; see README.md.
 *
 * The library is imported from `../../src` so that the example runs without building the package;
 * in an application, import from 'typeorm-envelope'.
 */
import 'reflect-metadata';
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { DataSource } from 'typeorm';
import {
  EnvelopeEncryption,
  type KeyringEntry,
  rewrapDataKeys,
  type VaultAuth,
  VaultTransitKeyProvider,
} from '../../src';
import { startVaultEmulator, type VaultEmulator } from '../../test/support/vault-emulator';
import { Customer, SAMPLE_CUSTOMERS } from '../quickstart/customer';
import { startPgliteServer } from '../quickstart/pglite-server';
import { printApplicationView, printPlaintextCheck, printStoredRows, table } from '../shared/print';

/** What the example observed; checked by test/integration/examples.test.ts. */
export interface VaultDemoResult {
  /** `emulator` (default) or `vault` (`VAULT_ADDR` and `VAULT_TRANSIT_KEY` set). */
  mode: 'emulator' | 'vault';
  plaintextInDatabase: boolean;
  /** Emulator only: Vault requests per operation, at start-up, for all writes, for all reads. */
  vaultCalls?: Record<Phase, Record<string, number>>;
  /** Emulator only: `rotate`, then a re-wrap of every data key with Transit `rewrap`. */
  rotation?: {
    before: string[];
    after: string[];
    rewrapCalls: number;
    dataUnchanged: boolean;
    readAfter: boolean;
  };
  /** Emulator only: the revocation demonstration. */
  revocation?: { cachedReadSucceeded: boolean; error: { name: string; message: string } };
}

type Phase = 'startup' | 'writes' | 'reads';

const KEY = 'app-data';
const POLICY = 'app-data-encryption';
const BULK_ROWS = 1_000;
const OPERATIONS = ['login', 'readKey', 'datakey', 'decrypt', 'rewrap'] as const;

function diff(after: Record<string, number>, before: Record<string, number>): Record<string, number> {
  return Object.fromEntries(Object.keys(after).map((op) => [op, (after[op] ?? 0) - (before[op] ?? 0)]));
}

/** Credentials for a real Vault, as the Vault CLI and Agent provide them. */
function authFromEnv(): VaultAuth {
  const { VAULT_TOKEN, VAULT_TOKEN_FILE, VAULT_ROLE_ID, VAULT_SECRET_ID } = process.env;
  if (VAULT_ROLE_ID && VAULT_SECRET_ID)
    return { appRole: { roleId: VAULT_ROLE_ID, secretId: VAULT_SECRET_ID } };
  if (VAULT_TOKEN_FILE) return { tokenFile: VAULT_TOKEN_FILE };
  if (VAULT_TOKEN) return { token: VAULT_TOKEN };
  throw new Error('set VAULT_TOKEN, VAULT_TOKEN_FILE, or VAULT_ROLE_ID and VAULT_SECRET_ID');
}

/** The first stored wrapped keys, as text: `vault:v<N>:` and the start of the ciphertext. */
async function wrappedPrefixes(dataSource: DataSource): Promise<string[]> {
  const rows: Array<{ w: Buffer }> = await dataSource.query(
    'SELECT DISTINCT email_wrapped_key AS w FROM customer ORDER BY 1 LIMIT 3',
  );
  return rows.map((r) => `${r.w.toString('latin1').slice(0, 20)}…`);
}

export async function main(log: (line: string) => void = console.log): Promise<VaultDemoResult> {
  const address = process.env.VAULT_ADDR;
  const realKey = process.env.VAULT_TRANSIT_KEY;
  const mode = address && realKey ? 'vault' : 'emulator';
  log(
    `typeorm-envelope with Vault Transit (${mode === 'vault' ? `Vault at ${address}` : 'Vault emulator on 127.0.0.1'};` +
      ' PostgreSQL: embedded PGlite, in memory)',
  );

  let vault: VaultEmulator | undefined;
  let dataSource: DataSource | undefined;
  const server = await startPgliteServer();
  try {
    let keys: KeyringEntry[];
    let provider: VaultTransitKeyProvider;
    if (mode === 'vault') {
      provider = new VaultTransitKeyProvider({
        address: address as string,
        keyName: realKey as string,
        mount: process.env.VAULT_TRANSIT_MOUNT || 'transit',
        ...(process.env.VAULT_NAMESPACE ? { namespace: process.env.VAULT_NAMESPACE } : {}),
        auth: authFromEnv(),
      });
      keys = [{ version: 1, provider }];
    } else {
      vault = await startVaultEmulator();
      vault.createKey(KEY, { type: 'aes256-gcm96', derived: true });
      // The documented least-privilege policy, as the customer would write it.
      vault.setPolicy(
        POLICY,
        readFileSync(resolve(__dirname, '../../../examples/vault-transit/policy.hcl'), 'utf8'),
      );
      const appRole = vault.createAppRole('typeorm-envelope-demo', { policies: [POLICY], tokenTtl: 3_600 });
      const make = () =>
        new VaultTransitKeyProvider({ address: vault?.address as string, keyName: KEY, auth: { appRole } });
      provider = make();
      // Version 2 is the same Transit key: after `rotate`, the re-wrap moves data keys to its new version.
      keys = [
        { version: 1, provider },
        { version: 2, provider: make() },
      ];
      log(
        `master key: Transit key ${KEY} (derived aes256-gcm96; emulated; set VAULT_ADDR and VAULT_TRANSIT_KEY for a real Vault)`,
      );
      log('  the application logs in with an AppRole whose policy is examples/vault-transit/policy.hcl');
    }
    const counts = (): Record<string, number> => ({ ...(vault?.calls ?? {}) });

    const encryption = new EnvelopeEncryption({ keys, activeVersion: 1 });
    dataSource = new DataSource({
      type: 'postgres',
      url: server.url,
      entities: [Customer],
      synchronize: true,
      logging: false,
    });
    encryption.attach(dataSource); // before initialize(); validates the key at start-up
    const atStart = counts();
    await dataSource.initialize();
    const afterStartup = counts();
    log(`key validated at start-up: ${provider.describe().keyReference}`);
    const repository = dataSource.getRepository(Customer);

    const people = SAMPLE_CUSTOMERS;
    await repository.save(people.map((p) => Object.assign(new Customer(), p)));
    await repository.save(
      Array.from({ length: BULK_ROWS }, (_, i) =>
        Object.assign(new Customer(), {
          email: `user${i}@example.com`,
          address: { street: `${i} Side St`, city: 'Ogdenville' },
          plan: 'free',
        }),
      ),
      { chunk: 250 },
    );
    const total = people.length + BULK_ROWS;
    const afterWrites = counts();
    log(`saved ${total} customers (${people.length} shown below, ${BULK_ROWS} generated)\n`);

    const customers = await repository.find({ order: { id: 'ASC' }, take: people.length });
    printApplicationView(log, customers);
    const rows: Array<Record<string, unknown>> = await dataSource.query(
      'SELECT * FROM customer ORDER BY id LIMIT $1',
      [people.length],
    );
    printStoredRows(log, '\nWhat the database stores (bytea shown as first bytes + length):', rows);
    log(
      `  email_wrapped_key is Transit's ciphertext of the data key, its key version kept: ${(await wrappedPrefixes(dataSource))[0]}`,
    );
    const plaintextInDatabase = printPlaintextCheck(log, rows, people);

    encryption.purgeCache(); // a fresh process: empty cache
    const beforeReads = counts();
    const all = await repository.find({ order: { id: 'ASC' } });
    const afterReads = counts();
    log(`\nread all ${all.length} customers back with a cold cache`);

    if (!vault) {
      log(
        '\nRotation and revocation are demonstrated on the emulator only (run without VAULT_ADDR); see README.md.',
      );
      return { mode, plaintextInDatabase };
    }

    const vaultCalls: Record<Phase, Record<string, number>> = {
      startup: diff(afterStartup, atStart),
      writes: diff(afterWrites, afterStartup),
      reads: diff(afterReads, beforeReads),
    };
    log('\nVault requests (counted by the emulator):');
    for (const line of table([
      ['operation', 'start-up', `${total} writes`, `${all.length} reads (cold cache)`],
      ...OPERATIONS.map((op) => [
        op,
        String(vaultCalls.startup[op] ?? 0),
        String(vaultCalls.writes[op] ?? 0),
        String(vaultCalls.reads[op] ?? 0),
      ]),
    ]))
      log(line);
    log('  One datakey for all the writes, one decrypt for all the reads: a data key serves many rows.');
    log('  Start-up, for versions 1 and 2 (the same Transit key, one provider each): an AppRole login and a');
    log('  read of the key (type, derived, not exportable); for the active version a round trip.');

    // Rotation: the customer rotates the Transit key; the application moves every data key to
    // the new key version without the data key leaving Vault, then version 1 can be retired.
    log(`\nRotation: vault write -f transit/keys/${KEY}/rotate (here: emulator.rotateKey)`);
    const ciphertextBefore: Array<{ c: Buffer }> = await dataSource.query(
      'SELECT email_ciphertext AS c FROM customer ORDER BY id',
    );
    const before = await wrappedPrefixes(dataSource);
    vault.rotateKey(KEY);
    await encryption.activate(2);
    vault.resetCalls();
    const result = await rewrapDataKeys(dataSource, encryption, { toVersion: 2 });
    if (result.error) throw result.error;
    const after = await wrappedPrefixes(dataSource);
    const ciphertextAfter: Array<{ c: Buffer }> = await dataSource.query(
      'SELECT email_ciphertext AS c FROM customer ORDER BY id',
    );
    const dataUnchanged = ciphertextBefore.every((r, i) => r.c.equals(ciphertextAfter[i]?.c as Buffer));
    log(
      `  rewrapDataKeys: ${vault.calls.rewrap} Transit rewrap call(s), one per data key, re-wrapped inside Vault;` +
        ` then ${vault.calls.decrypt} decrypt(s): the job checks each new wrapped key before writing it`,
    );
    log(`  wrapped keys before: ${before.join(', ')}`);
    log(`  wrapped keys after:  ${after.join(', ')}`);
    log(
      `  email_ciphertext of all ${ciphertextAfter.length} rows unchanged: ${dataUnchanged ? 'yes' : 'NO'}`,
    );
    vault.setMinDecryptionVersion(KEY, 2);
    encryption.purgeCache();
    const readAfter = (await repository.find()).length === total;
    log(`  min_decryption_version=2 (version 1 retired): all rows still read: ${readAfter ? 'yes' : 'NO'}`);

    const first = customers[0] as Customer;
    log(`\nRevocation: the customer deletes the application's policy (vault policy delete ${POLICY})`);
    vault.deletePolicy(POLICY);
    let cachedReadSucceeded = false;
    try {
      const cached = await repository.findOneByOrFail({ id: first.id });
      cachedReadSucceeded = true;
      log(`  read right after: still works from the cached data key -> ${cached.email}`);
    } catch (error) {
      log(`  read right after: failed (unexpected) -> ${(error as Error).name}: ${(error as Error).message}`);
    }
    log('  cached data keys expire after cache.unwrappedKeyTtl (default 30 min); encryption.purgeCache()');
    log('  drops them now:');
    encryption.purgeCache();
    let error = { name: '', message: '' };
    try {
      const loaded = await repository.findOneByOrFail({ id: first.id });
      log(`  read after purgeCache(): loaded (unexpected) -> ${loaded.email}`);
    } catch (caught) {
      const e = caught as Error;
      error = { name: e.name, message: e.message };
      log(`  read after purgeCache() -> ${e.name}: ${e.message}`);
    }
    return {
      mode,
      plaintextInDatabase,
      vaultCalls,
      rotation: { before, after, rewrapCalls: result.rewrapCalls, dataUnchanged, readAfter },
      revocation: { cachedReadSucceeded, error },
    };
  } finally {
    if (dataSource?.isInitialized) await dataSource.destroy();
    await server.stop();
    await vault?.close();
  }
}

if (require.main === module) {
  main().then(
    (result) => {
      const ok =
        !result.plaintextInDatabase &&
        (result.mode === 'vault' ||
          (result.vaultCalls?.writes.datakey === 1 &&
            result.rotation?.dataUnchanged === true &&
            result.rotation.readAfter &&
            result.revocation?.cachedReadSucceeded === true &&
            result.revocation.error.name === 'KeyAccessDeniedError'));
      if (!ok) {
        console.error('example: an expected behaviour was not observed (see above)');
        process.exitCode = 1;
      }
    },
    (error: unknown) => {
      console.error(error);
      process.exitCode = 1;
    },
  );
}
