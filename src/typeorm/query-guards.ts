import {
  type EntityMetadata,
  InsertQueryBuilder,
  type ObjectLiteral,
  QueryBuilder,
  SelectQueryBuilder,
  UpdateQueryBuilder,
} from 'typeorm';
import type { ColumnMetadata } from 'typeorm/metadata/ColumnMetadata';
import { UnsupportedOperationError } from '../errors';
import { blindIndexColumnOf, searchableColumnOf } from './blind-index-columns';
import { type EncryptedColumns, sidecarColumnsOf, storedColumnsOf } from './encrypted-columns';
import { primaryKeyOf } from './primary-key';

/**
 * Query-builder steps that decide what reaches an encrypted column before any subscriber event
 * can see it: an update's SET map, an upsert's ON CONFLICT column list, a SELECT's columns and
 * ORDER BY. They are adjusted or refused here, for entities this library installed, and left
 * alone for all others.
 */

/** The encrypted columns of each installed entity (built metadata), for the guards below. */
const installed = new WeakMap<EntityMetadata, readonly EncryptedColumns[]>();

/** Makes the guards apply to `metadata`. */
export function guardEntity(metadata: EntityMetadata, columns: readonly EncryptedColumns[]): void {
  installed.set(metadata, columns);
  installGuards();
}

/** A SET map the library copied from the caller's, and what the update it belongs to targets. */
interface SetMap {
  /** The primary key of the one row the update targets, when `whereInIds` named exactly one. */
  primaryKey(): string | undefined;
  /** Narrows the update to rows whose `column` holds `value` (the tenant its values are sealed for). */
  restrictTo(column: ColumnMetadata, value: unknown): void;
}

const setMaps = new WeakMap<object, SetMap>();
const singleRowWheres = new WeakMap<object, { where: unknown; id: unknown }>();

/** The library's own copy of an update's SET map, if `entity` is one. */
export function setMapOf(entity: object): SetMap | undefined {
  return setMaps.get(entity);
}

interface ExpressionMap {
  mainAlias?: { hasMetadata: boolean; metadata: EntityMetadata };
  wheres: Array<{ type: string; condition?: unknown }>;
  onUpdate?: { overwrite?: unknown; columns?: unknown };
}

const expressionMapOf = (builder: unknown) => (builder as { expressionMap: ExpressionMap }).expressionMap;

function columnsOf(map: ExpressionMap): readonly EncryptedColumns[] | undefined {
  const alias = map.mainAlias;
  return alias?.hasMetadata ? installed.get(alias.metadata) : undefined;
}

let guardsInstalled = false;

function installGuards(): void {
  if (guardsInstalled) return;
  guardsInstalled = true;
  guardSetMaps();
  guardUpsertColumns();
  guardSelects();
}

/**
 * TypeORM hands an update's SET map to `beforeUpdate` and then reads it again to build the
 * query. The subscriber must put sealed values where it reads them without changing the
 * caller's object, so the map is replaced by a copy (deep along embedded paths) of the library's
 * own, in which the subscriber replaces plaintext by ciphertext.
 */
function guardSetMaps(): void {
  const proto = UpdateQueryBuilder.prototype as unknown as Record<string, (...args: unknown[]) => unknown>;
  const set = proto.set as (this: unknown, values: unknown) => unknown;
  proto.set = function (this: unknown, values: unknown) {
    const map = expressionMapOf(this);
    const columns = columnsOf(map);
    if (!columns || !values || typeof values !== 'object') return set.call(this, values);
    const copy = copyAlongEncryptedPaths(values as ObjectLiteral, columns);
    const metadata = map.mainAlias?.metadata as EntityMetadata;
    setMaps.set(copy, {
      primaryKey: () => {
        const single = singleRowWheres.get(map);
        if (!single || map.wheres[0] !== single.where || map.wheres.some((w) => w.type === 'or')) {
          return undefined;
        }
        return primaryKeyOf(metadata, metadata.ensureEntityIdMap(single.id));
      },
      restrictTo: (column, value) => {
        const builder = this as { setParameter(name: string, value: unknown): unknown };
        const parameter = 'typeormEnvelopeTenant';
        builder.setParameter(parameter, value);
        const condition = `${metadata.connection.driver.escape(column.databaseName)} = :${parameter}`;
        /* The caller's conditions stay together in brackets, whatever their ANDs and ORs. */
        map.wheres = map.wheres.length
          ? [
              { type: 'simple', condition: map.wheres },
              { type: 'and', condition },
            ]
          : [{ type: 'simple', condition }];
      },
    });
    return set.call(this, copy);
  };
  /* `createQueryBuilder().update(Entity, values)` sets the map without calling `set()`. */
  const base = QueryBuilder.prototype as unknown as Record<string, (...args: unknown[]) => unknown>;
  const update = base.update as (this: unknown, ...args: unknown[]) => unknown;
  base.update = function (this: unknown, ...args: unknown[]) {
    const builder = update.apply(this, args) as { set(values: unknown): unknown };
    const values = args.length > 1 ? args[1] : undefined;
    if (values && typeof values === 'object') builder.set(values);
    return builder;
  };
  const whereInIds = proto.whereInIds as (this: unknown, ids: unknown) => unknown;
  proto.whereInIds = function (this: unknown, ids: unknown) {
    const result = whereInIds.call(this, ids);
    const map = expressionMapOf(this);
    const only = Array.isArray(ids) ? (ids.length === 1 ? ids[0] : undefined) : ids;
    if (only !== undefined && map.wheres.length === 1)
      singleRowWheres.set(map, { where: map.wheres[0], id: only });
    else singleRowWheres.delete(map);
    return result;
  };
}

