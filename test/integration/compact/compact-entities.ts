import 'reflect-metadata';
import { Column, Entity, ManyToOne, OneToMany, PrimaryColumn, PrimaryGeneratedColumn } from 'typeorm';
import { TypeormEnvelopeDataKeys1764500000000 } from '../../../migrations/1764500000000-TypeormEnvelopeDataKeys';
import { Encrypted, EncryptionTenant, encryptedWith } from '../../../src';
import { TENANT_MIGRATIONS } from '../../support/tenant-entities';

/** The application-wide default, decided at import time. */
const EncryptedCompact = encryptedWith({ layout: 'compact' });

export interface Address {
  street: string;
  city: string;
}

/** Encrypted properties inside an embedded object. */
export class CompactContactDetails {
  @EncryptedCompact({ nullable: true }) phone!: string | null;
  @Column({ type: 'varchar', nullable: true }) channel!: string | null;
}

@Entity('compact_people')
export class CompactPerson {
  @PrimaryGeneratedColumn() id!: number;
  @EncryptedCompact() email!: string;
  @EncryptedCompact({ type: 'json', nullable: true }) address!: Address | null;
  @Column({ type: 'varchar', default: '' }) plan!: string;
  @Column(() => CompactContactDetails) contact!: CompactContactDetails;
  @OneToMany(
    () => CompactOrder,
    (order) => order.person,
  )
  orders!: CompactOrder[];
}

@Entity('compact_orders')
export class CompactOrder {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ layout: 'compact' }) cardNumber!: string;
  @ManyToOne(
    () => CompactPerson,
    (person) => person.orders,
    { eager: true, nullable: false },
  )
  person!: CompactPerson;
}

/** A client-assigned key: values are bound to it (upserts on it). */
@Entity('compact_badges')
export class CompactBadge {
  @PrimaryColumn({ type: 'uuid' }) id!: string;
  @EncryptedCompact() holder!: string;
  @EncryptedCompact({ nullable: true }) level!: number | null;
  @Column({ type: 'varchar', default: '' }) team!: string;
}

/** A tenant's rows in the compact layout. */
@Entity('compact_tenant_contacts')
export class CompactTenantContact {
  @PrimaryGeneratedColumn() id!: number;
  @EncryptionTenant() @Column() workspaceId!: string;
  @Column({ default: '' }) label!: string;
  @EncryptedCompact() email!: string;
  @EncryptedCompact({ type: 'json', nullable: true }) profile!: { phone: string } | null;
}

/** A tenant's rows with a client-assigned key (upserts on it). */
@Entity('compact_tenant_badges')
export class CompactTenantBadge {
  @PrimaryColumn({ type: 'uuid' }) id!: string;
  @EncryptionTenant() @Column() workspaceId!: string;
  @EncryptedCompact() holder!: string;
  @EncryptedCompact({ nullable: true }) note!: string | null;
}

/** The migration the compact layout needs. */
export const COMPACT_MIGRATIONS = [TypeormEnvelopeDataKeys1764500000000];
/** Tenants and the compact layout. */
export const COMPACT_TENANT_MIGRATIONS = [...TENANT_MIGRATIONS, TypeormEnvelopeDataKeys1764500000000];

/* A table moving from sidecars to compact: the same table mapped both ways. */
@Entity('layout_forward')
export class ForwardAsSidecars {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted() email!: string;
  @Encrypted({ nullable: true }) note!: string | null;
}

@Entity('layout_forward')
export class ForwardMigrating {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ layout: 'compact', migrateFrom: 'sidecars' }) email!: string;
  @Encrypted({ layout: 'compact', migrateFrom: 'sidecars', nullable: true }) note!: string | null;
}

/* A table moving back from compact to sidecars. */
@Entity('layout_back')
export class BackAsCompact {
  @PrimaryGeneratedColumn() id!: number;
  @EncryptedCompact() email!: string;
  @EncryptedCompact({ nullable: true }) note!: string | null;
}

@Entity('layout_back')
export class BackMigrating {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ layout: 'sidecars', migrateFrom: 'compact' }) email!: string;
  @Encrypted({ layout: 'sidecars', migrateFrom: 'compact', nullable: true }) note!: string | null;
}
