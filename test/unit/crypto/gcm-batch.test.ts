import { randomBytes } from 'node:crypto';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { GcmOpenBatch, GcmSealBatch } from '../../../src/crypto/gcm-batch';
import { nativeGcm } from '../../../src/crypto/native-gcm';
import { bytes, GCM_VECTORS, hex, refOpen, refSeal } from '../../support/gcm-reference';

type BatchModule = typeof import('../../../src/crypto/gcm-batch');

/** One value of a batch: its plaintext, IV, associated data (by index, so values share some). */
const value = fc.record({
  plaintext: bytes(0, 120),
  iv: bytes(12, 12),
  aad: fc.nat({ max: 3 }),
  /** Stored as iv || sealed in one buffer (the compact layout) or with the IV apart (sidecars). */
  contiguous: fc.boolean(),
  /** Bytes in front of the sealed bytes in the stored buffer (a header, a data-key id). */
  lead: fc.nat({ max: 12 }),
});
const batchOf = fc.array(value, { minLength: 1, maxLength: 40 });

/** Where a stored value is tampered with. */
const tamper = fc.record({
  which: fc.nat(),
  part: fc.constantFrom('iv', 'ciphertext', 'tag', 'aad'),
  at: fc.nat(),
  bit: fc.integer({ min: 0, max: 7 }),
});

interface Value {
  plaintext: Buffer;
  iv: Buffer;
  aad: number;
  contiguous: boolean;
  lead: number;
}

interface Stored {
  plaintext: Buffer;
  iv: Buffer;
  sealed: Buffer;
  aad: Buffer;
  contiguous: boolean;
  lead: number;
}

function store(key: Buffer, aads: Buffer[], values: readonly Value[]): Stored[] {
  return values.map((v) => {
    const aad = aads[v.aad] as Buffer;
    return {
      plaintext: v.plaintext,
      iv: v.iv,
      sealed: refSeal(key, v.iv, v.plaintext, aad),
      aad,
      contiguous: v.contiguous,
      lead: v.lead,
    };
  });
}

function batchOfStored(module: BatchModule, stored: Stored[]): InstanceType<BatchModule['GcmOpenBatch']> {
  const batch = new module.GcmOpenBatch();
  for (const s of stored) {
    const lead = Buffer.alloc(s.lead, 0xee);
    if (s.contiguous) batch.addContiguous(Buffer.concat([lead, s.iv, s.sealed]), s.lead, s.aad);
    else batch.add(s.iv, Buffer.concat([lead, s.sealed]), s.lead, s.aad);
  }
  return batch;
}

function expectOpened(module: BatchModule, key: Buffer, stored: Stored[], failing?: number): void {
  const opened = batchOfStored(module, stored).open(key);
  stored.forEach((s, i) => {
    const range = opened.plaintexts.subarray(opened.start(i), opened.end(i));
    expect(range.length).toBe(s.plaintext.length);
    if (i === failing) {
      expect(opened.opened[i]).toBe(0);
      /* No unauthenticated byte is left behind. */
      expect(range.every((b) => b === 0)).toBe(true);
    } else {
      expect(opened.opened[i]).toBe(1);
      expect(range.equals(s.plaintext)).toBe(true);
    }
  });
}

/** The same module with the native addon disabled: node:crypto, one decipher per value. */
let nodeCrypto: BatchModule;
const native: BatchModule = { GcmOpenBatch, GcmSealBatch } as BatchModule;
beforeAll(async () => {
  vi.resetModules();
  vi.stubEnv('TYPEORM_ENVELOPE_NATIVE', '0');
  nodeCrypto = await import('../../../src/crypto/gcm-batch');
  const backend = await import('../../../src/crypto/native-gcm');
  expect(backend.nativeGcm).toBeUndefined();
});
afterAll(() => {
  vi.unstubAllEnvs();
});

const backends = (): Array<[string, BatchModule]> => [
  [nativeGcm ? 'native' : 'node:crypto (no addon built)', native],
  ['node:crypto', nodeCrypto],
];

