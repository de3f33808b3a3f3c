import { type MigrationInterface, type QueryRunner, Table, TableIndex } from 'typeorm';

/** Table names of the key registry and the audit log. */
export const KEY_VERSIONS_TABLE = 'typeorm_envelope_key_versions';
export const AUDIT_LOG_TABLE = 'typeorm_envelope_audit_log';

/**
 * Creates the library's own tables: the key registry (one row per master-key version of each
 * keyring; never the key itself) and the audit log of key and rotation events, to which the library only appends.
 * Add it to the DataSource's `migrations` beside your own.
 */
export class TypeormEnvelopeKeyRegistry1764300000000 implements MigrationInterface {
  name = 'TypeormEnvelopeKeyRegistry1764300000000';

  async up(queryRunner: QueryRunner): Promise<void> {
    await queryRunner.createTable(
      new Table({
        name: KEY_VERSIONS_TABLE,
        columns: [
          { name: 'keyring_id', type: 'varchar', length: '200', isPrimary: true },
          { name: 'version', type: 'int', isPrimary: true },
          { name: 'provider_kind', type: 'varchar', length: '50' },
          { name: 'key_reference', type: 'varchar', length: '2048' },
          { name: 'state', type: 'varchar', length: '20' },
          { name: 'created_at', type: 'timestamptz', default: 'now()' },
          { name: 'activated_at', type: 'timestamptz', isNullable: true },
          { name: 'retired_at', type: 'timestamptz', isNullable: true },
          { name: 'last_validated_at', type: 'timestamptz', isNullable: true },
          { name: 'rotation_interval_days', type: 'int', default: 365 },
        ],
      }),
      true,
    );
    await queryRunner.createTable(
      new Table({
        name: AUDIT_LOG_TABLE,
        columns: [
          { name: 'id', type: 'bigint', isPrimary: true, isGenerated: true, generationStrategy: 'increment' },
          { name: 'at', type: 'timestamptz', default: 'now()' },
          { name: 'keyring_id', type: 'varchar', length: '200' },
          { name: 'event', type: 'varchar', length: '50' },
          { name: 'key_version', type: 'int', isNullable: true },
          { name: 'actor', type: 'varchar', length: '200' },
          { name: 'details', type: 'jsonb', default: "'{}'" },
        ],
      }),
      true,
    );
    await queryRunner.createIndex(
      AUDIT_LOG_TABLE,
      new TableIndex({ name: 'IDX_typeorm_envelope_audit_at', columnNames: ['keyring_id', 'at'] }),
    );
  }

  async down(queryRunner: QueryRunner): Promise<void> {
    await queryRunner.dropTable(AUDIT_LOG_TABLE, true);
    await queryRunner.dropTable(KEY_VERSIONS_TABLE, true);
  }
}
