import { randomBytes } from 'node:crypto';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { ValueBinding } from '../../src/crypto/associated-data';
import { type DataKeyRegistrar, FieldEncryptor, type SealedValue } from '../../src/field-encryptor';
import { type CachedDataKey, DataKeyCache, NOT_CACHED } from '../../src/keys/data-key-cache';
import { Keyring } from '../../src/keys/keyring';
import { LocalKeyProvider } from '../../src/keys/local-key-provider';

/**
 * `tryOpenMany` (one native call per data key for a result set) against `tryOpen` value by value:
 * the same values, the same errors, and one value's failure never another's.
 */
const keyring = new Keyring(
  [1, 2].map((version) => ({
    version,
    provider: new LocalKeyProvider({ key: randomBytes(32).toString('base64') }),
  })),
  1,
);
/** Small uses-per-key, so a batch holds values under several data keys. */
const cache = new DataKeyCache(keyring, { dataKeyMaxUses: 7 });
const encryptor = new FieldEncryptor(cache);

/** The compact layout's data-key ids, as the data-key table would give them. */
class Registrar implements DataKeyRegistrar {
  readonly #ids = new Map<CachedDataKey, bigint>();
  knownId(dataKey: CachedDataKey): bigint | undefined {
    return this.#ids.get(dataKey);
  }
  register(dataKey: CachedDataKey): Promise<bigint> {
    const id = BigInt(this.#ids.size + 1);
    this.#ids.set(dataKey, id);
    return Promise.resolve(id);
  }
}
const registrar = new Registrar();

const BINDINGS: ValueBinding[] = [
  { table: 'people', schema: 'app', column: 'email' },
  { table: 'people', schema: 'app', column: 'phone', primaryKey: '7' },
  { table: 'people', schema: 'app', column: 'name', formerColumns: ['fullName'] },
  { table: 'people', column: 'notes', primaryKey: 'f3b1c2d4' },
];
const RENAMED: ValueBinding = { table: 'people', schema: 'app', column: 'fullName' };

const anyValue = fc.oneof(
  fc.string({ maxLength: 60 }),
  fc.double(),
  fc.boolean(),
  fc.bigInt(),
  fc.date({ noInvalidDate: true }),
  fc.jsonValue({ maxDepth: 2 }).filter((v) => v !== null),
  fc.uint8Array({ maxLength: 30 }).map((a) => Buffer.from(a)),
);

const entry = fc.record({
  value: anyValue,
  binding: fc.nat({ max: BINDINGS.length - 1 }),
  /** Sealed under the binding's former column name (a renamed property). */
  renamed: fc.boolean(),
  compact: fc.boolean(),
  /** Opened under another binding than it was sealed for (a value copied to another place). */
  moved: fc.boolean(),
  /** A byte flipped in the stored value: none, or at this position. */
  flip: fc.option(fc.nat(), { nil: undefined }),
});

async function sealedEntry(e: {
  value: unknown;
  binding: number;
  renamed: boolean;
  compact: boolean;
  moved: boolean;
  flip: number | undefined;
}): Promise<{ sealed: SealedValue; binding: ValueBinding }> {
  const opened = BINDINGS[e.binding] as ValueBinding;
  const sealedFor = e.renamed && opened.formerColumns ? RENAMED : opened;
  let sealed = e.compact
    ? await encryptor.sealCompact(e.value, sealedFor, undefined, registrar)
    : await encryptor.seal(e.value, sealedFor);
  if (e.flip !== undefined) {
    const ciphertext = Buffer.from(sealed.ciphertext);
    const at = e.flip % ciphertext.length;
    ciphertext[at] = (ciphertext[at] as number) ^ 0x10;
    sealed = { ...sealed, ciphertext };
  }
  const binding = e.moved ? (BINDINGS[(e.binding + 1) % BINDINGS.length] as ValueBinding) : opened;
  return { sealed, binding };
}

function one(sealed: SealedValue, binding: ValueBinding): { value?: unknown; error?: unknown } {
  try {
    return { value: encryptor.tryOpen(sealed, binding) };
  } catch (error) {
    return { error };
  }
}

describe('FieldEncryptor.tryOpenMany', () => {
  it('gives, value by value, what tryOpen gives: the plaintext or the same error (sidecar and compact, tampered, moved, renamed)', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(entry, { minLength: 1, maxLength: 30 }), async (entries) => {
        const items = await Promise.all(entries.map(sealedEntry));
        const { values, failures } = encryptor.tryOpenMany(
          items.map((i) => i.sealed),
          items.map((i) => i.binding),
        );
        items.forEach((item, i) => {
          const expected = one(item.sealed, item.binding);
          if (expected.error) {
            expect(failures[i]).toBeInstanceOf((expected.error as Error).constructor);
            expect((failures[i] as Error).message).toBe((expected.error as Error).message);
            expect((failures[i] as { context?: unknown }).context).toEqual(
              (expected.error as { context?: unknown }).context,
            );
          } else {
            expect(failures[i]).toBeUndefined();
            expect(values[i]).toEqual(expected.value);
          }
        });
        /* Untampered values in place always open, whatever the others in the batch. */
        entries.forEach((e, i) => {
          if (e.flip === undefined && !e.moved) expect(failures[i]).toBeUndefined();
        });
      }),
      { numRuns: 120 },
    );
  });

  it('says NOT_CACHED for values whose data key is not cached, and opens the others', async () => {
    const cold = new FieldEncryptor(new DataKeyCache(keyring));
    const warm = await encryptor.seal('warm', BINDINGS[0] as ValueBinding);
    const elsewhere = await cold.seal('cold', BINDINGS[0] as ValueBinding);
    const reader = new FieldEncryptor(cache);
    const { values, failures } = reader.tryOpenMany([warm, elsewhere], [
      BINDINGS[0],
      BINDINGS[0],
    ] as ValueBinding[]);
    expect(values).toEqual(['warm', NOT_CACHED]);
    expect(failures.filter((f) => f !== undefined)).toEqual([]);
    expect(await reader.open(elsewhere, BINDINGS[0] as ValueBinding)).toBe('cold');
  });
});

