import { randomBytes } from 'node:crypto';
import Module from 'node:module';
import { Readable } from 'node:stream';
import { inspect } from 'node:util';
import { KMSClient } from '@aws-sdk/client-kms';
import { ConfiguredRetryStrategy } from '@smithy/core/retry';
import { NodeHttpHandler } from '@smithy/node-http-handler';
import type { HttpRequest, HttpResponse } from '@smithy/types';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  AwsKmsKeyProvider,
  type AwsKmsKeyProviderOptions,
  ConfigError,
  IntegrityError,
  KeyAccessDeniedError,
  KeyProviderError,
  LocalKeyProvider,
} from '../../src';
import { type KmsEmulator, startKmsEmulator } from '../support/kms-emulator';

const CONTEXT = Object.freeze({ 'typeorm-envelope:keyring': 'main' });
const OTHER_CONTEXT = Object.freeze({ 'typeorm-envelope:keyring': 'other' });

/** The SDK's standard strategy with a 10 ms backoff, so retry tests do not wait seconds. */
const fastRetries = (maxAttempts: number) => new ConfiguredRetryStrategy(maxAttempts, () => 10);

async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (error) {
    return error as Error;
  }
  throw new Error('expected the call to fail');
}

describe('AwsKmsKeyProvider against the KMS emulator', () => {
  let emulator: KmsEmulator;
  let keyId: string;
  let keyArn: string;
  const providers: AwsKmsKeyProvider[] = [];

  const provider = (options: Partial<AwsKmsKeyProviderOptions> = {}): AwsKmsKeyProvider => {
    const created = new AwsKmsKeyProvider({
      keyId,
      clientConfig: { ...emulator.clientConfig(), retryStrategy: fastRetries(5) },
      ...options,
    });
    providers.push(created);
    return created;
  };
  const newKey = (keySpec?: string, keyUsage?: string) => emulator.createKey({ keySpec, keyUsage }).KeyId;

  beforeAll(async () => {
    emulator = await startKmsEmulator();
    const meta = emulator.createKey({ description: 'main' });
    keyId = meta.KeyId;
    keyArn = meta.Arn;
    emulator.createAlias('alias/app', keyId);
  });

  beforeEach(() => emulator.resetCalls());

  afterEach(() => {
    emulator.failAll(null);
    for (const p of providers.splice(0)) p.destroy();
  });

  afterAll(async () => {
    await emulator?.close();
  });

  it('generates a data key with GenerateDataKey and unwraps it with Decrypt pinned to the key', async () => {
    const kms = provider();
    expect(kms.describe()).toEqual({ kind: 'aws-kms', keyReference: keyId });
    const { plaintextKey, wrappedKey } = await kms.generateDataKey(CONTEXT);
    expect(plaintextKey).toBeInstanceOf(Buffer);
    expect(plaintextKey).toHaveLength(32);
    expect(plaintextKey.equals(Buffer.alloc(32))).toBe(false);
    expect(wrappedKey.includes(plaintextKey)).toBe(false);
    const unwrapped = await kms.unwrapDataKey(wrappedKey, CONTEXT);
    expect(unwrapped).toBeInstanceOf(Buffer);
    expect(unwrapped.equals(plaintextKey)).toBe(true);
    expect(kms.describe()).toEqual({ kind: 'aws-kms', keyReference: keyArn });
    expect(emulator.calls).toMatchObject({ GenerateDataKey: 1, Decrypt: 1 });
    expect(emulator.callLog.map((c) => [c.operation, c.keyId])).toEqual([
      ['GenerateDataKey', keyId],
      ['Decrypt', keyId],
    ]);
  });

  it('sends the encryption context on every call', async () => {
    const kms = provider();
    const second = provider({ keyId: newKey() });
    const { wrappedKey, plaintextKey } = await kms.generateDataKey(CONTEXT);
    await kms.unwrapDataKey(wrappedKey, CONTEXT);
    await kms.wrapDataKey(plaintextKey, CONTEXT);
    await kms.rewrapDataKey(wrappedKey, CONTEXT, second);
    await kms.validate(CONTEXT);
    const crypto = emulator.callLog.filter((c) => c.operation !== 'DescribeKey');
    expect(crypto.map((c) => c.operation)).toEqual([
      'GenerateDataKey',
      'Decrypt',
      'Encrypt',
      'ReEncrypt',
      'GenerateDataKey',
      'Decrypt',
    ]);
    for (const call of crypto) expect(call.encryptionContext).toEqual(CONTEXT);
  });

  it('refuses a wrapped key under another context, another key, or altered, with IntegrityError', async () => {
    const kms = provider();
    const { wrappedKey } = await kms.generateDataKey(CONTEXT);
    const wrongContext = await rejection(kms.unwrapDataKey(wrappedKey, OTHER_CONTEXT));
    expect(wrongContext).toBeInstanceOf(IntegrityError);
    expect(wrongContext.message).toContain('InvalidCiphertextException');
    expect((wrongContext as IntegrityError).keyId).toBe(keyId);

    const otherKey = await rejection(provider({ keyId: newKey() }).unwrapDataKey(wrappedKey, CONTEXT));
    expect(otherKey).toBeInstanceOf(IntegrityError);
    expect(otherKey.message).toContain('IncorrectKeyException');
    expect(otherKey.message).toContain(
      'master key configured for its version may not be the one that wrapped it',
    );

    const altered = Buffer.from(wrappedKey);
    altered[altered.length - 1] ^= 1;
    const tampered = await rejection(kms.unwrapDataKey(altered, CONTEXT));
    expect(tampered).toBeInstanceOf(IntegrityError);
    for (const error of [wrongContext, otherKey, tampered]) {
      expect(error.message).not.toContain(wrappedKey.toString('base64'));
      expect(error.message).not.toContain(wrappedKey.toString('hex'));
    }
  });

  it('resolves the key reference a registry records to the key ARN, and compares recorded references', async () => {
    const aliased = provider({ keyId: 'alias/app' });
    expect(await aliased.resolveKeyReference()).toBe(keyArn);
    expect(emulator.calls.DescribeKey).toBe(1);
    expect(await aliased.hasKeyReference(keyArn)).toBe(true);
    expect(await aliased.hasKeyReference('alias/app')).toBe(true); // recorded as configured
    const other = emulator.createKey();
    expect(await aliased.hasKeyReference(other.Arn)).toBe(false);
    // A key ARN is its own reference: no call.
    expect(await provider({ keyId: other.Arn }).resolveKeyReference()).toBe(other.Arn);
    expect(emulator.calls.DescribeKey).toBe(1);
  });

  it('works with an alias name and an alias ARN', async () => {
    const aliasArn = `arn:aws:kms:${emulator.region}:${emulator.accountId}:alias/app`;
    for (const alias of ['alias/app', aliasArn]) {
      const kms = provider({ keyId: alias });
      expect(kms.describe().keyReference).toBe(alias);
      const { plaintextKey, wrappedKey } = await kms.generateDataKey(CONTEXT);
      expect((await kms.unwrapDataKey(wrappedKey, CONTEXT)).equals(plaintextKey)).toBe(true);
      expect((await provider().unwrapDataKey(wrappedKey, CONTEXT)).equals(plaintextKey)).toBe(true);
      expect(kms.describe().keyReference).toBe(keyArn);
    }
    const fresh = provider({ keyId: 'alias/app' });
    await expect(fresh.describeKey()).resolves.toEqual({
      Arn: keyArn,
      KeyState: 'Enabled',
      KeySpec: 'SYMMETRIC_DEFAULT',
      KeyUsage: 'ENCRYPT_DECRYPT',
    });
    expect(fresh.describe()).toEqual({ kind: 'aws-kms', keyReference: keyArn });
  });

  it('raises KeyAccessDeniedError naming the keyId for disabled, pending deletion, denied and unknown keys', async () => {
    const cases: [string, () => string][] = [
      ['DisabledException', () => emulator.disableKey(newKey()).KeyId],
      ['KMSInvalidStateException', () => emulator.scheduleDeletion(newKey()).KeyId],
      ['AccessDeniedException', () => emulator.denyAccess(newKey()).KeyId],
      ['NotFoundException', () => 'alias/does-not-exist'],
    ];
    for (const [exception, make] of cases) {
      const id = make();
      const kms = provider({ keyId: id });
      for (const call of [kms.generateDataKey(CONTEXT), kms.wrapDataKey(randomBytes(32), CONTEXT)]) {
        const error = await rejection(call);
        expect(error).toBeInstanceOf(KeyAccessDeniedError);
        expect(error.message).toContain(`(${exception})`);
        expect((error as KeyAccessDeniedError).keyId).toBe(id);
        expect(error.message).toContain(id);
        expect((error.cause as Error).name).toBe(exception);
      }
    }
    const denied = await rejection(provider({ keyId: emulator.denyAccess(newKey()).KeyId }).describeKey());
    expect(denied.message).toMatch(/^access to the KMS key was denied \(AccessDeniedException\)/);
  });

  it('raises KeyAccessDeniedError when unwrapping under a key disabled after the fact', async () => {
    const id = newKey();
    const kms = provider({ keyId: id });
    const { wrappedKey } = await kms.generateDataKey(CONTEXT);
    emulator.disableKey(id);
    const error = await rejection(kms.unwrapDataKey(wrappedKey, CONTEXT));
    expect(error).toBeInstanceOf(KeyAccessDeniedError);
    expect(error.message).toContain('DisabledException');
    emulator.enableKey(id);
    await expect(kms.unwrapDataKey(wrappedKey, CONTEXT)).resolves.toHaveLength(32);
  });

  it('validate() checks state, spec and usage in order, then a round trip', async () => {
    const rsa = provider({ keyId: newKey('RSA_2048', 'ENCRYPT_DECRYPT') });
    const rsaError = await rejection(rsa.validate(CONTEXT));
    expect(rsaError).toBeInstanceOf(KeyProviderError);
    expect((rsaError as KeyProviderError).detail).toBe(
      'key is asymmetric (RSA_2048); a symmetric ENCRYPT_DECRYPT key is required',
    );
    expect((rsaError as KeyProviderError).keyId).toBe(rsa.keyId);

    const ecc = provider({ keyId: newKey('ECC_NIST_P256', 'SIGN_VERIFY') });
    expect(((await rejection(ecc.validate(CONTEXT))) as KeyProviderError).detail).toBe(
      'key is asymmetric (ECC_NIST_P256); a symmetric ENCRYPT_DECRYPT key is required',
    );

    const disabled = provider({ keyId: emulator.disableKey(newKey()).KeyId });
    const disabledError = await rejection(disabled.validate(CONTEXT));
    expect(disabledError).toBeInstanceOf(KeyAccessDeniedError);
    expect((disabledError as KeyProviderError).detail).toBe('key is Disabled; an Enabled key is required');
    expect((disabledError as KeyProviderError).keyId).toBe(disabled.keyId);

    const pending = provider({ keyId: emulator.scheduleDeletion(newKey()).KeyId });
    expect((await rejection(pending.validate(CONTEXT))).message).toContain('key is PendingDeletion');

    emulator.resetCalls();
    await expect(provider({ keyId: 'alias/app' }).validate(CONTEXT)).resolves.toBeUndefined();
    expect(emulator.callLog.map((c) => c.operation)).toEqual(['DescribeKey', 'GenerateDataKey', 'Decrypt']);
  });

  it('rewraps between two KMS keys with ReEncrypt, never decrypting locally', async () => {
    const source = provider();
    const destination = provider({ keyId: newKey() });
    const { plaintextKey, wrappedKey } = await source.generateDataKey(CONTEXT);
    emulator.resetCalls();
    const rewrapped = await source.rewrapDataKey(wrappedKey, CONTEXT, destination);
    expect(emulator.calls).toMatchObject({ ReEncrypt: 1, Decrypt: 0, Encrypt: 0, GenerateDataKey: 0 });
    expect(emulator.callLog[0]).toEqual({
      operation: 'ReEncrypt',
      keyId: destination.keyId,
      encryptionContext: CONTEXT,
    });
    expect(rewrapped.equals(wrappedKey)).toBe(false);
    expect((await destination.unwrapDataKey(rewrapped, CONTEXT)).equals(plaintextKey)).toBe(true);
    expect(await rejection(source.unwrapDataKey(rewrapped, CONTEXT))).toBeInstanceOf(IntegrityError);
    const wrongContext = await rejection(source.rewrapDataKey(wrappedKey, OTHER_CONTEXT, destination));
    expect(wrongContext).toBeInstanceOf(IntegrityError);
  });

  it('rewraps from a LocalKeyProvider into KMS with Encrypt, and back out with Decrypt', async () => {
    const local = new LocalKeyProvider({ key: randomBytes(32).toString('base64') });
    const kms = provider();
    const { plaintextKey, wrappedKey } = await local.generateDataKey(CONTEXT);
    const inKms = await local.rewrapDataKey(wrappedKey, CONTEXT, kms);
    expect(emulator.calls).toMatchObject({ Encrypt: 1, ReEncrypt: 0, Decrypt: 0 });
    expect(emulator.callLog[0]).toEqual({ operation: 'Encrypt', keyId, encryptionContext: CONTEXT });
    expect((await kms.unwrapDataKey(inKms, CONTEXT)).equals(plaintextKey)).toBe(true);

    emulator.resetCalls();
    const backToLocal = await kms.rewrapDataKey(inKms, CONTEXT, local);
    expect(emulator.calls).toMatchObject({ Decrypt: 1, ReEncrypt: 0, Encrypt: 0 });
    expect((await local.unwrapDataKey(backToLocal, CONTEXT)).equals(plaintextKey)).toBe(true);
  });

  it('rides out throttling with the SDK retry strategy', async () => {
    const kms = provider();
    emulator.injectFaults({ operation: 'GenerateDataKey', error: 'ThrottlingException', times: 2 });
    const { plaintextKey } = await kms.generateDataKey(CONTEXT);
    expect(plaintextKey).toHaveLength(32);
    expect(emulator.calls.GenerateDataKey).toBe(3);
    expect(emulator.faults.GenerateDataKey).toBe(2);
  });

  it('raises KeyProviderError after maxAttempts during an outage', async () => {
    const kms = provider();
    emulator.failAll('KMSInternalException');
    const error = await rejection(kms.generateDataKey(CONTEXT));
    expect(error).toBeInstanceOf(KeyProviderError);
    expect(error).not.toBeInstanceOf(KeyAccessDeniedError);
    expect(error.message).toContain('KMS GenerateDataKey failed after 5 attempts (KMSInternalException)');
    expect((error as KeyProviderError).keyId).toBe(keyId);
    expect((error.cause as Error).name).toBe('KMSInternalException');
    expect(emulator.calls.GenerateDataKey).toBe(5);

    const twoAttempts = provider({ maxAttempts: 2, clientConfig: emulator.clientConfig() });
    emulator.resetCalls();
    expect(await rejection(twoAttempts.describeKey())).toBeInstanceOf(KeyProviderError);
    expect(emulator.calls.DescribeKey).toBe(2);
  });

  it('exhausted throttling is a KeyProviderError, not an access error', async () => {
    const kms = provider({ clientConfig: { ...emulator.clientConfig(), retryStrategy: fastRetries(2) } });
    const { wrappedKey } = await kms.generateDataKey(CONTEXT);
    emulator.injectFaults({ operation: 'Decrypt', error: 'ThrottlingException', times: 2 });
    const error = await rejection(kms.unwrapDataKey(wrappedKey, CONTEXT));
    expect(error).toBeInstanceOf(KeyProviderError);
    expect(error).not.toBeInstanceOf(KeyAccessDeniedError);
    expect(error.message).toContain('(ThrottlingException)');
  });

  it('maps a network failure to KeyProviderError', async () => {
    const closed = await startKmsEmulator();
    const endpoint = closed.endpoint;
    await closed.close();
    const kms = provider({ endpoint, maxAttempts: 1, clientConfig: emulator.clientConfig() });
    const error = await rejection(kms.generateDataKey(CONTEXT));
    expect(error).toBeInstanceOf(KeyProviderError);
    expect(error.message).toContain('ECONNREFUSED');
  });

  it('reuses a prebuilt KMSClient and leaves it open', async () => {
    const client = new KMSClient({ ...emulator.clientConfig(), maxAttempts: 1 });
    try {
      const kms = provider({ client, clientConfig: undefined });
      expect(kms.client).toBe(client);
      const { wrappedKey } = await kms.generateDataKey(CONTEXT);
      kms.destroy();
      await expect(kms.unwrapDataKey(wrappedKey, CONTEXT)).resolves.toHaveLength(32);
    } finally {
      client.destroy();
    }
  });

  it('prints only kind and keyId', () => {
    const kms = provider({ keyId: 'alias/app' });
    expect(inspect(kms)).toBe("AwsKmsKeyProvider { kind: 'aws-kms', keyId: 'alias/app' }");
    expect(JSON.parse(JSON.stringify({ kms }))).toEqual({ kms: { kind: 'aws-kms', keyId: 'alias/app' } });
    expect(inspect(kms)).not.toContain('test');
  });
});

