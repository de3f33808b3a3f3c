import 'reflect-metadata';
import { Column, Entity, ManyToOne, PrimaryColumn, PrimaryGeneratedColumn } from 'typeorm';
import { TypeormEnvelopeDataKeys1764500000000 } from '../../migrations/1764500000000-TypeormEnvelopeDataKeys';
import { TypeormEnvelopeIndexKeys1764600000000 } from '../../migrations/1764600000000-TypeormEnvelopeIndexKeys';
import { Encrypted, EncryptionTenant } from '../../src';
import { TENANT_MIGRATIONS } from './tenant-entities';

/** A SaaS's user: logs in by email, unique within the workspace (the tenant). */
@Entity('bidx_members')
export class Member {
  @PrimaryGeneratedColumn() id!: number;
  @EncryptionTenant() @Column() workspaceId!: string;
  @Column({ default: '' }) label!: string;
  @Encrypted({ searchable: { normalize: 'email' }, unique: true }) email!: string;
  @Encrypted({ searchable: { normalize: 'digits' }, nullable: true }) phone!: string | null;
  @Encrypted({ nullable: true }) note!: string | null;
}

export class Address {
  @Column({ default: '' }) street!: string;
  @Encrypted({ searchable: { normalize: 'lowercase' }, nullable: true }) city!: string | null;
}

/** An application without tenants: one index key for the keyring. */
@Entity('bidx_accounts')
export class Account {
  @PrimaryColumn('uuid') id!: string;
  @Column({ default: '' }) name!: string;
  @Encrypted({ searchable: { normalize: 'email' }, unique: true }) email!: string;
  /** The same values as `email` in most rows: its indexes must still differ (another column key). */
  @Encrypted({ searchable: { normalize: 'email' }, nullable: true }) recoveryEmail!: string | null;
  @Column(() => Address) address!: Address;
}

@Entity('bidx_invoices')
export class Invoice {
  @PrimaryGeneratedColumn() id!: number;
  @Column() total!: number;
  @ManyToOne(() => Account, { nullable: false }) account!: Account;
}

/** A normaliser that refuses some values (and quotes them in its error, which must not leak). */
export function strictCode(value: string): string {
  if (value.includes('!')) throw new Error(`cannot normalise ${value}`);
  return value.toUpperCase();
}

@Entity('bidx_vouchers')
export class Voucher {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ searchable: { normalize: strictCode } }) code!: string;
}

/** The migrations blind indexes need beside tenants. */
export const BLIND_INDEX_MIGRATIONS = [...TENANT_MIGRATIONS, TypeormEnvelopeIndexKeys1764600000000];

/** A table whose plaintext `email` column is being encrypted (backfill), searchable once encrypted. */
@Entity('bidx_legacy_customers')
export class LegacyCustomer {
  @PrimaryColumn('int') id!: number;
  @Encrypted({
    searchable: { normalize: 'email' },
    plaintextColumn: { name: 'email', type: 'varchar' },
    readPlaintextFallback: true,
  })
  email!: string;
}

/** Searchable properties in the compact layout: the index column sits beside the one value column. */
@Entity('bidx_compact_members')
export class CompactMember {
  @PrimaryGeneratedColumn() id!: number;
  @EncryptionTenant() @Column() workspaceId!: string;
  @Encrypted({ layout: 'compact', searchable: { normalize: 'email' }, unique: true }) email!: string;
  @Encrypted({ layout: 'compact', nullable: true }) note!: string | null;
}

/** The migrations of the compact layout's data-key table and of blind indexes, beside tenants. */
export const COMPACT_BLIND_INDEX_MIGRATIONS = [
  ...BLIND_INDEX_MIGRATIONS,
  TypeormEnvelopeDataKeys1764500000000,
];
