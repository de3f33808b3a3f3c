import { randomBytes } from 'node:crypto';
import Module from 'node:module';
import { inspect } from 'node:util';
import { KeyManagementServiceClient } from '@google-cloud/kms';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  ConfigError,
  GcpKmsCallError,
  GcpKmsKeyProvider,
  type GcpKmsKeyProviderOptions,
  IntegrityError,
  KeyAccessDeniedError,
  KeyProviderError,
  LocalKeyProvider,
} from '../../../../src';
import { canonicalContext } from '../../../../src/keys/key-provider';
import {
  APP_MEMBER,
  ENCRYPTER_DECRYPTER,
  type GcpKmsEmulator,
  startGcpKmsEmulator,
} from '../../../support/gcp-kms-emulator';

const CONTEXT = Object.freeze({ 'typeorm-envelope:keyring': 'main' });
const OTHER_KEYRING = Object.freeze({ 'typeorm-envelope:keyring': 'other' });
const TENANT_A = Object.freeze({ 'typeorm-envelope:keyring': 'main', 'typeorm-envelope:tenant': 'a' });
const TENANT_B = Object.freeze({ 'typeorm-envelope:keyring': 'main', 'typeorm-envelope:tenant': 'b' });

let emulator: GcpKmsEmulator;
let keyName: string;
const providers: GcpKmsKeyProvider[] = [];

/** A provider on the emulator; backoff of a few ms so retry tests do not wait. */
function provider(options: Partial<GcpKmsKeyProviderOptions> = {}): GcpKmsKeyProvider {
  const made = new GcpKmsKeyProvider({
    keyName,
    ...(options.client ? {} : emulator.connection()),
    retryDelay: 2,
    maxRetryDelay: 5,
    ...options,
  });
  providers.push(made);
  return made;
}

async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (error) {
    return error as Error;
  }
  throw new Error('expected the call to fail');
}

const crypto = () => emulator.callLog.filter((c) => c.operation === 'Encrypt' || c.operation === 'Decrypt');

beforeAll(async () => {
  emulator = await startGcpKmsEmulator();
  keyName = emulator.createKey({ id: 'main' }).name;
});
beforeEach(() => emulator.resetCalls());
afterEach(() => {
  emulator.failAll(null);
  for (const p of providers.splice(0)) p.destroy();
});
afterAll(async () => {
  await emulator?.close();
});

