/**
 * typeorm-envelope with Google Cloud KMS as the master key: `npm run example:gcp-kms`.
 *
 * The quickstart's application (same entity, same embedded PostgreSQL), with the master key in
 * Cloud KMS. By default it runs with no Google Cloud project: a Cloud KMS emulator
 * (test/support/gcp-kms-emulator.ts, spoken to by the real `@google-cloud/kms` client in REST
 * mode) holds a symmetric key whose IAM policy grants the application the roles README.md lists.
 * Set `GCP_KMS_KEY_NAME` to use a real key with application default credentials instead.
 *
 * The library is imported from `../../src` so that the example runs without building the package;
 * in an application, import from 'typeorm-envelope'.
 */
import 'reflect-metadata';
import { DataSource } from 'typeorm';
import { EnvelopeEncryption, GcpKmsKeyProvider, type KeyringEntry, rewrapDataKeys } from '../../src';
import type { EncryptionContext } from '../../src/keys/key-provider';
import { APP_MEMBER, type GcpKmsEmulator, startGcpKmsEmulator } from '../../test/support/gcp-kms-emulator';
import { Customer, SAMPLE_CUSTOMERS } from '../quickstart/customer';
import { startPgliteServer } from '../quickstart/pglite-server';
import { printApplicationView, printPlaintextCheck, printStoredRows, table } from '../shared/print';

/** What the example observed; checked by test/integration/examples.test.ts. */
export interface GcpKmsDemoResult {
  /** `emulator` (default) or `gcp` (`GCP_KMS_KEY_NAME` set). */
  mode: 'emulator' | 'gcp';
  plaintextInDatabase: boolean;
  /** Cloud KMS calls per operation: at start-up, for all writes, for all reads with a cold cache. */
  kmsCalls: Record<Phase, Record<string, number>>;
  /** The key versions the stored wrapped keys name. */
  versions: string[];
  /** Emulator only: a new primary version, then a re-wrap onto a keyring version pinned to it. */
  rotation?: { versionsAfter: string[]; dataUnchanged: boolean; readAfterOldVersionDisabled: boolean };
  /** Emulator only: the revocation demonstration. */
  revocation?: { cachedReadSucceeded: boolean; error: { name: string; message: string } };
}

type Phase = 'startup' | 'writes' | 'reads';
type Counts = Record<string, number>;

const KEY_RING = 'demo';
const KEY_ID = 'customer-data';
const BULK_ROWS = 1_000;
const OPERATIONS = ['GetCryptoKey', 'Encrypt', 'Decrypt'] as const;

function diff(after: Counts, before: Counts): Counts {
  return Object.fromEntries(Object.keys(after).map((op) => [op, (after[op] ?? 0) - (before[op] ?? 0)]));
}

/** A provider that counts its calls, for real Cloud KMS where no emulator counts them. */
class CountedGcpKmsKeyProvider extends GcpKmsKeyProvider {
  readonly counts: Counts = { GetCryptoKey: 0, Encrypt: 0, Decrypt: 0 };
  override async checkKey(): Promise<void> {
    this.counts.GetCryptoKey = (this.counts.GetCryptoKey ?? 0) + 1;
    return super.checkKey();
  }
  protected override _wrapDataKey(plaintextKey: Buffer, context: EncryptionContext): Promise<Buffer> {
    this.counts.Encrypt = (this.counts.Encrypt ?? 0) + 1;
    return super._wrapDataKey(plaintextKey, context);
  }
  protected override _unwrapDataKey(wrappedKey: Buffer, context: EncryptionContext): Promise<Buffer> {
    this.counts.Decrypt = (this.counts.Decrypt ?? 0) + 1;
    return super._unwrapDataKey(wrappedKey, context);
  }
}

/** The key versions the stored wrapped keys name, from the bytes in the table. */
async function storedVersions(dataSource: DataSource): Promise<string[]> {
  const rows: Array<{ w: Buffer }> = await dataSource.query(
    'SELECT DISTINCT email_wrapped_key AS w FROM customer',
  );
  return [...new Set(rows.map((r) => GcpKmsKeyProvider.keyVersionOf(r.w)))].sort();
}

