import type { EntityMetadata } from 'typeorm';
import type { ValueBinding } from '../crypto/associated-data';
import type { EncryptedColumns } from './encrypted-columns';

/**
 * The place a value is bound to: schema, table, the property's path and, when given, the row's
 * primary key. The schema is PostgreSQL's (`public` unless the entity or the DataSource names
 * another), so that a row copied between two schemas with the same table does not decrypt there.
 * Two databases are told apart by their keys or `keyringId`, not by the binding.
 */
export function valueBinding(
  metadata: EntityMetadata,
  column: EncryptedColumns,
  primaryKey: string | undefined,
): ValueBinding {
  const path = column.main.propertyPath;
  const former = column.definition.formerNames;
  const prefix = path.slice(0, path.length - column.definition.propertyName.length);
  return {
    table: metadata.tableName,
    schema: metadata.schema || 'public',
    column: path,
    primaryKey,
    ...(former.length ? { formerColumns: former.map((name) => prefix + name) } : {}),
  };
}