describe('GcpKmsKeyProvider against the Cloud KMS emulator', () => {
  it('generates a data key locally, wraps it with Encrypt, unwraps it with Decrypt; the wrapped key records its version', async () => {
    const kms = provider();
    expect(kms.describe()).toEqual({ kind: 'gcp-kms', keyReference: keyName });
    const { plaintextKey, wrappedKey } = await kms.generateDataKey(CONTEXT);
    expect(plaintextKey).toHaveLength(32);
    expect(plaintextKey.equals(Buffer.alloc(32))).toBe(false);
    expect(wrappedKey.includes(plaintextKey)).toBe(false);
    expect(GcpKmsKeyProvider.keyVersionOf(wrappedKey)).toBe(`${keyName}/cryptoKeyVersions/1`);
    const unwrapped = await kms.unwrapDataKey(wrappedKey, CONTEXT);
    expect(unwrapped.equals(plaintextKey)).toBe(true);
    expect(emulator.calls).toMatchObject({ Encrypt: 1, Decrypt: 1, GetCryptoKey: 0 });
    // Stored bytes: the recorded version, then the service's ciphertext, which names the same version.
    const header = 4 + Buffer.byteLength(`${keyName}/cryptoKeyVersions/1`);
    expect(wrappedKey.subarray(0, 2)).toEqual(Buffer.from([0x47, 0x01]));
    expect(emulator.versionOfCiphertext(wrappedKey.subarray(header))).toBe(`${keyName}/cryptoKeyVersions/1`);
  });

  it('binds every call to the keyring and tenant (canonical context as additional authenticated data) with checksums on every byte field', async () => {
    const kms = provider();
    const second = provider({ keyName: emulator.createKey().name });
    const { wrappedKey, plaintextKey } = await kms.generateDataKey(TENANT_A);
    await kms.unwrapDataKey(wrappedKey, TENANT_A);
    await kms.wrapDataKey(plaintextKey, TENANT_A);
    await kms.rewrapDataKey(wrappedKey, TENANT_A, second);
    await kms.validate(TENANT_A);
    expect(crypto().map((c) => c.operation)).toEqual([
      'Encrypt',
      'Decrypt',
      'Encrypt',
      'Decrypt',
      'Encrypt',
      'Encrypt',
      'Decrypt',
    ]);
    for (const call of crypto()) {
      expect(call.aad).toBe(canonicalContext(TENANT_A).toString('utf8'));
      expect(call.aad).toContain('"typeorm-envelope:tenant","a"');
      expect(call.checksummed).toEqual([
        call.operation === 'Encrypt' ? 'plaintext' : 'ciphertext',
        'additionalAuthenticatedData',
      ]);
      expect(call.principal).toBe(APP_MEMBER);
    }
  });

  it('refuses a wrapped key under another keyring’s or tenant’s context, or altered, with IntegrityError from the service', async () => {
    const kms = provider();
    const { wrappedKey } = await kms.generateDataKey(TENANT_A);
    const altered = Buffer.from(wrappedKey);
    altered[altered.length - 1] ^= 1;
    for (const [bytes, context] of [
      [wrappedKey, TENANT_B],
      [wrappedKey, OTHER_KEYRING],
      [altered, TENANT_A],
    ] as const) {
      emulator.resetCalls();
      const error = await rejection(kms.unwrapDataKey(bytes, context));
      expect(error).toBeInstanceOf(IntegrityError);
      expect(error.message).toContain('(INVALID_ARGUMENT)');
      expect(error).toMatchObject({ keyId: keyName });
      expect(emulator.calls.Decrypt).toBe(1); // not retried: the bytes, not the path, are wrong
      expect(error.message).not.toContain(bytes.toString('base64'));
    }
  });

  it('refuses, without calling the service, a data key wrapped by another key than the configured one', async () => {
    const other = provider({ keyName: emulator.createKey({ id: 'other-customer' }).name });
    const { wrappedKey } = await other.generateDataKey(CONTEXT);
    emulator.resetCalls();
    const error = await rejection(provider().unwrapDataKey(wrappedKey, CONTEXT));
    expect(error).toBeInstanceOf(IntegrityError);
    expect(error.message).toContain(
      `wrapped by ${other.keyName}/cryptoKeyVersions/1, a version of another key than ${keyName}`,
    );
    expect(emulator.calls.Decrypt).toBe(0);
  });

  it('refuses, without calling the service, wrapped keys that record no key version', async () => {
    const kms = provider();
    const { wrappedKey } = await kms.generateDataKey(CONTEXT);
    const nameLength = wrappedKey.readUInt16BE(2);
    const serviceCiphertext = wrappedKey.subarray(4 + nameLength);
    const keyOnly = Buffer.from(keyName);
    const withoutVersion = Buffer.concat([
      Buffer.from([0x47, 0x01, keyOnly.length >> 8, keyOnly.length & 0xff]),
      keyOnly,
      serviceCiphertext,
    ]);
    const local = await new LocalKeyProvider({ key: randomBytes(32).toString('base64') }).generateDataKey(
      CONTEXT,
    );
    emulator.resetCalls();
    for (const bytes of [
      serviceCiphertext,
      withoutVersion,
      local.wrappedKey,
      Buffer.alloc(0),
      wrappedKey.subarray(0, 4 + nameLength),
    ]) {
      const error = await rejection(kms.unwrapDataKey(bytes, CONTEXT));
      expect(error).toBeInstanceOf(IntegrityError);
      expect((error as IntegrityError).detail).toBe(
        'the wrapped data key is not one Google Cloud KMS wrapped through this provider (it records no key version)',
      );
    }
    expect(() => GcpKmsKeyProvider.keyVersionOf(serviceCiphertext)).toThrow(IntegrityError);
    expect(emulator.calls.Decrypt).toBe(0);
  });

  it('a provider pinned to one key version wraps with it only, and refuses data keys another version wrapped', async () => {
    const key = emulator.createKey({ versions: 2 });
    const [v1, v2] = key.versions as [string, string];
    const onV1 = provider({ keyName: v1 });
    const onKey = provider({ keyName: key.name });
    const { wrappedKey: byV1, plaintextKey } = await onV1.generateDataKey(CONTEXT);
    expect(GcpKmsKeyProvider.keyVersionOf(byV1)).toBe(v1); // not the primary (version 2)
    const { wrappedKey: byV2 } = await onKey.generateDataKey(CONTEXT);
    expect(GcpKmsKeyProvider.keyVersionOf(byV2)).toBe(v2);
    // The crypto key opens both; the pinned provider only its own version's.
    expect((await onKey.unwrapDataKey(byV1, CONTEXT)).equals(plaintextKey)).toBe(true);
    expect((await onV1.unwrapDataKey(byV1, CONTEXT)).equals(plaintextKey)).toBe(true);
    emulator.resetCalls();
    const error = await rejection(onV1.unwrapDataKey(byV2, CONTEXT));
    expect(error).toBeInstanceOf(IntegrityError);
    expect((error as IntegrityError).detail).toBe(
      `the data key was wrapped by ${v2}; this master-key version is pinned to ${v1}`,
    );
    expect(emulator.calls.Decrypt).toBe(0);
    expect(onV1.describe()).toEqual({ kind: 'gcp-kms', keyReference: v1 });
    // Decrypt is called on the crypto key; the service finds the version in the ciphertext.
    expect(emulator.callLog.every((c) => c.name === key.name || c.operation !== 'Decrypt')).toBe(true);
  });

  it('refuses data keys that are not 256 bits, on the way in and on the way out', async () => {
    const kms = provider();
    for (const size of [0, 16, 31, 33, 64]) {
      expect(await rejection(kms.wrapDataKey(randomBytes(size), CONTEXT))).toBeInstanceOf(KeyProviderError);
    }
    expect(emulator.calls.Encrypt).toBe(0);
    // A ciphertext of 16 bytes under this very key and context, filed as a data key.
    const raw = new KeyManagementServiceClient({ fallback: 'rest', ...emulator.connection() });
    const [out] = await raw.encrypt({
      name: keyName,
      plaintext: randomBytes(16),
      additionalAuthenticatedData: canonicalContext(CONTEXT),
    });
    await raw.close();
    const version = Buffer.from(String(out.name));
    const short = Buffer.concat([
      Buffer.from([0x47, 0x01, 0, version.length]),
      version,
      Buffer.from(out.ciphertext as Uint8Array),
    ]);
    const error = await rejection(kms.unwrapDataKey(short, CONTEXT));
    expect(error).toBeInstanceOf(KeyProviderError);
    expect(error.message).toContain('GCP KMS Decrypt returned a malformed data key');
  });
});

