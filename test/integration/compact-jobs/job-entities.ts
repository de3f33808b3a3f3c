import 'reflect-metadata';
import { Column, Entity, PrimaryGeneratedColumn } from 'typeorm';
import { TypeormEnvelopeDataKeys1764500000000 } from '../../../migrations/1764500000000-TypeormEnvelopeDataKeys';
import { Encrypted, EncryptionTenant } from '../../../src';
import { TENANT_MIGRATIONS } from '../../support/tenant-entities';

/** A card number in the compact layout, bound to its row. */
@Entity('job_cards')
export class JobCard {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ layout: 'compact' }) number!: string;
  @Column({ type: 'varchar', default: '' }) owner!: string;
}

/** Notes not bound to their row, so one sealed value can be copied into many rows with SQL. */
@Entity('job_notes')
export class JobNote {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ layout: 'compact', bindPrimaryKey: false }) body!: string;
  @Column({ type: 'int', default: 0 }) template!: number;
}

/** A tenant's contacts in the compact layout. */
@Entity('job_contacts')
export class JobContact {
  @PrimaryGeneratedColumn() id!: number;
  @EncryptionTenant() @Column() workspaceId!: string;
  @Encrypted({ layout: 'compact' }) email!: string;
  @Encrypted({ layout: 'compact', type: 'json', nullable: true }) profile!: { phone: string } | null;
}

/** One property in each layout: rotation takes both paths for one entity. */
@Entity('job_accounts')
export class JobAccount {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted() iban!: string;
  @Encrypted({ layout: 'compact' }) holder!: string;
}

/** The registry, tenant and data-key migrations, in order. */
export const JOB_MIGRATIONS = [...TENANT_MIGRATIONS, TypeormEnvelopeDataKeys1764500000000];

/* One table moving between layouts, mapped three ways: before, during and after. */
@Entity('job_layout')
export class LayoutSidecars {
  @PrimaryGeneratedColumn() id!: number;
  @EncryptionTenant() @Column() workspaceId!: string;
  @Encrypted() email!: string;
  @Encrypted({ nullable: true }) note!: string | null;
}

@Entity('job_layout')
export class LayoutToCompact {
  @PrimaryGeneratedColumn() id!: number;
  @EncryptionTenant() @Column() workspaceId!: string;
  @Encrypted({ layout: 'compact', migrateFrom: 'sidecars' }) email!: string;
  @Encrypted({ layout: 'compact', migrateFrom: 'sidecars', nullable: true }) note!: string | null;
}

@Entity('job_layout')
export class LayoutCompact {
  @PrimaryGeneratedColumn() id!: number;
  @EncryptionTenant() @Column() workspaceId!: string;
  @Encrypted({ layout: 'compact' }) email!: string;
  @Encrypted({ layout: 'compact', nullable: true }) note!: string | null;
}

@Entity('job_layout')
export class LayoutToSidecars {
  @PrimaryGeneratedColumn() id!: number;
  @EncryptionTenant() @Column() workspaceId!: string;
  @Encrypted({ layout: 'sidecars', migrateFrom: 'compact' }) email!: string;
  @Encrypted({ layout: 'sidecars', migrateFrom: 'compact', nullable: true }) note!: string | null;
}

/** The mappings of `job_layout`, by name (for child processes). */
export const LAYOUT_ENTITIES = { LayoutSidecars, LayoutToCompact, LayoutCompact, LayoutToSidecars };
