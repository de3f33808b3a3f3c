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

/** The three customers both examples save. */
export const SAMPLE_CUSTOMERS: ReadonlyArray<Pick<Customer, 'email' | 'address' | 'plan'>> = [
  { email: 'alice@example.com', address: { street: '1 Main St', city: 'Springfield' }, plan: 'pro' },
  { email: 'bob@example.org', address: { street: '742 Evergreen Tce', city: 'Shelbyville' }, plan: 'free' },
  { email: 'carol@example.net', address: null, plan: 'team' },
];