describe('checksums (the client verifies none)', () => {
  it('an Encrypt answer altered on the way is retried, and only the intact wrapped key is returned', async () => {
    const kms = provider();
    emulator.injectFaults({ operation: 'Encrypt', fault: 'corrupt-response', times: 1 });
    const { plaintextKey, wrappedKey } = await kms.generateDataKey(CONTEXT);
    expect(emulator.calls.Encrypt).toBe(2);
    expect((await kms.unwrapDataKey(wrappedKey, CONTEXT)).equals(plaintextKey)).toBe(true);
  });

  it('a Decrypt answer altered on the way is retried; the altered key is never returned', async () => {
    const kms = provider();
    const { plaintextKey, wrappedKey } = await kms.generateDataKey(CONTEXT);
    emulator.resetCalls();
    emulator.injectFaults({ operation: 'Decrypt', fault: 'corrupt-response', times: 2 });
    expect((await kms.unwrapDataKey(wrappedKey, CONTEXT)).equals(plaintextKey)).toBe(true);
    expect(emulator.calls.Decrypt).toBe(3);
  });

  it('a request altered on the way is refused by the service (INVALID_ARGUMENT on its checksum) and sent again', async () => {
    const kms = provider();
    const { plaintextKey, wrappedKey } = await kms.generateDataKey(CONTEXT);
    emulator.resetCalls();
    emulator.injectFaults({ operation: 'Decrypt', fault: 'corrupt-request', times: 1 });
    expect((await kms.unwrapDataKey(wrappedKey, CONTEXT)).equals(plaintextKey)).toBe(true);
    expect(emulator.callLog.map((c) => c.error ?? c.status)).toEqual(['INVALID_ARGUMENT', 200]);
  });

  it('answers that stay altered fail with a KeyProviderError after maxAttempts, and nothing is returned', async () => {
    const kms = provider({ maxAttempts: 3 });
    emulator.failAll('corrupt-response');
    const error = await rejection(kms.generateDataKey(CONTEXT));
    expect(error).toBeInstanceOf(KeyProviderError);
    expect(error).not.toBeInstanceOf(KeyAccessDeniedError);
    expect(error.message).toContain(
      'GCP KMS Encrypt failed after 3 attempts: the ciphertext does not match its checksum (corrupted in transit) (CHECKSUM_MISMATCH)',
    );
    expect(emulator.calls.Encrypt).toBe(3);
  });
});

