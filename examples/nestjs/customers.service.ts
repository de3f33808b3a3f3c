import { Injectable } from '@nestjs/common';
import { InjectRepository } from '@nestjs/typeorm';
import type { Repository } from 'typeorm';
import { Customer } from '../quickstart/customer';

/** An ordinary NestJS service over an ordinary TypeORM repository: encryption is invisible here. */
@Injectable()
export class CustomersService {
  constructor(@InjectRepository(Customer) private readonly customers: Repository<Customer>) {}

  register(people: ReadonlyArray<Pick<Customer, 'email' | 'address' | 'plan'>>): Promise<Customer[]> {
    return this.customers.save(people.map((p) => this.customers.create(p)));
  }

  list(): Promise<Customer[]> {
    return this.customers.find({ order: { id: 'ASC' } });
  }

  async changeEmail(id: number, email: string): Promise<Customer> {
    const customer = await this.customers.findOneByOrFail({ id });
    customer.email = email;
    return this.customers.save(customer);
  }
}
