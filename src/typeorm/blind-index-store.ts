import type { DataSource, QueryRunner } from 'typeorm';
import { INDEX_KEYS_TABLE } from '../../migrations/1764600000000-TypeormEnvelopeIndexKeys';
import { ConfigError } from '../errors';
import type { IndexKeyRecord, IndexKeyState, IndexKeyStore } from '../keys/index-keys';

/** `tenant_id` of the application keyring's own index keys (a tenant id is never empty). */
export const NO_TENANT = '';

/** Whether the index-key table exists in the DataSource's schema (its migration has run). */
export async function indexKeysTableExists(runner: QueryRunner): Promise<boolean> {
  const schema = (runner.connection.options as { schema?: string }).schema;
  return (await runner.hasTable(schema ? `${schema}.${INDEX_KEYS_TABLE}` : INDEX_KEYS_TABLE)) as boolean;
}

/** The index-key table's path in the DataSource's schema, quoted. */
export function indexKeysTable(dataSource: DataSource): string {
  const schema = (dataSource.options as { schema?: string }).schema;
  return (schema ? [schema, INDEX_KEYS_TABLE] : [INDEX_KEYS_TABLE])
    .map((part) => dataSource.driver.escape(part))
    .join('.');
}

interface RecordRow {
  version: number;
  state: IndexKeyState;
  key_version: number;
  wrapped_key: Buffer | null;
}

/**
 * The index-key records of one keyring in the `TypeormEnvelopeIndexKeys` migration's table.
 * Reads may run on a caller's query runner (inside its transaction, in its snapshot); a new key
 * is always stored on a connection of its own and committed at once, before any index computed
 * under it can be written, so a rolled-back transaction never takes away a key that committed
 * rows use.
 */
export class SqlIndexKeyStore implements IndexKeyStore {
  constructor(
    readonly dataSource: DataSource,
    readonly keyringId: string,
    readonly runner?: QueryRunner,
  ) {}

  /** The same store, reading through `runner`. */
  on(runner: QueryRunner | undefined): SqlIndexKeyStore {
    return runner === this.runner ? this : new SqlIndexKeyStore(this.dataSource, this.keyringId, runner);
  }

  async read(tenant: string | undefined): Promise<IndexKeyRecord[]> {
    const sql = `SELECT version, state, key_version, wrapped_key FROM ${indexKeysTable(this.dataSource)}
                 WHERE keyring_id = $1 AND tenant_id = $2 ORDER BY version DESC`;
    const params = [this.keyringId, tenant ?? NO_TENANT];
    const usable = this.runner && !this.runner.isReleased ? this.runner : undefined;
    const rows = (await missingTable(
      usable ? usable.query(sql, params) : this.dataSource.query(sql, params),
    )) as RecordRow[];
    return rows.map(recordOf);
  }

  async insert(tenant: string | undefined, record: IndexKeyRecord): Promise<boolean> {
    const result = (await missingTable(
      this.dataSource.query(
        `INSERT INTO ${indexKeysTable(this.dataSource)} (keyring_id, tenant_id, version, state, key_version, wrapped_key)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING version`,
        [
          this.keyringId,
          tenant ?? NO_TENANT,
          record.version,
          record.state,
          record.keyVersion,
          record.wrappedKey,
        ],
      ),
    )) as unknown[];
    return result.length > 0;
  }
}

export function recordOf(row: RecordRow): IndexKeyRecord {
  return {
    version: Number(row.version),
    state: row.state,
    keyVersion: Number(row.key_version),
    wrappedKey: row.wrapped_key,
  };
}

/** An undefined table is a missing migration: said as such. */
export async function missingTable<T>(query: Promise<T>): Promise<T> {
  try {
    return await query;
  } catch (error) {
    const code =
      (error as { code?: unknown }).code ?? (error as { driverError?: { code?: unknown } }).driverError?.code;
    if (code === '42P01') {
      throw new ConfigError(
        `searchable encrypted properties need the ${INDEX_KEYS_TABLE} table: add the TypeormEnvelopeIndexKeys1764600000000 ` +
          "migration to the DataSource's migrations and run it",
      );
    }
    throw error;
  }
}
