import type { ValueType } from '../crypto/codec';

/**
 * A value read from the plaintext column a property is migrated from, in the property's type.
 * `pg` returns `bigint` (int8) and `numeric` columns as strings, which the codec would refuse for
 * a `bigint` or `number` property; anything that is not such a string is returned as it is.
 */
export function legacyValue(value: unknown, type: ValueType | undefined): unknown {
  if (typeof value !== 'string') return value;
  const text = value.trim();
  if (type === 'bigint' && /^[+-]?\d+$/.test(text)) return BigInt(text);
  if (type === 'number' && text !== '' && Number.isFinite(Number(text))) return Number(text);
  return value;
}
