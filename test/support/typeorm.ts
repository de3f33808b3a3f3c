import 'reflect-metadata';
import { DataSource, type DataSourceOptions, type Logger } from 'typeorm';
import { EnvelopeEncryption, type EnvelopeEncryptionOptions } from '../../src';
import { CountingKeyProvider } from './counting-key-provider';
import { createTestSchema, type TestSchema } from './database';

/** Records every query and its parameters, to prove plaintext never reaches TypeORM's log. */
export class RecordingLogger implements Logger {
  readonly lines: string[] = [];
  logQuery(query: string, parameters?: unknown[]) {
    this.lines.push(`${query} -- ${JSON.stringify(parameters ?? [])}`);
  }
  logQueryError(error: string | Error, query: string, parameters?: unknown[]) {
    this.lines.push(`ERROR ${String(error)} ${query} -- ${JSON.stringify(parameters ?? [])}`);
  }
  logQuerySlow(_time: number, query: string, parameters?: unknown[]) {
    this.lines.push(`${query} -- ${JSON.stringify(parameters ?? [])}`);
  }
  logSchemaBuild(message: string) {
    this.lines.push(message);
  }
  logMigration(message: string) {
    this.lines.push(message);
  }
  log(_level: string, message: unknown) {
    this.lines.push(String(message));
  }
}

export interface EncryptedTestDatabase {
  dataSource: DataSource;
  encryption: EnvelopeEncryption;
  provider: CountingKeyProvider;
  schema: TestSchema;
  logger: RecordingLogger;
  close(): Promise<void>;
}

/**
 * A real PostgreSQL schema with a DataSource that has encryption attached, a counting local key
 * provider (key generated at run time) and a query logger.
 */
export async function encryptedDatabase(
  entities: DataSourceOptions['entities'],
  options: {
    prefix?: string;
    encryption?: Partial<EnvelopeEncryptionOptions>;
    /** More key versions beside version 1 (the counting provider); version 1 stays active. */
    extraKeys?: EnvelopeEncryptionOptions['keys'];
    /** Migrations to run at initialize (e.g. the key registry's). */
    migrations?: DataSourceOptions['migrations'];
    /** Use this schema instead of creating one (a second DataSource on the same tables). */
    schema?: TestSchema;
    /** The application's own entity subscribers, as given in the DataSource options. */
    subscribers?: DataSourceOptions['subscribers'];
  } = {},
): Promise<EncryptedTestDatabase> {
  const schema = options.schema ?? (await createTestSchema(options.prefix ?? 'typeorm'));
  const provider = new CountingKeyProvider();
  const encryption = new EnvelopeEncryption({
    keys: [{ version: 1, provider }, ...(options.extraKeys ?? [])],
    activeVersion: 1,
    ...options.encryption,
  });
  const logger = new RecordingLogger();
  const dataSource = new DataSource({
    type: 'postgres',
    url: schema.url,
    schema: schema.schema,
    entities,
    synchronize: true,
    logging: true,
    logger,
    migrations: options.migrations ?? [],
    migrationsRun: Array.isArray(options.migrations) && options.migrations.length > 0,
    subscribers: options.subscribers ?? [],
  });
  encryption.attach(dataSource);
  await dataSource.initialize();
  return {
    dataSource,
    encryption,
    provider,
    schema,
    logger,
    async close() {
      if (dataSource.isInitialized) await dataSource.destroy();
      if (!options.schema) await schema.drop();
    },
  };
}
