/**
 * Associated data binds each ciphertext to where it belongs, so a ciphertext copied to another
 * table, column or row fails to decrypt. It never includes the wrapped key or the key version,
 * so re-wrapping a data key under a new master key leaves every ciphertext valid.
 */

/** Where a value is stored. */
export interface ValueBinding {
  /** Table (or any stable name for the value's container). */
  table: string;
  /**
   * The schema (or any namespace) holding `table`. When given, new values are bound to it too and
   * a header flag records so; values sealed without it are read as bound to `table` alone.
   */
  schema?: string;
  /** The value's name within its table (the TypeORM integration uses the property path). */
  column: string;
  /**
   * Names `column` had before a rename. A value that does not authenticate under `column` is
   * tried under each of these when it is opened; new values are always sealed under `column`.
   */
  formerColumns?: readonly string[];
  /**
   * The row's primary key as text, when known before the value is written. A value sealed without
   * it is bound to table and column only; a flag in the ciphertext header records which.
   */
  primaryKey?: string;
  /**
   * The tenant the row belongs to (the entity's `@EncryptionTenant()` property, as text). When
   * given, the value is bound to it and a header flag records so: a value copied into a row of
   * another tenant does not decrypt there.
   */
  tenant?: string;
}

/** Ciphertext format version, first byte of the stored ciphertext. */
export const FORMAT_V1 = 1;
/** Header flag: the primary key is part of the associated data. */
export const FLAG_PRIMARY_KEY_BOUND = 0x01;
/** Header flag: the schema is part of the associated data. */
export const FLAG_SCHEMA_BOUND = 0x02;
/** Header flag: the tenant is part of the associated data. */
export const FLAG_TENANT_BOUND = 0x04;
export const HEADER_BYTES = 2;

const MAX_TABLES = 10_000;
const UNBOUND_KEY = lengthPrefixed('');

/**
 * Builds the associated data; the header is included so that flipping a flag is detected. The
 * part that depends only on header, table and column is built once and reused (read-only).
 */
export function associatedData(header: Uint8Array, binding: ValueBinding): Buffer {
  const flags = header[1] ?? 0;
  const cached = cachedPrefix(header, binding, ((header[0] ?? 0) << 8) | flags);
  /* Without a tenant to open it under, a tenant-bound value simply fails authentication. */
  const tenant = (flags & FLAG_TENANT_BOUND) === 0 ? undefined : lengthPrefixed(binding.tenant ?? '');
  if ((flags & FLAG_PRIMARY_KEY_BOUND) === 0) {
    return tenant ? Buffer.concat([cached.prefix, tenant, UNBOUND_KEY]) : cached.unbound;
  }
  const key = lengthPrefixed(binding.primaryKey ?? '');
  return Buffer.concat(tenant ? [cached.prefix, tenant, key] : [cached.prefix, key]);
}

type ByTable = Map<string, Map<string, Map<number, { prefix: Buffer; unbound: Buffer }>>>;
/** Values bound to a table only (header flag 0x02 unset), by table. */
const unschemed: ByTable = new Map();
/** Values bound to schema and table, by schema then table (no key string built per value). */
const bySchema = new Map<string, ByTable>();

type Prefixes = { prefix: Buffer; unbound: Buffer };
/**
 * The same, by binding object, for frozen bindings (the TypeORM integration freezes one per column):
 * one lookup per value instead of one per name. A frozen binding's names cannot change.
 */
const byFrozenBinding = new WeakMap<ValueBinding, Map<number, Prefixes>>();

function cachedPrefix(header: Uint8Array, binding: ValueBinding, headerKey: number): Prefixes {
  if (!Object.isFrozen(binding)) return prefixByNames(header, binding, headerKey);
  let byHeader = byFrozenBinding.get(binding);
  if (!byHeader) {
    byHeader = new Map();
    byFrozenBinding.set(binding, byHeader);
  }
  let cached = byHeader.get(headerKey);
  if (!cached) {
    cached = prefixByNames(header, binding, headerKey);
    byHeader.set(headerKey, cached);
  }
  return cached;
}

function prefixByNames(header: Uint8Array, binding: ValueBinding, headerKey: number): Prefixes {
  const schemaBound = ((header[1] ?? 0) & FLAG_SCHEMA_BOUND) !== 0;
  /* Without a schema to open it under, a schema-bound value simply fails authentication. */
  const schema = binding.schema ?? '';
  let byTable = unschemed;
  if (schemaBound) {
    byTable = bySchema.get(schema) as ByTable;
    if (!byTable) {
      if (bySchema.size >= MAX_TABLES) bySchema.clear();
      byTable = new Map();
      bySchema.set(schema, byTable);
    }
  }
  let byColumn = byTable.get(binding.table);
  if (!byColumn) {
    if (byTable.size >= MAX_TABLES) byTable.clear();
    byColumn = new Map();
    byTable.set(binding.table, byColumn);
  }
  let byHeader = byColumn.get(binding.column);
  if (!byHeader) {
    byHeader = new Map();
    byColumn.set(binding.column, byHeader);
  }
  let cached = byHeader.get(headerKey);
  if (!cached) {
    const prefix = Buffer.concat([
      Buffer.from('typeorm-envelope', 'latin1'),
      header.subarray(0, HEADER_BYTES),
      lengthPrefixed(binding.table),
      ...(schemaBound ? [lengthPrefixed(schema)] : []),
      lengthPrefixed(binding.column),
    ]);
    cached = { prefix, unbound: Buffer.concat([prefix, UNBOUND_KEY]) };
    byHeader.set(headerKey, cached);
  }
  return cached;
}

/** Length-prefixing keeps ("ab","c") and ("a","bc") distinct. */
function lengthPrefixed(text: string): Buffer {
  const bytes = Buffer.from(text, 'utf8');
  const length = Buffer.allocUnsafe(4);
  length.writeUInt32BE(bytes.length);
  return Buffer.concat([length, bytes]);
}
