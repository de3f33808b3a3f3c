import { inspect } from 'node:util';
import type {
  DataSource,
  EntityMetadata,
  EntitySubscriberInterface,
  InsertEvent,
  QueryRunner,
  UpdateEvent,
} from 'typeorm';
import type { ColumnMetadata } from 'typeorm/metadata/ColumnMetadata';
import { type IndexPlace, indexInput } from '../crypto/blind-index';
import { ConfigError, UniqueViolationError, UnsupportedOperationError, withErrorContext } from '../errors';
import type { IndexKey, IndexKeys, ScopeIndexKeys } from '../keys/index-keys';
import type { KeyScope } from '../keys/key-scope';
import { type BlindIndexDefinition, blindIndexDefinition } from './blind-index-decorator';
import type { SqlIndexKeyStore } from './blind-index-store';
import type { EncryptedColumns } from './encrypted-columns';
import { tenantText } from './encryption-tenant';
import { PendingPlaintext } from './property-state';
import { setMapOf } from './query-guards';

/** What the blind indexes of one DataSource need from the library. */
export interface BlindIndexRuntime {
  dataSource: DataSource;
  indexKeys: IndexKeys;
  store: SqlIndexKeyStore;
  /** The key scope of a row's tenant (`null`: the application keyring's own). */
  scopeOf(tenant: string | null): KeyScope;
  /** The plaintext a value the library sealed stands for (a SET map holds the ciphertext). */
  plaintextOf(value: unknown): { value: unknown } | undefined;
}

/** One searchable property as installed in one entity's built metadata. */
export interface SearchableColumn {
  definition: BlindIndexDefinition;
  columns: EncryptedColumns;
  /** The `bytea` blind-index column. */
  index: ColumnMetadata;
  place: IndexPlace;
  placeId: string;
  runtime: BlindIndexRuntime;
  /** The unique index on `index`, if the property is unique. */
  uniqueIndexName?: string;
}

const byMetadata = new WeakMap<EntityMetadata, Map<string, SearchableColumn>>();
const byColumns = new WeakMap<EncryptedColumns, SearchableColumn>();

/** The searchable properties of an installed entity, by property path. */
export function searchableColumnsOf(
  metadata: EntityMetadata,
): ReadonlyMap<string, SearchableColumn> | undefined {
  return byMetadata.get(metadata);
}

/** The blind-index column of an encrypted property, if it is searchable. */
export function blindIndexColumnOf(columns: EncryptedColumns): ColumnMetadata | undefined {
  return byColumns.get(columns)?.index;
}

/** The searchable property behind `columns`, if it is one. */
export function searchableColumnOf(columns: EncryptedColumns): SearchableColumn | undefined {
  return byColumns.get(columns);
}

/** The values of the UPDATE whose SET list TypeORM is building: only then does a property's path name its index. */
const buildingUpdate: object[] = [];

/** Runs `fn` (TypeORM building the SET list of `values`) with searchable paths naming their index column. */
export function whileBuildingUpdate<T>(values: object | undefined, fn: () => T): T {
  buildingUpdate.push(values ?? {});
  try {
    return fn();
  } finally {
    buildingUpdate.pop();
  }
}

/** Index values this library computed: TypeORM copies them into the value sets it builds. */
const computed = new WeakSet<Buffer>();

/** Objects the query rewriter built: their index property holds a condition, not a value. */
export const whereCopies = new WeakSet<object>();

const PENDING_REFUSED =
  'the blind index of a searchable encrypted property was not computed before the write reached the ' +
  "database (the write bypassed the library's subscribers, or the index key left memory meanwhile); " +
  'nothing was written: retry the write';

/** Stands for an index not computed yet; refused if it ever reaches the driver. */
export const PENDING_INDEX = Object.freeze({
  toPostgres(): never {
    throw new UnsupportedOperationError(PENDING_REFUSED);
  },
  toJSON: () => '[pending blind index, refused]',
  [inspect.custom]: () => 'PendingBlindIndex',
});

