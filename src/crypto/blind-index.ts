import { createHmac, hkdfSync } from 'node:crypto';
import { ConfigError, ValueTypeError } from '../errors';
import { encodeValue, type ValueType, valueTypeOf } from './codec';

/**
 * Blind indexes: a keyed HMAC-SHA256 of a normalised value, stored beside its ciphertext, so the
 * database can find rows by equality without learning the value. The index key is never a data
 * key; each (table, column) gets a key of its own derived from it with HKDF, so equal values in
 * two columns, or under two index keys (two tenants), never give equal indexes.
 *
 * Stored form (34 bytes): the index-key version (unsigned 16-bit big-endian), then the full
 * 32-byte HMAC. The version lets a rotation of the index key tell rows it has recomputed from
 * rows it has not; the HMAC is not truncated, so a match is a match (no false positives to filter)
 * and the index can carry a unique constraint.
 */

/** Normalisers built in: `'email'` trims and lower-cases, `'digits'` keeps the ASCII digits only. */
export type BuiltInNormalizer = 'lowercase' | 'trim' | 'email' | 'digits';

/** How a searchable string is normalised before it is indexed: a built-in name or a function. */
export type Normalizer = BuiltInNormalizer | ((value: string) => string);

/** Bytes of the index-key version at the start of a stored index. */
export const INDEX_VERSION_BYTES = 2;
/** Bytes of a stored index: version and HMAC-SHA256. */
export const BLIND_INDEX_BYTES = INDEX_VERSION_BYTES + 32;
/** The highest index-key version a stored index can name. */
export const MAX_INDEX_KEY_VERSION = 0xffff;

/** Value types a blind index can be built for: those with one canonical encoding (not `json`). */
const INDEXABLE: ReadonlySet<ValueType> = new Set([
  'string',
  'number',
  'bigint',
  'boolean',
  'date',
  'buffer',
  'uint8array',
]);

const BUILT_IN: Record<BuiltInNormalizer, (value: string) => string> = {
  lowercase: (value) => value.toLowerCase(),
  trim: (value) => value.trim(),
  email: (value) => value.trim().toLowerCase(),
  digits: (value) => value.replace(/[^0-9]/g, ''),
};

/** The function of a normaliser option; an unknown name is a `ConfigError`. */
export function normalizerFunction(
  normalizer: Normalizer | undefined,
): ((value: string) => string) | undefined {
  if (normalizer === undefined) return undefined;
  if (typeof normalizer === 'function') return normalizer;
  const builtIn = Object.hasOwn(BUILT_IN, normalizer) ? BUILT_IN[normalizer] : undefined;
  if (!builtIn) {
    throw new ConfigError(
      `unknown normaliser ${JSON.stringify(String(normalizer))}; use 'lowercase', 'trim', 'email', 'digits' or a function`,
    );
  }
  return builtIn;
}

/** Refuses value types a blind index cannot be built for. */
export function checkIndexableType(type: ValueType | undefined, normalizer: Normalizer | undefined): void {
  if (type !== undefined && !INDEXABLE.has(type)) {
    throw new ConfigError(
      `a ${type} property cannot be searchable: its values have no single byte form to index`,
    );
  }
  if (normalizer !== undefined && type !== undefined && type !== 'string') {
    throw new ConfigError(`a normaliser applies to strings only, and this property holds ${type} values`);
  }
}

/**
 * The bytes an index is computed over: the normalised value in the value codec's encoding (a type
 * tag, then the value), so a string and a number never share an index. `-0` is indexed as `0`,
 * as SQL compares them equal. Errors name no value: a normaliser that throws, or returns
 * something other than a well-formed string, is a `ValueTypeError` without the original as cause
 * (its message could quote the value).
 */
export function indexInput(
  value: unknown,
  type: ValueType | undefined,
  normalize: ((value: string) => string) | undefined,
): Buffer {
  if (value === null || value === undefined) throw new ValueTypeError('a null value has no blind index');
  let indexed = value;
  if (normalize && typeof value === 'string') {
    let normalized: unknown;
    try {
      normalized = normalize(value);
    } catch (error) {
      throw new ValueTypeError(
        `the normaliser of this searchable property threw ${error instanceof Error ? `a ${error.name}` : 'a value'}; nothing was written or queried`,
      );
    }
    if (typeof normalized !== 'string') {
      throw new ValueTypeError(
        `the normaliser of this searchable property returned a ${normalized === null ? 'null' : typeof normalized}, not a string`,
      );
    }
    indexed = normalized;
  }
  if (typeof indexed === 'number' && Object.is(indexed, -0)) indexed = 0;
  if (type === 'json' || valueTypeOf(indexed) === 'json') {
    throw new ValueTypeError('a JSON value has no blind index');
  }
  return encodeValue(indexed, type);
}

/** Where an index lives; part of the derivation of its column key. */
export interface IndexPlace {
  schema: string;
  table: string;
  /** The database name of the blind-index column. */
  column: string;
}

const HKDF_SALT = Buffer.from('typeorm-envelope blind index v1', 'utf8');

function lengthPrefixed(text: string): Buffer {
  const bytes = Buffer.from(text, 'utf8');
  const length = Buffer.alloc(4);
  length.writeUInt32BE(bytes.length);
  return Buffer.concat([length, bytes]);
}

/** The HKDF `info` naming one index column: schema, table, column, each length-prefixed. */
export function placeInfo(place: IndexPlace): Buffer {
  return Buffer.concat([
    lengthPrefixed(place.schema),
    lengthPrefixed(place.table),
    lengthPrefixed(place.column),
  ]);
}

/**
 * The key of one index column: HKDF-SHA256 of the index key, with the column's place as `info`.
 * The caller zeroes it when the index key leaves memory.
 */
export function deriveColumnKey(indexKey: Buffer, place: IndexPlace): Buffer {
  /* Precondition: index keys are 256 bits; a shorter one would be guessable. */
  if (indexKey.length !== 32) throw new ConfigError('an index key must be 32 bytes');
  return Buffer.from(hkdfSync('sha256', indexKey, HKDF_SALT, placeInfo(place), 32));
}

/** A stored index: the index-key version, then HMAC-SHA256 of `input` under the column key. */
export function blindIndex(columnKey: Buffer, version: number, input: Buffer): Buffer {
  if (!Number.isInteger(version) || version < 1 || version > MAX_INDEX_KEY_VERSION) {
    throw new ConfigError(`index-key version must be an integer from 1 to ${MAX_INDEX_KEY_VERSION}`);
  }
  const out = Buffer.allocUnsafe(BLIND_INDEX_BYTES);
  out.writeUInt16BE(version, 0);
  createHmac('sha256', columnKey).update(input).digest().copy(out, INDEX_VERSION_BYTES);
  return out;
}

/** The index-key version a stored index was made with. */
export function indexKeyVersionOf(index: Uint8Array): number {
  if (index.length !== BLIND_INDEX_BYTES) return 0;
  return ((index[0] ?? 0) << 8) | (index[1] ?? 0);
}
