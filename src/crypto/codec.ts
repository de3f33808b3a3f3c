import { ValueTypeError } from '../errors';

/** The value types an encrypted property can hold. */
export type ValueType =
  | 'string'
  | 'number'
  | 'bigint'
  | 'boolean'
  | 'date'
  | 'json'
  | 'buffer'
  | 'uint8array';

/** One tag byte in front of the encoded value says its type; it is encrypted with the value. */
const TAGS: Record<ValueType, number> = {
  string: 1,
  number: 2,
  bigint: 3,
  boolean: 4,
  date: 5,
  json: 6,
  buffer: 7,
  uint8array: 8,
};
const TYPE_OF_TAG = new Map<number, ValueType>(
  Object.entries(TAGS).map(([type, tag]) => [tag, type as ValueType]),
);

/** The type a value would be encoded as, or `undefined` when it cannot be encrypted. */
export function valueTypeOf(value: unknown): ValueType | undefined {
  switch (typeof value) {
    case 'string':
      return 'string';
    case 'number':
      return 'number';
    case 'bigint':
      return 'bigint';
    case 'boolean':
      return 'boolean';
    case 'object':
      if (value === null) return undefined;
      if (value instanceof Date) return 'date';
      if (Buffer.isBuffer(value)) return 'buffer';
      if (value instanceof Uint8Array) return 'uint8array';
      return 'json';
    default:
      return undefined;
  }
}

/**
 * Encodes a non-null value into bytes that decode to the same type and value.
 * When `declared` is given, a value of another type is refused (a `json` property takes any
 * JSON-serialisable value).
 *
 * A `json` value (an object or array, or any value of a property declared `type: 'json'`) is
 * stored as the text `JSON.stringify` makes of it and read back with `JSON.parse`, exactly as
 * TypeORM's own `json` columns do, so what JSON has no form for comes back in JSON's form: a
 * `Date` inside comes back as its ISO string, a `Buffer` as `{ type: 'Buffer', data: [...] }`,
 * `undefined` properties are left out, `NaN` and infinities become `null`, class instances come
 * back as plain objects. Values JSON cannot hold are refused with a `ValueTypeError` (never a
 * `TypeError`): a bigint, a cycle, a `Map` or a `Set`. A `Date`, `Buffer`, `Uint8Array` or
 * `bigint` kept in a property of its own (not `type: 'json'`) round-trips as itself.
 */
export function encodeValue(value: unknown, declared?: ValueType): Buffer {
  const type = valueTypeOf(value);
  if (type === undefined) {
    throw new ValueTypeError(`a value of type ${typeof value} cannot be encrypted`);
  }
  /* A lone surrogate would decrypt as U+FFFD: a silently different value. Refuse it instead. */
  if (type === 'string' && !(value as string & { isWellFormed(): boolean }).isWellFormed()) {
    throw new ValueTypeError('string is not well-formed UTF-16 (it has a lone surrogate)');
  }
  const stored = declared === 'json' ? 'json' : type;
  if (declared !== undefined && declared !== stored) {
    throw new ValueTypeError(`expected a ${declared} value, got a ${type}`);
  }
  return Buffer.concat([Buffer.of(TAGS[stored]), encodeBody(value, stored)]);
}

/** Decodes bytes made by `encodeValue`. */
export function decodeValue(bytes: Buffer): unknown {
  return decodeValueAt(bytes, 0, bytes.length);
}

/**
 * Decodes the bytes `encodeValue` made that sit at `[start, end)` of `bytes` (one plaintext of a
 * batch opened together), without copying them first.
 */
export function decodeValueAt(bytes: Buffer, start: number, end: number): unknown {
  const type = end > start ? TYPE_OF_TAG.get(bytes[start] ?? -1) : undefined;
  if (type === undefined) throw new ValueTypeError('encrypted value has an unknown type tag');
  const from = start + 1;
  switch (type) {
    case 'string':
      return bytes.toString('utf8', from, end);
    case 'number':
      return readDouble(bytes, from, end);
    case 'bigint':
      return BigInt(bytes.toString('latin1', from, end));
    case 'boolean':
      return from < end && bytes[from] === 1;
    case 'date':
      return new Date(readDouble(bytes, from, end));
    case 'json':
      return JSON.parse(bytes.toString('utf8', from, end));
    case 'buffer':
      return Buffer.from(bytes.subarray(from, end));
    case 'uint8array':
      return new Uint8Array(bytes.subarray(from, end));
  }
}

function encodeBody(value: unknown, type: ValueType): Buffer {
  switch (type) {
    case 'string':
      return Buffer.from(value as string, 'utf8');
    case 'number':
      return writeDouble(value as number);
    case 'bigint':
      return Buffer.from((value as bigint).toString(), 'latin1');
    case 'boolean':
      return Buffer.of(value ? 1 : 0);
    case 'date':
      return writeDouble((value as Date).getTime());
    case 'json':
      return Buffer.from(stringifyJson(value), 'utf8');
    case 'buffer':
    case 'uint8array':
      return Buffer.from(value as Uint8Array);
  }
}

/**
 * The JSON text of a `json` value, as `JSON.stringify` makes it, or a `ValueTypeError` for a value
 * JSON cannot hold: a bigint, a cycle, a `toJSON` that throws, or a `Map` or `Set` (which JSON
 * would silently store as `{}`). Messages name what was wrong, never the value: the `TypeError`
 * of `JSON.stringify` is not kept as a cause, since its message can quote property names.
 */
function stringifyJson(value: unknown): string {
  let text: string | undefined;
  try {
    text = JSON.stringify(value);
  } catch {
    throw new ValueTypeError(`a json value cannot be stored: ${unrepresentable(value) ?? CYCLE}`);
  }
  if (text === undefined) throw new ValueTypeError('value is not JSON-serialisable');
  /* A Map or Set becomes `{}`: look for them only when the text has an empty object. */
  if (text.includes('{}')) {
    const found = unrepresentable(value);
    if (found) throw new ValueTypeError(`a json value cannot be stored: ${found}`);
  }
  return text;
}

const CYCLE = 'it refers to itself (a cycle), or a toJSON method threw';

/** What in `value` JSON cannot represent (a bigint, a Map, a Set), or `undefined`. */
function unrepresentable(value: unknown): string | undefined {
  let found: string | undefined;
  const stop = new Error();
  try {
    JSON.stringify(value, (_key, item: unknown) => {
      if (typeof item === 'bigint') found = 'it holds a bigint (JSON has no bigint: store it as a string)';
      else if (item instanceof Map) found = 'it holds a Map (JSON would keep none of its entries)';
      else if (item instanceof Set) found = 'it holds a Set (JSON would keep none of its members)';
      if (found) throw stop;
      return item;
    });
  } catch {
    /* Stopped at the first finding, or by a cycle. */
  }
  return found;
}

function writeDouble(n: number): Buffer {
  const out = Buffer.allocUnsafe(8);
  out.writeDoubleBE(n);
  return out;
}

function readDouble(bytes: Buffer, start: number, end: number): number {
  if (end - start !== 8) throw new ValueTypeError('encrypted number has a wrong length');
  return bytes.readDoubleBE(start);
}