describe('FieldEncryptor.trySealMany', () => {
  it('seals each value as trySeal would: it opens to the same value, with a fresh IV and its own bytes, uses counted per value', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.record({ value: anyValue, binding: fc.nat({ max: BINDINGS.length - 1 }) }), {
          minLength: 1,
          maxLength: 40,
        }),
        fc.boolean(),
        async (entries, compact) => {
          const counting = new DataKeyCache(keyring, { dataKeyMaxUses: 7 });
          const sealer = new FieldEncryptor(counting);
          await sealer.seal('warm the encrypting key', BINDINGS[0] as ValueBinding);
          const bindings = entries.map((e) => BINDINGS[e.binding] as ValueBinding);
          const { sealed, failures } = sealer.trySealMany(
            entries.map((e) => e.value),
            bindings,
            entries.map(() => undefined),
            compact ? new Registrar() : undefined,
          );
          expect(failures.filter((f) => f !== undefined)).toEqual([]);
          /* The warm key had 6 uses left: those values are sealed at once, the rest wait for the next key. */
          const ready = sealed.filter((s) => s !== NOT_CACHED);
          expect(ready).toHaveLength(Math.min(6, entries.length));
          const resolved = await Promise.all(
            sealed.map((s, i) =>
              s === NOT_CACHED
                ? compact
                  ? sealer.sealCompact(
                      entries[i]?.value,
                      bindings[i] as ValueBinding,
                      undefined,
                      new Registrar(),
                    )
                  : sealer.seal(entries[i]?.value, bindings[i] as ValueBinding)
                : (s as SealedValue | Promise<SealedValue>),
            ),
          );
          const ivs = new Set<string>();
          for (const [i, s] of resolved.entries()) {
            const binding = bindings[i] as ValueBinding;
            expect(s.ciphertext[0]).toBe(compact ? 2 : 1);
            ivs.add(s.iv.toString('hex'));
            /* What a round trip of the value through seal() and open() gives (JSON's form, for a json value). */
            const expected = await encryptor.open(await encryptor.seal(entries[i]?.value, binding), binding);
            expect(sealer.tryOpen(s, binding)).toEqual(expected);
          }
          expect(ivs.size).toBe(entries.length);
          /* Each value has bytes of its own: changing one changes no other. */
          const before = resolved.map((s) => Buffer.from(s.ciphertext));
          const first = (resolved[0] as SealedValue).ciphertext;
          first[first.length - 1] = (first[first.length - 1] as number) ^ 1;
          for (const [i, s] of resolved.entries()) {
            if (i > 0) expect(s.ciphertext.equals(before[i] as Buffer)).toBe(true);
          }
        },
      ),
      { numRuns: 60 },
    );
  });

  it('refuses a value of the wrong type as trySeal does, sealing the others', async () => {
    const sealer = new FieldEncryptor(new DataKeyCache(keyring));
    await sealer.seal('warm the encrypting key', BINDINGS[0] as ValueBinding);
    const { sealed, failures } = sealer.trySealMany(
      ['fine', 42, 'also fine'],
      [BINDINGS[0], BINDINGS[0], BINDINGS[0]] as ValueBinding[],
      ['string', 'string', 'string'],
    );
    expect(failures[1]).toBeInstanceOf(Error);
    expect((failures[1] as Error).name).toBe('ValueTypeError');
    expect(sealer.tryOpen(sealed[0] as SealedValue, BINDINGS[0] as ValueBinding)).toBe('fine');
    expect(sealer.tryOpen(sealed[2] as SealedValue, BINDINGS[0] as ValueBinding)).toBe('also fine');
  });
});

describe('FieldEncryptor.openMany', () => {
  it('opens values under keys not cached with one unwrap per data key, and reports each bad value as open() does', async () => {
    const writer = new FieldEncryptor(new DataKeyCache(keyring, { dataKeyMaxUses: 5 }));
    const binding = BINDINGS[1] as ValueBinding;
    const sealed = await Promise.all(
      Array.from({ length: 15 }, (_, i) => writer.seal(`value ${i}`, binding)),
    );
    const tampered = {
      ...(sealed[7] as SealedValue),
      ciphertext: Buffer.from((sealed[7] as SealedValue).ciphertext),
    };
    tampered.ciphertext[4] = (tampered.ciphertext[4] as number) ^ 1;
    sealed[7] = tampered;
    const cache = new DataKeyCache(keyring);
    const reader = new FieldEncryptor(cache);
    const { values, failures } = await reader.openMany(
      sealed,
      sealed.map(() => binding),
    );
    expect(cache.stats.unwrapped).toBe(3);
    expect(values.filter((_, i) => i !== 7)).toEqual(
      Array.from({ length: 15 }, (_, i) => `value ${i}`).filter((_, i) => i !== 7),
    );
    const expected = await reader.open(tampered, binding).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect((failures[7] as Error).message).toBe((expected as Error).message);
    expect(failures.filter((f) => f !== undefined)).toHaveLength(1);
  });
});
