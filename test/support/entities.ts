import {
  Column,
  CreateDateColumn,
  DeleteDateColumn,
  Entity,
  ManyToOne,
  OneToMany,
  PrimaryColumn,
  PrimaryGeneratedColumn,
} from 'typeorm';
import { Encrypted } from '../../src';

export interface Address {
  street: string;
  city: string;
  tags?: string[];
}

/** Holds encrypted properties inside an embedded object. */
export class ContactDetails {
  @Encrypted({ nullable: true, mask: 'phone' }) phone!: string | null;
  @Column({ type: 'varchar', nullable: true }) preferredChannel!: string | null;
}

@Entity()
export class Customer {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ mask: 'email' }) email!: string;
  @Encrypted({ type: 'json', nullable: true }) address!: Address | null;
  @Column({ type: 'varchar' }) plan!: string;
  @Column(() => ContactDetails) contact!: ContactDetails;
  @OneToMany(
    () => Order,
    (order) => order.customer,
  )
  orders!: Order[];
  @DeleteDateColumn({ nullable: true }) deletedAt!: Date | null;
}

@Entity()
export class Order {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ mask: 'last4' }) cardNumber!: string;
  @ManyToOne(
    () => Customer,
    (customer) => customer.orders,
    { eager: true, nullable: false },
  )
  customer!: Customer;
}

/** Abstract parent: its encrypted property is inherited by every entity that extends it. */
export abstract class Person {
  @PrimaryColumn({ type: 'uuid' }) id!: string;
  @Encrypted() fullName!: string;
  @CreateDateColumn() createdAt!: Date;
}

/** Client-assigned primary key: values are bound to their row. */
@Entity()
export class Employee extends Person {
  @Encrypted({ nullable: true }) salary!: number | null;
  @Encrypted({ nullable: true }) birthDate!: Date | null;
  @Encrypted({ nullable: true }) active!: boolean | null;
  @Encrypted({ type: 'bigint', nullable: true }) badge!: bigint | null;
  @Encrypted({ nullable: true }) photo!: Buffer | null;
  @Column({ type: 'varchar' }) team!: string;
}
