import { randomBytes } from 'node:crypto';
import { inspect } from 'node:util';
import { ConfiguredRetryStrategy } from '@smithy/core/retry';
import 'reflect-metadata';
import { Column, Entity, PrimaryGeneratedColumn } from 'typeorm';
import { expect } from 'vitest';
import { type AwsKmsTenantOptions, Encrypted, EncryptionTenant, type EnvelopeEncryption } from '../../src';
import { rawQuery } from './database';
import { type KeyPolicyStatement, type KmsEmulator, startKmsEmulator } from './kms-emulator';
import { type EmulatedUserCredentials, type StsEmulator, startStsEmulator } from './sts-emulator';

/** The account the application (the vendor) runs in. */
export const VENDOR_ACCOUNT = '444455556666';
/** The encryption-context entry that names a data key's tenant. */
export const TENANT_CONTEXT = 'typeorm-envelope:tenant';
/** What the application's role may do with a customer's key. */
export const ROLE_ACTIONS = ['kms:GenerateDataKey', 'kms:Decrypt', 'kms:Encrypt'];

/**
 * A tenant's note with `bindPrimaryKey: false`: its values are bound to table, column and tenant
 * only, so the tenant binding is all that keeps a value copied from another tenant's row out.
 */
@Entity('tenant_notes')
export class TenantNote {
  @PrimaryGeneratedColumn() id!: number;
  @EncryptionTenant() @Column() workspaceId!: string;
  @Encrypted({ bindPrimaryKey: false }) body!: string;
}

/** A customer-provided key as a customer hands it over: base64 of 32 random bytes. */
export const customerKey = (): string => randomBytes(32).toString('base64');

/** Every printable form of a customer-provided key: base64, base64url, hex (both cases). */
export function keyForms(base64Key: string): string[] {
  const bytes = Buffer.from(base64Key, 'base64');
  const hex = bytes.toString('hex');
  return [base64Key, bytes.toString('base64url'), hex, hex.toUpperCase()];
}

/** The STS and KMS emulators of a SaaS and its customers' accounts, sharing one credential registry. */
export interface TenantClouds {
  sts: StsEmulator;
  kms: KmsEmulator;
  /** The application's own IAM user: the credentials that call `AssumeRole`. */
  app: EmulatedUserCredentials;
  /** `tenantKeys.awsKms` for an `EnvelopeEncryption` reaching these emulators. */
  awsKms(): AwsKmsTenantOptions;
  /** Every secret the emulators handed out (secret keys, session tokens). */
  secrets(): string[];
  close(): Promise<void>;
}

/** Starts both emulators, the KMS one enforcing key policies for the callers STS knows. Call `close()`. */
export async function startTenantClouds(): Promise<TenantClouds> {
  const sts = await startStsEmulator();
  const kms = await startKmsEmulator({ accountId: VENDOR_ACCOUNT, principalOf: (id) => sts.principalOf(id) });
  const app = sts.createUser(VENDOR_ACCOUNT, 'saas-app');
  return {
    sts,
    kms,
    app,
    awsKms: () => ({
      stsEndpoint: sts.endpoint,
      clientConfig: {
        endpoint: kms.endpoint,
        region: kms.region,
        credentials: app,
        retryStrategy: new ConfiguredRetryStrategy(2, () => 5),
      },
    }),
    secrets: () => [app.secretAccessKey, ...sts.issuedSecrets()],
    async close() {
      await kms.close();
      await sts.close();
    },
  };
}

/** One customer's AWS account: its key, the role it created for the application, and its policies. */
export interface CustomerAccount {
  tenantId: string;
  account: string;
  roleArn: string;
  keyArn: string;
  keyUuid: string;
  externalId: string;
  /** The key policy as the customer wrote it (`roleActions` for the role, tenant condition or not). */
  policy(options?: { roleActions?: string[]; requireTenant?: string | null }): KeyPolicyStatement[];
}