/**
 * Installs the blind-index columns of an entity's searchable properties: each index column's
 * value is derived, whenever TypeORM reads it for a write, from the property's plaintext and the
 * row's tenant, under the scope's active index key, which the subscriber below has made sure is in
 * memory. Nothing is remembered on or beside the caller's objects (an index is a function of the
 * value, the place and the tenant), so copies, moves to another tenant and normalising
 * subscribers all get the index of what is actually written.
 */
export function installBlindIndexes(
  metadata: EntityMetadata,
  encrypted: readonly EncryptedColumns[],
  runtime: BlindIndexRuntime,
): SearchableColumn[] {
  const found: SearchableColumn[] = [];
  for (const columns of encrypted) {
    const definition = blindIndexDefinition(columns.main.target, columns.main.propertyName);
    if (!definition) continue;
    const context = { entity: metadata.name, column: columns.main.propertyPath };
    const index = metadata.columns.find(
      (c) => c.propertyName === definition.property && c.embeddedMetadata === columns.main.embeddedMetadata,
    );
    if (!index) throw new ConfigError('the blind-index column is missing', context);
    const clash = metadata.columns.find((c) => c !== index && c.databaseName === index.databaseName);
    if (clash) {
      throw new ConfigError(
        `column name "${index.databaseName}" is used twice (by the blind index of ${columns.main.propertyPath} and ` +
          `${clash.propertyPath}); give one of them another name (columnNames.blindIndex)`,
        context,
      );
    }
    const unique = metadata.indices.find(
      (i) => i.isUnique && i.columns.length === 1 && i.columns[0] === index,
    );
    const searchable: SearchableColumn = {
      definition,
      columns,
      index,
      place: {
        schema: schemaOf(metadata),
        table: metadata.tableName,
        column: index.databaseName,
      },
      placeId: `${schemaOf(metadata)}\0${metadata.tableName}\0${index.databaseName}`,
      runtime,
      ...(unique?.name ? { uniqueIndexName: unique.name } : {}),
    };
    overrideIndexAccess(searchable);
    byColumns.set(columns, searchable);
    found.push(searchable);
  }
  if (!found.length) return found;
  byMetadata.set(metadata, new Map(found.map((s) => [s.columns.main.propertyPath, s])));
  /* An update's SET map names the property: its index column is written with it. */
  const byPath = new Map(found.map((s) => [s.columns.main.propertyPath, s]));
  const previous = metadata.findColumnsWithPropertyPath.bind(metadata);
  metadata.findColumnsWithPropertyPath = (propertyPath: string) => {
    const columns = previous(propertyPath);
    const values = buildingUpdate[buildingUpdate.length - 1];
    const searchable = values ? byPath.get(propertyPath) : undefined;
    /*
     * A query-builder update names the tenant of a tenant entity (the encryption subscriber requires
     * it): the index is computed for it. The value set TypeORM builds for a save names the index
     * column itself when its value changed, and no tenant unless the row moves: nothing to add then.
     */
    if (!searchable || !values || rowTenant(searchable.columns, values) === undefined) return columns;
    return columns.includes(searchable.index) ? columns : [...columns, searchable.index];
  };
  return found;
}

/** Tenants fixed by a save for objects that do not say (a partial entity saved over its row). */
const fallbackTenants = new WeakMap<object, string | null>();

function overrideIndexAccess(searchable: SearchableColumn): void {
  const { columns, definition } = searchable;
  const property = columns.definition.propertyName;
  searchable.index.getEntityValue = (entity: object) => {
    if (entity === null || entity === undefined) return entity;
    const holder = columns.holderOf(entity, false);
    if (!holder) return undefined;
    if (whereCopies.has(holder)) return holder[definition.property];
    /* A value set TypeORM built from its diff carries the index computed for the entity. */
    const carried = holder[definition.property];
    if (Buffer.isBuffer(carried) && computed.has(carried)) return carried;
    let value = holder[property];
    if (value === undefined || value === null) return value;
    const origin = searchable.runtime.plaintextOf(value);
    if (origin) value = origin.value;
    else if (value instanceof PendingPlaintext) value = value.value;
    if (value === null || value === undefined) return value;
    const tenant = rowTenant(columns, entity);
    if (tenant === undefined) return PENDING_INDEX;
    try {
      return writeIndex(searchable, tenant, value, holder) ?? PENDING_INDEX;
    } catch {
      /* TypeORM also reads columns where nothing is written (create(), merge()); a value its
         normaliser refuses is refused before any write, by the subscriber (below). */
      return PENDING_INDEX;
    }
  };
  /* Reads never select the column (select: false); a value read anyway is not kept. */
  searchable.index.setEntityValue = () => undefined;
  searchable.index.transformer = undefined;
}

