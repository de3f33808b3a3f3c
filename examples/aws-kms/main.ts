/**
 * typeorm-envelope with AWS KMS as the master key: `npm run example:aws-kms`.
 *
 * The quickstart's application (same entity, same embedded PostgreSQL), with the master key in
 * AWS KMS. By default it runs with no AWS account: a KMS emulator (test/support/kms-emulator.ts,
 * spoken to by the real AWS SDK) holds a symmetric key behind the alias `alias/typeorm-envelope-demo`.
 * Set `KMS_KEY_ID` (and `AWS_REGION`, optionally `KMS_ROLE_ARN` / `KMS_EXTERNAL_ID`) to use a real
 * key with the standard AWS credential chain instead; see README.md for the IAM and key policies.
 *
 * The library is imported from `../../src` so that the example runs without building the package;
 * in an application, import from 'typeorm-envelope'.
 */
import 'reflect-metadata';
import { DataSource } from 'typeorm';
import { AwsKmsKeyProvider, type AwsKmsKeyProviderOptions, EnvelopeEncryption } from '../../src';
import { type KmsEmulator, startKmsEmulator } from '../../test/support/kms-emulator';
import { Customer, SAMPLE_CUSTOMERS } from '../quickstart/customer';
import { startPgliteServer } from '../quickstart/pglite-server';
import { printApplicationView, printPlaintextCheck, printStoredRows, table } from '../shared/print';

/** What the example observed; checked by test/integration/examples.test.ts. */
export interface AwsKmsDemoResult {
  /** `emulator` (default) or `aws` (`KMS_KEY_ID` set). */
  mode: 'emulator' | 'aws';
  /** The customers as the application loaded them, in id order (the first three). */
  customers: Array<Pick<Customer, 'id' | 'email' | 'address' | 'plan'>>;
  /** Whether any stored byte sequence contained a plaintext email or city. */
  plaintextInDatabase: boolean;
  /** KMS calls per operation: at start-up, for all writes, for all reads with a cold cache. */
  kmsCalls: Record<Phase, Record<string, number>>;
  /** Emulator only: the revocation demonstration. */
  revocation?: {
    /** A read right after the key was disabled succeeded (cached data key). */
    cachedReadSucceeded: boolean;
    /** The error the read raised after `purgeCache()`. */
    error: { name: string; message: string };
  };
}

type Phase = 'startup' | 'writes' | 'reads';

const ALIAS = 'alias/typeorm-envelope-demo';
const BULK_ROWS = 1_000;
const OPERATIONS = ['DescribeKey', 'GenerateDataKey', 'Decrypt'] as const;
/** Per-operation counts of KMS requests, read at any time. */
type CallCounter = () => Record<string, number>;

/** `after - before`, per operation. */
function diff(after: Record<string, number>, before: Record<string, number>): Record<string, number> {
  return Object.fromEntries(Object.keys(after).map((op) => [op, (after[op] ?? 0) - (before[op] ?? 0)]));
}

/** The provider for real AWS: options from the environment, undefined ones omitted. */
function awsProviderFromEnv(keyId: string): AwsKmsKeyProvider {
  const options: AwsKmsKeyProviderOptions = { keyId };
  const { AWS_REGION, KMS_ROLE_ARN, KMS_EXTERNAL_ID } = process.env;
  if (AWS_REGION) options.region = AWS_REGION;
  if (KMS_ROLE_ARN) options.roleArn = KMS_ROLE_ARN;
  if (KMS_EXTERNAL_ID) options.externalId = KMS_EXTERNAL_ID;
  return new AwsKmsKeyProvider(options);
}

/** Counts the requests a provider's own KMSClient sends (for real AWS, where no emulator counts them). */
function countClientCalls(provider: AwsKmsKeyProvider): CallCounter {
  const counts: Record<string, number> = Object.fromEntries(OPERATIONS.map((op) => [op, 0]));
  provider.client.middlewareStack.add(
    (next, context) => (args) => {
      const operation = String(context.commandName ?? 'unknown').replace(/Command$/, '');
      counts[operation] = (counts[operation] ?? 0) + 1;
      return next(args);
    },
    { step: 'initialize', name: 'typeormEnvelopeDemoCallCounter' },
  );
  return () => ({ ...counts });
}

