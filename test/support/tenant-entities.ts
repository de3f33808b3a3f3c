import 'reflect-metadata';
import { Column, DataSource, Entity, PrimaryGeneratedColumn } from 'typeorm';
import { TypeormEnvelopeKeyRegistry1764300000000 } from '../../migrations/1764300000000-TypeormEnvelopeKeyRegistry';
import { TypeormEnvelopeTenantKeys1764400000000 } from '../../migrations/1764400000000-TypeormEnvelopeTenantKeys';
import { Encrypted, EncryptionTenant, type EnvelopeEncryption } from '../../src';

/** A SaaS's contact: one row per workspace's customer, the workspace being the tenant. */
@Entity('tenant_contacts')
export class TenantContact {
  @PrimaryGeneratedColumn() id!: number;
  @EncryptionTenant() @Column() workspaceId!: string;
  @Column({ default: '' }) label!: string;
  @Encrypted() email!: string;
  @Encrypted({ type: 'json', nullable: true }) profile!: { phone: string } | null;
}

/** The migrations tenant keys need, in order. */
export const TENANT_MIGRATIONS = [
  TypeormEnvelopeKeyRegistry1764300000000,
  TypeormEnvelopeTenantKeys1764400000000,
];

/**
 * The tenant contacts on `schema` of the server at `url`, with the tenant migrations and
 * `encryption` attached, not initialized yet: what each process of the SaaS these tests play opens.
 */
export function tenantContactsDataSource(
  encryption: EnvelopeEncryption,
  url: string | undefined,
  schema: string | undefined,
  options: { synchronize?: boolean; migrationsRun?: boolean } = {},
): DataSource {
  const dataSource = new DataSource({
    type: 'postgres',
    url,
    schema,
    entities: [TenantContact],
    migrations: TENANT_MIGRATIONS,
    ...options,
  });
  encryption.attach(dataSource);
  return dataSource;
}
