import { randomFillSync } from 'node:crypto';
import { IV_BYTES } from './aes-gcm';

/**
 * Hands out 96-bit random IVs cut from a CSPRNG buffer filled in bulk: one `randomFillSync` per
 * `batch` IVs instead of one `randomBytes(12)` call per value, which costs as much as the encryption.
 * Each refill allocates a new buffer, so an IV handed out is never overwritten.
 */
export class IvPool {
  private pool: Buffer = Buffer.alloc(0);
  private offset = 0;

  constructor(private readonly batch = 1024) {}

  /** Returns a fresh IV, used once. */
  next(): Buffer {
    if (this.offset + IV_BYTES > this.pool.length) {
      this.pool = randomFillSync(Buffer.allocUnsafeSlow(IV_BYTES * this.batch));
      this.offset = 0;
    }
    const iv = this.pool.subarray(this.offset, this.offset + IV_BYTES);
    this.offset += IV_BYTES;
    return iv;
  }
}
