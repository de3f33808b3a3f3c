import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ConfigError, IntegrityError } from '../../../src/errors';
import { type CachedDataKey, DataKeyCache, type DataKeyCacheOptions } from '../../../src/keys/data-key-cache';
import type { EncryptionContext, GeneratedDataKey } from '../../../src/keys/key-provider';
import { Keyring } from '../../../src/keys/keyring';
import { LocalKeyProvider } from '../../../src/keys/local-key-provider';

/** The real local provider, counting the calls that reach it. */
class CountingProvider extends LocalKeyProvider {
  generated = 0;
  unwrapped = 0;

  constructor() {
    super({ key: randomBytes(32).toString('base64') });
  }

  protected override async _generateDataKey(context: EncryptionContext): Promise<GeneratedDataKey> {
    this.generated += 1;
    return super._generateDataKey(context);
  }

  protected override async _unwrapDataKey(wrappedKey: Buffer, context: EncryptionContext): Promise<Buffer> {
    this.unwrapped += 1;
    return super._unwrapDataKey(wrappedKey, context);
  }
}

/** A clock that moves only when told to. It starts above 0: lru-cache treats a start time of 0 as "no TTL". */
class FakeClock {
  time = 1_000;
  now(): number {
    return this.time;
  }
  advance(ms: number): void {
    this.time += ms;
  }
}

function setup(options: DataKeyCacheOptions = {}) {
  const provider = new CountingProvider();
  const keyring = new Keyring([{ version: 1, provider }], 1);
  const cache = new DataKeyCache(keyring, options);
  return { provider, keyring, cache };
}

const isZeroed = (key: Buffer) => key.length === 32 && key.every((byte) => byte === 0);

/** Returns the key buffer the cache hands to `fn`. Only a test keeps it, to check that it gets zeroed. */
const encryptionKey = (cache: DataKeyCache) => cache.withEncryptionKey((key, dataKey) => ({ key, dataKey }));
const decryptionKey = (cache: DataKeyCache, version: number, wrapped: Buffer) =>
  cache.withDecryptionKey(version, wrapped, (key) => key);

/** Wrapped data keys made directly by the provider, so that the cache has never seen them. */
async function wrappedKeys(provider: CountingProvider, keyring: Keyring, count: number) {
  const keys: GeneratedDataKey[] = [];
  for (let i = 0; i < count; i++) keys.push(await provider.generateDataKey(keyring.context));
  provider.generated = 0;
  return keys;
}