/** The row's tenant as the entity (or the save it is part of) gives it; `undefined` when unknown. */
function rowTenant(columns: EncryptedColumns, entity: object): string | null | undefined {
  const column = columns.tenant;
  if (!column) return null;
  const given = tenantText(column, column.getEntityValue(entity));
  if (given !== undefined) return given;
  return fallbackTenants.get(entity);
}

interface Memo {
  value: unknown;
  key: IndexKey;
  scope: KeyScope;
  index: Buffer;
}

/** The last index computed for each (object, property): TypeORM reads a column several times per write. */
const memos = new WeakMap<object, Map<SearchableColumn, Memo>>();

/**
 * The index `value` is written with, in the row's scope, under its active index key; `undefined`
 * when that key is not in memory (the subscriber loads it before every write).
 */
export function writeIndex(
  searchable: SearchableColumn,
  tenant: string | null,
  value: unknown,
  holder?: object,
): Buffer | undefined {
  const scope = searchable.runtime.scopeOf(tenant);
  const key = searchable.runtime.indexKeys.peek(scope)?.write;
  if (!key) return undefined;
  /* Only primitives are remembered: an object value may change inside without a new identity. */
  const memoized = holder !== undefined && typeof value !== 'object';
  const memo = memoized ? memos.get(holder)?.get(searchable) : undefined;
  if (memo && memo.key === key && memo.scope === scope && Object.is(memo.value, value) && !key.destroyed) {
    return memo.index;
  }
  const index = key.index(searchable.place, searchable.placeId, inputOf(searchable, value, tenant));
  computed.add(index);
  if (memoized) {
    let forHolder = memos.get(holder);
    if (!forHolder) {
      forHolder = new Map();
      memos.set(holder, forHolder);
    }
    forHolder.set(searchable, { value, key, scope, index });
  }
  return index;
}

/** The bytes indexed for `value`: normalised and encoded, errors naming the property and tenant. */
export function inputOf(
  searchable: SearchableColumn,
  value: unknown,
  tenant: string | null | undefined,
): Buffer {
  try {
    return indexInput(value, searchable.columns.definition.type, searchable.definition.normalize);
  } catch (error) {
    throw withErrorContext(error, {
      entity: searchable.columns.entity.name,
      column: searchable.columns.main.propertyPath,
      ...(typeof tenant === 'string' ? { tenant } : {}),
    });
  }
}

/** The scope's keys in memory, loading them (and, for writes, creating the first) when needed. */
export function scopeKeys(
  searchable: SearchableColumn,
  scope: KeyScope,
  forWrite: boolean,
  runner: QueryRunner | undefined,
): ScopeIndexKeys | Promise<ScopeIndexKeys> {
  const { indexKeys, store } = searchable.runtime;
  const known = indexKeys.peek(scope);
  if (known && (known.write || !forWrite)) return known;
  return indexKeys.load(scope, store.on(runner), forWrite);
}

/**
 * Before every write that names a searchable property, makes sure the row's scope has an index
 * key in memory (creating the scope's first one if it has none), so the index column can be
 * computed when TypeORM builds the statement. Costs nothing while the key is in memory.
 */
export class BlindIndexSubscriber implements EntitySubscriberInterface {
  beforeInsert(event: InsertEvent<object>): Promise<void> | undefined {
    return event.entity ? prepare(event.metadata, event.entity, undefined, event.queryRunner) : undefined;
  }

  beforeUpdate(event: UpdateEvent<object>): Promise<void> | undefined {
    const entity = event.entity as object | undefined;
    return entity ? prepare(event.metadata, entity, event.databaseEntity, event.queryRunner) : undefined;
  }
}

