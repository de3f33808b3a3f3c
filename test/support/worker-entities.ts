import { Column, Entity, PrimaryGeneratedColumn } from 'typeorm';
import { Encrypted } from '../../src';

/** A table the parallel-job tests split into primary-key ranges: two encrypted properties. */
@Entity('ledger_accounts')
export class LedgerAccount {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted() iban!: string;
  @Encrypted() holder!: string;
  @Column({ type: 'int' }) n!: number;
}
