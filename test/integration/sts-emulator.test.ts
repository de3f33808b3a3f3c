import { fromTemporaryCredentials } from '@aws-sdk/credential-providers';
/* The STS client that fromTemporaryCredentials itself loads: the protocol under test is its own. */
import { AssumeRoleCommand, STSClient, STSServiceException } from '@aws-sdk/nested-clients/sts';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { type EmulatedUserCredentials, type StsEmulator, startStsEmulator } from '../support/sts-emulator';

const CUSTOMER = '111122223333';
const VENDOR = '444455556666';
const ROLE = `arn:aws:iam::${CUSTOMER}:role/app-data-encryption`;

async function stsError(call: Promise<unknown>): Promise<STSServiceException> {
  try {
    await call;
  } catch (error) {
    expect(error).toBeInstanceOf(STSServiceException);
    return error as STSServiceException;
  }
  throw new Error('expected the STS call to fail');
}

describe('STS emulator driven by the SDK STS client of fromTemporaryCredentials', () => {
  let sts: StsEmulator;
  let app: EmulatedUserCredentials;
  let externalId: string;
  const client = (credentials: EmulatedUserCredentials) =>
    new STSClient({ ...sts.clientConfig(), credentials, maxAttempts: 1 });

  beforeAll(async () => {
    sts = await startStsEmulator();
    app = sts.createUser(VENDOR, 'app');
    externalId = `ext-${crypto.randomUUID()}`;
    sts.defineRole({ roleArn: ROLE, trust: { principals: [VENDOR], externalId } });
  });
  afterAll(async () => {
    await sts?.close();
  });
  beforeEach(() => {
    sts.failAll(null);
    sts.resetCalls();
  });

  it('AssumeRole returns credentials and the assumed-role user, mapped to the role and its account', async () => {
    const before = Date.now();
    const out = await client(app).send(
      new AssumeRoleCommand({ RoleArn: ROLE, RoleSessionName: 'tenant-a', ExternalId: externalId }),
    );
    const { Credentials: creds, AssumedRoleUser: user } = out;
    expect(creds?.AccessKeyId).toMatch(/^ASIA[A-Z2-7]{16}$/);
    expect(creds?.SecretAccessKey).toMatch(/^[A-Za-z0-9+/=]{40}$/);
    expect(creds?.SessionToken?.length).toBeGreaterThan(100);
    expect(creds?.Expiration).toBeInstanceOf(Date);
    /* One hour from when the emulator answered: between the request and the response, to the second. */
    const after = Date.now();
    const expires = creds?.Expiration?.getTime() ?? 0;
    expect(expires).toBeGreaterThanOrEqual(before + 3_600_000 - 1_000);
    expect(expires).toBeLessThanOrEqual(after + 3_600_000 + 1_000);
    expect(user?.Arn).toBe(`arn:aws:sts::${CUSTOMER}:assumed-role/app-data-encryption/tenant-a`);
    expect(user?.AssumedRoleId).toMatch(/^AROA[A-Z2-7]{16}:tenant-a$/);
    expect(out.$metadata.httpStatusCode).toBe(200);
    expect(out.$metadata.requestId).toMatch(/^[0-9a-f-]{36}$/);
    expect(sts.principalOf(creds?.AccessKeyId as string)).toEqual({
      account: CUSTOMER,
      arn: user?.Arn,
      roleArn: ROLE,
      expiration: creds?.Expiration,
    });
    expect(sts.callLog).toEqual([
      {
        action: 'AssumeRole',
        accessKeyId: app.accessKeyId,
        roleArn: ROLE,
        roleSessionName: 'tenant-a',
        externalId,
      },
    ]);
  });

  it('DurationSeconds is sent and honoured within 900..MaxSessionDuration', async () => {
    const out = await client(app).send(
      new AssumeRoleCommand({
        RoleArn: ROLE,
        RoleSessionName: 's1',
        ExternalId: externalId,
        DurationSeconds: 900,
      }),
    );
    expect(sts.callLog[0]?.durationSeconds).toBe(900);
    expect((out.Credentials?.Expiration?.getTime() ?? 0) - Date.now()).toBeLessThanOrEqual(900_000);
    const error = await stsError(
      client(app).send(
        new AssumeRoleCommand({
          RoleArn: ROLE,
          RoleSessionName: 's1',
          ExternalId: externalId,
          DurationSeconds: 60,
        }),
      ),
    );
    expect(error.name).toBe('ValidationError');
    expect(error.$metadata.httpStatusCode).toBe(400);
  });

  it('a wrong or missing external id, an untrusted caller and an unknown role are AccessDenied (403) with a RequestId', async () => {
    const stranger = sts.createUser('999988887777', 'stranger');
    const issued = sts.issuedAccessKeyIds().length;
    const attempts = [
      () =>
        client(app).send(
          new AssumeRoleCommand({ RoleArn: ROLE, RoleSessionName: 'sess', ExternalId: 'wrong-id' }),
        ),
      () => client(app).send(new AssumeRoleCommand({ RoleArn: ROLE, RoleSessionName: 'sess' })),
      () =>
        client(stranger).send(
          new AssumeRoleCommand({ RoleArn: ROLE, RoleSessionName: 'sess', ExternalId: externalId }),
        ),
      () =>
        client(app).send(
          new AssumeRoleCommand({
            RoleArn: `${ROLE}-missing`,
            RoleSessionName: 'sess',
            ExternalId: externalId,
          }),
        ),
    ];
    for (const attempt of attempts) {
      const error = await stsError(attempt());
      expect(error.name).toBe('AccessDenied');
      expect(error.$fault).toBe('client');
      expect(error.$metadata.httpStatusCode).toBe(403);
      expect(error.$metadata.requestId).toMatch(/^[0-9a-f-]{36}$/);
      expect(error.message).toContain('is not authorized to perform: sts:AssumeRole on resource');
    }
    expect(sts.calls.AssumeRole).toBe(4);
    expect(sts.issuedAccessKeyIds()).toHaveLength(issued);
  });

  it('unknown access keys are InvalidClientTokenId (403)', async () => {
    const fake = { accessKeyId: 'AKIAFAKEFAKEFAKEFAKE', secretAccessKey: 'not-a-real-secret' };
    const error = await stsError(
      client(fake).send(
        new AssumeRoleCommand({ RoleArn: ROLE, RoleSessionName: 'sess', ExternalId: externalId }),
      ),
    );
    expect(error.name).toBe('InvalidClientTokenId');
    expect(error.$metadata.httpStatusCode).toBe(403);
  });

  it('a trust policy changed at run time takes effect on the next AssumeRole', async () => {
    sts.setTrustPolicy(ROLE, { principals: ['111100001111'], externalId });
    try {
      const error = await stsError(
        client(app).send(
          new AssumeRoleCommand({ RoleArn: ROLE, RoleSessionName: 'sess', ExternalId: externalId }),
        ),
      );
      expect(error.name).toBe('AccessDenied');
    } finally {
      sts.setTrustPolicy(ROLE, { principals: [VENDOR], externalId });
    }
  });

  it('injected faults: Throttling is retried by the client; an outage fails every call', async () => {
    sts.injectFaults({ action: 'AssumeRole', error: 'Throttling', times: 1 });
    const retrying = new STSClient({ ...sts.clientConfig(), credentials: app, maxAttempts: 3 });
    await retrying.send(
      new AssumeRoleCommand({ RoleArn: ROLE, RoleSessionName: 'sess', ExternalId: externalId }),
    );
    expect(sts.calls.AssumeRole).toBe(2);
    expect(sts.faults.AssumeRole).toBe(1);
    sts.failAll('InternalFailure');
    const error = await stsError(
      client(app).send(
        new AssumeRoleCommand({ RoleArn: ROLE, RoleSessionName: 'sess', ExternalId: externalId }),
      ),
    );
    expect(error.name).toBe('InternalFailure');
    expect(error.$metadata.httpStatusCode).toBe(500);
    expect(error.$fault).toBe('server');
  });

  it('fromTemporaryCredentials gets credentials through the emulator', async () => {
    const provider = fromTemporaryCredentials({
      masterCredentials: app,
      params: { RoleArn: ROLE, RoleSessionName: 'typeorm-envelope', ExternalId: externalId },
      clientConfig: sts.clientConfig(),
    });
    const creds = await provider();
    expect(creds.accessKeyId).toMatch(/^ASIA/);
    expect(creds.sessionToken).toBeTruthy();
    expect(creds.expiration).toBeInstanceOf(Date);
    expect(sts.principalOf(creds.accessKeyId)?.roleArn).toBe(ROLE);
    expect(sts.callLog[0]).toMatchObject({ accessKeyId: app.accessKeyId, externalId });
  });
});