function prepare(
  metadata: EntityMetadata,
  entity: object,
  databaseEntity: object | undefined,
  runner: QueryRunner,
): Promise<void> | undefined {
  const searchable = byMetadata.get(metadata);
  if (!searchable) return undefined;
  let pending: Promise<unknown>[] | undefined;
  for (const column of searchable.values()) {
    const value = column.columns.holderOf(entity, false)?.[column.columns.definition.propertyName];
    if (value === undefined || value === null) continue;
    let tenant = rowTenant(column.columns, entity);
    if (tenant === undefined && databaseEntity && column.columns.tenant) {
      /* A partial entity saved over its row keeps the row's tenant (as its values do). */
      tenant = tenantText(column.columns.tenant, column.columns.tenant.getEntityValue(databaseEntity));
      if (tenant !== undefined) fallbackTenants.set(entity, tenant);
    }
    if (tenant === undefined) continue; // the encryption subscriber refuses the write
    const context = {
      entity: metadata.name,
      column: column.columns.main.propertyPath,
      ...(tenant === null ? {} : { tenant }),
    };
    /* A value its normaliser refuses fails the write here, with a typed error, before any statement. */
    inputOf(column, column.runtime.plaintextOf(value)?.value ?? value, tenant);
    const keys = scopeKeys(column, column.runtime.scopeOf(tenant), true, runner);
    /* A save over a row: the row itself is no duplicate of its own value. A query-builder update
       (a SET map) names no row: only the unique index checks it. */
    const check = column.definition.unique && !setMapOf(entity);
    const self = databaseEntity ?? entity;
    if (keys instanceof Promise) {
      pending ??= [];
      pending.push(
        keys
          .then((loaded) =>
            check ? refuseOlderDuplicate(column, loaded, value, tenant, self, runner) : undefined,
          )
          .catch((error: unknown) => Promise.reject(withErrorContext(error, context))),
      );
    } else if (check && keys.query.length > 1) {
      pending ??= [];
      pending.push(refuseOlderDuplicate(column, keys, value, tenant, self, runner));
    }
  }
  return pending ? Promise.all(pending).then(() => undefined) : undefined;
}

/**
 * While an index key is rotated, a unique property's rows are indexed under two keys, which the
 * unique index cannot compare: a value another row holds under the previous key is looked for
 * (in the write's own transaction) and refused. Concurrent writers of the same value that both
 * look before either commits can still meet under the two keys: the rotation then reports that
 * duplicate and keeps the previous key until it is resolved.
 */
async function refuseOlderDuplicate(
  column: SearchableColumn,
  keys: ScopeIndexKeys,
  value: unknown,
  tenant: string | null,
  self: object | undefined,
  runner: QueryRunner,
): Promise<void> {
  if (!column.definition.unique) return;
  const older = keys.query.filter((key) => key !== keys.write);
  if (older.length === 0) return;
  const plaintext = column.runtime.plaintextOf(value)?.value ?? value;
  const input = inputOf(column, plaintext, tenant);
  const indexes = older.map((key) => key.index(column.place, column.placeId, input));
  const metadata = column.columns.entity;
  const driver = metadata.connection.driver;
  const table = metadata.tablePath
    .split('.')
    .map((part) => driver.escape(part))
    .join('.');
  const keyColumns = metadata.primaryColumns;
  const own = self ? keyColumns.map((c) => c.getEntityValue(self)) : [];
  const excludeSelf =
    self && own.every((v) => v !== undefined && v !== null)
      ? ` AND (${keyColumns.map((c) => driver.escape(c.databaseName)).join(', ')}) IS DISTINCT FROM (${own.map((_, i) => `$${i + 2}`).join(', ')})`
      : '';
  const found = (await runner.query(
    `SELECT 1 FROM ${table} WHERE ${driver.escape(column.index.databaseName)} = ANY($1)${excludeSelf} LIMIT 1`,
    [indexes, ...(excludeSelf ? own : [])],
  )) as unknown[];
  if (found.length > 0) {
    throw new UniqueViolationError(
      'another row already holds this value of a unique encrypted property; nothing was written',
      {
        entity: metadata.name,
        column: column.columns.main.propertyPath,
        ...(tenant === null ? {} : { tenant }),
      },
    );
  }
}

function schemaOf(metadata: EntityMetadata): string {
  const driver = metadata.connection.driver as { schema?: string };
  return metadata.schema || driver.schema || 'public';
}
