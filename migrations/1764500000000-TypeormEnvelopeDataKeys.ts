import type { MigrationInterface, QueryRunner } from 'typeorm';

/** Table name of the data-key table used by the compact storage layout. */
export const DATA_KEYS_TABLE = 'typeorm_envelope_data_keys';
/** Index of the data-key table by keyring, tenant and master-key version (rotation and status). */
export const DATA_KEYS_VERSION_INDEX = 'IDX_typeorm_envelope_data_keys_version';

/**
 * Creates the data-key table of the compact storage layout (`@Encrypted({ layout: 'compact' })`):
 * one row per data key, holding its keyring, tenant (NULL for the application's own keys), the
 * master-key version wrapping it now, the wrapped key (never a key in the clear), a fingerprint of
 * the wrap it was registered with (which makes registration idempotent) and its creation and
 * re-wrap times. Compact values hold only the id of their key's row, so this table must be backed
 * up, and restored, with the data. Independent of the other migrations; add it to the DataSource's
 * `migrations` when any property uses the compact layout.
 */
export class TypeormEnvelopeDataKeys1764500000000 implements MigrationInterface {
  name = 'TypeormEnvelopeDataKeys1764500000000';

  async up(queryRunner: QueryRunner): Promise<void> {
    const table = qualified(queryRunner, DATA_KEYS_TABLE);
    await queryRunner.query(
      `CREATE TABLE IF NOT EXISTS ${table} (
        "id" bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        "keyring" text NOT NULL,
        "tenant_id" text NULL,
        "key_version" integer NOT NULL,
        "wrapped_key" bytea NOT NULL,
        "fingerprint" bytea NOT NULL UNIQUE,
        "created_at" timestamptz NOT NULL DEFAULT now(),
        "rewrapped_at" timestamptz NULL
      )`,
    );
    await queryRunner.query(
      `CREATE INDEX IF NOT EXISTS "${DATA_KEYS_VERSION_INDEX}" ON ${table} ("keyring", "tenant_id", "key_version")`,
    );
  }

  async down(queryRunner: QueryRunner): Promise<void> {
    await queryRunner.query(`DROP TABLE IF EXISTS ${qualified(queryRunner, DATA_KEYS_TABLE)}`);
  }
}

/** A name in the DataSource's schema (when it names one), quoted. */
function qualified(queryRunner: QueryRunner, name: string): string {
  const { driver, options } = queryRunner.connection;
  const schema = (options as { schema?: string }).schema;
  return (schema ? [schema, name] : [name]).map((p) => driver.escape(p)).join('.');
}