describe('GcmOpenBatch: the values of one result set under one key, in one call', () => {
  it('opens the GCM specification vectors, on each backend', () => {
    for (const [, module] of backends()) {
      const batch = new module.GcmOpenBatch();
      for (const v of GCM_VECTORS) batch.add(hex(v.iv), hex(v.ciphertext + v.tag), 0, hex(v.aad));
      /* All vectors of one batch must share a key: open each one under its own. */
      GCM_VECTORS.forEach((v) => {
        const one = new module.GcmOpenBatch();
        one.add(hex(v.iv), hex(v.ciphertext + v.tag), 0, hex(v.aad));
        const opened = one.open(hex(v.key));
        expect(opened.opened[0]).toBe(1);
        expect(opened.plaintexts.subarray(opened.start(0), opened.end(0)).toString('hex')).toBe(v.plaintext);
      });
      expect(batch.size).toBe(GCM_VECTORS.length);
    }
  });

  it('gives every value its own plaintext, whatever the lengths, layouts and shared associated data (both backends)', () => {
    fc.assert(
      fc.property(batchOf, (values) => {
        const key = randomBytes(32);
        const aads = [Buffer.alloc(0), randomBytes(5), randomBytes(40), randomBytes(77)];
        const stored = store(key, aads, values);
        for (const [, module] of backends()) expectOpened(module, key, stored);
      }),
      { numRuns: 150 },
    );
  });

  it('fails exactly the tampered value, zeroing its plaintext, and opens every other one (both backends)', () => {
    fc.assert(
      fc.property(batchOf, tamper, (values, t) => {
        const key = randomBytes(32);
        const aads = [Buffer.alloc(0), randomBytes(5), randomBytes(40), randomBytes(77)];
        const stored = store(key, aads, values);
        const which = t.which % stored.length;
        const victim = stored[which] as Stored;
        const flip = (buffer: Buffer, from: number, to: number) => {
          const copy = Buffer.from(buffer);
          const at = from + (t.at % Math.max(1, to - from));
          if (to > from) copy[at] = (copy[at] as number) ^ (1 << t.bit);
          return copy;
        };
        const ctLength = victim.sealed.length - 16;
        let changed: Stored;
        if (t.part === 'iv') changed = { ...victim, iv: flip(victim.iv, 0, 12) };
        else if (t.part === 'tag')
          changed = { ...victim, sealed: flip(victim.sealed, ctLength, ctLength + 16) };
        else if (t.part === 'ciphertext' && ctLength > 0)
          changed = { ...victim, sealed: flip(victim.sealed, 0, ctLength) };
        else changed = { ...victim, aad: Buffer.concat([victim.aad, Buffer.of(t.bit)]) };
        /* The reference agrees the tampered value fails. */
        expect(refOpen(key, changed.iv, changed.sealed, changed.aad)).toBeUndefined();
        const tampered = stored.map((s, i) => (i === which ? changed : s));
        for (const [, module] of backends()) expectOpened(module, key, tampered, which);
      }),
      { numRuns: 150 },
    );
  });

  it('fails every value under a wrong key, leaving only zeros', () => {
    const key = randomBytes(32);
    const stored = store(
      key,
      [randomBytes(9)],
      [
        { plaintext: randomBytes(30), iv: randomBytes(12), aad: 0, contiguous: true, lead: 2 },
        { plaintext: randomBytes(1), iv: randomBytes(12), aad: 0, contiguous: false, lead: 0 },
      ],
    );
    for (const [, module] of backends()) {
      const opened = batchOfStored(module, stored).open(randomBytes(32));
      expect([...opened.opened]).toEqual([0, 0]);
      expect(opened.plaintexts.every((b) => b === 0)).toBe(true);
    }
  });

  it('refuses, before any call, an IV of another length or a value shorter than an IV and a tag', () => {
    const batch = new GcmOpenBatch();
    expect(() => batch.add(randomBytes(11), randomBytes(40), 0, Buffer.alloc(0))).toThrow(RangeError);
    expect(() => batch.add(randomBytes(12), randomBytes(15), 0, Buffer.alloc(0))).toThrow(RangeError);
    expect(() => batch.addContiguous(randomBytes(30), 3, Buffer.alloc(0))).toThrow(RangeError);
    expect(batch.size).toBe(0);
  });
});

describe('GcmSealBatch: the values of one write under one key, in one call', () => {
  it('seals each value exactly as the reference does, on each backend', () => {
    fc.assert(
      fc.property(batchOf, (values) => {
        const key = randomBytes(32);
        const aads = [Buffer.alloc(0), randomBytes(5), randomBytes(40), randomBytes(77)];
        for (const [, module] of backends()) {
          const batch = new module.GcmSealBatch();
          for (const v of values) batch.add(v.iv, v.plaintext, aads[v.aad] as Buffer);
          const lead = values[0]?.lead ?? 0;
          const sealed = batch.seal(key, lead);
          values.forEach((v, i) => {
            expect(sealed.end(i) - sealed.start(i)).toBe(lead + v.plaintext.length + 16);
            expect(
              sealed.sealed
                .subarray(sealed.start(i) + lead, sealed.end(i))
                .equals(refSeal(key, v.iv, v.plaintext, aads[v.aad] as Buffer)),
            ).toBe(true);
          });
        }
      }),
      { numRuns: 100 },
    );
  });
});

describe.skipIf(!nativeGcm)("the addon's batch calls refuse inconsistent arguments", () => {
  it('throws a TypeError, writing nothing, for ranges out of bounds or overlapping outputs', () => {
    const addon = nativeGcm as NonNullable<typeof nativeGcm>;
    const key = randomBytes(32);
    const handle = addon.createKey(key);
    const input = randomBytes(60);
    const out = Buffer.alloc(60 - 56);
    const result = new Uint8Array(2);
    const call = (ends: number[], aadOf: number[], o: Uint8Array = out, r: Uint8Array = result) =>
      addon.openMany(
        handle,
        key,
        input,
        Uint32Array.from(ends),
        null,
        Buffer.alloc(3),
        Uint32Array.of(3),
        Uint32Array.from(aadOf),
        o,
        r,
      );
    expect(() => call([30, 61], [0, 0])).toThrow(TypeError); // past the input
    expect(() => call([20, 60], [0, 0])).toThrow(TypeError); // a value shorter than IV and tag
    expect(() => call([30, 60], [0, 1])).toThrow(TypeError); // no such associated data
    expect(() => call([30, 60], [0, 0], input.subarray(0, 4))).toThrow(TypeError); // out overlaps input
    expect(() => call([30, 60], [0, 0], Buffer.alloc(5))).toThrow(TypeError); // wrong out length
    expect([...result]).toEqual([0, 0]);
    expect(call([30, 60], [0, 0])).toBe(0); // random bytes: nothing authenticates
    addon.destroyKey(handle);
  });
});