describe('DataKeyCache encryption keys', () => {
  it('reuses one data key for many values', async () => {
    const { provider, cache } = setup();
    const keys = new Set<Buffer>();
    for (let i = 0; i < 500; i++) keys.add((await encryptionKey(cache)).key);
    expect(keys.size).toBe(1);
    expect(provider.generated).toBe(1);
    expect(cache.stats).toEqual({ generated: 1, unwrapped: 0 });
  });

  it('generates a new key after dataKeyMaxUses uses and zeroes the old one', async () => {
    const { provider, cache } = setup({ dataKeyMaxUses: 10 });
    const first = await encryptionKey(cache);
    const firstCopy = Buffer.from(first.key);
    for (let i = 1; i < 9; i++) expect((await encryptionKey(cache)).key).toBe(first.key);
    expect(isZeroed(first.key)).toBe(false);

    const tenth = await encryptionKey(cache);
    expect(tenth.key).toBe(first.key);
    expect(isZeroed(first.key)).toBe(true);
    expect(first.dataKey.destroyed).toBe(true);
    expect(provider.generated).toBe(1);

    const next = await encryptionKey(cache);
    expect(provider.generated).toBe(2);
    expect(next.key.equals(firstCopy)).toBe(false);
    expect(next.dataKey.wrappedKey.equals(first.dataKey.wrappedKey)).toBe(false);
  });

  it('generates a new key after dataKeyMaxAge on the given clock and zeroes the old one', async () => {
    const clock = new FakeClock();
    const { provider, cache } = setup({ dataKeyMaxAge: 60_000, refreshAhead: 0, clock });
    const first = await encryptionKey(cache);
    clock.advance(59_000);
    expect((await encryptionKey(cache)).key).toBe(first.key);
    expect(provider.generated).toBe(1);

    clock.advance(2_000);
    const second = await encryptionKey(cache);
    expect(provider.generated).toBe(2);
    expect(second.key).not.toBe(first.key);
    expect(isZeroed(first.key)).toBe(true);
    expect(first.dataKey.destroyed).toBe(true);
  });

  it('renews the active key ahead of its maximum age with one request, serving the old key meanwhile', async () => {
    const clock = new FakeClock();
    const { provider, cache } = setup({ dataKeyMaxAge: 60_000, refreshAhead: 10_000, clock });
    const first = await encryptionKey(cache);
    clock.advance(49_000);
    await encryptionKey(cache);
    expect(provider.generated).toBe(1);

    clock.advance(2_000); // inside the refresh window
    const during = await Promise.all(Array.from({ length: 100 }, () => encryptionKey(cache)));
    expect(during.every((r) => r.key === first.key)).toBe(true);
    await new Promise((resolve) => setImmediate(resolve));
    expect(provider.generated).toBe(2);

    const after = await encryptionKey(cache);
    expect(after.key).not.toBe(first.key);
    expect(isZeroed(first.key)).toBe(true);
    expect(provider.generated).toBe(2);
  });

  it('refuses a refreshAhead that is not below dataKeyMaxAge', () => {
    expect(() => setup({ dataKeyMaxAge: 1_000, refreshAhead: 1_000 })).toThrow(ConfigError);
    expect(() => setup({ dataKeyMaxAge: 1_000, refreshAhead: -1 })).toThrow(ConfigError);
  });

  it('serves 500 concurrent callers when each key lasts only 10 uses: every call succeeds, 50 keys', async () => {
    const { provider, cache } = setup({ dataKeyMaxUses: 10 });
    const results = await Promise.all(Array.from({ length: 500 }, () => encryptionKey(cache)));
    expect(results).toHaveLength(500);
    expect(provider.generated).toBe(50);
  });

  it('serves 200 concurrent callers on a cold cache with one generation', async () => {
    const { provider, cache } = setup();
    const results = await Promise.all(Array.from({ length: 200 }, () => encryptionKey(cache)));
    expect(provider.generated).toBe(1);
    expect(new Set(results.map((r) => r.key)).size).toBe(1);
  });

  it('uses the version that is active at the time of the call', async () => {
    const one = new CountingProvider();
    const two = new CountingProvider();
    const keyring = new Keyring(
      [
        { version: 1, provider: one },
        { version: 2, provider: two },
      ],
      1,
    );
    const cache = new DataKeyCache(keyring);
    expect((await encryptionKey(cache)).dataKey.version).toBe(1);
    keyring.activate(2);
    expect((await encryptionKey(cache)).dataKey.version).toBe(2);
    expect([one.generated, two.generated]).toEqual([1, 1]);
  });
});

