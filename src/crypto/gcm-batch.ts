import { gcmOpen, gcmSeal, handleFor, IV_BYTES, KEY_BYTES, TAG_BYTES } from './aes-gcm';
import { nativeGcm } from './native-gcm';

/** What one value adds to a batch beyond its plaintext: its IV and its tag. */
const SEALED_OVERHEAD = IV_BYTES + TAG_BYTES;

/**
 * The values of one batch under one data key, laid out for a single native call: each value's
 * bytes back to back in one buffer, and each distinct associated data once (the values of one
 * column that are not bound to their row share theirs).
 */
class BatchLayout {
  /** Distinct associated data, by object: equal-but-distinct buffers are simply passed twice. */
  readonly #aadIndex = new Map<Uint8Array, number>();
  readonly #aads: Uint8Array[] = [];
  readonly aadOf: number[] = [];

  /** The index of `aad` among the batch's distinct associated data. */
  protected aad(aad: Uint8Array): void {
    let index = this.#aadIndex.get(aad);
    if (index === undefined) {
      index = this.#aads.length;
      this.#aads.push(aad);
      this.#aadIndex.set(aad, index);
    }
    this.aadOf.push(index);
  }

  protected aadArguments(): { aads: Buffer; aadEnds: Uint32Array; aadOf: Uint32Array } {
    const aads = Buffer.concat(this.#aads);
    const aadEnds = new Uint32Array(this.#aads.length);
    let end = 0;
    this.#aads.forEach((aad, j) => {
      end += aad.length;
      aadEnds[j] = end;
    });
    return { aads, aadEnds, aadOf: Uint32Array.from(this.aadOf) };
  }

  protected aadAt(i: number): Uint8Array {
    return this.#aads[this.aadOf[i] as number] as Uint8Array;
  }
}

/**
 * Values to open under one key, opened by {@link GcmOpenBatch.open} in one native call where the
 * native backend is in use (else one `node:crypto` decipher per value, with the same results).
 */
export class GcmOpenBatch extends BatchLayout {
  /** Per value: the IV when it is stored apart, else `undefined` (the IV leads `source`). */
  readonly #ivs: (Uint8Array | undefined)[] = [];
  readonly #sources: Buffer[] = [];
  readonly #offsets: number[] = [];
  #bytes = 0;

  get size(): number {
    return this.#sources.length;
  }

  /**
   * Adds a value whose IV is stored apart: `sealed` from `offset` on is `ciphertext || tag`.
   * Returns its index in the batch.
   */
  add(iv: Uint8Array, sealed: Buffer, offset: number, aad: Uint8Array): number {
    if (iv.length !== IV_BYTES) throw new RangeError('iv must be 12 bytes');
    return this.#push(iv, sealed, offset, IV_BYTES + sealed.length - offset, aad);
  }

  /** Adds a value stored as `iv || ciphertext || tag` from `offset` on. Returns its index in the batch. */
  addContiguous(stored: Buffer, offset: number, aad: Uint8Array): number {
    return this.#push(undefined, stored, offset, stored.length - offset, aad);
  }

