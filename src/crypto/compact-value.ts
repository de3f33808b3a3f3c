import { IntegrityError } from '../errors';
import { IV_BYTES, TAG_BYTES } from './aes-gcm';
import {
  FLAG_PRIMARY_KEY_BOUND,
  FLAG_SCHEMA_BOUND,
  FLAG_TENANT_BOUND,
  HEADER_BYTES,
} from './associated-data';

/**
 * The compact layout's stored value (format 2), one `bytea` column per property:
 *
 * ```
 * byte 0      0x02 (FORMAT_V2)
 * byte 1      flags, as in format 1 (primary key, schema, tenant bound)
 * bytes 2-9   data-key id, unsigned 64-bit big-endian (its row in the data-key table)
 * bytes 10-21 IV (96 bits)
 * bytes 22-   AES-256-GCM ciphertext of the encoded value, then the 16-byte tag
 * ```
 *
 * The associated data covers bytes 0-1 only (as in format 1): the data-key id is not in it, since
 * a value moved under another id fails authentication anyway (another key) and ids never change.
 */
export const FORMAT_V2 = 2;
/** Bytes of the data-key id. */
export const DATA_KEY_ID_BYTES = 8;
/** Offset of the data-key id. */
export const DATA_KEY_ID_OFFSET = HEADER_BYTES;
/** Offset of the IV. */
export const COMPACT_IV_OFFSET = DATA_KEY_ID_OFFSET + DATA_KEY_ID_BYTES;
/** Offset of the ciphertext (and the length of everything before it). */
export const COMPACT_BODY_OFFSET = COMPACT_IV_OFFSET + IV_BYTES;
/**
 * The shortest well-formed value: the prefix, one encoded byte (the codec's type tag is always
 * there) and the tag.
 */
export const COMPACT_MIN_BYTES = COMPACT_BODY_OFFSET + 1 + TAG_BYTES;
/** Data-key ids are PostgreSQL `bigint` identities: 1 to 2^63 - 1. */
export const MAX_DATA_KEY_ID = 2n ** 63n - 1n;

const KNOWN_FLAGS = FLAG_PRIMARY_KEY_BOUND | FLAG_SCHEMA_BOUND | FLAG_TENANT_BOUND;

/** The parts of a format-2 value. Every buffer is a view into the parsed value (not a copy). */
export interface CompactValue {
  /** Bytes 0-1 (format and flags): the part of the value in its associated data. */
  header: Buffer;
  /** The header flags. */
  flags: number;
  /** The id of the data key's row in the data-key table. */
  dataKeyId: bigint;
  /** The 96-bit IV. */
  iv: Buffer;
  /** AES-256-GCM ciphertext followed by the 16-byte tag. */
  body: Buffer;
}

/** What {@link encodeCompact} writes. */
export interface CompactParts {
  flags: number;
  dataKeyId: bigint;
  iv: Uint8Array;
  body: Uint8Array;
}

/** The two header bytes of a format-2 value with these flags (as its associated data takes them). */
export function compactHeader(flags: number): Buffer {
  return Buffer.of(FORMAT_V2, flags);
}

/**
 * Builds a format-2 value. Throws a `RangeError` for parts no reader would accept (unknown flags,
 * an id outside 1..2^63-1, an IV that is not 96 bits, a body shorter than a tag and one byte):
 * those are programming errors, never data.
 */
export function encodeCompact(parts: CompactParts): Buffer {
  const { flags, dataKeyId, iv, body } = parts;
  if (!Number.isInteger(flags) || flags < 0 || (flags & ~KNOWN_FLAGS) !== 0) {
    throw new RangeError('compact value: unknown header flags');
  }
  if (dataKeyId < 1n || dataKeyId > MAX_DATA_KEY_ID) {
    throw new RangeError('compact value: data-key id out of range');
  }
  if (iv.length !== IV_BYTES) throw new RangeError('compact value: the IV must be 96 bits');
  if (body.length < 1 + TAG_BYTES) throw new RangeError('compact value: body shorter than a tag');
  const out = Buffer.allocUnsafe(COMPACT_BODY_OFFSET + body.length);
  out[0] = FORMAT_V2;
  out[1] = flags;
  out.writeBigUInt64BE(dataKeyId, DATA_KEY_ID_OFFSET);
  out.set(iv, COMPACT_IV_OFFSET);
  out.set(body, COMPACT_BODY_OFFSET);
  return out;
}

