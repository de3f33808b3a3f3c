import 'reflect-metadata';
import { Column, Entity, PrimaryGeneratedColumn } from 'typeorm';
import { Encrypted, EncryptionTenant } from '../../src';

/** A contact of one workspace (the SaaS's tenant): its encrypted properties are sealed under that workspace's key. */
@Entity('contact')
export class Contact {
  @PrimaryGeneratedColumn() id!: number;

  /** The tenant: an ordinary column, bound into every value and wrapped data key of the row. */
  @EncryptionTenant() @Column({ type: 'varchar' }) workspaceId!: string;

  /** Stored as email_ciphertext / email_iv / email_wrapped_key / email_key_version. */
  @Encrypted() email!: string;

  @Encrypted({ type: 'json', nullable: true }) profile!: { phone: string } | null;
}
