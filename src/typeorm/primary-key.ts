import type { EntityMetadata } from 'typeorm';

/** The primary key as text (`42`, or JSON of the columns for a composite key), when fully set. */
export function primaryKeyOf(metadata: EntityMetadata, entity: object): string | undefined {
  return primaryKeyText(
    metadata,
    metadata.primaryColumns.map((c) => c.getEntityValue(entity)),
  );
}

/**
 * The same text from a raw row read with SQL (keyed by database column name), so that tools
 * working below TypeORM bind values exactly as the entity integration does.
 */
export function primaryKeyOfRow(metadata: EntityMetadata, row: Record<string, unknown>): string | undefined {
  return primaryKeyText(
    metadata,
    metadata.primaryColumns.map((c) => row[c.databaseName]),
  );
}

function primaryKeyText(metadata: EntityMetadata, values: unknown[]): string | undefined {
  if (values.length === 0 || values.some((v) => v === undefined || v === null)) return undefined;
  if (values.length === 1) return keyText(values[0]);
  return JSON.stringify(
    Object.fromEntries(metadata.primaryColumns.map((c, i) => [c.propertyPath, keyText(values[i])])),
  );
}

function keyText(value: unknown): string {
  return value instanceof Date ? value.toISOString() : String(value);
}
