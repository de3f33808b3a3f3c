import { type MigrationInterface, type QueryRunner, Table, TableColumn, TableIndex } from 'typeorm';
import { AUDIT_LOG_TABLE } from './1764300000000-TypeormEnvelopeKeyRegistry';

/** Table names of the tenant registry. */
export const TENANTS_TABLE = 'typeorm_envelope_tenants';
export const TENANT_KEYS_TABLE = 'typeorm_envelope_tenant_keys';
/** Allocates tenant key versions: from 1,000,000 up, so no tenant key version is an application key version. */
export const TENANT_KEY_VERSION_SEQUENCE = 'typeorm_envelope_tenant_key_version_seq';

/**
 * Creates the tenant registry: one row per tenant (its External ID, the key its new rows use, its
 * onboarding job), one row per tenant key (a KMS key and role, or a customer-provided key wrapped
 * by the application's keyring; never a key in the clear), and a tenant column in the audit log.
 * Needs the `TypeormEnvelopeKeyRegistry` migration first; add both to the DataSource's `migrations`.
 */
export class TypeormEnvelopeTenantKeys1764400000000 implements MigrationInterface {
  name = 'TypeormEnvelopeTenantKeys1764400000000';

  async up(queryRunner: QueryRunner): Promise<void> {
    const sequence = qualified(queryRunner, TENANT_KEY_VERSION_SEQUENCE);
    await queryRunner.query(
      `CREATE SEQUENCE IF NOT EXISTS ${sequence} AS integer START 1000000 MINVALUE 1000000`,
    );
    await queryRunner.createTable(
      new Table({
        name: TENANTS_TABLE,
        columns: [
          { name: 'keyring_id', type: 'varchar', length: '200', isPrimary: true },
          { name: 'tenant_id', type: 'varchar', length: '200', isPrimary: true },
          { name: 'external_id', type: 'varchar', length: '100' },
          { name: 'state', type: 'varchar', length: '20', default: "'active'" },
          { name: 'active_version', type: 'int', isNullable: true },
          { name: 'rotation_interval_days', type: 'int', default: 365 },
          { name: 'created_at', type: 'timestamptz', default: 'now()' },
          { name: 'key_activated_at', type: 'timestamptz', isNullable: true },
          { name: 'offboarded_at', type: 'timestamptz', isNullable: true },
          { name: 'job', type: 'jsonb', isNullable: true },
        ],
      }),
      true,
    );
    await queryRunner.createTable(
      new Table({
        name: TENANT_KEYS_TABLE,
        columns: [
          {
            name: 'version',
            type: 'int',
            isPrimary: true,
            default: `nextval('${sequence.replace(/'/g, "''")}'::regclass)`,
          },
          { name: 'keyring_id', type: 'varchar', length: '200' },
          { name: 'tenant_id', type: 'varchar', length: '200' },
          { name: 'provider_kind', type: 'varchar', length: '50' },
          { name: 'key_reference', type: 'varchar', length: '2048' },
          { name: 'descriptor', type: 'jsonb' },
          { name: 'state', type: 'varchar', length: '20' },
          { name: 'created_at', type: 'timestamptz', default: 'now()' },
          { name: 'activated_at', type: 'timestamptz', isNullable: true },
          { name: 'last_validated_at', type: 'timestamptz', isNullable: true },
          { name: 'destroyed_at', type: 'timestamptz', isNullable: true },
        ],
      }),
      true,
    );
    await queryRunner.createIndex(
      TENANT_KEYS_TABLE,
      new TableIndex({
        name: 'IDX_typeorm_envelope_tenant_keys_tenant',
        columnNames: ['keyring_id', 'tenant_id'],
      }),
    );
    await queryRunner.addColumn(
      AUDIT_LOG_TABLE,
      new TableColumn({ name: 'tenant_id', type: 'varchar', length: '200', isNullable: true }),
    );
    await queryRunner.createIndex(
      AUDIT_LOG_TABLE,
      new TableIndex({
        name: 'IDX_typeorm_envelope_audit_tenant',
        columnNames: ['keyring_id', 'tenant_id', 'at'],
      }),
    );
  }

  async down(queryRunner: QueryRunner): Promise<void> {
    await queryRunner.dropIndex(AUDIT_LOG_TABLE, 'IDX_typeorm_envelope_audit_tenant');
    await queryRunner.dropColumn(AUDIT_LOG_TABLE, 'tenant_id');
    await queryRunner.dropTable(TENANT_KEYS_TABLE, true);
    await queryRunner.dropTable(TENANTS_TABLE, true);
    await queryRunner.query(`DROP SEQUENCE IF EXISTS ${qualified(queryRunner, TENANT_KEY_VERSION_SEQUENCE)}`);
  }
}

/** A name in the DataSource's schema (when it names one), quoted. */
function qualified(queryRunner: QueryRunner, name: string): string {
  const { driver, options } = queryRunner.connection;
  const schema = (options as { schema?: string }).schema;
  return (schema ? [schema, name] : [name]).map((p) => driver.escape(p)).join('.');
}