function copyAlongEncryptedPaths(values: ObjectLiteral, columns: readonly EncryptedColumns[]): ObjectLiteral {
  const copy: ObjectLiteral = { ...values };
  for (const column of columns) {
    let source: ObjectLiteral | undefined = values;
    let target = copy;
    for (const embedded of column.main.embeddedMetadata?.embeddedMetadataTree ?? []) {
      const next: unknown = source?.[embedded.propertyName];
      if (!next || typeof next !== 'object') break;
      if (target[embedded.propertyName] === next) target[embedded.propertyName] = { ...next };
      source = next as ObjectLiteral;
      target = target[embedded.propertyName] as ObjectLiteral;
    }
  }
  return copy;
}

/**
 * An upsert's ON CONFLICT list names database columns. Naming some columns of an encrypted value
 * would update a ciphertext beside another value's IV and key: the list is completed with the
 * value's other columns.
 */
function guardUpsertColumns(): void {
  const proto = InsertQueryBuilder.prototype as unknown as Record<string, (...args: unknown[]) => unknown>;
  const getQuery = proto.getQuery as (this: unknown) => string;
  proto.getQuery = function (this: unknown) {
    const map = expressionMapOf(this);
    const columns = columnsOf(map);
    const onUpdate = map.onUpdate;
    if (columns && onUpdate) {
      if (Array.isArray(onUpdate.overwrite)) onUpdate.overwrite = completed(onUpdate.overwrite, columns);
      if (Array.isArray(onUpdate.columns)) onUpdate.columns = completed(onUpdate.columns, columns);
      refuseUpsertOfAnotherRow(map, columns);
      keepUpsertInItsTenant(this as UpsertBuilder, map, columns);
    }
    return getQuery.call(this);
  };
}

interface UpsertBuilder {
  alias: string;
  getMainTableName(): string;
  getTableName(name: string): string;
  escape(name: string): string;
}

/**
 * An upsert that writes the tenant column but not every encrypted property would, on a conflicting
 * row of another tenant, move that row to the inserted tenant while the values it does not write
 * stay bound to the old one: unreadable. Such an upsert updates only a row of the same tenant; a
 * conflicting row of another tenant is left as it is.
 */
function keepUpsertInItsTenant(
  builder: UpsertBuilder,
  map: ExpressionMap,
  columns: readonly EncryptedColumns[],
): void {
  const tenant = columns[0]?.tenant;
  const onUpdate = map.onUpdate as { overwrite?: unknown; columns?: unknown; overwriteCondition?: unknown[] };
  const written = [onUpdate.overwrite, onUpdate.columns].flatMap((list) =>
    Array.isArray(list) ? list.map(String) : [],
  );
  if (!tenant || !written.includes(tenant.databaseName)) return;
  if (columns.every((c) => written.includes(c.main.databaseName))) return;
  const main = builder.getMainTableName();
  const row = builder.alias !== main ? builder.escape(builder.alias) : builder.getTableName(main);
  const name = builder.escape(tenant.databaseName);
  const condition = `${row}.${name} IS NOT DISTINCT FROM EXCLUDED.${name}`;
  onUpdate.overwriteCondition ??= [];
  const conditions = onUpdate.overwriteCondition as Array<{ type: string; condition: unknown }>;
  if (conditions.some((c) => c.condition === condition)) return;
  conditions.push({ type: conditions.length ? 'and' : 'simple', condition });
}

/**
 * Values of a client-assigned key are bound to the key given in the INSERT. When the conflict is
 * found on another column (a natural key), the row that is updated has another primary key, or
 * gets the given one written over its own while its other values stay bound to the old one:
 * either way a row that cannot be read. Such an upsert is refused when it would write encrypted
 * values or a primary key.
 */