describe('errors and retries', () => {
  it('a removed IAM binding, a disabled or destroyed version and a missing key raise KeyAccessDeniedError, without retries', async () => {
    const revoked = emulator.createKey();
    const disabled = emulator.createKey();
    const destroyed = emulator.createKey();
    const kmsRevoked = provider({ keyName: revoked.name });
    const kmsDisabled = provider({ keyName: disabled.name });
    const kmsDestroyed = provider({ keyName: destroyed.name });
    const wrapped = await kmsDisabled.generateDataKey(CONTEXT);
    const wrappedDestroyed = await kmsDestroyed.generateDataKey(CONTEXT);
    emulator.revoke(revoked.name, APP_MEMBER, ENCRYPTER_DECRYPTER);
    emulator.setVersionState(disabled.primary as string, 'DISABLED');
    emulator.setVersionState(destroyed.primary as string, 'DESTROYED');
    const missing = `${keyName.replace(/[^/]+$/, 'no-such-key')}`;
    const cases: Array<[() => Promise<unknown>, string, string]> = [
      [
        () => kmsRevoked.generateDataKey(CONTEXT),
        'access to the GCP KMS key was denied (PERMISSION_DENIED)',
        "Permission 'cloudkms.cryptoKeyVersions.useToEncrypt' denied",
      ],
      [
        () => kmsDisabled.unwrapDataKey(wrapped.wrappedKey, CONTEXT),
        'the GCP KMS key version is disabled or destroyed (FAILED_PRECONDITION)',
        'has value DISABLED',
      ],
      [
        () => kmsDisabled.generateDataKey(CONTEXT),
        'the GCP KMS key version is disabled or destroyed (FAILED_PRECONDITION)',
        'has value DISABLED',
      ],
      [
        () => kmsDestroyed.unwrapDataKey(wrappedDestroyed.wrappedKey, CONTEXT),
        'the GCP KMS key version is disabled or destroyed (FAILED_PRECONDITION)',
        'has value DESTROYED',
      ],
      [
        () => provider({ keyName: missing }).generateDataKey(CONTEXT),
        'the GCP KMS key was not found (NOT_FOUND)',
        'not found',
      ],
    ];
    emulator.resetCalls();
    for (const [call, what, said] of cases) {
      const error = await rejection(call());
      expect(error).toBeInstanceOf(KeyAccessDeniedError);
      expect((error as KeyAccessDeniedError).detail.startsWith(what)).toBe(true);
      expect(error.message).toContain(said);
      expect(error.cause).toBeInstanceOf(GcpKmsCallError);
    }
    expect(emulator.callLog).toHaveLength(cases.length); // one call each
  });

  it('500 then 200: the write succeeds on the second attempt', async () => {
    const kms = provider();
    emulator.injectFaults({ operation: 'Encrypt', fault: 'INTERNAL', times: 1 });
    const { wrappedKey } = await kms.generateDataKey(CONTEXT);
    expect(emulator.callLog.map((c) => c.status)).toEqual([500, 200]);
    expect(GcpKmsKeyProvider.keyVersionOf(wrappedKey)).toBe(`${keyName}/cryptoKeyVersions/1`);
  });

  it('rides out throttling (429) and UNAVAILABLE (503) with backoff, in the provider', async () => {
    const kms = provider();
    const { wrappedKey } = await kms.generateDataKey(CONTEXT);
    emulator.resetCalls();
    emulator.injectFaults({ operation: 'Decrypt', fault: 'RESOURCE_EXHAUSTED', times: 2 });
    emulator.injectFaults({ operation: 'Decrypt', fault: 'UNAVAILABLE', times: 2 });
    await expect(kms.unwrapDataKey(wrappedKey, CONTEXT)).resolves.toHaveLength(32);
    expect(emulator.callLog.map((c) => c.status)).toEqual([429, 429, 503, 503, 200]);
    expect(emulator.faults.Decrypt).toBe(4);
  });

  it('an outage fails with a KeyProviderError after maxAttempts (default 5), not an access error', async () => {
    const kms = provider();
    emulator.failAll('UNAVAILABLE');
    const error = await rejection(kms.generateDataKey(CONTEXT));
    expect(error).toBeInstanceOf(KeyProviderError);
    expect(error).not.toBeInstanceOf(KeyAccessDeniedError);
    expect((error as KeyProviderError).detail).toMatch(
      /^GCP KMS Encrypt failed after 5 attempts \(UNAVAILABLE\)/,
    );
    expect(error).toMatchObject({ keyId: keyName });
    expect(error.cause).toMatchObject({ status: 'UNAVAILABLE', httpStatus: 503 });
    expect(emulator.calls.Encrypt).toBe(5);

    emulator.resetCalls();
    emulator.failAll('RESOURCE_EXHAUSTED');
    const throttled = await rejection(provider({ maxAttempts: 2 }).generateDataKey(CONTEXT));
    expect(throttled.message).toContain('failed after 2 attempts (RESOURCE_EXHAUSTED)');
    expect(emulator.calls.Encrypt).toBe(2);
  });

  it('credentials the service does not accept are a KeyProviderError, not a revocation', async () => {
    const connection = emulator.connection();
    connection.authClient.setCredentials({ access_token: 'expired-or-foreign-token' });
    const error = await rejection(provider(connection).generateDataKey(CONTEXT));
    expect(error).toBeInstanceOf(KeyProviderError);
    expect(error).not.toBeInstanceOf(KeyAccessDeniedError);
    expect(error.message).toContain(
      "the service did not accept the application's credentials (UNAUTHENTICATED)",
    );
    expect(emulator.calls.Encrypt).toBe(1);
  });

  it('a refused connection is retried, then a KeyProviderError naming the network error', async () => {
    const closed = await startGcpKmsEmulator();
    const port = closed.port;
    await closed.close();
    const error = await rejection(
      provider({ ...emulator.connection(), port, maxAttempts: 2 }).generateDataKey(CONTEXT),
    );
    expect(error).toBeInstanceOf(KeyProviderError);
    expect(error.message).toContain('GCP KMS Encrypt failed after 2 attempts (ECONNREFUSED)');
  });

  it('never carries the data key, the request or the token in an error, its cause or inspect output', async () => {
    const dataKey = randomBytes(32);
    const token = emulator.tokenFor(APP_MEMBER);
    const closed = await startGcpKmsEmulator();
    const port = closed.port;
    await closed.close();
    const failures = [
      await rejection(
        provider({ ...emulator.connection(), port, maxAttempts: 1 }).wrapDataKey(dataKey, CONTEXT),
      ),
    ];
    emulator.failAll('PERMISSION_DENIED');
    failures.push(await rejection(provider().wrapDataKey(dataKey, CONTEXT)));
    emulator.failAll('hang');
    failures.push(
      await rejection(provider({ requestTimeout: 50, maxAttempts: 1 }).wrapDataKey(dataKey, CONTEXT)),
    );
    for (const error of failures) {
      const printed = `${inspect(error, { showHidden: true, depth: 20 })}\n${JSON.stringify(error)}\n${error.message}`;
      for (const secret of [dataKey.toString('base64'), dataKey.toString('hex'), token]) {
        expect(printed).not.toContain(secret);
      }
      expect(Object.keys(error.cause as object)).not.toContain('config');
    }
  });
});