export async function main(log: (line: string) => void = console.log): Promise<AwsKmsDemoResult> {
  const realKeyId = process.env.KMS_KEY_ID;
  const mode = realKeyId ? 'aws' : 'emulator';
  log(
    `typeorm-envelope with AWS KMS (${mode === 'aws' ? 'real AWS KMS' : 'KMS emulator on 127.0.0.1'};` +
      ' PostgreSQL: embedded PGlite, in memory)',
  );

  let emulator: KmsEmulator | undefined;
  let provider: AwsKmsKeyProvider | undefined;
  let dataSource: DataSource | undefined;
  const server = await startPgliteServer();
  try {
    let keyArn = '';
    let countCalls: CallCounter;
    if (realKeyId) {
      // The standard credential chain (environment, profile, SSO, instance/task role…); with
      // KMS_ROLE_ARN, a role in the key owner's account is assumed first.
      provider = awsProviderFromEnv(realKeyId);
      countCalls = countClientCalls(provider);
      log(
        `master key: ${realKeyId}${process.env.KMS_ROLE_ARN ? ` via role ${process.env.KMS_ROLE_ARN}` : ''}`,
      );
    } else {
      const kms = await startKmsEmulator();
      emulator = kms;
      keyArn = kms.createKey({ description: 'typeorm-envelope demo' }).Arn;
      kms.createAlias(ALIAS, keyArn);
      // The real SDK, pointed at the emulator: endpoint, region and fake credentials.
      provider = new AwsKmsKeyProvider({ keyId: ALIAS, clientConfig: kms.clientConfig() });
      countCalls = () => ({ ...kms.calls });
      log(`master key: ${ALIAS} -> ${keyArn} (emulated; set KMS_KEY_ID to use real AWS)`);
    }

    const encryption = new EnvelopeEncryption({ keys: [{ version: 1, provider }], activeVersion: 1 });
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
    log(`key validated at start-up: ${provider.describe().keyReference}`);
    const repository = dataSource.getRepository(Customer);

    const people = SAMPLE_CUSTOMERS;
    await repository.save(people.map((p) => Object.assign(new Customer(), p)));
    const bulk = Array.from({ length: BULK_ROWS }, (_, i) =>
      Object.assign(new Customer(), {
        email: `user${i}@example.com`,
        address: { street: `${i} Side St`, city: 'Ogdenville' },
        plan: 'free',
      }),
    );
    await repository.save(bulk, { chunk: 250 });
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
    log('  (email_wrapped_key is a KMS ciphertext blob: only KMS, with this key, can open it)');
    const plaintextInDatabase = printPlaintextCheck(log, rows, people);

    // A process that did not write the rows (another instance, or after a restart) starts with an
    // empty cache: purging it here shows what reading costs then.
    encryption.purgeCache();
    const beforeReads = countCalls();
    const all = await repository.find({ order: { id: 'ASC' } });
    const afterReads = countCalls();
    const wrappedKeys = await dataSource.query(
      'SELECT count(DISTINCT email_wrapped_key)::int AS n FROM customer',
    );
    log(`\nread all ${all.length} customers back with a cold cache`);

    const kmsCalls: Record<Phase, Record<string, number>> = {
      startup: diff(afterStartup, atStart),
      writes: diff(afterWrites, afterStartup),
      reads: diff(afterReads, beforeReads),
    };
    log(`\nKMS calls (${emulator ? 'counted by the emulator' : 'counted on the KMSClient'}):`);
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
    const dataKeys = Number(wrappedKeys[0]?.n ?? 0);
    log(
      `  ${total} rows share ${dataKeys} data key${dataKeys === 1 ? '' : 's'}: writing them cost one GenerateDataKey,`,
    );
    log('  reading them in a fresh process one Decrypt. Thousands of rows cost one KMS call, not one each:');
    log('  a data key seals new values until cache.dataKeyMaxAge (default 30 min) or dataKeyMaxUses, and');
    log('  an unwrapped one stays cached for cache.unwrappedKeyTtl (default 30 min).');
    log('  Start-up: DescribeKey + a GenerateDataKey/Decrypt round trip, so a bad key fails fast.');

    let revocation: AwsKmsDemoResult['revocation'];
    if (emulator) {
      const first = customers[0] as Customer;
      log('\nRevocation: the customer disables the KMS key (here: emulator.disableKey)');
      emulator.disableKey(keyArn);
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
      log('\nRevocation is demonstrated on the emulator only (run without KMS_KEY_ID); see README.md.');
    }

    return {
      mode,
      customers: customers.map(({ id, email, address, plan }) => ({ id, email, address, plan })),
      plaintextInDatabase,
      kmsCalls,
      ...(revocation ? { revocation } : {}),
    };
  } finally {
    if (dataSource?.isInitialized) await dataSource.destroy();
    await server.stop();
    provider?.destroy();
    await emulator?.close();
  }
}

if (require.main === module) {
  main().then(
    (result) => {
      const ok =
        !result.plaintextInDatabase &&
        result.kmsCalls.writes.GenerateDataKey === 1 &&
        (result.mode === 'aws' ||
          (result.revocation?.cachedReadSucceeded === true &&
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
