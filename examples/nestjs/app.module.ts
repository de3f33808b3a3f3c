import { type DynamicModule, Module } from '@nestjs/common';
import { TypeOrmModule } from '@nestjs/typeorm';
import { DataSource, type DataSourceOptions } from 'typeorm';
import { EnvelopeEncryption } from '../../src';
import { Customer } from '../quickstart/customer';
import { CustomersService } from './customers.service';
import { encryption } from './encryption';

/** The application module; `register()` takes what would come from configuration. */
@Module({})
// biome-ignore lint/complexity/noStaticOnlyClass: a NestJS dynamic module is a class with a static factory
export class AppModule {
  static register(options: { databaseUrl: string }): DynamicModule {
    return {
      module: AppModule,
      imports: [
        TypeOrmModule.forRootAsync({
          useFactory: (): DataSourceOptions => ({
            type: 'postgres',
            url: options.databaseUrl,
            entities: [Customer],
            // Creates the tables for the example; in production, use migrations.
            synchronize: true,
          }),
          // Nest builds the DataSource here: attach before initialize(), which also validates
          // the master keys, so the application does not start with a wrong key.
          dataSourceFactory: async (dataSourceOptions) => {
            const dataSource = new DataSource(dataSourceOptions as DataSourceOptions);
            encryption.attach(dataSource);
            return dataSource.initialize();
          },
        }),
        TypeOrmModule.forFeature([Customer]),
      ],
      providers: [CustomersService, { provide: EnvelopeEncryption, useValue: encryption }],
    };
  }
}