describe('validation names the failed check', () => {
  it('key exists, purpose ENCRYPT_DECRYPT, primary version enabled, then a round trip', async () => {
    type Case = [make: () => string, detail: (name: string) => string, type: typeof KeyProviderError];
    const cases: Case[] = [
      [
        () => keyName.replace(/[^/]+$/, 'never-created'),
        () => 'the GCP KMS key was not found (NOT_FOUND)',
        KeyAccessDeniedError,
      ],
      [
        () => emulator.createKey({ purpose: 'ASYMMETRIC_DECRYPT' }).name,
        () => 'key purpose is ASYMMETRIC_DECRYPT; a symmetric ENCRYPT_DECRYPT key is required',
        KeyProviderError,
      ],
      [
        () => emulator.createKey({ purpose: 'RAW_ENCRYPT_DECRYPT' }).name,
        () => 'key purpose is RAW_ENCRYPT_DECRYPT; a symmetric ENCRYPT_DECRYPT key is required',
        KeyProviderError,
      ],
      [
        () => emulator.createKey({ versions: 0 }).name,
        () => 'key has no primary version; an ENABLED primary version is required',
        KeyAccessDeniedError,
      ],
      [
        () => {
          const key = emulator.createKey();
          emulator.setVersionState(key.primary as string, 'DISABLED');
          return key.name;
        },
        (name) =>
          `primary version ${name}/cryptoKeyVersions/1 is DISABLED; an ENABLED primary version is required`,
        KeyAccessDeniedError,
      ],
      [
        () => {
          const key = emulator.createKey({ versions: 2 });
          emulator.setVersionState(key.versions[0] as string, 'DESTROYED');
          return key.versions[0] as string;
        },
        (name) => `key version ${name} is DESTROYED; an ENABLED key version is required`,
        KeyAccessDeniedError,
      ],
    ];
    for (const [make, detail, type] of cases) {
      const name = make();
      emulator.resetCalls();
      const error = await rejection(provider({ keyName: name }).validate(CONTEXT));
      expect(error).toBeInstanceOf(type);
      if (type === KeyProviderError) expect(error).not.toBeInstanceOf(KeyAccessDeniedError);
      expect((error as KeyProviderError).detail.startsWith(detail(name))).toBe(true);
      expect(error).toMatchObject({ keyId: name });
      expect(emulator.calls.Encrypt).toBe(0); // the round trip comes last
    }
  });

  it('without cloudkms.cryptoKeys.get (no viewer role) validation says which permission is missing', async () => {
    const key = emulator.createKey({ bindings: { [ENCRYPTER_DECRYPTER]: [APP_MEMBER] } });
    const error = await rejection(provider({ keyName: key.name }).validate(CONTEXT));
    expect(error).toBeInstanceOf(KeyAccessDeniedError);
    expect(error.message).toContain("Permission 'cloudkms.cryptoKeys.get' denied");
  });

  it('a valid key: GetCryptoKey, then an Encrypt → Decrypt round trip; a pinned version is read too', async () => {
    await provider().validate(CONTEXT);
    expect(emulator.callLog.map((c) => c.operation)).toEqual(['GetCryptoKey', 'Encrypt', 'Decrypt']);
    emulator.resetCalls();
    const pinned = provider({ keyName: `${keyName}/cryptoKeyVersions/1` });
    await pinned.validate(CONTEXT);
    expect(emulator.callLog.map((c) => c.operation)).toEqual([
      'GetCryptoKey',
      'GetCryptoKeyVersion',
      'Encrypt',
      'Decrypt',
    ]);
    await expect(pinned.describeKey()).resolves.toEqual({
      name: keyName,
      purpose: 'ENCRYPT_DECRYPT',
      primary: {
        name: `${keyName}/cryptoKeyVersions/1`,
        state: 'ENABLED',
        algorithm: 'GOOGLE_SYMMETRIC_ENCRYPTION',
        protectionLevel: 'SOFTWARE',
      },
      version: {
        name: `${keyName}/cryptoKeyVersions/1`,
        state: 'ENABLED',
        algorithm: 'GOOGLE_SYMMETRIC_ENCRYPTION',
        protectionLevel: 'SOFTWARE',
      },
    });
  });
});