describe('DataKeyCache decryption keys', () => {
  it('decrypts with a key it generated without an unwrap call', async () => {
    const { provider, cache } = setup();
    const { key, dataKey } = await encryptionKey(cache);
    const decrypting = await decryptionKey(cache, dataKey.version, dataKey.wrappedKey);
    expect(decrypting.equals(key)).toBe(true);
    expect(decrypting).not.toBe(key);
    expect(provider.unwrapped).toBe(0);
  });

  it('unwraps a key once, then serves it from memory', async () => {
    const { provider, keyring, cache } = setup();
    const [generated] = await wrappedKeys(provider, keyring, 1);
    const { plaintextKey, wrappedKey } = generated as GeneratedDataKey;
    for (let i = 0; i < 50; i++) {
      expect((await decryptionKey(cache, 1, wrappedKey)).equals(plaintextKey)).toBe(true);
    }
    expect(provider.unwrapped).toBe(1);
    expect(cache.stats.unwrapped).toBe(1);
  });

  it('serves 200 concurrent callers of one wrapped key on a cold cache with one unwrap', async () => {
    const { provider, keyring, cache } = setup();
    const [generated] = await wrappedKeys(provider, keyring, 1);
    const { plaintextKey, wrappedKey } = generated as GeneratedDataKey;
    const keys = await Promise.all(Array.from({ length: 200 }, () => decryptionKey(cache, 1, wrappedKey)));
    expect(provider.unwrapped).toBe(1);
    expect(keys.every((key) => key.equals(plaintextKey))).toBe(true);
  });

  it('unwraps again after unwrappedKeyTtl on the given clock and zeroes the expired key', async () => {
    const clock = new FakeClock();
    const { provider, keyring, cache } = setup({ unwrappedKeyTtl: 5_000, clock });
    const [generated] = await wrappedKeys(provider, keyring, 1);
    const { wrappedKey } = generated as GeneratedDataKey;
    const first = await decryptionKey(cache, 1, wrappedKey);
    clock.advance(4_000);
    expect(await decryptionKey(cache, 1, wrappedKey)).toBe(first);
    expect(provider.unwrapped).toBe(1);

    clock.advance(2_000);
    const second = await decryptionKey(cache, 1, wrappedKey);
    expect(provider.unwrapped).toBe(2);
    expect(second).not.toBe(first);
    expect(isZeroed(first)).toBe(true);
  });

  it('keeps at most maxUnwrappedKeys keys and zeroes the ones it evicts', async () => {
    const { provider, keyring, cache } = setup({ maxUnwrappedKeys: 3 });
    const generated = await wrappedKeys(provider, keyring, 8);
    const held: Buffer[] = [];
    for (const { wrappedKey } of generated) {
      held.push(await decryptionKey(cache, 1, wrappedKey));
      expect(cache.unwrappedKeyCount).toBeLessThanOrEqual(3);
    }
    expect(provider.unwrapped).toBe(8);
    expect(held.slice(0, 5).every(isZeroed)).toBe(true);
    expect(held.slice(5).some(isZeroed)).toBe(false);
  });

  it('serves one burst of more distinct keys than maxUnwrappedKeys on a cold cache, within the bound', async () => {
    const { provider, keyring, cache } = setup({ maxUnwrappedKeys: 3 });
    const generated = await wrappedKeys(provider, keyring, 40);
    let largest = 0;
    // Each key is asked for by several callers at once, as the rows of one result are.
    const calls = generated.flatMap(({ wrappedKey, plaintextKey }) =>
      Array.from({ length: 4 }, () =>
        cache.withDecryptionKey(1, wrappedKey, (key) => {
          largest = Math.max(largest, cache.unwrappedKeyCount);
          return key.equals(plaintextKey);
        }),
      ),
    );
    const outcomes = await Promise.allSettled(calls);
    expect(outcomes.filter((o) => o.status === 'rejected')).toEqual([]);
    expect(outcomes.every((o) => o.status === 'fulfilled' && o.value === true)).toBe(true);
    expect(largest).toBeLessThanOrEqual(3);
    expect(cache.unwrappedKeyCount).toBeLessThanOrEqual(3);
    // One unwrap per distinct key: the callers of one key share it.
    expect(provider.unwrapped).toBe(40);
  });

  it('zeroes every key of such a burst that leaves the cache', async () => {
    const { provider, keyring, cache } = setup({ maxUnwrappedKeys: 2 });
    const generated = await wrappedKeys(provider, keyring, 20);
    const handed = await Promise.all(
      generated.map(({ wrappedKey }) => cache.withDecryptionKey(1, wrappedKey, (key) => key)),
    );
    expect(cache.unwrappedKeyCount).toBeLessThanOrEqual(2);
    expect(handed.filter((key) => !isZeroed(key)).length).toBeLessThanOrEqual(2);
  });

  it('a purge while unwraps are in flight serves their callers once, caches none of them and zeroes them', async () => {
    const { provider, keyring, cache } = setup();
    const generated = await wrappedKeys(provider, keyring, 5);
    const pending = generated.map(({ wrappedKey, plaintextKey }) =>
      cache.withDecryptionKey(1, wrappedKey, (key) => ({ key, same: key.equals(plaintextKey) })),
    );
    cache.purge();
    const handed = await Promise.all(pending);
    expect(handed.map((h) => h.same)).toEqual([true, true, true, true, true]);
    expect(handed.every((h) => isZeroed(h.key))).toBe(true);
    expect(cache.unwrappedKeyCount).toBe(0);
    expect(provider.unwrapped).toBe(5);
  });

  it('passes on an IntegrityError for an altered wrapped key, and caches nothing', async () => {
    const { provider, keyring, cache } = setup();
    const [generated] = await wrappedKeys(provider, keyring, 1);
    const altered = Buffer.from((generated as GeneratedDataKey).wrappedKey);
    altered[20] = (altered[20] as number) ^ 0x10;
    await expect(decryptionKey(cache, 1, altered)).rejects.toBeInstanceOf(IntegrityError);
    await expect(decryptionKey(cache, 1, altered)).rejects.toMatchObject({ keyVersion: 1 });
    expect(cache.unwrappedKeyCount).toBe(0);
  });
});

