import type { EntityMetadata } from 'typeorm';
import type { ColumnMetadata } from 'typeorm/metadata/ColumnMetadata';

/**
 * A value bound to its row is bound to the primary key as PostgreSQL will return it, so that a
 * key given in another form (an upper-case UUID, a `char(8)` key shorter than its column) still
 * reads back. Each kind below says how PostgreSQL prints a key of that type.
 */
type KeyForm = (value: unknown) => string;

const INTEGER_TYPES = new Set(['int', 'int2', 'int4', 'int8', 'integer', 'smallint', 'bigint']);
const TEXT_TYPES = new Set(['varchar', 'character varying', 'text', 'citext', 'enum', 'simple-enum']);
const CHAR_TYPES = new Set(['char', 'character', 'nchar']);

const asText: KeyForm = (value) => String(value);

const asInteger: KeyForm = (value) => {
  const text = String(value).trim();
  return /^[+-]?\d+$/.test(text) ? BigInt(text).toString() : text;
};

/** PostgreSQL accepts UUIDs with or without hyphens and braces, in any case; it prints one form. */
const asUuid: KeyForm = (value) => {
  const text = String(value);
  const hex = text.replace(/^\{|\}$/g, '').replace(/-/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) return text;
  const h = hex.toLowerCase();
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
};

/** `char(n)` values come back padded with spaces to `n` characters. */
const asChar =
  (length: number): KeyForm =>
  (value) =>
    String(value).replace(/ +$/, '').padEnd(length, ' ');

/**
 * How the database prints a primary-key column, or `undefined` when that cannot be known here
 * (numeric scales, floating point, dates and times, a transformer between entity and column).
 */
export function keyFormOf(column: ColumnMetadata): KeyForm | undefined {
  let form = forms.get(column);
  if (form === undefined) {
    form = findKeyForm(column) ?? null;
    forms.set(column, form);
  }
  return form ?? undefined;
}

/** Built metadata does not change once built: the form is found once per column. */
const forms = new WeakMap<ColumnMetadata, KeyForm | null>();

function findKeyForm(column: ColumnMetadata): KeyForm | undefined {
  if (column.transformer) return undefined;
  const type = String(column.entityMetadata.connection.driver.normalizeType(column)).toLowerCase();
  if (INTEGER_TYPES.has(type)) return asInteger;
  if (type === 'uuid') return asUuid;
  if (TEXT_TYPES.has(type)) return asText;
  if (CHAR_TYPES.has(type)) return asChar(Number(column.length) || 1);
  return undefined;
}

/** The primary-key columns whose printed form cannot be known, so values cannot be bound to them. */
export function unbindableKeyColumns(metadata: EntityMetadata): ColumnMetadata[] {
  return metadata.primaryColumns.filter((column) => keyFormOf(column) === undefined);
}

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
  const text = (i: number) => {
    const column = metadata.primaryColumns[i] as ColumnMetadata;
    const value = values[i];
    return (keyFormOf(column) ?? legacyText)(value);
  };
  if (values.length === 1) return text(0);
  return JSON.stringify(Object.fromEntries(metadata.primaryColumns.map((c, i) => [c.propertyPath, text(i)])));
}

/** Keys of other types are never bound (start-up refuses them); this only names them in errors. */
function legacyText(value: unknown): string {
  return value instanceof Date ? value.toISOString() : String(value);
}
