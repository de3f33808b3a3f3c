import {
  type EntityMetadata,
  InsertQueryBuilder,
  type ObjectLiteral,
  SelectQueryBuilder,
  UpdateQueryBuilder,
} from 'typeorm';
import { UnsupportedOperationError } from '../errors';
import type { EncryptedColumns } from './encrypted-columns';
import { SIDECAR_ROLES } from './encrypted-decorator';
import { primaryKeyOf } from './primary-key';

/**
 * Query-builder steps that decide what reaches an encrypted column before any subscriber event
 * can see it: an update's SET map, an upsert's ON CONFLICT column list, an ORDER BY. They are
 * adjusted or refused here, for entities this library installed, and left alone for all others.
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
}

const setMaps = new WeakMap<object, SetMap>();
const singleRowWheres = new WeakMap<object, { where: unknown; id: unknown }>();

/** The library's own copy of an update's SET map, if `entity` is one. */
export function setMapOf(entity: object): SetMap | undefined {
  return setMaps.get(entity);
}

interface ExpressionMap {
  mainAlias?: { hasMetadata: boolean; metadata: EntityMetadata };
  wheres: Array<{ type: string }>;
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
  guardOrdering();
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
    });
    return set.call(this, copy);
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
    }
    return getQuery.call(this);
  };
}

function completed(names: readonly string[], columns: readonly EncryptedColumns[]): string[] {
  const result = [...names];
  for (const column of columns) {
    const group = [
      column.main,
      ...SIDECAR_ROLES.map((role) => column.sidecars[role]),
      ...(column.plaintext ? [column.plaintext] : []),
    ].map((c) => c.databaseName);
    if (!group.some((name) => result.includes(name))) continue;
    for (const name of group) if (!result.includes(name)) result.push(name);
  }
  return result;
}

/** Ciphertexts sort by random bytes: an ORDER BY an encrypted property is refused, not obeyed. */
function guardOrdering(): void {
  const proto = SelectQueryBuilder.prototype as unknown as Record<string, (...args: unknown[]) => unknown>;
  for (const method of ['orderBy', 'addOrderBy'] as const) {
    const original = proto[method] as (this: unknown, ...args: unknown[]) => unknown;
    proto[method] = function (this: unknown, ...args: unknown[]) {
      const [sort] = args;
      const keys =
        typeof sort === 'string' ? [sort] : sort && typeof sort === 'object' ? Object.keys(sort) : [];
      for (const key of keys) refuseEncryptedSort(this, key);
      return original.apply(this, args);
    };
  }
}

function refuseEncryptedSort(builder: unknown, key: string): void {
  const dot = key.indexOf('.');
  if (dot < 0) return;
  const aliasName = key.slice(0, dot);
  const path = key.slice(dot + 1);
  const aliases = (
    builder as {
      expressionMap: { aliases: Array<{ name: string; hasMetadata: boolean; metadata: EntityMetadata }> };
    }
  ).expressionMap.aliases;
  const alias = aliases.find((a) => a.name === aliasName);
  if (!alias?.hasMetadata) return;
  const column = installed.get(alias.metadata)?.find((c) => c.main.propertyPath === path);
  if (!column) return;
  throw new UnsupportedOperationError(
    'results cannot be ordered by an encrypted property (the database would sort random ciphertext); ' +
      'sort in the application after loading',
    { entity: alias.metadata.name, column: path },
  );
}
