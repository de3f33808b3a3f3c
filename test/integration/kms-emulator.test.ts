import {
  CancelKeyDeletionCommand,
  CreateAliasCommand,
  CreateKeyCommand,
  DecryptCommand,
  DescribeKeyCommand,
  DisabledException,
  DisableKeyCommand,
  EnableKeyCommand,
  EncryptCommand,
  GenerateDataKeyCommand,
  IncorrectKeyException,
  InvalidAliasNameException,
  InvalidCiphertextException,
  InvalidKeyUsageException,
  KMSClient,
  KMSInternalException,
  KMSInvalidStateException,
  KMSServiceException,
  ListAliasesCommand,
  NotFoundException,
  ReEncryptCommand,
  ScheduleKeyDeletionCommand,
} from '@aws-sdk/client-kms';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type KmsEmulator, startKmsEmulator } from '../support/kms-emulator';

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const CONTEXT = { tenant: 't-1', table: 'users', column: 'email' };

/** Awaits a call that must fail and returns the SDK's exception. */
async function kmsError(call: Promise<unknown>): Promise<KMSServiceException> {
  try {
    await call;
  } catch (error) {
    expect(error).toBeInstanceOf(KMSServiceException);
    return error as KMSServiceException;
  }
  throw new Error('expected the KMS call to fail');
}

function expectAwsError(error: KMSServiceException, name: string, status = 400): void {
  expect(error.name).toBe(name);
  expect(error.$metadata.httpStatusCode).toBe(status);
}

