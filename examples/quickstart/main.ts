/**
 * typeorm-envelope quickstart: `npm run demo`.
 *
 * Runs with no server and no configuration: PostgreSQL is PGlite (WASM, in memory) served over a
 * local socket, and the master key is generated for this run. The library is imported from
 * `../../src` so that the demo runs without building the package; in an application, import
 * from 'typeorm-envelope'.
 */
import 'reflect-metadata';
import { randomBytes } from 'node:crypto';
import { DataSource } from 'typeorm';
import { EnvelopeEncryption, LocalKeyProvider, maskEntity } from '../../src';
import { printApplicationView, printPlaintextCheck, printStoredRows, shortHex } from '../shared/print';
import { Customer, SAMPLE_CUSTOMERS } from './customer';
import { startPgliteServer } from './pglite-server';

/** What the demo observed; checked by test/integration/examples.test.ts. */
export interface DemoResult {
  /** Fingerprint of the run's master key (never the key). */
  fingerprint: string;
  /** The customers as the application loaded them, in id order. */
  customers: Array<Pick<Customer, 'id' | 'email' | 'address' | 'plan'>>;
  /** Whether any stored byte sequence contained a plaintext email or city. */
  plaintextInDatabase: boolean;
  /** `maskEntity()` of the first customer. */
  masked: Record<string, unknown>;
  /** `name: message` of the error a `where` on an encrypted property raised. */
  whereError: string;
  /** The error raised by loading the tampered row. */
  tamperError: { name: string; message: string; primaryKey: string };
  /** Key-provider calls made during the run. */
  providerCalls: { generated: number; unwrapped: number };
}

function describeError(error: unknown): string {
  return error instanceof Error ? `${error.name}: ${error.message}` : String(error);
}

export async function main(log: (line: string) => void = console.log): Promise<DemoResult> {
  log('typeorm-envelope quickstart (PostgreSQL: embedded PGlite, in memory)');
  const server = await startPgliteServer();
  let dataSource: DataSource | undefined;
  try {
    // The customer-held master key. Generated here for the demo; in production it comes from a
    // secret store (LocalKeyProvider) or stays in a KMS. It is never printed, only its fingerprint.
    const provider = new LocalKeyProvider({ key: randomBytes(32).toString('base64') });
    const encryption = new EnvelopeEncryption({ keys: [{ version: 1, provider }], activeVersion: 1 });
    log(`master key: generated for this run, fingerprint ${provider.fingerprint}`);

    dataSource = new DataSource({
      type: 'postgres',
      url: server.url,
      entities: [Customer],
      synchronize: true,
      logging: false,
    });
    encryption.attach(dataSource); // before initialize()
    await dataSource.initialize();
    const repository = dataSource.getRepository(Customer);

    const people = SAMPLE_CUSTOMERS;
    await repository.save(people.map((p) => Object.assign(new Customer(), p)));
    log(`saved ${people.length} customers\n`);

    const customers = await repository.find({ order: { id: 'ASC' } });
    printApplicationView(log, customers);

    const rows: Array<Record<string, unknown>> = await dataSource.query('SELECT * FROM customer ORDER BY id');
    printStoredRows(
      log,
      '\nWhat the database stores (SELECT * FROM customer; bytea shown as first bytes + length):',
      rows,
    );
    log(`  columns: ${Object.keys(rows[0] ?? {}).join(', ')}`);
    const wrappedKeys = new Set(rows.map((r) => shortHex(r.email_wrapped_key)));
    if (rows.length > 1 && wrappedKeys.size === 1) {
      log('  (one data key, wrapped once by the master key, seals all three: it is cached in memory)');
    }
    const plaintextInDatabase = printPlaintextCheck(log, rows, people);

    const first = customers[0] as Customer;
    const masked = maskEntity(first) as Record<string, unknown>;
    log(`\nLog-safe view, maskEntity(customer): ${JSON.stringify(masked)}`);

    log('\nQuerying by an encrypted property, find({ where: { email } }):');
    let whereError = '';
    try {
      await repository.find({ where: { email: first.email } });
      log('  (not refused)');
    } catch (error) {
      whereError = describeError(error);
      log(`  refused -> ${whereError}`);
    }

    const victim = customers[1] as Customer;
    log(`\nTampering: flipping one bit of email_ciphertext of customer ${victim.id} with raw SQL`);
    await dataSource.query(
      'UPDATE customer SET email_ciphertext = set_byte(email_ciphertext, 5, get_byte(email_ciphertext, 5) # 1) WHERE id = $1',
      [victim.id],
    );
    let tamperError = { name: '', message: '', primaryKey: '' };
    try {
      const loaded = await repository.findOneByOrFail({ id: victim.id });
      log(`  loaded without error (unexpected): ${loaded.email}`);
    } catch (error) {
      const e = error as Error & { primaryKey?: string };
      tamperError = { name: e.name, message: e.message, primaryKey: String(e.primaryKey ?? '') };
      log(`  loading it -> ${describeError(error)}`);
    }
    const untouched = await repository.findOneByOrFail({ id: first.id });
    log(`  customer ${untouched.id} still loads: ${untouched.email}`);

    const providerCalls = encryption.providerCalls;
    log(
      `\nKey-provider calls: ${providerCalls.generated} data key(s) generated, ${providerCalls.unwrapped} unwrapped`,
    );

    return {
      fingerprint: provider.fingerprint,
      customers: customers.map(({ id, email, address, plan }) => ({ id, email, address, plan })),
      plaintextInDatabase,
      masked,
      whereError,
      tamperError,
      providerCalls,
    };
  } finally {
    if (dataSource?.isInitialized) await dataSource.destroy();
    await server.stop();
  }
}

if (require.main === module) {
  main().then(
    (result) => {
      const ok =
        !result.plaintextInDatabase &&
        result.whereError.startsWith('UnsupportedOperationError') &&
        result.tamperError.name === 'IntegrityError';
      if (!ok) {
        console.error('demo: an expected behaviour was not observed (see above)');
        process.exitCode = 1;
      }
    },
    (error: unknown) => {
      console.error(error);
      process.exitCode = 1;
    },
  );
}