/**
 * Writes the frame of a format-2 value into the first {@link COMPACT_BODY_OFFSET} bytes of `out`,
 * whose body (ciphertext and tag) is already in place after them: for values sealed together
 * into one buffer. Throws a `RangeError` for a frame no reader would accept, as `encodeCompact`.
 */
export function frameCompact(out: Buffer, flags: number, dataKeyId: bigint, iv: Uint8Array): Buffer {
  if (!Number.isInteger(flags) || flags < 0 || (flags & ~KNOWN_FLAGS) !== 0) {
    throw new RangeError('compact value: unknown header flags');
  }
  if (dataKeyId < 1n || dataKeyId > MAX_DATA_KEY_ID) {
    throw new RangeError('compact value: data-key id out of range');
  }
  if (iv.length !== IV_BYTES) throw new RangeError('compact value: the IV must be 96 bits');
  if (out.length < COMPACT_MIN_BYTES) throw new RangeError('compact value: body shorter than a tag');
  out[0] = FORMAT_V2;
  out[1] = flags;
  out.writeBigUInt64BE(dataKeyId, DATA_KEY_ID_OFFSET);
  out.set(iv, COMPACT_IV_OFFSET);
  return out;
}

/**
 * Splits a format-2 value into its parts (views, no copy). A value that is too short, of another
 * format, with unknown flags or an impossible data-key id is an `IntegrityError` (it was not
 * written by this library, or was altered); nothing in the message comes from the value's bytes
 * beyond its format.
 */
export function parseCompact(value: Uint8Array): CompactValue {
  const buf = Buffer.isBuffer(value) ? value : Buffer.from(value.buffer, value.byteOffset, value.byteLength);
  checkCompact(buf);
  const dataKeyId = buf.readBigUInt64BE(DATA_KEY_ID_OFFSET);
  return {
    header: buf.subarray(0, HEADER_BYTES),
    flags: buf[1] as number,
    dataKeyId,
    iv: buf.subarray(COMPACT_IV_OFFSET, COMPACT_BODY_OFFSET),
    body: buf.subarray(COMPACT_BODY_OFFSET),
  };
}

/**
 * Checks what {@link parseCompact} checks, without making views or a bigint: for the values of a
 * result set opened together.
 */
export function checkCompact(buf: Buffer): void {
  if (buf.length < COMPACT_MIN_BYTES || buf[0] !== FORMAT_V2) {
    throw new IntegrityError('compact encrypted value is truncated or has an unknown format');
  }
  if (((buf[1] as number) & ~KNOWN_FLAGS) !== 0) {
    throw new IntegrityError('compact encrypted value has unknown header flags');
  }
  /* 1 to 2^63 - 1, read as two 32-bit halves: no bigint per value. */
  const high = buf.readUInt32BE(DATA_KEY_ID_OFFSET);
  const low = buf.readUInt32BE(DATA_KEY_ID_OFFSET + 4);
  if (high >= 0x80000000 || (high === 0 && low === 0)) {
    throw new IntegrityError('compact encrypted value names an impossible data-key id');
  }
}

/**
 * The data-key id of a format-2 value, or `undefined` when `value` is not a well-formed format-2
 * value (e.g. a format-1 ciphertext during a layout migration). Never throws.
 */
export function compactDataKeyId(value: Uint8Array | null | undefined): bigint | undefined {
  if (!value || value.length < COMPACT_MIN_BYTES || value[0] !== FORMAT_V2) return undefined;
  const buf = Buffer.isBuffer(value) ? value : Buffer.from(value.buffer, value.byteOffset, value.byteLength);
  const id = buf.readBigUInt64BE(DATA_KEY_ID_OFFSET);
  return id >= 1n && id <= MAX_DATA_KEY_ID ? id : undefined;
}

/** The stored format of a value (its first byte): 1 for sidecar values, 2 for compact ones. */
export function storedFormat(value: Uint8Array): number | undefined {
  return value.length === 0 ? undefined : value[0];
}
