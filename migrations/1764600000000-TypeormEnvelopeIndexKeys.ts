import type { MigrationInterface, QueryRunner } from 'typeorm';

/** Table name of the index keys of blind indexes (`@Encrypted({ searchable: true })`). */
export const INDEX_KEYS_TABLE = 'typeorm_envelope_index_keys';

/**
 * Creates the table of index keys, the keys blind indexes are computed under: one row per version
 * of each scope's key (the application keyring's own, `tenant_id` `''`, and one per tenant), with
 * its state (`active`: writes and queries use it; `next`: a rotation's new key, which queries
 * match before writes use it; `previous`: queries still match it while a rotation recomputes the
 * rows; `retired`: erased), the master-key version wrapping it and the
 * wrapped key, never a key in the clear. A partial unique index keeps one active version per
 * scope. Independent of the other migrations; add it to the DataSource's `migrations` when any
 * property is searchable. Back it up with the data: without it, stored indexes cannot be matched
 * again (run `rotateIndexKey` to recompute them under a new key).
 */
export class TypeormEnvelopeIndexKeys1764600000000 implements MigrationInterface {
  name = 'TypeormEnvelopeIndexKeys1764600000000';

  async up(queryRunner: QueryRunner): Promise<void> {
    const table = qualified(queryRunner, INDEX_KEYS_TABLE);
    await queryRunner.query(
      `CREATE TABLE IF NOT EXISTS ${table} (
        "keyring_id" varchar(200) NOT NULL,
        "tenant_id" varchar(200) NOT NULL DEFAULT '',
        "version" integer NOT NULL CHECK ("version" BETWEEN 1 AND 65535),
        "state" varchar(20) NOT NULL CHECK ("state" IN ('active', 'next', 'previous', 'retired')),
        "key_version" integer NOT NULL,
        "wrapped_key" bytea NULL,
        "created_at" timestamptz NOT NULL DEFAULT now(),
        "activated_at" timestamptz NULL DEFAULT now(),
        "rewrapped_at" timestamptz NULL,
        "retired_at" timestamptz NULL,
        PRIMARY KEY ("keyring_id", "tenant_id", "version"),
        CHECK ("state" = 'retired' OR "wrapped_key" IS NOT NULL)
      )`,
    );
    await queryRunner.query(
      `CREATE UNIQUE INDEX IF NOT EXISTS "IDX_typeorm_envelope_index_keys_active" ON ${table} ("keyring_id", "tenant_id") WHERE "state" = 'active'`,
    );
  }

  async down(queryRunner: QueryRunner): Promise<void> {
    await queryRunner.query(`DROP TABLE IF EXISTS ${qualified(queryRunner, INDEX_KEYS_TABLE)}`);
  }
}

/** A name in the DataSource's schema (when it names one), quoted. */
function qualified(queryRunner: QueryRunner, name: string): string {
  const { driver, options } = queryRunner.connection;
  const schema = (options as { schema?: string }).schema;
  return (schema ? [schema, name] : [name]).map((p) => driver.escape(p)).join('.');
}