describe('KMS emulator driven by the real @aws-sdk/client-kms', () => {
  let emulator: KmsEmulator;
  let kms: KMSClient;
  let keyArn: string;
  let keyId: string;

  const newKey = async (input: ConstructorParameters<typeof CreateKeyCommand>[0] = {}) => {
    const { KeyMetadata } = await kms.send(new CreateKeyCommand(input));
    if (!KeyMetadata?.Arn) throw new Error('CreateKey returned no metadata');
    return KeyMetadata;
  };
  const dataKey = (KeyId: string, EncryptionContext: Record<string, string> = CONTEXT) =>
    kms.send(new GenerateDataKeyCommand({ KeyId, KeySpec: 'AES_256', EncryptionContext }));

  beforeAll(async () => {
    emulator = await startKmsEmulator();
    kms = new KMSClient({ ...emulator.clientConfig(), maxAttempts: 1 });
    const meta = await newKey({ Description: 'column master key' });
    keyArn = meta.Arn as string;
    keyId = meta.KeyId as string;
    await kms.send(new CreateAliasCommand({ AliasName: 'alias/app', TargetKeyId: keyId }));
  });

  afterAll(async () => {
    kms?.destroy();
    await emulator?.close();
  });

  it('creates symmetric keys with real-looking metadata', async () => {
    expect(emulator.endpoint).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
    expect(keyId).toMatch(UUID);
    const { KeyMetadata: meta } = await kms.send(new DescribeKeyCommand({ KeyId: keyId }));
    expect(meta).toMatchObject({
      KeyId: keyId,
      Arn: `arn:aws:kms:us-east-1:111122223333:key/${keyId}`,
      AWSAccountId: '111122223333',
      KeyState: 'Enabled',
      Enabled: true,
      KeySpec: 'SYMMETRIC_DEFAULT',
      KeyUsage: 'ENCRYPT_DECRYPT',
      EncryptionAlgorithms: ['SYMMETRIC_DEFAULT'],
      KeyManager: 'CUSTOMER',
      Origin: 'AWS_KMS',
      Description: 'column master key',
    });
    expect(meta?.CreationDate).toBeInstanceOf(Date);
    expect(Math.abs((meta?.CreationDate?.getTime() ?? 0) - Date.now())).toBeLessThan(60_000);
  });

  it('round-trips GenerateDataKey → Decrypt with the key ARN and the documented blob layout', async () => {
    const generated = await dataKey(keyId);
    expect(generated.KeyId).toBe(keyArn);
    expect(generated.Plaintext).toHaveLength(32);
    const blob = Buffer.from(generated.CiphertextBlob as Uint8Array);
    expect(blob).toHaveLength(1 + 36 + 12 + 16 + 32);
    expect(blob[0]).toBe(1);
    expect(blob.subarray(1, 37).toString('ascii')).toBe(keyId);

    const reordered = { column: 'email', table: 'users', tenant: 't-1' };
    const decrypted = await kms.send(
      new DecryptCommand({ CiphertextBlob: generated.CiphertextBlob, EncryptionContext: reordered }),
    );
    expect(Buffer.from(decrypted.Plaintext as Uint8Array)).toEqual(
      Buffer.from(generated.Plaintext as Uint8Array),
    );
    expect(decrypted.KeyId).toBe(keyArn);
    expect(decrypted.EncryptionAlgorithm).toBe('SYMMETRIC_DEFAULT');
  });

  it('supports NumberOfBytes and Encrypt/Decrypt, with fresh ciphertext every time', async () => {
    const generated = await kms.send(new GenerateDataKeyCommand({ KeyId: keyId, NumberOfBytes: 64 }));
    expect(generated.Plaintext).toHaveLength(64);
    const Plaintext = Buffer.from('hello envelope');
    const first = await kms.send(
      new EncryptCommand({ KeyId: keyArn, Plaintext, EncryptionContext: CONTEXT }),
    );
    const second = await kms.send(
      new EncryptCommand({ KeyId: keyArn, Plaintext, EncryptionContext: CONTEXT }),
    );
    expect(first.KeyId).toBe(keyArn);
    expect(first.EncryptionAlgorithm).toBe('SYMMETRIC_DEFAULT');
    expect(Buffer.from(first.CiphertextBlob as Uint8Array)).not.toEqual(
      Buffer.from(second.CiphertextBlob as Uint8Array),
    );
    const out = await kms.send(
      new DecryptCommand({ CiphertextBlob: second.CiphertextBlob, EncryptionContext: CONTEXT, KeyId: keyId }),
    );
    expect(Buffer.from(out.Plaintext as Uint8Array).toString()).toBe('hello envelope');
  });

  it('rejects a mismatched encryption context or a corrupted blob with InvalidCiphertextException', async () => {
    const { CiphertextBlob } = await dataKey(keyId);
    const blob = Buffer.from(CiphertextBlob as Uint8Array);
    const wrongContexts = [{ ...CONTEXT, tenant: 't-2' }, { tenant: 't-1' }, undefined];
    for (const EncryptionContext of wrongContexts) {
      const error = await kmsError(kms.send(new DecryptCommand({ CiphertextBlob: blob, EncryptionContext })));
      expect(error).toBeInstanceOf(InvalidCiphertextException);
      expectAwsError(error, 'InvalidCiphertextException');
    }
    const corrupted = Buffer.from(blob);
    corrupted[corrupted.length - 1] ^= 0x01;
    for (const bad of [corrupted, blob.subarray(0, 40), Buffer.from('not a kms blob at all')]) {
      const error = await kmsError(
        kms.send(new DecryptCommand({ CiphertextBlob: bad, EncryptionContext: CONTEXT })),
      );
      expect(error).toBeInstanceOf(InvalidCiphertextException);
    }
  });

  it('resolves key ids, key ARNs, alias names and alias ARNs', async () => {
    const aliasArn = 'arn:aws:kms:us-east-1:111122223333:alias/app';
    for (const KeyId of [keyId, keyArn, 'alias/app', aliasArn]) {
      const { KeyMetadata } = await kms.send(new DescribeKeyCommand({ KeyId }));
      expect(KeyMetadata?.Arn).toBe(keyArn);
      expect((await dataKey(KeyId)).KeyId).toBe(keyArn);
    }
    const { CiphertextBlob } = await dataKey('alias/app');
    const out = await kms.send(
      new DecryptCommand({ CiphertextBlob, EncryptionContext: CONTEXT, KeyId: aliasArn }),
    );
    expect(out.KeyId).toBe(keyArn);
    const { Aliases } = await kms.send(new ListAliasesCommand({ KeyId: keyId }));
    expect(Aliases).toEqual([
      expect.objectContaining({ AliasName: 'alias/app', AliasArn: aliasArn, TargetKeyId: keyId }),
    ]);
  });

  it('rejects invalid and duplicate alias names', async () => {
    const invalid = await kmsError(
      kms.send(new CreateAliasCommand({ AliasName: 'app2', TargetKeyId: keyId })),
    );
    expect(invalid).toBeInstanceOf(InvalidAliasNameException);
    const duplicate = await kmsError(
      kms.send(new CreateAliasCommand({ AliasName: 'alias/app', TargetKeyId: keyId })),
    );
    expectAwsError(duplicate, 'AlreadyExistsException');
  });

  it('throws IncorrectKeyException when Decrypt pins a different key', async () => {
    const other = await newKey();
    const { CiphertextBlob } = await dataKey(keyId);
    const error = await kmsError(
      kms.send(new DecryptCommand({ CiphertextBlob, EncryptionContext: CONTEXT, KeyId: other.KeyId })),
    );
    expect(error).toBeInstanceOf(IncorrectKeyException);
    expectAwsError(error, 'IncorrectKeyException');
  });

  it('re-encrypts under a second key without exposing the plaintext', async () => {
    const second = await newKey();
    const generated = await dataKey(keyId);
    const destinationContext = { tenant: 't-1', rotated: 'yes' };
    const reEncrypted = await kms.send(
      new ReEncryptCommand({
        CiphertextBlob: generated.CiphertextBlob,
        SourceEncryptionContext: CONTEXT,
        SourceKeyId: 'alias/app',
        DestinationKeyId: second.KeyId,
        DestinationEncryptionContext: destinationContext,
      }),
    );
    expect(reEncrypted.SourceKeyId).toBe(keyArn);
    expect(reEncrypted.KeyId).toBe(second.Arn);
    expect(reEncrypted).not.toHaveProperty('Plaintext');
    const newBlob = Buffer.from(reEncrypted.CiphertextBlob as Uint8Array);
    expect(newBlob).not.toEqual(Buffer.from(generated.CiphertextBlob as Uint8Array));
    const out = await kms.send(
      new DecryptCommand({
        CiphertextBlob: newBlob,
        EncryptionContext: destinationContext,
        KeyId: second.KeyId,
      }),
    );
    expect(Buffer.from(out.Plaintext as Uint8Array)).toEqual(Buffer.from(generated.Plaintext as Uint8Array));
    expect(out.KeyId).toBe(second.Arn);
    const pinnedToOld = await kmsError(
      kms.send(
        new DecryptCommand({ CiphertextBlob: newBlob, EncryptionContext: destinationContext, KeyId: keyId }),
      ),
    );
    expect(pinnedToOld).toBeInstanceOf(IncorrectKeyException);
  });

  it('describes asymmetric keys and refuses them for symmetric operations', async () => {
    const rsa = await newKey({ KeySpec: 'RSA_2048', KeyUsage: 'ENCRYPT_DECRYPT' });
    const { KeyMetadata } = await kms.send(new DescribeKeyCommand({ KeyId: rsa.KeyId }));
    expect(KeyMetadata).toMatchObject({ KeySpec: 'RSA_2048', KeyUsage: 'ENCRYPT_DECRYPT' });
    expect(KeyMetadata?.EncryptionAlgorithms).toEqual(['RSAES_OAEP_SHA_1', 'RSAES_OAEP_SHA_256']);
    const ecc = await newKey({ KeySpec: 'ECC_NIST_P256', KeyUsage: 'SIGN_VERIFY' });
    expect(ecc).toMatchObject({
      KeySpec: 'ECC_NIST_P256',
      KeyUsage: 'SIGN_VERIFY',
      SigningAlgorithms: ['ECDSA_SHA_256'],
    });
    for (const id of [rsa.KeyId as string, ecc.KeyId as string]) {
      const error = await kmsError(dataKey(id));
      expect(error).toBeInstanceOf(InvalidKeyUsageException);
      expectAwsError(error, 'InvalidKeyUsageException');
    }
    const mismatch = await kmsError(newKey({ KeySpec: 'ECC_NIST_P256', KeyUsage: 'ENCRYPT_DECRYPT' }));
    expectAwsError(mismatch, 'ValidationException');
  });

  it('walks the key lifecycle: disabled, pending deletion, cancelled', async () => {
    const meta = await newKey();
    const KeyId = meta.KeyId as string;
    const { CiphertextBlob } = await dataKey(KeyId);
    const decrypt = () => kms.send(new DecryptCommand({ CiphertextBlob, EncryptionContext: CONTEXT }));

    await kms.send(new DisableKeyCommand({ KeyId }));
    for (const call of [decrypt(), dataKey(KeyId)]) {
      const error = await kmsError(call);
      expect(error).toBeInstanceOf(DisabledException);
      expectAwsError(error, 'DisabledException');
    }
    await kms.send(new EnableKeyCommand({ KeyId }));
    await expect(decrypt()).resolves.toMatchObject({ KeyId: meta.Arn });

    const tooShort = await kmsError(
      kms.send(new ScheduleKeyDeletionCommand({ KeyId, PendingWindowInDays: 6 })),
    );
    expectAwsError(tooShort, 'ValidationException');
    const scheduled = await kms.send(new ScheduleKeyDeletionCommand({ KeyId, PendingWindowInDays: 7 }));
    expect(scheduled).toMatchObject({ KeyId: meta.Arn, KeyState: 'PendingDeletion', PendingWindowInDays: 7 });
    const days = ((scheduled.DeletionDate?.getTime() ?? 0) - Date.now()) / 86_400_000;
    expect(days).toBeGreaterThan(6.99);
    expect(days).toBeLessThan(7.01);
    for (const call of [decrypt(), dataKey(KeyId), kms.send(new EnableKeyCommand({ KeyId }))]) {
      const error = await kmsError(call);
      expect(error).toBeInstanceOf(KMSInvalidStateException);
      expectAwsError(error, 'KMSInvalidStateException');
    }

    const cancelled = await kms.send(new CancelKeyDeletionCommand({ KeyId }));
    expect(cancelled.KeyId).toBe(meta.Arn);
    const { KeyMetadata } = await kms.send(new DescribeKeyCommand({ KeyId }));
    expect(KeyMetadata).toMatchObject({ KeyState: 'Disabled', Enabled: false });
    expect(KeyMetadata?.DeletionDate).toBeUndefined();
    expect(await kmsError(decrypt())).toBeInstanceOf(DisabledException);
  });

  it('applies the direct helpers without HTTP', async () => {
    emulator.resetCalls();
    const meta = emulator.createKey({ description: 'helper' });
    expect(emulator.createAlias('alias/helper', meta.KeyId).KeyId).toBe(meta.KeyId);
    expect(emulator.disableKey('alias/helper').KeyState).toBe('Disabled');
    expect(emulator.enableKey(meta.Arn).KeyState).toBe('Enabled');
    expect(emulator.scheduleDeletion(meta.KeyId).PendingDeletionWindowInDays).toBe(30);
    expect(emulator.calls.CreateKey).toBe(0);
    const { KeyMetadata } = await kms.send(new DescribeKeyCommand({ KeyId: 'alias/helper' }));
    expect(KeyMetadata).toMatchObject({ KeyState: 'PendingDeletion', Description: 'helper' });
  });

  it('throws NotFoundException for unknown keys, aliases and ARNs', async () => {
    const unknown = [
      '00000000-0000-4000-8000-000000000000',
      'alias/nope',
      'arn:aws:kms:us-east-1:111122223333:alias/nope',
      `arn:aws:kms:eu-west-1:111122223333:key/${keyId}`,
    ];
    for (const KeyId of unknown) {
      const error = await kmsError(kms.send(new DescribeKeyCommand({ KeyId })));
      expect(error).toBeInstanceOf(NotFoundException);
      expectAwsError(error, 'NotFoundException');
    }
    expect(await kmsError(dataKey('alias/nope'))).toBeInstanceOf(NotFoundException);
  });

  it('denies access to a key with AccessDeniedException until re-allowed', async () => {
    const meta = await newKey();
    const { CiphertextBlob } = await dataKey(meta.KeyId as string);
    emulator.denyAccess(meta.KeyId as string, true);
    const calls = [
      kms.send(new DescribeKeyCommand({ KeyId: meta.KeyId })),
      kms.send(new DecryptCommand({ CiphertextBlob, EncryptionContext: CONTEXT })),
    ];
    for (const call of calls) expectAwsError(await kmsError(call), 'AccessDeniedException');
    emulator.denyAccess(meta.KeyId as string, false);
    await expect(
      kms.send(new DecryptCommand({ CiphertextBlob, EncryptionContext: CONTEXT })),
    ).resolves.toBeDefined();
  });

  it('retries injected ThrottlingExceptions with the default retry strategy', async () => {
    const retrying = new KMSClient({ ...emulator.clientConfig(), maxAttempts: 3 });
    try {
      emulator.resetCalls();
      emulator.injectFaults({ operation: 'GenerateDataKey', error: 'ThrottlingException', times: 2 });
      const out = await retrying.send(new GenerateDataKeyCommand({ KeyId: keyId, KeySpec: 'AES_256' }));
      expect(out.KeyId).toBe(keyArn);
      expect(out.$metadata.attempts).toBe(3);
      expect(emulator.calls.GenerateDataKey).toBe(3);
      expect(emulator.faults.GenerateDataKey).toBe(2);
    } finally {
      retrying.destroy();
    }
  });

  it('surfaces injected faults without retries, scoped to the named operation', async () => {
    emulator.injectFaults({ operation: 'Decrypt', error: 'ThrottlingException', times: 1 });
    await expect(dataKey(keyId)).resolves.toBeDefined();
    const { CiphertextBlob } = await dataKey(keyId);
    const throttled = await kmsError(
      kms.send(new DecryptCommand({ CiphertextBlob, EncryptionContext: CONTEXT })),
    );
    expectAwsError(throttled, 'ThrottlingException');

    emulator.injectFaults({ error: 'KMSInternalException', times: 1 });
    const internal = await kmsError(dataKey(keyId));
    expect(internal).toBeInstanceOf(KMSInternalException);
    expectAwsError(internal, 'KMSInternalException', 500);
    await expect(dataKey(keyId)).resolves.toBeDefined();
  });

  it('simulates an outage with failAll until cleared', async () => {
    emulator.failAll('KMSInternalException');
    for (const call of [dataKey(keyId), kms.send(new DescribeKeyCommand({ KeyId: keyId }))]) {
      expectAwsError(await kmsError(call), 'KMSInternalException', 500);
    }
    emulator.failAll(null);
    await expect(dataKey(keyId)).resolves.toBeDefined();
  });

  it('counts calls per operation and logs key ids and contexts', async () => {
    emulator.resetCalls();
    const { CiphertextBlob } = await dataKey('alias/app');
    await kms.send(new DecryptCommand({ CiphertextBlob, EncryptionContext: CONTEXT }));
    await kmsError(kms.send(new DecryptCommand({ CiphertextBlob, EncryptionContext: { tenant: 'x' } })));
    await newKey();
    expect(emulator.calls.GenerateDataKey).toBe(1);
    expect(emulator.calls.Decrypt).toBe(2);
    expect(emulator.calls.Encrypt).toBe(0);
    expect(emulator.faults.Decrypt).toBe(0);
    expect(emulator.callLog).toEqual([
      { operation: 'GenerateDataKey', keyId: 'alias/app', encryptionContext: CONTEXT },
      { operation: 'Decrypt', keyId, encryptionContext: CONTEXT },
      { operation: 'Decrypt', keyId, encryptionContext: { tenant: 'x' } },
      { operation: 'CreateKey' },
    ]);
    emulator.resetCalls();
    expect(emulator.calls.Decrypt).toBe(0);
    expect(emulator.callLog).toEqual([]);
  });

  it('adds configurable latency to every response', async () => {
    const before = emulator.delayedResponses.length;
    emulator.setLatency(60);
    try {
      const described = await kms.send(new DescribeKeyCommand({ KeyId: keyId }));
      expect(described.KeyMetadata?.KeyId).toBe(keyId);
      // The answer came only after the emulator's 60 ms timer had fired for it.
      expect(emulator.delayedResponses.slice(before)).toEqual([60]);
    } finally {
      emulator.setLatency(0);
    }
    await kms.send(new DescribeKeyCommand({ KeyId: keyId }));
    expect(emulator.delayedResponses.slice(before)).toEqual([60]); // latency 0: sent at once
  });

  it('requires an Authorization header', async () => {
    const unsigned = new KMSClient({ ...emulator.clientConfig(), maxAttempts: 1 });
    unsigned.middlewareStack.add(
      (next) => async (args) => {
        const request = args.request as { headers: Record<string, string> };
        delete request.headers.authorization;
        return next(args);
      },
      { step: 'deserialize', name: 'stripAuthorization' },
    );
    try {
      expectAwsError(
        await kmsError(unsigned.send(new DescribeKeyCommand({ KeyId: keyId }))),
        'UnrecognizedClientException',
      );
    } finally {
      unsigned.destroy();
    }
  });

  it('honours custom region and account id', async () => {
    const custom = await startKmsEmulator({ region: 'eu-west-1', accountId: '444455556666' });
    const client = new KMSClient({ ...custom.clientConfig(), maxAttempts: 1 });
    try {
      const { KeyMetadata } = await client.send(new CreateKeyCommand({}));
      expect(KeyMetadata?.Arn).toBe(`arn:aws:kms:eu-west-1:444455556666:key/${KeyMetadata?.KeyId}`);
      expect(custom.clientConfig()).toMatchObject({ region: 'eu-west-1', endpoint: custom.endpoint });
    } finally {
      client.destroy();
      await custom.close();
    }
  });
});