describe('AwsKmsKeyProvider configuration', () => {
  it('requires keyId', () => {
    for (const keyId of [undefined, '', '  ', 42]) {
      expect(() => new AwsKmsKeyProvider({ keyId } as unknown as AwsKmsKeyProviderOptions)).toThrow(
        ConfigError,
      );
    }
    expect(() => new AwsKmsKeyProvider({ keyId: '' })).toThrow(/needs keyId/);
    expect(() => new AwsKmsKeyProvider({ keyId: 'alias/a b', region: 'us-east-1' })).toThrow(ConfigError);
  });

  it('refuses client together with options that build a client', () => {
    const client = new KMSClient({ region: 'us-east-1' });
    try {
      const build = (extra: Partial<AwsKmsKeyProviderOptions>) => () =>
        new AwsKmsKeyProvider({ keyId: 'alias/app', client, ...extra });
      expect(build({ roleArn: 'arn:aws:iam::111122223333:role/r' })).toThrow(ConfigError);
      expect(build({ roleArn: 'arn:aws:iam::111122223333:role/r' })).toThrow(
        'Cannot set both client and roleArn',
      );
      expect(build({ region: 'eu-west-1' })).toThrow('Cannot set both client and region');
      expect(build({ endpoint: 'http://127.0.0.1:1' })).toThrow('Cannot set both client and endpoint');
      expect(build({})).not.toThrow();
    } finally {
      client.destroy();
    }
  });

  it('refuses externalId or roleSessionName without roleArn, and a malformed roleArn', () => {
    const base = { keyId: 'alias/app', region: 'us-east-1' };
    expect(() => new AwsKmsKeyProvider({ ...base, externalId: 'x' })).toThrow('externalId needs roleArn');
    expect(() => new AwsKmsKeyProvider({ ...base, roleSessionName: 's' })).toThrow(
      'roleSessionName needs roleArn',
    );
    expect(() => new AwsKmsKeyProvider({ ...base, roleArn: 'my-role' })).toThrow(ConfigError);
    expect(() => new AwsKmsKeyProvider({ ...base, maxAttempts: 0 })).toThrow(ConfigError);
  });

  it('builds a cross-account client whose credentials come from STS AssumeRole', async () => {
    const emulator = await startKmsEmulator();
    const stsRequests: HttpRequest[] = [];
    const kmsRequests: HttpRequest[] = [];
    const network = new NodeHttpHandler();
    // A request handler that answers STS itself and passes KMS calls to the emulator; the STS client
    // built by fromTemporaryCredentials reuses the KMS client's request handler.
    const requestHandler = {
      metadata: { handlerProtocol: 'http/1.1' },
      async handle(request: HttpRequest, options?: object) {
        if (!request.hostname.startsWith('sts.')) {
          kmsRequests.push(request);
          return network.handle(request as never, options);
        }
        stsRequests.push(request);
        const response: HttpResponse = {
          statusCode: 200,
          headers: { 'content-type': 'text/xml' },
          body: Readable.from([Buffer.from(ASSUME_ROLE_RESPONSE)]),
        };
        return { response };
      },
      updateHttpClientConfig() {},
      httpHandlerConfigs: () => ({}),
      destroy: () => network.destroy(),
    };
    const kms = new AwsKmsKeyProvider({
      keyId: emulator.createKey().KeyId,
      region: emulator.region,
      endpoint: emulator.endpoint,
      roleArn: 'arn:aws:iam::111122223333:role/app-data',
      externalId: 'ext-123',
      clientConfig: {
        requestHandler: requestHandler as never,
        credentialDefaultProvider: () => async () => ({ accessKeyId: 'BASE', secretAccessKey: 'base' }),
      },
    });
    try {
      expect(typeof kms.client.config.credentials).toBe('function');
      const { plaintextKey, wrappedKey } = await kms.generateDataKey(CONTEXT);
      expect((await kms.unwrapDataKey(wrappedKey, CONTEXT)).equals(plaintextKey)).toBe(true);
      expect(stsRequests).toHaveLength(1);
      const form = new URLSearchParams(String(stsRequests[0].body));
      expect(form.get('Action')).toBe('AssumeRole');
      expect(form.get('RoleArn')).toBe('arn:aws:iam::111122223333:role/app-data');
      expect(form.get('ExternalId')).toBe('ext-123');
      expect(form.get('RoleSessionName')).toBe('typeorm-envelope');
      expect(stsRequests[0].headers.authorization).toContain('Credential=BASE/');
      expect(kmsRequests).toHaveLength(2);
      for (const request of kmsRequests) {
        expect(request.headers.authorization).toContain('Credential=ASIATEMPORARY/');
        expect(request.headers['x-amz-security-token']).toBe('session-token');
      }
    } finally {
      kms.destroy();
      await emulator.close();
    }
  });

  it('constructs with roleArn without calling STS', () => {
    const kms = new AwsKmsKeyProvider({
      keyId: 'arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab',
      region: 'eu-west-1',
      roleArn: 'arn:aws:iam::111122223333:role/app-data',
    });
    expect(typeof kms.client.config.credentials).toBe('function');
    kms.destroy();
  });

  it('explains how to install @aws-sdk/client-kms when it is missing', () => {
    const loader = Module as unknown as { _load: (request: string, ...rest: unknown[]) => unknown };
    const original = loader._load;
    loader._load = function (this: unknown, request: string, ...rest: unknown[]) {
      if (request === '@aws-sdk/client-kms') {
        throw Object.assign(new Error(`Cannot find module '${request}'`), { code: 'MODULE_NOT_FOUND' });
      }
      return original.call(this, request, ...rest);
    };
    try {
      const error = (() => {
        try {
          new AwsKmsKeyProvider({ keyId: 'alias/app', region: 'us-east-1' });
        } catch (e) {
          return e as Error;
        }
        throw new Error('expected a ConfigError');
      })();
      expect(error).toBeInstanceOf(ConfigError);
      expect(error.message).toBe(
        'AwsKmsKeyProvider needs the optional peer dependency @aws-sdk/client-kms: npm install @aws-sdk/client-kms',
      );
    } finally {
      loader._load = original;
    }
  });
});

const ASSUME_ROLE_RESPONSE = `<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::111122223333:assumed-role/app-data/typeorm-envelope</Arn>
      <AssumedRoleId>AROAEXAMPLE:typeorm-envelope</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <AccessKeyId>ASIATEMPORARY</AccessKeyId>
      <SecretAccessKey>temporary-secret</SecretAccessKey>
      <SessionToken>session-token</SessionToken>
      <Expiration>${new Date(Date.now() + 3_600_000).toISOString()}</Expiration>
    </Credentials>
  </AssumeRoleResult>
  <ResponseMetadata><RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ResponseMetadata>
</AssumeRoleResponse>`;
