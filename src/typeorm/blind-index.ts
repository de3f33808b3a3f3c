import type { DataSource, EntityMetadata, EntityTarget, ObjectLiteral } from 'typeorm';
import { ConfigError } from '../errors';
import type { IndexKeys } from '../keys/index-keys';
import type { KeyScope } from '../keys/key-scope';
import {
  type BlindIndexRuntime,
  BlindIndexSubscriber,
  installBlindIndexes,
  searchableColumnsOf,
} from './blind-index-columns';
import { indexParameter, installQueryRewriting, registerUniqueIndex } from './blind-index-query';
import { SqlIndexKeyStore } from './blind-index-store';
import type { EncryptedColumns } from './encrypted-columns';
import { tenantText } from './encryption-tenant';

/** What attaching blind indexes to a DataSource needs from the library. */
export interface BlindIndexAttachment {
  indexKeys: IndexKeys;
  keyringId: string;
  scopeOf(tenant: string | null): KeyScope;
  plaintextOf(value: unknown): { value: unknown } | undefined;
}

const runtimes = new WeakMap<DataSource, BlindIndexRuntime>();
const subscribers = new WeakMap<DataSource, BlindIndexSubscriber>();

/**
 * Installs the blind indexes of every searchable property of `dataSource`'s entities (whose
 * encrypted columns are `installed`), the query rewriting, and the subscriber that loads index
 * keys before writes. Called each time the DataSource builds its metadata.
 */
export function attachBlindIndexes(
  dataSource: DataSource,
  installed: ReadonlyMap<EntityMetadata, readonly EncryptedColumns[]>,
  attachment: BlindIndexAttachment,
): void {
  let runtime = runtimes.get(dataSource);
  if (!runtime) {
    runtime = {
      dataSource,
      indexKeys: attachment.indexKeys,
      store: new SqlIndexKeyStore(dataSource, attachment.keyringId),
      scopeOf: attachment.scopeOf,
      plaintextOf: attachment.plaintextOf,
    };
    runtimes.set(dataSource, runtime);
  }
  let any = false;
  for (const [metadata, columns] of installed) {
    for (const searchable of installBlindIndexes(metadata, columns, runtime)) {
      registerUniqueIndex(searchable);
      any = true;
    }
  }
  if (!any) return;
  installQueryRewriting();
  let subscriber = subscribers.get(dataSource);
  if (!subscriber) {
    subscriber = new BlindIndexSubscriber();
    subscribers.set(dataSource, subscriber);
  }
  /* First among the subscribers: it only loads keys, and must not make the encryption subscriber
     wait for subscribers registered after it (it waits one microtask for those). */
  if (!dataSource.subscribers.includes(subscriber)) dataSource.subscribers.unshift(subscriber);
}

/** Options of {@link EnvelopeEncryption.blindIndex}. */
export interface BlindIndexHelperOptions {
  /** The row's tenant, for an entity with an `@EncryptionTenant()` column (required there). */
  tenant?: string | number | null;
  /** The DataSource the entity belongs to. Default: the first one attached. */
  dataSource?: DataSource;
}

/**
 * The blind indexes that match `value` in `property` of `entity` (one per index key queries
 * match: one, two during an index-key rotation), for query-builder conditions written as strings:
 * `.andWhere('c.email_bidx = ANY(:emails)', { emails })`.
 */
export async function blindIndexesOf(
  dataSource: DataSource,
  entity: EntityTarget<ObjectLiteral>,
  property: string,
  value: unknown,
  options: BlindIndexHelperOptions = {},
): Promise<Buffer[]> {
  if (!dataSource.isInitialized) throw new ConfigError('blindIndex() needs an initialized DataSource');
  const metadata = dataSource.getMetadata(entity);
  const column = searchableColumnsOf(metadata)?.get(property);
  if (!column) {
    throw new ConfigError('this property is not searchable (@Encrypted({ searchable: true }))', {
      entity: metadata.name,
      column: property,
    });
  }
  if (value === null || value === undefined) {
    throw new ConfigError('a null value has no blind index: use IS NULL on the ciphertext column', {
      entity: metadata.name,
      column: property,
    });
  }
  const tenantColumn = column.columns.tenant;
  let tenant: string | null = null;
  if (tenantColumn) {
    const given = options.tenant === undefined ? undefined : tenantText(tenantColumn, options.tenant);
    if (given === undefined) {
      throw new ConfigError(
        `this entity's rows belong to tenants: give the tenant (blindIndex(…, { tenant })) whose ${tenantColumn.propertyPath} the query fixes`,
        { entity: metadata.name, column: property },
      );
    }
    tenant = given;
  }
  const parameter = indexParameter(column, column.runtime.scopeOf(tenant), [value], tenant);
  await parameter.resolve(undefined);
  return parameter.toPostgres();
}