  #push(iv: Uint8Array | undefined, source: Buffer, offset: number, bytes: number, aad: Uint8Array): number {
    /* Shorter values are refused by the caller as failing authentication, as gcmOpen does. */
    if (bytes < SEALED_OVERHEAD) throw new RangeError('a sealed value is at least an IV and a tag');
    this.#ivs.push(iv);
    this.#sources.push(source);
    this.#offsets.push(offset);
    this.#bytes += bytes;
    this.aad(aad);
    return this.#sources.length - 1;
  }

  /**
   * Opens every value under `key`. Value i's plaintext is `plaintexts[start(i), end(i))` when
   * `opened[i]` is 1; a value that failed authentication (0) leaves only zeros there. The caller
   * zeroes `plaintexts` once it has decoded them.
   */
  open(key: Uint8Array): OpenedBatch {
    const n = this.#sources.length;
    const input = Buffer.allocUnsafe(this.#bytes);
    const ends = new Uint32Array(n);
    let at = 0;
    for (let i = 0; i < n; i++) {
      const iv = this.#ivs[i];
      const source = this.#sources[i] as Buffer;
      if (iv) {
        input.set(iv, at);
        at += IV_BYTES;
      }
      at += source.copy(input, at, this.#offsets[i]);
      ends[i] = at;
    }
    const plaintexts = Buffer.allocUnsafe(Math.max(0, this.#bytes - n * SEALED_OVERHEAD));
    const opened = new Uint8Array(n);
    if (nativeGcm && key.length === KEY_BYTES) {
      const { aads, aadEnds, aadOf } = this.aadArguments();
      nativeGcm.openMany(handleFor(key), key, input, ends, null, aads, aadEnds, aadOf, plaintexts, opened);
    } else {
      this.#openEach(key, input, ends, plaintexts, opened);
    }
    return new OpenedBatch(plaintexts, ends, opened);
  }

  /** node:crypto (or a value too short to be one): one decipher per value, the same results. */
  #openEach(key: Uint8Array, input: Buffer, ends: Uint32Array, plaintexts: Buffer, opened: Uint8Array): void {
    let start = 0;
    for (let i = 0; i < ends.length; i++) {
      const end = ends[i] as number;
      const iv = input.subarray(start, start + IV_BYTES);
      const plaintext = gcmOpen(key, iv, input.subarray(start + IV_BYTES, end), this.aadAt(i));
      const at = start - i * SEALED_OVERHEAD;
      if (plaintext) {
        plaintexts.set(plaintext, at);
        plaintext.fill(0);
        opened[i] = 1;
      } else {
        plaintexts.fill(0, at, end - (i + 1) * SEALED_OVERHEAD);
      }
      start = end;
    }
  }
}

/** The plaintexts of an opened batch, all in one buffer. */
export class OpenedBatch {
  constructor(
    /** Every plaintext, back to back; zero it once decoded. */
    readonly plaintexts: Buffer,
    readonly ends: Uint32Array,
    /** 1 where the value authenticated. */
    readonly opened: Uint8Array,
  ) {}

  start(i: number): number {
    return i === 0 ? 0 : (this.ends[i - 1] as number) - i * SEALED_OVERHEAD;
  }

  end(i: number): number {
    return (this.ends[i] as number) - (i + 1) * SEALED_OVERHEAD;
  }
}

/**
 * Plaintexts to seal under one key, sealed by {@link GcmSealBatch.seal} in one native call where
 * the native backend is in use (else one `node:crypto` cipher per value).
 */
export class GcmSealBatch extends BatchLayout {
  readonly #plaintexts: Uint8Array[] = [];
  readonly #ivs: Uint8Array[] = [];
  #bytes = 0;

  get size(): number {
    return this.#plaintexts.length;
  }

  /** Adds a plaintext with its IV (never used before with this key: see `IvPool`). Returns its index. */
  add(iv: Uint8Array, plaintext: Uint8Array, aad: Uint8Array): number {
    if (iv.length !== IV_BYTES) throw new TypeError('iv must be 12 bytes');
    this.#ivs.push(iv);
    this.#plaintexts.push(plaintext);
    this.#bytes += plaintext.length;
    this.aad(aad);
    return this.#plaintexts.length - 1;
  }

  /**
   * Seals every plaintext under `key`, each after `lead` bytes left free for the caller (a header):
   * value i is `sealed.subarray(start(i), end(i))`, its `ciphertext || tag` from `start(i) + lead`.
   */
  seal(key: Uint8Array, lead = 0): SealedBatch {
    const n = this.#plaintexts.length;
    const sealed = Buffer.allocUnsafe(this.#bytes + n * (TAG_BYTES + lead));
    const ends = new Uint32Array(n);
    if (nativeGcm && key.length === KEY_BYTES) {
      const input = Buffer.allocUnsafe(this.#bytes);
      const ivs = Buffer.allocUnsafe(n * IV_BYTES);
      let at = 0;
      for (let i = 0; i < n; i++) {
        const plaintext = this.#plaintexts[i] as Uint8Array;
        input.set(plaintext, at);
        ivs.set(this.#ivs[i] as Uint8Array, i * IV_BYTES);
        at += plaintext.length;
        ends[i] = at;
      }
      try {
        const { aads, aadEnds, aadOf } = this.aadArguments();
        nativeGcm.sealMany(
          handleFor(key),
          key,
          input,
          ends,
          ivs,
          aads,
          aadEnds,
          aadOf,
          sealed,
          new Uint8Array(n),
          lead,
        );
      } finally {
        input.fill(0);
      }
    } else {
      let at = 0;
      for (let i = 0; i < n; i++) {
        const plaintext = this.#plaintexts[i] as Uint8Array;
        const box = gcmSeal(key, this.#ivs[i] as Uint8Array, plaintext, this.aadAt(i));
        sealed.set(box, at + i * (TAG_BYTES + lead) + lead);
        at += plaintext.length;
        ends[i] = at;
      }
    }
    return new SealedBatch(sealed, ends, lead);
  }
}

/** The sealed values of a batch, all in one buffer, each after its `lead` bytes. */
export class SealedBatch {
  constructor(
    readonly sealed: Buffer,
    readonly ends: Uint32Array,
    readonly lead: number,
  ) {}

  /** Where value i's lead bytes begin. */
  start(i: number): number {
    return i === 0 ? 0 : (this.ends[i - 1] as number) + i * (TAG_BYTES + this.lead);
  }

  end(i: number): number {
    return (this.ends[i] as number) + (i + 1) * (TAG_BYTES + this.lead);
  }
}
