import { randomBytes } from 'node:crypto';
import { KeyManagementServiceClient } from '@google-cloud/kms';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { crc32c } from '../../../../src/keys/crc32c';
import {
  ADMIN_MEMBER,
  APP_MEMBER,
  ENCRYPTER_DECRYPTER,
  type GcpKmsEmulator,
  startGcpKmsEmulator,
} from '../../../support/gcp-kms-emulator';

/**
 * The emulator, driven by the real `@google-cloud/kms` 5.7.0 client in REST mode, exactly as the
 * provider drives it: these tests pin down the protocol facts the provider relies on.
 */
let emulator: GcpKmsEmulator;
const clients: KeyManagementServiceClient[] = [];

const client = (member = APP_MEMBER) => {
  const made = new KeyManagementServiceClient({ fallback: 'rest', ...emulator.connection(member) });
  clients.push(made);
  return made;
};
const sum = (bytes: Buffer) => ({ value: crc32c(bytes) });

async function rejection(promise: Promise<unknown>): Promise<Error & { code?: unknown; status?: unknown }> {
  try {
    await promise;
  } catch (error) {
    return error as Error;
  }
  throw new Error('expected the call to fail');
}

/** The `{ error: { code, message, status } }` body a REST error carries as its message. */
const body = (error: Error) =>
  JSON.parse(error.message).error as { code: number; status: string; message: string };

beforeAll(async () => {
  emulator = await startGcpKmsEmulator();
});
afterEach(() => {
  emulator.failAll(null);
  emulator.setLatency(0);
  emulator.resetCalls();
});
afterAll(async () => {
  for (const c of clients) await c.close();
  await emulator?.close();
});