/**
 * Creates a customer's account as its onboarding guide tells it to: a role trusting the vendor
 * account with the tenant's External ID (from `externalIdFor`), and a KMS key whose policy lets
 * that role use the key only for data keys whose encryption context names this very tenant.
 */
export async function createCustomerAccount(
  clouds: TenantClouds,
  encryption: EnvelopeEncryption,
  tenantId: string,
  account: string,
): Promise<CustomerAccount> {
  const externalId = await encryption.tenants.externalIdFor(tenantId);
  const roleArn = `arn:aws:iam::${account}:role/saas-${tenantId}`;
  clouds.sts.defineRole({ roleArn, trust: { principals: [VENDOR_ACCOUNT], externalId } });
  const policy: CustomerAccount['policy'] = ({
    roleActions = ROLE_ACTIONS,
    requireTenant = tenantId,
  } = {}) => [
    { principals: [`arn:aws:iam::${account}:role/key-admin`], actions: ['kms:*'] },
    { principals: [roleArn], actions: ['kms:DescribeKey'] },
    ...(roleActions.length
      ? [
          {
            principals: [roleArn],
            actions: roleActions,
            ...(requireTenant === null
              ? {}
              : { encryptionContextEquals: { [TENANT_CONTEXT]: requireTenant } }),
          },
        ]
      : []),
  ];
  const key = clouds.kms.createKey({
    accountId: account,
    description: `key of ${tenantId}`,
    policy: policy(),
  });
  return { tenantId, account, roleArn, keyArn: key.Arn, keyUuid: key.KeyId, externalId, policy };
}

/** The error a promise rejects with (fails the test when it resolves). */
export async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (error) {
    return error as Error;
  }
  throw new Error('expected the call to fail');
}

/** Asserts that none of `needles` appears in the message, inspect output or JSON of `outputs`. */
export function expectNoneOf(needles: readonly string[], ...outputs: unknown[]): void {
  const texts = outputs.map((o) =>
    typeof o === 'string'
      ? o
      : `${inspect(o, { depth: 20, showHidden: true })}\n${o instanceof Error ? o.message : ''}\n${JSON.stringify(o) ?? ''}`,
  );
  for (const needle of needles) for (const text of texts) expect(text).not.toContain(needle);
}

/**
 * Every table of `schema`, each row cast to text, searched for `needles`; and every bytea column
 * searched for each of `rawBytes` with `position()`. Returns what was found where (empty: nothing).
 */
export async function scanSchema(
  url: string,
  schema: string,
  needles: readonly string[],
  rawBytes: readonly Buffer[],
): Promise<string[]> {
  const found: string[] = [];
  const tables = await rawQuery<{ table_name: string }>(
    url,
    `SELECT table_name FROM information_schema.tables WHERE table_schema = $1 AND table_type = 'BASE TABLE'`,
    [schema],
  );
  expect(tables.length).toBeGreaterThan(0);
  for (const { table_name: table } of tables) {
    const path = `"${schema}"."${table}"`;
    for (const needle of needles) {
      const [row] = await rawQuery<{ n: number }>(
        url,
        `SELECT count(*)::int AS n FROM ${path} t WHERE strpos(t::text, $1) > 0`,
        [needle],
      );
      if ((row?.n ?? 0) > 0) found.push(`${table}: text form`);
    }
    const byteaColumns = await rawQuery<{ column_name: string }>(
      url,
      `SELECT column_name FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 AND data_type = 'bytea'`,
      [schema, table],
    );
    for (const { column_name: column } of byteaColumns) {
      for (const bytes of rawBytes) {
        const [row] = await rawQuery<{ n: number }>(
          url,
          `SELECT count(*)::int AS n FROM ${path} WHERE position($1::bytea IN "${column}") > 0`,
          [bytes],
        );
        if ((row?.n ?? 0) > 0) found.push(`${table}.${column}: raw bytes`);
      }
    }
  }
  return found;
}
