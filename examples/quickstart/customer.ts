import 'reflect-metadata';
import { Column, Entity, PrimaryGeneratedColumn } from 'typeorm';
import { Encrypted } from '../../src';

export interface Address {
  street: string;
  city: string;
}

@Entity()
export class Customer {
  @PrimaryGeneratedColumn() id!: number;

  /** Stored as email_ciphertext / email_iv / email_wrapped_key / email_key_version. */
  @Encrypted({ mask: 'email' }) email!: string;

  /** Any JSON value; null is stored as four NULL columns. */
  @Encrypted({ type: 'json', nullable: true }) address!: Address | null;

  /** An ordinary column, stored and queried as usual. */
  @Column({ type: 'varchar' }) plan!: string;
}