describe('encrypt and decrypt through the real client (REST)', () => {
  it('round-trips with additional authenticated data and checks and returns CRC32C checksums', async () => {
    const key = emulator.createKey();
    const kms = client();
    const plaintext = randomBytes(32);
    const aad = Buffer.from('[["typeorm-envelope:keyring","default"]]');
    const [encrypted] = await kms.encrypt({
      name: key.name,
      plaintext,
      additionalAuthenticatedData: aad,
      plaintextCrc32c: sum(plaintext),
      additionalAuthenticatedDataCrc32c: sum(aad),
    });
    expect(encrypted.name).toBe(`${key.name}/cryptoKeyVersions/1`);
    expect(encrypted.verifiedPlaintextCrc32c).toBe(true);
    expect(encrypted.verifiedAdditionalAuthenticatedDataCrc32c).toBe(true);
    const ciphertext = Buffer.from(encrypted.ciphertext as Uint8Array);
    // Int64 checksums arrive as strings (REST maps int64 to JSON strings).
    expect(encrypted.ciphertextCrc32c).toEqual({ value: String(crc32c(ciphertext)) });
    expect(encrypted.protectionLevel).toBe('SOFTWARE'); // sent as 1, named by the client
    expect(ciphertext.includes(plaintext)).toBe(false);

    const [decrypted] = await kms.decrypt({
      name: key.name,
      ciphertext,
      additionalAuthenticatedData: aad,
      ciphertextCrc32c: sum(ciphertext),
      additionalAuthenticatedDataCrc32c: sum(aad),
    });
    expect(Buffer.from(decrypted.plaintext as Uint8Array).equals(plaintext)).toBe(true);
    expect(decrypted.plaintextCrc32c).toEqual({ value: String(crc32c(plaintext)) });
    expect(decrypted.usedPrimary).toBe(true);

    expect(emulator.calls).toMatchObject({ Encrypt: 1, Decrypt: 1 });
    expect(emulator.callLog).toEqual([
      {
        operation: 'Encrypt',
        name: key.name,
        principal: APP_MEMBER,
        aad: aad.toString(),
        checksummed: ['plaintext', 'additionalAuthenticatedData'],
        version: `${key.name}/cryptoKeyVersions/1`,
        status: 200,
      },
      {
        operation: 'Decrypt',
        name: key.name,
        principal: APP_MEMBER,
        aad: aad.toString(),
        checksummed: ['ciphertext', 'additionalAuthenticatedData'],
        version: `${key.name}/cryptoKeyVersions/1`,
        status: 200,
      },
    ]);
  });

  it('refuses a request whose checksum does not match its bytes, as the service does; without one, nothing is verified', async () => {
    const key = emulator.createKey();
    const kms = client();
    const plaintext = randomBytes(32);
    const wrong = await rejection(
      kms.encrypt({ name: key.name, plaintext, plaintextCrc32c: { value: (crc32c(plaintext) ^ 1) >>> 0 } }),
    );
    expect(wrong.code).toBe(400);
    expect(body(wrong)).toMatchObject({ status: 'INVALID_ARGUMENT' });
    expect(body(wrong).message).toContain('plaintext_crc32c');

    const [unchecked] = await kms.encrypt({ name: key.name, plaintext });
    expect(unchecked.verifiedPlaintextCrc32c).toBe(false);
    expect(unchecked.verifiedAdditionalAuthenticatedDataCrc32c).toBe(false);

    const ciphertext = Buffer.from(unchecked.ciphertext as Uint8Array);
    const badCiphertextSum = await rejection(
      kms.decrypt({
        name: key.name,
        ciphertext,
        ciphertextCrc32c: { value: (crc32c(ciphertext) ^ 1) >>> 0 },
      }),
    );
    expect(body(badCiphertextSum).message).toContain('ciphertext_crc32c');
  });

  it('refuses other additional authenticated data, another key’s ciphertext and altered bytes with INVALID_ARGUMENT', async () => {
    const key = emulator.createKey();
    const other = emulator.createKey();
    const kms = client();
    const aad = Buffer.from('tenant a');
    const [out] = await kms.encrypt({
      name: key.name,
      plaintext: randomBytes(32),
      additionalAuthenticatedData: aad,
    });
    const ciphertext = Buffer.from(out.ciphertext as Uint8Array);
    const altered = Buffer.from(ciphertext);
    altered[altered.length - 1] ^= 1;
    for (const request of [
      { name: key.name, ciphertext, additionalAuthenticatedData: Buffer.from('tenant b') },
      { name: key.name, ciphertext },
      { name: other.name, ciphertext, additionalAuthenticatedData: aad },
      { name: key.name, ciphertext: altered, additionalAuthenticatedData: aad },
    ]) {
      const error = await rejection(kms.decrypt(request));
      expect(error.code).toBe(400);
      expect(body(error)).toEqual({
        code: 400,
        status: 'INVALID_ARGUMENT',
        message: 'Decryption failed: the ciphertext is invalid.',
      });
    }
  });

  it('sends `$alt=json;enum-encoding=int`: enums go out as numbers and the client names them', async () => {
    const key = emulator.createKey();
    const [cryptoKey] = await client().getCryptoKey({ name: key.name });
    expect(cryptoKey).toMatchObject({
      name: key.name,
      purpose: 'ENCRYPT_DECRYPT',
      primary: { name: key.primary, state: 'ENABLED', algorithm: 'GOOGLE_SYMMETRIC_ENCRYPTION' },
    });
    const url = `http://127.0.0.1:${emulator.port}/v1/${key.name}`;
    const headers = { authorization: `Bearer ${emulator.tokenFor(APP_MEMBER)}` };
    const numeric = await (await fetch(`${url}?$alt=json%3Benum-encoding=int`, { headers })).json();
    expect(numeric).toMatchObject({ purpose: 1, primary: { state: 1, algorithm: 1 } });
    const named = await (await fetch(url, { headers })).json();
    expect(named).toMatchObject({ purpose: 'ENCRYPT_DECRYPT', primary: { state: 'ENABLED' } });
  });
});