describe('references, rewrap, client', () => {
  it('records the configured name as the key reference: the crypto key, or the pinned version', async () => {
    const kms = provider();
    expect(await kms.resolveKeyReference()).toBe(keyName);
    expect(await kms.hasKeyReference(keyName)).toBe(true);
    expect(await kms.hasKeyReference(`${keyName}/cryptoKeyVersions/1`)).toBe(false);
    const pinned = provider({ keyName: `${keyName}/cryptoKeyVersions/1` });
    expect(await pinned.resolveKeyReference()).toBe(`${keyName}/cryptoKeyVersions/1`);
    expect(await pinned.hasKeyReference(keyName)).toBe(false);
    expect(emulator.callLog).toEqual([]); // names are canonical: no call to resolve them
  });

  it('rewraps to another Cloud KMS key, to a local key and from one (unwrap here, wrap there)', async () => {
    const kms = provider();
    const other = provider({ keyName: emulator.createKey().name });
    const local = new LocalKeyProvider({ key: randomBytes(32).toString('base64') });
    const { plaintextKey, wrappedKey } = await kms.generateDataKey(CONTEXT);
    emulator.resetCalls();
    const moved = await kms.rewrapDataKey(wrappedKey, CONTEXT, other);
    expect(crypto().map((c) => [c.operation, c.name])).toEqual([
      ['Decrypt', keyName],
      ['Encrypt', other.keyName],
    ]);
    expect((await other.unwrapDataKey(moved, CONTEXT)).equals(plaintextKey)).toBe(true);
    expect(await rejection(kms.unwrapDataKey(moved, CONTEXT))).toBeInstanceOf(IntegrityError);
    const inLocal = await kms.rewrapDataKey(wrappedKey, CONTEXT, local);
    expect((await local.unwrapDataKey(inLocal, CONTEXT)).equals(plaintextKey)).toBe(true);
    const back = await local.rewrapDataKey(inLocal, CONTEXT, kms);
    expect((await kms.unwrapDataKey(back, CONTEXT)).equals(plaintextKey)).toBe(true);
  });

  it('shares one client between providers; destroy() leaves a client passed in open', async () => {
    const shared = GcpKmsKeyProvider.createClient(emulator.connection());
    const a = provider({ client: shared });
    const b = provider({ client: shared, keyName: emulator.createKey().name });
    expect(a.client).toBe(shared);
    const { wrappedKey } = await a.generateDataKey(CONTEXT);
    a.destroy();
    await expect(a.unwrapDataKey(wrappedKey, CONTEXT)).resolves.toHaveLength(32);
    await expect(b.generateDataKey(CONTEXT)).resolves.toBeDefined();
    await shared.close();
  });

  it('prints only kind and keyName', () => {
    const kms = provider();
    expect(inspect(kms)).toBe(`GcpKmsKeyProvider { kind: 'gcp-kms', keyName: '${keyName}' }`);
    expect(JSON.parse(JSON.stringify({ kms }))).toEqual({ kms: { kind: 'gcp-kms', keyName } });
    expect(inspect(kms)).not.toContain(emulator.tokenFor(APP_MEMBER));
  });
});

