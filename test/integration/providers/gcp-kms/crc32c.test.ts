import { crc32 } from 'node:zlib';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { crc32c } from '../../../../src/keys/crc32c';

/** Bit by bit, straight from the definition: the reference the table-driven code is checked against. */
function bitwise(data: Uint8Array): number {
  let crc = 0xffffffff;
  for (const byte of data) {
    crc ^= byte;
    for (let bit = 0; bit < 8; bit++) crc = crc & 1 ? (crc >>> 1) ^ 0x82f63b78 : crc >>> 1;
  }
  return (crc ^ 0xffffffff) >>> 0;
}

describe('crc32c (Castagnoli)', () => {
  it('gives the standard check value and the RFC 3720 (iSCSI) vectors', () => {
    expect(crc32c(Buffer.from('123456789', 'ascii'))).toBe(0xe3069283);
    expect(crc32c(Buffer.alloc(0))).toBe(0);
    expect(crc32c(Buffer.alloc(32, 0x00))).toBe(0x8a9136aa);
    expect(crc32c(Buffer.alloc(32, 0xff))).toBe(0x62a8ab43);
    expect(crc32c(Buffer.from(Array.from({ length: 32 }, (_, i) => i)))).toBe(0x46dd794e);
    expect(crc32c(Buffer.from(Array.from({ length: 32 }, (_, i) => 31 - i)))).toBe(0x113fdb5c);
  });

  it('is not zlib’s CRC-32 (IEEE), which Cloud KMS would refuse', () => {
    const data = Buffer.from('123456789', 'ascii');
    expect(crc32(data)).toBe(0xcbf43926);
    expect(crc32c(data)).not.toBe(crc32(data));
  });

  it('matches the bit-by-bit definition on any bytes, and extends over a split at any point', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), fc.nat(), (data, at) => {
        const split = data.length === 0 ? 0 : at % (data.length + 1);
        const whole = crc32c(data);
        expect(whole).toBe(bitwise(data));
        expect(crc32c(data.subarray(split), crc32c(data.subarray(0, split)))).toBe(whole);
        expect(Number.isInteger(whole) && whole >= 0 && whole <= 0xffffffff).toBe(true);
      }),
    );
  });

  it('changes when any single bit changes (what catches bytes altered in transit)', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 1, maxLength: 200 }), fc.nat(), (data, position) => {
        const bit = position % (data.length * 8);
        const flipped = Uint8Array.from(data);
        flipped[bit >> 3] = (flipped[bit >> 3] as number) ^ (1 << (bit & 7));
        expect(crc32c(flipped)).not.toBe(crc32c(data));
      }),
    );
  });
});