describe('key versions through the real client', () => {
  it('creates a version, makes it primary, disables the old one (PATCH ?updateMask=state) and schedules its destruction', async () => {
    const key = emulator.createKey();
    const admin = client(ADMIN_MEMBER);
    const app = client();
    const [old] = await app.encrypt({ name: key.name, plaintext: Buffer.from('under version 1') });

    const [created] = await admin.createCryptoKeyVersion({ parent: key.name, cryptoKeyVersion: {} });
    expect(created).toMatchObject({ name: `${key.name}/cryptoKeyVersions/2`, state: 'ENABLED' });
    expect(emulator.keyInfo(key.name).primary).toBe(`${key.name}/cryptoKeyVersions/1`); // not primary yet
    const [updated] = await admin.updateCryptoKeyPrimaryVersion({ name: key.name, cryptoKeyVersionId: '2' });
    expect(updated.primary?.name).toBe(`${key.name}/cryptoKeyVersions/2`);
    const [fresh] = await app.encrypt({ name: key.name, plaintext: Buffer.from('under version 2') });
    expect(fresh.name).toBe(`${key.name}/cryptoKeyVersions/2`);
    // An explicit version name encrypts under that version, primary or not.
    const [pinned] = await app.encrypt({
      name: `${key.name}/cryptoKeyVersions/1`,
      plaintext: Buffer.from('x'),
    });
    expect(pinned.name).toBe(`${key.name}/cryptoKeyVersions/1`);

    const [disabled] = await admin.updateCryptoKeyVersion({
      cryptoKeyVersion: { name: `${key.name}/cryptoKeyVersions/1`, state: 'DISABLED' },
      updateMask: { paths: ['state'] },
    });
    expect(disabled.state).toBe('DISABLED');
    const refused = await rejection(app.decrypt({ name: key.name, ciphertext: old.ciphertext }));
    expect(refused.code).toBe(400);
    expect(body(refused).status).toBe('FAILED_PRECONDITION');
    expect(body(refused).message).toContain('has value DISABLED in field crypto_key_version.state');
    const [destroyed] = await admin.destroyCryptoKeyVersion({ name: `${key.name}/cryptoKeyVersions/1` });
    expect(destroyed.state).toBe('DESTROY_SCHEDULED');
    expect(emulator.calls).toMatchObject({
      CreateCryptoKeyVersion: 1,
      UpdateCryptoKeyPrimaryVersion: 1,
      UpdateCryptoKeyVersion: 1,
      DestroyCryptoKeyVersion: 1,
    });
  });
});

describe('identity and IAM', () => {
  it('refuses a missing or unknown token (401), a member without the permission (403) and an unknown key (404)', async () => {
    const key = emulator.createKey({ bindings: { [ENCRYPTER_DECRYPTER]: [APP_MEMBER] } });
    const app = client();
    const noViewer = await rejection(app.getCryptoKey({ name: key.name }));
    expect(noViewer.code).toBe(403);
    expect(body(noViewer).message).toBe(
      `Permission 'cloudkms.cryptoKeys.get' denied on resource '${key.name}' (or it may not exist).`,
    );
    expect(
      (await rejection(app.createCryptoKeyVersion({ parent: key.name, cryptoKeyVersion: {} }))).code,
    ).toBe(403);

    emulator.revoke(key.name, APP_MEMBER);
    const revoked = await rejection(app.encrypt({ name: key.name, plaintext: Buffer.from('x') }));
    expect(body(revoked)).toMatchObject({ code: 403, status: 'PERMISSION_DENIED' });
    expect(emulator.callLog.at(-1)).toMatchObject({
      principal: APP_MEMBER,
      status: 403,
      error: 'PERMISSION_DENIED',
    });

    const unknownToken = emulator.connection();
    unknownToken.authClient.setCredentials({ access_token: 'not-a-token-the-emulator-issued' });
    const stranger = new KeyManagementServiceClient({ fallback: 'rest', ...unknownToken });
    clients.push(stranger);
    const unauthenticated = await rejection(
      stranger.encrypt({ name: key.name, plaintext: Buffer.from('x') }),
    );
    expect(body(unauthenticated)).toMatchObject({ code: 401, status: 'UNAUTHENTICATED' });

    const missing = await rejection(
      app.encrypt({ name: `${key.name.replace(/[^/]+$/, 'no-such-key')}`, plaintext: Buffer.from('x') }),
    );
    expect(body(missing)).toMatchObject({ code: 404, status: 'NOT_FOUND' });
  });
});