export async function main(log: (line: string) => void = console.log): Promise<GcpKmsDemoResult> {
  const realKeyName = process.env.GCP_KMS_KEY_NAME;
  const mode = realKeyName ? 'gcp' : 'emulator';
  log(
    `typeorm-envelope with Google Cloud KMS (${mode === 'gcp' ? 'real Cloud KMS' : 'Cloud KMS emulator on 127.0.0.1'};` +
      ' PostgreSQL: embedded PGlite, in memory)',
  );

  let emulator: GcpKmsEmulator | undefined;
  let dataSource: DataSource | undefined;
  const providers: GcpKmsKeyProvider[] = [];
  const server = await startPgliteServer();
  try {
    let keys: KeyringEntry[];
    let keyName: string;
    let countCalls: () => Counts;
    if (realKeyName) {
      // Application default credentials: GOOGLE_APPLICATION_CREDENTIALS, gcloud's, the attached
      // service account or workload identity. The key's primary version wraps the data keys.
      keyName = realKeyName;
      const provider = new CountedGcpKmsKeyProvider({ keyName });
      providers.push(provider);
      keys = [{ version: 1, provider }];
      countCalls = () => ({ ...provider.counts });
      log(`master key: ${keyName} (application default credentials)`);
    } else {
      const kms = await startGcpKmsEmulator({ project: 'typeorm-envelope-demo' });
      emulator = kms;
      keyName = kms.createKey({ keyRing: KEY_RING, id: KEY_ID }).name;
      // Keyring version 1 is pinned to key version 1, so a rotation can move data keys off it.
      const provider = new GcpKmsKeyProvider({
        keyName: `${keyName}/cryptoKeyVersions/1`,
        ...kms.connection(),
      });
      providers.push(provider);
      keys = [{ version: 1, provider }];
      countCalls = () => ({ ...kms.calls });
      log(`master key: ${keyName}, version 1 (emulated; set GCP_KMS_KEY_NAME to use real Cloud KMS)`);
      log(`  granted to ${APP_MEMBER}: roles/cloudkms.cryptoKeyEncrypterDecrypter, roles/cloudkms.viewer`);
    }

    const encryption = new EnvelopeEncryption({ keys, activeVersion: 1 });
    dataSource = new DataSource({
      type: 'postgres',
      url: server.url,
      entities: [Customer],
      synchronize: true,
      logging: false,
    });
    encryption.attach(dataSource); // before initialize(); validates the key at start-up
    const atStart = countCalls();
    await dataSource.initialize();
    const afterStartup = countCalls();
    log(`key validated at start-up: ${keys[0]?.provider.describe().keyReference}`);
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
    const afterWrites = countCalls();
    log(`saved ${total} customers (${people.length} shown below, ${BULK_ROWS} generated)\n`);

    const customers = await repository.find({ order: { id: 'ASC' }, take: people.length });
    printApplicationView(log, customers);
    const rows: Array<Record<string, unknown>> = await dataSource.query(
      'SELECT * FROM customer ORDER BY id LIMIT $1',
      [people.length],
    );
    printStoredRows(log, '\nWhat the database stores (bytea shown as first bytes + length):', rows);
    const versions = await storedVersions(dataSource);
    log('  (email_wrapped_key: the key version that wrapped the data key, then the Cloud KMS ciphertext)');
    for (const version of versions) log(`  wrapped by ${version}`);
    const plaintextInDatabase = printPlaintextCheck(log, rows, people);

    // A process that did not write the rows starts with an empty cache: purging it shows what reading costs then.
    encryption.purgeCache();
    const beforeReads = countCalls();
    const all = await repository.find({ order: { id: 'ASC' } });
    const afterReads = countCalls();
    log(`\nread all ${all.length} customers back with a cold cache`);
    const kmsCalls: Record<Phase, Counts> = {
      startup: diff(afterStartup, atStart),
      writes: diff(afterWrites, afterStartup),
      reads: diff(afterReads, beforeReads),
    };
    log(`\nCloud KMS calls (${emulator ? 'counted by the emulator' : 'counted by the provider'}):`);
    for (const line of table([
      ['operation', 'start-up', `${total} writes`, `${all.length} reads (cold cache)`],
      ...OPERATIONS.map((op) => [
        op,
        String(kmsCalls.startup[op] ?? 0),
        String(kmsCalls.writes[op] ?? 0),
        String(kmsCalls.reads[op] ?? 0),
      ]),
    ]))
      log(line);
    log('  Data keys are 32 random bytes wrapped with one Encrypt; thousands of rows share one, and a fresh');
    log(
      '  process reads them all after one Decrypt. Every call carries the keyring (and tenant) as additional',
    );
    log('  authenticated data, and CRC32C checksums of its bytes, checked on the answers too.');

    let rotation: GcpKmsDemoResult['rotation'];
    let revocation: GcpKmsDemoResult['revocation'];
    if (emulator) {
      const kms = emulator;
      log(
        '\nRotation: the customer rotates the key in Cloud KMS (a new primary version), and the application',
      );
      log('deploys keyring version 2 pinned to it, then re-wraps the data keys: the data stays as it is.');
      const v2 = kms.rotate(keyName);
      const pinned = new GcpKmsKeyProvider({ keyName: v2, ...kms.connection() });
      providers.push(pinned);
      const rotated = new EnvelopeEncryption({
        keys: [...keys, { version: 2, provider: pinned }],
        activeVersion: 1,
      });
      const next = new DataSource({
        type: 'postgres',
        url: server.url,
        entities: [Customer],
        logging: false,
      });
      rotated.attach(next);
      await next.initialize();
      try {
        await rotated.activate(2);
        const before: Array<{ c: Buffer }> = await next.query(
          'SELECT email_ciphertext AS c FROM customer ORDER BY id',
        );
        const result = await rewrapDataKeys(next, rotated);
        if (result.error) throw result.error;
        const after: Array<{ c: Buffer }> = await next.query(
          'SELECT email_ciphertext AS c FROM customer ORDER BY id',
        );
        const dataUnchanged =
          before.length === after.length && before.every((r, i) => r.c.equals(after[i]?.c as Buffer));
        const versionsAfter = await storedVersions(next);
        log(
          `  re-wrapped ${result.properties[0]?.rowsRewrapped ?? 0} rows with ${result.rewrapCalls} Decrypt + Encrypt;`,
        );
        log(
          `  ciphertext unchanged: ${dataUnchanged ? 'yes' : 'NO'}; wrapped keys now name ${versionsAfter.join(', ')}`,
        );
        kms.setVersionState(`${keyName}/cryptoKeyVersions/1`, 'DISABLED');
        rotated.purgeCache();
        const readAfterOldVersionDisabled =
          (await next.getRepository(Customer).count()) === total &&
          (await next.getRepository(Customer).findOneByOrFail({ id: customers[0]?.id })).email ===
            customers[0]?.email;
        log(
          `  version 1 disabled: every customer still reads -> ${readAfterOldVersionDisabled ? 'yes' : 'NO'}`,
        );
        rotation = { versionsAfter, dataUnchanged, readAfterOldVersionDisabled };

        const first = customers[0] as Customer;
        const repo = next.getRepository(Customer);
        await repo.findOneByOrFail({ id: first.id }); // cached now
        log('\nRevocation: the customer removes the application from the key’s IAM policy');
        kms.revoke(keyName, APP_MEMBER);
        let cachedReadSucceeded = false;
        try {
          const cached = await repo.findOneByOrFail({ id: first.id });
          cachedReadSucceeded = true;
          log(`  read right after: still works from the cached data key -> ${cached.email}`);
        } catch (error) {
          log(
            `  read right after: failed (unexpected) -> ${(error as Error).name}: ${(error as Error).message}`,
          );
        }
        log(
          '  cached data keys expire after cache.unwrappedKeyTtl (default 30 min); encryption.purgeCache()',
        );
        log('  drops them now:');
        rotated.purgeCache();
        let error = { name: '', message: '' };
        try {
          const loaded = await repo.findOneByOrFail({ id: first.id });
          log(`  read after purgeCache(): loaded (unexpected) -> ${loaded.email}`);
        } catch (caught) {
          const e = caught as Error;
          error = { name: e.name, message: e.message };
          log(`  read after purgeCache() -> ${e.name}: ${e.message}`);
        }
        revocation = { cachedReadSucceeded, error };
      } finally {
        await next.destroy();
      }
    } else {
      log('\nRotation and revocation are demonstrated on the emulator only (run without GCP_KMS_KEY_NAME).');
    }

    return {
      mode,
      plaintextInDatabase,
      kmsCalls,
      versions,
      ...(rotation ? { rotation } : {}),
      ...(revocation ? { revocation } : {}),
    };
  } finally {
    if (dataSource?.isInitialized) await dataSource.destroy();
    await server.stop();
    for (const provider of providers) provider.destroy();
    await emulator?.close();
  }
}

if (require.main === module) {
  main().then(
    (result) => {
      const ok =
        !result.plaintextInDatabase &&
        result.kmsCalls.writes.Encrypt === 1 &&
        (result.mode === 'gcp' ||
          (result.rotation?.dataUnchanged === true &&
            result.rotation.readAfterOldVersionDisabled &&
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
