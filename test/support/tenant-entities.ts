import 'reflect-metadata';
import { Column, Entity, PrimaryGeneratedColumn } from 'typeorm';
import { TypeormEnvelopeKeyRegistry1764300000000 } from '../../migrations/1764300000000-TypeormEnvelopeKeyRegistry';
import { TypeormEnvelopeTenantKeys1764400000000 } from '../../migrations/1764400000000-TypeormEnvelopeTenantKeys';
import { Encrypted, EncryptionTenant } from '../../src';

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
