import type { EntityMetadata } from 'typeorm';
import type { ValueBinding } from '../crypto/associated-data';
import type { EncryptedColumns } from './encrypted-columns';

/**
 * The place a value is bound to: schema, table, the property's path and, when given, the row's
 * primary key. The schema is the one the table lives in (the entity's, else the DataSource's,
 * else the connection's `current_schema()`), so that a row copied between two schemas with the
 * same table does not decrypt there, and two DataSources reaching one table, one through its
 * `schema` option and one through `search_path`, bind alike. Two databases are told apart by
 * their keys or `keyringId`, not by the binding.
 */
export function valueBinding(
  metadata: EntityMetadata,
  column: EncryptedColumns,
  primaryKey: string | undefined,
  tenant?: string | null,
): ValueBinding {
  let place = places.get(column);
  if (!place) {
    const former = formerPaths(column);
    place = Object.freeze({
      table: metadata.tableName,
      schema: schemaOf(metadata),
      column: column.main.propertyPath,
      ...(former.length ? { formerColumns: former } : {}),
    });
    places.set(column, place);
  }
  if (tenant !== undefined && tenant !== null) {
    return primaryKey === undefined ? { ...place, tenant } : { ...place, primaryKey, tenant };
  }
  return primaryKey === undefined ? place : { ...place, primaryKey };
}

/** The unchanging part of each installed column's binding, built at its first use (after connect). */
const places = new WeakMap<EncryptedColumns, ValueBinding>();

/** The property paths a renamed property had (`renamedFrom`), inside the same embedded objects. */
export function formerPaths(column: EncryptedColumns): string[] {
  const path = column.main.propertyPath;
  const prefix = path.slice(0, path.length - column.definition.propertyName.length);
  return column.definition.formerNames.map((name) => prefix + name);
}

function schemaOf(metadata: EntityMetadata): string {
  /* TypeORM's postgres driver sets `schema` to the connection's current_schema() when none is given. */
  const driver = metadata.connection.driver as { schema?: string };
  return metadata.schema || driver.schema || 'public';
}