describe('GcpKmsKeyProvider configuration', () => {
  it('requires keyName: a crypto key or one of its versions', () => {
    for (const bad of [
      undefined,
      '',
      '  ',
      42,
      'alias/app',
      'projects/p/locations/l/keyRings/r',
      `${'projects/p/locations/l/keyRings/r/cryptoKeys/k'} `,
      'projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/0',
      'projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/x',
    ]) {
      expect(() => new GcpKmsKeyProvider({ keyName: bad } as unknown as GcpKmsKeyProviderOptions)).toThrow(
        ConfigError,
      );
    }
    expect(() => new GcpKmsKeyProvider({ keyName: '' })).toThrow(/needs keyName/);
  });

  it('refuses client together with options that build a client, and bad numbers', () => {
    const client = GcpKmsKeyProvider.createClient(emulator.connection());
    const build = (extra: Partial<GcpKmsKeyProviderOptions>) => () =>
      new GcpKmsKeyProvider({ keyName, client, ...extra });
    expect(build({ authClient: emulator.connection().authClient })).toThrow(
      'Cannot set both client and authClient',
    );
    expect(build({ apiEndpoint: '127.0.0.1' })).toThrow('Cannot set both client and apiEndpoint');
    expect(build({ clientOptions: {} })).toThrow('Cannot set both client and clientOptions');
    expect(build({ requestTimeout: 1_000, maxAttempts: 2 })).not.toThrow();
    for (const value of [0, -1, Number.NaN, Number.POSITIVE_INFINITY, '5' as unknown as number]) {
      expect(build({ requestTimeout: value })).toThrow(
        /requestTimeout must be a positive number of milliseconds/,
      );
      expect(build({ retryDelay: value })).toThrow(ConfigError);
    }
    expect(build({ maxAttempts: 0 })).toThrow('maxAttempts must be a positive integer, got 0');
    expect(build({ maxAttempts: 1.5 })).toThrow(ConfigError);
    expect(() => new GcpKmsKeyProvider({ keyName, protocol: 'ftp' as 'http' })).toThrow(ConfigError);
    expect(() => new GcpKmsKeyProvider({ keyName, port: 70_000 })).toThrow(ConfigError);
  });

  it('explains how to install @google-cloud/kms when it is missing', () => {
    const loader = Module as unknown as { _load: (request: string, ...rest: unknown[]) => unknown };
    const original = loader._load;
    loader._load = function (this: unknown, request: string, ...rest: unknown[]) {
      if (request === '@google-cloud/kms') {
        throw Object.assign(new Error(`Cannot find module '${request}'`), { code: 'MODULE_NOT_FOUND' });
      }
      return original.call(this, request, ...rest);
    };
    try {
      const error = (() => {
        try {
          new GcpKmsKeyProvider({ keyName });
        } catch (e) {
          return e as Error;
        }
        throw new Error('expected a ConfigError');
      })();
      expect(error).toBeInstanceOf(ConfigError);
      expect(error.message).toBe(
        'GcpKmsKeyProvider needs the optional peer dependency @google-cloud/kms: npm install @google-cloud/kms',
      );
    } finally {
      loader._load = original;
    }
  });
});
