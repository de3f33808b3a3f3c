import { describe, expect, it } from 'vitest';
import { IV_BYTES } from '../../../src/crypto/aes-gcm';
import { IvPool } from '../../../src/crypto/iv-pool';

describe('IvPool', () => {
  it('hands out 100,000 distinct 12-byte IVs', () => {
    const pool = new IvPool();
    const seen = new Set<string>();
    let wrongLength = 0;
    for (let i = 0; i < 100_000; i++) {
      const iv = pool.next();
      if (iv.length !== IV_BYTES) wrongLength += 1;
      seen.add(iv.toString('hex'));
    }
    expect(wrongLength).toBe(0);
    expect(seen.size).toBe(100_000);
  });

  it('never changes an IV it handed out when it refills', () => {
    for (const batch of [1, 2, 1024]) {
      const pool = new IvPool(batch);
      const handedOut = Array.from({ length: 3 * batch + 1 }, () => pool.next());
      const copies = handedOut.map((iv) => Buffer.from(iv));
      for (let i = 0; i < 5 * batch + 7; i++) pool.next();
      handedOut.forEach((iv, i) => {
        expect(iv.equals(copies[i] as Buffer)).toBe(true);
      });
    }
  });

  it('gives each IV its own 12 bytes: writing to one leaves the next ones unchanged', () => {
    const pool = new IvPool(4);
    const first = pool.next();
    const second = pool.next();
    const secondCopy = Buffer.from(second);
    first.fill(0xff);
    expect(second.equals(secondCopy)).toBe(true);
  });
});
