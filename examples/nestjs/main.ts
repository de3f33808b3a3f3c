/**
 * typeorm-envelope in a NestJS application: `npm run example:nestjs`.
 *
 * `TypeOrmModule.forRootAsync` with a `dataSourceFactory` that attaches the EnvelopeEncryption
 * before `initialize()` (see app.module.ts); services use `@InjectRepository` as usual. Runs with
 * no server and no configuration: PostgreSQL is PGlite served over a local socket, as in the
 * quickstart demo. The library is imported from `../../src` so that the example runs without
 * building the package; in an application, import from 'typeorm-envelope'.
 */
import 'reflect-metadata';
import { NestFactory } from '@nestjs/core';
import { DataSource } from 'typeorm';
import { EnvelopeEncryption } from '../../src';
import type { Customer } from '../quickstart/customer';
import { SAMPLE_CUSTOMERS } from '../quickstart/customer';
import { startPgliteServer } from '../quickstart/pglite-server';
import { printApplicationView, printPlaintextCheck, printStoredRows } from '../shared/print';
import { AppModule } from './app.module';
import { CustomersService } from './customers.service';
import { masterKey } from './encryption';

/** What the example observed; checked by test/integration/examples.test.ts. */
export interface NestDemoResult {
  /** The customers as the service returned them, in id order. */
  customers: Array<Pick<Customer, 'id' | 'email' | 'address' | 'plan'>>;
  /** Whether any stored byte sequence contained a plaintext email or city. */
  plaintextInDatabase: boolean;
  /** Key-provider calls made by the injected EnvelopeEncryption (start-up validation included). */
  providerCalls: { generated: number; unwrapped: number };
}

export async function main(log: (line: string) => void = console.log): Promise<NestDemoResult> {
  log('typeorm-envelope in NestJS (TypeOrmModule.forRootAsync + dataSourceFactory; PostgreSQL: PGlite)');
  log(`master key: fingerprint ${masterKey.fingerprint}`);
  const server = await startPgliteServer();
  try {
    const app = await NestFactory.createApplicationContext(AppModule.register({ databaseUrl: server.url }), {
      logger: ['error', 'warn'],
    });
    try {
      const service = app.get(CustomersService);
      await service.register(SAMPLE_CUSTOMERS);
      const first = (await service.list())[0] as Customer;
      await service.changeEmail(first.id, 'alice@example.org');
      const customers = await service.list();
      log(`saved ${customers.length} customers, then changed customer ${first.id}'s email\n`);
      printApplicationView(log, customers);

      const dataSource = app.get(DataSource);
      const rows: Array<Record<string, unknown>> = await dataSource.query(
        'SELECT * FROM customer ORDER BY id',
      );
      printStoredRows(log, '\nWhat the database stores (SELECT * FROM customer):', rows);
      const plaintextInDatabase = printPlaintextCheck(log, rows, [
        ...SAMPLE_CUSTOMERS,
        { email: 'alice@example.org', address: null },
      ]);
      // The same instance is injectable, for services that purge its cache or read its status.
      const { providerCalls } = app.get(EnvelopeEncryption);
      log(
        `\nKey-provider calls: ${providerCalls.generated} data key(s) generated, ${providerCalls.unwrapped} unwrapped`,
      );
      return {
        customers: customers.map(({ id, email, address, plan }) => ({ id, email, address, plan })),
        plaintextInDatabase,
        providerCalls,
      };
    } finally {
      await app.close(); // destroys the DataSource
    }
  } finally {
    await server.stop();
  }
}

if (require.main === module) {
  main().then(
    (result) => {
      if (result.plaintextInDatabase) {
        console.error('nestjs example: an expected behaviour was not observed (see above)');
        process.exitCode = 1;
      }
    },
    (error: unknown) => {
      console.error(error);
      process.exitCode = 1;
    },
  );
}