describe('DataKeyCache purge', () => {
  it('zeroes every key and makes the next uses call the provider again', async () => {
    const { provider, keyring, cache } = setup();
    const [generated] = await wrappedKeys(provider, keyring, 1);
    const { wrappedKey } = generated as GeneratedDataKey;
    const encrypting = await encryptionKey(cache);
    const decrypting = await decryptionKey(cache, 1, wrappedKey);
    const ownKey = await decryptionKey(cache, 1, encrypting.dataKey.wrappedKey);
    expect([provider.generated, provider.unwrapped]).toEqual([1, 1]);

    cache.purge();
    expect(isZeroed(encrypting.key)).toBe(true);
    expect(isZeroed(decrypting)).toBe(true);
    expect(isZeroed(ownKey)).toBe(true);
    expect(cache.unwrappedKeyCount).toBe(0);

    await encryptionKey(cache);
    await decryptionKey(cache, 1, wrappedKey);
    await decryptionKey(cache, 1, encrypting.dataKey.wrappedKey);
    expect([provider.generated, provider.unwrapped]).toEqual([2, 3]);
  });
});

describe('DataKeyCache purge during a generation', () => {
  it('makes the waiting encryption call fetch a fresh key instead of failing, and zeroes the dropped one', async () => {
    const { provider, cache } = setup();
    const waiting = encryptionKey(cache);
    cache.purge();
    const { key, dataKey } = await waiting;
    expect(key.length).toBe(32);
    expect(isZeroed(key)).toBe(false);
    expect(dataKey.destroyed).toBe(false);
    expect(provider.generated).toBe(2);
    // The key generated before the purge serves no decryption either: only the fresh one is cached.
    expect(cache.unwrappedKeyCount).toBe(1);
  });

  it('serves every caller that joined the purged generation, through repeated purges and renewals', async () => {
    const { provider, cache } = setup({ dataKeyMaxUses: 2 });
    const waiting = Array.from({ length: 30 }, () => encryptionKey(cache));
    for (let i = 0; i < 10; i++) {
      await Promise.resolve();
      if (i % 2) cache.purge();
      else cache.renewEncryptionKey();
    }
    const settled = await Promise.allSettled(waiting);
    expect(settled.filter((s) => s.status === 'rejected')).toEqual([]);
    const keys = settled.flatMap((s) => (s.status === 'fulfilled' ? [s.value] : []));
    expect(keys).toHaveLength(30);
    // A data key never serves more than dataKeyMaxUses values, and only fresh (not zeroed) keys served.
    const uses = new Map<CachedDataKey, number>();
    for (const { dataKey } of keys) uses.set(dataKey, (uses.get(dataKey) ?? 0) + 1);
    expect(Math.max(...uses.values())).toBeLessThanOrEqual(2);
    expect(provider.generated).toBeGreaterThanOrEqual(15);
  });
});