function refuseUpsertOfAnotherRow(map: ExpressionMap, columns: readonly EncryptedColumns[]): void {
  const metadata = map.mainAlias?.metadata as EntityMetadata;
  const onUpdate = map.onUpdate as {
    overwrite?: unknown;
    columns?: unknown;
    conflict?: unknown;
    conflict_target?: unknown;
  };
  const bound = columns.filter((c) => c.definition.bindPrimaryKey);
  if (!bound.length || metadata.primaryColumns.some((c) => c.isGenerated)) return;
  const names = (value: unknown) =>
    (Array.isArray(value) ? value : typeof value === 'string' ? [value] : []).map(String);
  const target = new Set(
    names(onUpdate.conflict ?? onUpdate.conflict_target).map((n) => n.replace(/"/g, '')),
  );
  const keyNames = metadata.primaryColumns.flatMap((c) => [c.databaseName, c.propertyPath]);
  const onKey =
    target.size === metadata.primaryColumns.length &&
    metadata.primaryColumns.every((c) => target.has(c.databaseName) || target.has(c.propertyPath));
  if (onKey) return;
  const written = new Set([...names(onUpdate.overwrite), ...names(onUpdate.columns)]);
  const encrypted = bound.flatMap((c) => [c.main, ...sidecarColumnsOf(c)]);
  if (!keyNames.some((n) => written.has(n)) && !encrypted.some((c) => written.has(c.databaseName))) return;
  const first = bound[0] as EncryptedColumns;
  throw new UnsupportedOperationError(
    'an upsert whose conflict target is not the primary key would update a row whose encrypted values are ' +
      'bound to another primary key; upsert on the primary key, or set bindPrimaryKey: false on the property',
    { entity: metadata.name, column: first.main.propertyPath },
  );
}

function completed(names: readonly string[], columns: readonly EncryptedColumns[]): string[] {
  const result = [...names];
  for (const column of columns) {
    const group = storedColumnsOf(column).map((c) => c.databaseName);
    if (!group.some((name) => result.includes(name))) continue;
    /* Values are sealed for the inserted row's tenant: an update that keeps the old tenant could not
       read them. The tenant column alone never brings in a value the upsert does not write. */
    if (column.tenant) group.push(column.tenant.databaseName);
    /* A value written without its blind index would be found under the value it replaced. */
    const index = blindIndexColumnOf(column);
    if (index) group.push(index.databaseName);
    for (const name of group) if (!result.includes(name)) result.push(name);
  }
  return result;
}

/**
 * Two adjustments to SELECTs, made when the query is built (by then every join of a `find` has its
 * alias): a selection naming an encrypted property also selects its sidecar columns, so a partial
 * `select` reads the four columns of each value in one statement, in the same snapshot (and from
 * the query result cache when it hits); an ORDER BY an encrypted property is refused, since
 * ciphertexts sort by random bytes.
 */
function guardSelects(): void {
  const proto = SelectQueryBuilder.prototype as unknown as Record<string, (...args: unknown[]) => unknown>;
  const getQuery = proto.getQuery as (this: unknown) => string;
  proto.getQuery = function (this: unknown) {
    const map = (this as { expressionMap: SelectExpressionMap }).expressionMap;
    completeSelections(map);
    for (const key of Object.keys(map.orderBys ?? {})) refuseEncryptedSort(map, key);
    return getQuery.call(this);
  };
}

interface SelectExpressionMap {
  aliases: Array<{ name: string; hasMetadata: boolean; metadata: EntityMetadata }>;
  selects: Array<{ selection: unknown; aliasName?: string }>;
  orderBys?: Record<string, unknown>;
}

/** The encrypted property a `alias.path` reference names, if any. */
function encryptedReference(map: SelectExpressionMap, reference: string) {
  const dot = reference.indexOf('.');
  if (dot < 0) return undefined;
  const alias = map.aliases.find((a) => a.name === reference.slice(0, dot));
  if (!alias?.hasMetadata) return undefined;
  const path = reference.slice(dot + 1);
  const column = installed.get(alias.metadata)?.find((c) => c.main.propertyPath === path);
  return column && { alias, column };
}

function completeSelections(map: SelectExpressionMap): void {
  for (const select of [...map.selects]) {
    if (typeof select.selection !== 'string' || select.aliasName) continue;
    const found = encryptedReference(map, select.selection);
    if (!found) continue;
    const { alias, column } = found;
    const others = [
      ...sidecarColumnsOf(column),
      ...(column.plaintext ? [column.plaintext] : []),
      ...(column.tenant ? [column.tenant] : []),
    ];
    for (const other of others) {
      const selection = `${alias.name}.${other.propertyPath}`;
      if (!map.selects.some((s) => s.selection === selection)) map.selects.push({ selection });
    }
  }
}

function refuseEncryptedSort(map: SelectExpressionMap, key: string): void {
  const found = encryptedReference(map, key);
  if (!found) return;
  throw new UnsupportedOperationError(
    searchableColumnOf(found.column)
      ? 'results cannot be ordered by a searchable encrypted property: its blind index keeps equality only, ' +
          'no order (a keyed hash), and its ciphertext would sort by random bytes; sort in the application after loading'
      : 'results cannot be ordered by an encrypted property (the database would sort random ciphertext); ' +
          'sort in the application after loading',
    { entity: found.alias.metadata.name, column: found.column.main.propertyPath },
  );
}
