/**
 * CRC32C (Castagnoli: reflected polynomial 0x82F63B78, initial value and final XOR 0xFFFFFFFF), the
 * checksum Google Cloud KMS uses to detect corruption of requests and responses in transit. It is
 * not zlib's CRC-32 (IEEE polynomial): the two disagree on every input but the empty one.
 */

const TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let bit = 0; bit < 8; bit++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

/**
 * Extends the CRC32C of some bytes (`previous`, from an earlier call) over `data`:
 * `crc32c(Buffer.concat([a, b])) === crc32c(b, crc32c(a))`.
 */
export function crc32c(data: Uint8Array, previous = 0): number {
  let crc = ~previous >>> 0;
  for (let i = 0; i < data.length; i++) {
    crc = (TABLE[(crc ^ (data[i] as number)) & 0xff] as number) ^ (crc >>> 8);
  }
  return ~crc >>> 0;
}
