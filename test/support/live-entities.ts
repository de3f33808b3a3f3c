import { Column, Entity, PrimaryGeneratedColumn } from 'typeorm';
import { Encrypted } from '../../src';

/**
 * The tables the tests of jobs beside live application writes run on: one encrypted property,
 * `secret`, and one plain column, `n`, that the application can write on its own.
 */
@Entity('live_secrets')
export class LiveSecret {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted() secret!: string;
  @Column({ type: 'int' }) n!: number;
}

/** A table whose plaintext `secret` column is being encrypted (created by SQL, as it was before). */
@Entity('live_plain')
export class LivePlain {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ plaintextColumn: { name: 'secret', type: 'varchar' }, readPlaintextFallback: true })
  secret!: string;
  @Column({ type: 'int' }) n!: number;
}

/** `live_secrets` moving from the four sidecars to the compact layout. */
@Entity('live_secrets')
export class LayoutMigrating {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ layout: 'compact', migrateFrom: 'sidecars' }) secret!: string;
  @Column({ type: 'int' }) n!: number;
}