describe('faults', () => {
  it('answers injected faults with the service’s statuses, and counts them', async () => {
    const key = emulator.createKey();
    const kms = client();
    const cases = [
      ['RESOURCE_EXHAUSTED', 429],
      ['UNAVAILABLE', 503],
      ['INTERNAL', 500],
      ['DEADLINE_EXCEEDED', 504],
      ['PERMISSION_DENIED', 403],
    ] as const;
    for (const [fault, status] of cases) {
      emulator.injectFaults({ operation: 'Encrypt', fault, times: 1 });
      const error = await rejection(kms.encrypt({ name: key.name, plaintext: Buffer.from('x') }));
      expect(error.code).toBe(status);
      expect(body(error).status).toBe(fault);
    }
    expect(emulator.calls.Encrypt).toBe(cases.length);
    expect(emulator.faults.Encrypt).toBe(cases.length);
    await expect(kms.encrypt({ name: key.name, plaintext: Buffer.from('x') })).resolves.toBeDefined();
  });

  it('an altered answer reaches the caller as it is: the client verifies no checksum', async () => {
    const key = emulator.createKey();
    const kms = client();
    emulator.injectFaults({ operation: 'Encrypt', fault: 'corrupt-response', times: 1 });
    const [encrypted] = await kms.encrypt({ name: key.name, plaintext: randomBytes(32) });
    const ciphertext = Buffer.from(encrypted.ciphertext as Uint8Array);
    expect(String(encrypted.ciphertextCrc32c?.value)).not.toBe(String(crc32c(ciphertext)));

    emulator.injectFaults({ operation: 'Decrypt', fault: 'corrupt-response', times: 1 });
    const [good] = await kms.encrypt({ name: key.name, plaintext: randomBytes(32) });
    const [decrypted] = await kms.decrypt({ name: key.name, ciphertext: good.ciphertext });
    const plaintext = Buffer.from(decrypted.plaintext as Uint8Array);
    expect(String(decrypted.plaintextCrc32c?.value)).not.toBe(String(crc32c(plaintext)));
  });

  it('a request altered on the way fails its checksum and is refused with INVALID_ARGUMENT', async () => {
    const key = emulator.createKey();
    const plaintext = randomBytes(32);
    emulator.injectFaults({ operation: 'Encrypt', fault: 'corrupt-request', times: 1 });
    const error = await rejection(
      client().encrypt({ name: key.name, plaintext, plaintextCrc32c: sum(plaintext) }),
    );
    expect(body(error)).toMatchObject({ code: 400, status: 'INVALID_ARGUMENT' });
    expect(body(error).message).toContain('checksum');
  });

  it('the client’s own retries do not fire in REST mode: one UNAVAILABLE is one failed call', async () => {
    // Its configuration retries UNAVAILABLE for Encrypt and Decrypt ("idempotent" codes), but in
    // REST mode the error carries the HTTP status (503), not the gRPC code (14).
    const key = emulator.createKey();
    const kms = client();
    for (const operation of ['Encrypt', 'GetCryptoKey'] as const) {
      emulator.injectFaults({ operation, fault: 'UNAVAILABLE', times: 1 });
      const error =
        operation === 'Encrypt'
          ? await rejection(kms.encrypt({ name: key.name, plaintext: Buffer.from('x') }))
          : await rejection(kms.getCryptoKey({ name: key.name }));
      expect(error.constructor.name).toBe('GaxiosError');
      expect(error.code).toBe(503);
      expect(emulator.calls[operation]).toBe(1);
    }
  });

  it('the client’s deadline does not apply in REST mode: a 1 ms timeout still gets a slow answer', async () => {
    const key = emulator.createKey();
    emulator.setLatency(200);
    const [out] = await client().encrypt({ name: key.name, plaintext: Buffer.from('x') }, { timeout: 1 });
    expect(out.name).toBe(`${key.name}/cryptoKeyVersions/1`);
  });

  it('a hung request is read and never answered; closing the emulator drops it', async () => {
    const key = emulator.createKey();
    emulator.failAll('hang');
    let settled = false;
    const pending = client()
      .encrypt({ name: key.name, plaintext: Buffer.from('x') })
      .finally(() => {
        settled = true;
      });
    while (emulator.calls.Encrypt === 0) await new Promise((resolve) => setTimeout(resolve, 5));
    expect(emulator.callLog.at(-1)).toMatchObject({ operation: 'Encrypt', principal: APP_MEMBER });
    expect(emulator.callLog.at(-1)?.status).toBeUndefined();
    expect(settled).toBe(false);
    const other = await startGcpKmsEmulator();
    try {
      // The hang is this emulator's; another one answers normally.
      const elsewhere = other.createKey();
      const answering = new KeyManagementServiceClient({ fallback: 'rest', ...other.connection() });
      clients.push(answering);
      await expect(
        answering.encrypt({ name: elsewhere.name, plaintext: Buffer.from('x') }),
      ).resolves.toBeDefined();
    } finally {
      await other.close();
    }
    expect(settled).toBe(false);
    emulator.failAll(null);
    await emulator.close();
    await expect(pending).rejects.toBeDefined();
    emulator = await startGcpKmsEmulator();
  });
});
