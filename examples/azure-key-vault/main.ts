/**
 * typeorm-envelope with Azure Key Vault as the master key: `npm run example:azure-key-vault`.
 *
 * The quickstart's application (same entity, same embedded PostgreSQL), with the master key in
 * Azure Key Vault. By default it runs with no Azure subscription: a Key Vault emulator
 * (test/support/azure-key-vault-emulator.ts, spoken to by the real `@azure/keyvault-keys` client,
 * bearer-challenge handshake included) holds an RSA 3072 key on which the application's identity
 * has the role `Key Vault Crypto Service Encryption User`. Set `AZURE_KEY_VAULT_KEY_ID` to use a
 * real key with `DefaultAzureCredential` (install `@azure/identity`); see README.md for the role.
 *
 * The library is imported from `../../src` so that the example runs without building the package;
 * in an application, import from 'typeorm-envelope'.
 */
import 'reflect-metadata';
import { DataSource } from 'typeorm';
import { AzureKeyVaultKeyProvider, EnvelopeEncryption } from '../../src';
import {
  type AzureKeyVaultEmulator,
  type KeyVaultOperation,
  startAzureKeyVaultEmulator,
  testCredential,
} from '../../test/support/azure-key-vault-emulator';
import { Customer, SAMPLE_CUSTOMERS } from '../quickstart/customer';
import { startPgliteServer } from '../quickstart/pglite-server';
import { printApplicationView, printPlaintextCheck, printStoredRows, table } from '../shared/print';

/** What the example observed; checked by test/integration/examples.test.ts. */
export interface AzureKeyVaultDemoResult {
  /** `emulator` (default) or `azure` (`AZURE_KEY_VAULT_KEY_ID` set). */
  mode: 'emulator' | 'azure';
  /** The versioned key id the provider uses (what a key registry records). */
  keyReference: string;
  customers: Array<Pick<Customer, 'id' | 'email' | 'address' | 'plan'>>;
  plaintextInDatabase: boolean;
  /** Emulator only: Key Vault requests per operation at start-up, for all writes, for all reads (cold cache). */
  calls?: Record<Phase, Record<string, number>>;
  /** Emulator only: the revocation demonstration. */
  revocation?: { cachedReadSucceeded: boolean; error: { name: string; message: string } };
}

type Phase = 'startup' | 'writes' | 'reads';

const KEY_NAME = 'typeorm-envelope-demo';
const APP_IDENTITY = 'typeorm-envelope-demo-app';
const ROLE = 'Key Vault Crypto Service Encryption User';
const BULK_ROWS = 1_000;
const OPERATIONS: readonly KeyVaultOperation[] = ['get', 'wrapkey', 'unwrapkey'];

function diff(after: Record<string, number>, before: Record<string, number>): Record<string, number> {
  return Object.fromEntries(OPERATIONS.map((op) => [op, (after[op] ?? 0) - (before[op] ?? 0)]));
}