describe('DataKeyCache options', () => {
  const names = ['dataKeyMaxAge', 'dataKeyMaxUses', 'unwrappedKeyTtl', 'maxUnwrappedKeys'] as const;
  const invalid = [
    0,
    -1,
    Number.POSITIVE_INFINITY,
    Number.NEGATIVE_INFINITY,
    Number.NaN,
    '5' as unknown as number,
  ];

  for (const name of names) {
    it.each(invalid)(`refuses ${name} = %s`, (value) => {
      expect(() => setup({ [name]: value })).toThrow(ConfigError);
    });
  }

  for (const name of ['dataKeyMaxUses', 'maxUnwrappedKeys'] as const) {
    it.each([0.5, 1.5, 1000.25])(`refuses a count ${name} = %s that is not an integer`, (value) => {
      expect(() => setup({ [name]: value })).toThrow(ConfigError);
      expect(() => setup({ [name]: value })).toThrow(new RegExp(`${name} must be a positive integer`));
    });
  }

  it.each([1_000_001, 2 ** 31, Number.MAX_SAFE_INTEGER])(
    'refuses maxUnwrappedKeys = %s, above 1,000,000, instead of allocating for it',
    (value) => {
      expect(() => setup({ maxUnwrappedKeys: value })).toThrow(ConfigError);
      expect(() => setup({ maxUnwrappedKeys: value })).toThrow(/maxUnwrappedKeys must be at most 1,000,000/);
    },
  );

  it('accepts maxUnwrappedKeys = 1,000,000', () => {
    expect(() => setup({ maxUnwrappedKeys: 1_000_000 })).not.toThrow();
  });

  for (const name of ['dataKeyMaxAge', 'unwrappedKeyTtl'] as const) {
    it.each([2 ** 31, 40 * 24 * 3_600_000])(
      `refuses ${name} = %s ms, beyond what a timer can wait`,
      (value) => {
        expect(() => setup({ [name]: value })).toThrow(ConfigError);
        expect(() => setup({ [name]: value })).toThrow(new RegExp(`${name} must be at most 2147483647`));
      },
    );

    it(`accepts ${name} = 2^31 - 1 ms without a timer warning`, () => {
      const warnings: string[] = [];
      const listener = (warning: Error) => warnings.push(warning.name);
      process.on('warning', listener);
      try {
        expect(() => setup({ [name]: 2 ** 31 - 1 })).not.toThrow();
      } finally {
        process.off('warning', listener);
      }
      expect(warnings).toEqual([]);
    });
  }

  it('accepts undefined options as the defaults', () => {
    expect(() => setup({ dataKeyMaxAge: undefined, maxUnwrappedKeys: undefined })).not.toThrow();
  });
});

describe('DataKeyCache timers', () => {
  it('never keep the process alive', () => {
    const root = resolve(__dirname, '../../..');
    // A plain node child, loading the TypeScript sources through the TypeScript compiler.
    const script = `
      const fs = require('node:fs');
      const ts = require('typescript');
      require.extensions['.ts'] = (module, file) => {
        const { outputText } = ts.transpileModule(fs.readFileSync(file, 'utf8'), {
          compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022 },
          fileName: file,
        });
        module._compile(outputText, file);
      };
      const { randomBytes } = require('node:crypto');
      const { DataKeyCache } = require('./src/keys/data-key-cache.ts');
      const { Keyring } = require('./src/keys/keyring.ts');
      const { LocalKeyProvider } = require('./src/keys/local-key-provider.ts');
      (async () => {
        const provider = new LocalKeyProvider({ key: randomBytes(32).toString('base64') });
        const keyring = new Keyring([{ version: 1, provider }], 1);
        const cache = new DataKeyCache(keyring, { dataKeyMaxUses: 3 });
        for (let i = 0; i < 10; i++) {
          await cache.withEncryptionKey(() => undefined);
          const { wrappedKey } = await provider.generateDataKey(keyring.context);
          await cache.withDecryptionKey(1, wrappedKey, () => undefined);
        }
        if (cache.unwrappedKeyCount === 0) throw new Error('the cache holds no keys');
        console.log('filled');
      })().catch((error) => {
        console.error(error);
        process.exit(2);
      });
    `;
    const child = spawnSync(process.execPath, ['-e', script], {
      cwd: root,
      encoding: 'utf8',
      timeout: 20_000,
      killSignal: 'SIGKILL',
    });
    expect(child.error).toBeUndefined();
    expect(child.signal).toBeNull();
    expect(child.stderr).toBe('');
    expect(child.stdout.trim()).toBe('filled');
    expect(child.status).toBe(0);
  });
});