export async function main(log: (line: string) => void = console.log): Promise<AzureKeyVaultDemoResult> {
  const realKeyId = process.env.AZURE_KEY_VAULT_KEY_ID;
  const mode = realKeyId ? 'azure' : 'emulator';
  log(
    `typeorm-envelope with Azure Key Vault (${mode === 'azure' ? 'real Azure Key Vault' : 'Key Vault emulator on 127.0.0.1'};` +
      ' PostgreSQL: embedded PGlite, in memory)',
  );

  let emulator: AzureKeyVaultEmulator | undefined;
  let dataSource: DataSource | undefined;
  const server = await startPgliteServer();
  try {
    let provider: AzureKeyVaultKeyProvider;
    if (realKeyId) {
      // DefaultAzureCredential of @azure/identity: environment, workload identity, managed identity,
      // Azure CLI… The identity needs the role Key Vault Crypto Service Encryption User on the key.
      provider = new AzureKeyVaultKeyProvider({ keyId: realKeyId });
      log(`master key: ${realKeyId}`);
    } else {
      const vault = await startAzureKeyVaultEmulator();
      emulator = vault;
      await vault.createKey(KEY_NAME, { kty: 'RSA', size: 3072 });
      vault.grant(APP_IDENTITY, ROLE, { key: KEY_NAME });
      // The real SDK, pointed at the emulator: plain HTTP on 127.0.0.1, and a test credential that
      // issues tokens for the tenant the vault's challenge names.
      provider = new AzureKeyVaultKeyProvider({
        keyId: vault.kid(KEY_NAME), // no version: the key's current version is looked up once
        credential: testCredential(APP_IDENTITY),
        clientOptions: vault.clientOptions(),
      });
      log(
        `master key: ${vault.kid(KEY_NAME)} (emulated RSA 3072; set AZURE_KEY_VAULT_KEY_ID to use real Azure)`,
      );
    }
    const counts = () => ({ ...(emulator?.calls ?? {}) }) as Record<string, number>;

    const encryption = new EnvelopeEncryption({ keys: [{ version: 1, provider }], activeVersion: 1 });
    dataSource = new DataSource({
      type: 'postgres',
      url: server.url,
      entities: [Customer],
      synchronize: true,
    });
    encryption.attach(dataSource); // before initialize(); validates the key at start-up
    const atStart = counts();
    await dataSource.initialize();
    const afterStartup = counts();
    const keyReference = await provider.resolveKeyReference();
    log(`key validated at start-up (exists, enabled, RSA ≥ 3072 bits, key_ops, round trip): ${keyReference}`);
    const repository = dataSource.getRepository(Customer);

    await repository.save(SAMPLE_CUSTOMERS.map((p) => Object.assign(new Customer(), p)));
    const bulk = Array.from({ length: BULK_ROWS }, (_, i) =>
      Object.assign(new Customer(), {
        email: `user${i}@example.com`,
        address: { street: `${i} Side St`, city: 'Ogdenville' },
        plan: 'free',
      }),
    );
    await repository.save(bulk, { chunk: 250 });
    const total = SAMPLE_CUSTOMERS.length + BULK_ROWS;
    const afterWrites = counts();
    log(`saved ${total} customers (${SAMPLE_CUSTOMERS.length} shown below, ${BULK_ROWS} generated)\n`);

    const customers = await repository.find({ order: { id: 'ASC' }, take: SAMPLE_CUSTOMERS.length });
    printApplicationView(log, customers);
    const rows: Array<Record<string, unknown>> = await dataSource.query(
      'SELECT * FROM customer ORDER BY id LIMIT $1',
      [SAMPLE_CUSTOMERS.length],
    );
    printStoredRows(log, '\nWhat the database stores (bytea shown as first bytes + length):', rows);
    log(
      '  (email_wrapped_key: the key version that wrapped it, then what only Key Vault can unwrap: the data',
    );
    log('   key and a digest of its keyring, wrapped with RSA-OAEP-256)');
    const plaintextInDatabase = printPlaintextCheck(log, rows, SAMPLE_CUSTOMERS);

    encryption.purgeCache(); // what a fresh process (another instance, a restart) starts with
    const beforeReads = counts();
    const all = await repository.find({ order: { id: 'ASC' } });
    const afterReads = counts();
    log(`\nread all ${all.length} customers back with a cold cache`);

    let calls: AzureKeyVaultDemoResult['calls'];
    let revocation: AzureKeyVaultDemoResult['revocation'];
    if (emulator) {
      calls = {
        startup: diff(afterStartup, atStart),
        writes: diff(afterWrites, afterStartup),
        reads: diff(afterReads, beforeReads),
      };
      log('\nKey Vault requests (counted by the emulator):');
      for (const line of table([
        ['operation', 'start-up', `${total} writes`, `${all.length} reads (cold cache)`],
        ...OPERATIONS.map((op) => [
          op,
          String(calls?.startup[op]),
          String(calls?.writes[op]),
          String(calls?.reads[op]),
        ]),
      ]))
        log(line);
      log('  One wrapkey for all the writes, one unwrapkey to read them all in a fresh process.');

      const first = customers[0] as Customer;
      log('\nRevocation: the customer removes the application’s role assignment on the key');
      emulator.removeRoleAssignment(APP_IDENTITY);
      let cachedReadSucceeded = false;
      try {
        const cached = await repository.findOneByOrFail({ id: first.id });
        cachedReadSucceeded = true;
        log(`  read right after: still works from the cached data key -> ${cached.email}`);
      } catch (error) {
        log(
          `  read right after: failed (unexpected) -> ${(error as Error).name}: ${(error as Error).message}`,
        );
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
      revocation = { cachedReadSucceeded, error };
    } else {
      log(
        '\nRequest counts and revocation are demonstrated on the emulator only (run without AZURE_KEY_VAULT_KEY_ID).',
      );
    }

    return {
      mode,
      keyReference,
      customers: customers.map(({ id, email, address, plan }) => ({ id, email, address, plan })),
      plaintextInDatabase,
      ...(calls ? { calls } : {}),
      ...(revocation ? { revocation } : {}),
    };
  } finally {
    if (dataSource?.isInitialized) await dataSource.destroy();
    await server.stop();
    await emulator?.close();
  }
}

if (require.main === module) {
  main().then(
    (result) => {
      const ok =
        !result.plaintextInDatabase &&
        (result.mode === 'azure' ||
          (result.calls?.writes.wrapkey === 1 &&
            result.calls.reads.unwrapkey === 1 &&
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
