/**
 * typeorm-envelope in a multi-tenant SaaS: `npm run example:multi-tenant`.
 *
 * One database, five workspaces (the tenants), every workspace's contacts under its own key:
 * `acme` and `globex` bring their own 256-bit keys (customer-provided keys, generated here for the
 * run), `initech` keeps a KMS key in its own AWS account and lets the SaaS use it through an IAM
 * role that requires its External ID, and `umbrella` and `hooli` use the SaaS's own key (the vendor
 * key). The example onboards the keys at run time, shows that one workspace's values do not
 * decrypt in another's rows, that revoking `initech`'s key changes nothing for the others, and that
 * an offboarded workspace's rows are unreadable by design.
 *
 * It needs no server and no account: PostgreSQL is PGlite (WASM, in memory), and AWS is the STS
 * and KMS emulators of test/support (spoken to by the real AWS SDK), with one account for the
 * vendor and one for the customer. Every expectation is checked where it is printed; the process
 * exits non-zero if one fails.
 *
 * The library is imported from `../../src` so that the example runs without building the package;
 * in an application, import from 'typeorm-envelope'.
 */
import 'reflect-metadata';
import { randomBytes } from 'node:crypto';
import { DataSource, Not } from 'typeorm';
import {
  EnvelopeEncryption,
  FIRST_TENANT_KEY_VERSION,
  IntegrityError,
  KeyAccessDeniedError,
  KeyRegistry,
  LocalKeyProvider,
  TenantOffboardedError,
  TypeormEnvelopeKeyRegistry1764300000000,
  TypeormEnvelopeTenantKeys1764400000000,
} from '../../src';
import { type KmsEmulator, startKmsEmulator } from '../../test/support/kms-emulator';
import { type StsEmulator, startStsEmulator } from '../../test/support/sts-emulator';
import { startPgliteServer } from '../quickstart/pglite-server';
import { type Log, table } from '../shared/print';
import { Contact } from './contact';

/** The SaaS runs in the vendor's account; `initech`'s key and role live in the customer's. */
const VENDOR_ACCOUNT = '444455556666';
const CUSTOMER_ACCOUNT = '111122223333';
const ROLE_ARN = `arn:aws:iam::${CUSTOMER_ACCOUNT}:role/saas-data-encryption`;

type KeyPlan = 'customer-key' | 'aws-kms' | 'vendor key';

const WORKSPACES: ReadonlyArray<{ id: string; key: KeyPlan }> = [
  { id: 'acme', key: 'customer-key' },
  { id: 'globex', key: 'customer-key' },
  { id: 'initech', key: 'aws-kms' },
  { id: 'umbrella', key: 'vendor key' },
  { id: 'hooli', key: 'vendor key' },
];
const REVOKED = 'initech';
const OFFBOARDED = 'globex';

/** What the example observed; test/integration/examples.test.ts checks the printed form. */
export interface MultiTenantResult {
  /** The expectations that did not hold (empty on success). */
  failures: string[];
  /** Expectations checked. */
  checked: number;
}

/** Prints each expectation as it is checked, and remembers the ones that failed. */
class Expectations {
  readonly failures: string[] = [];
  checked = 0;

  constructor(private readonly log: Log) {}

  check(condition: boolean, what: string): void {
    this.checked++;
    this.log(`    ${condition ? 'ok' : 'FAILED'}: ${what}`);
    if (!condition) this.failures.push(what);
  }
}

/** The error a promise rejects with, or undefined if it resolves. */
async function errorOf(promise: Promise<unknown>): Promise<Error | undefined> {
  try {
    await promise;
    return undefined;
  } catch (error) {
    return error instanceof Error ? error : new Error(String(error));
  }
}

const describeError = (error: Error | undefined) =>
  error ? `${error.name}: ${error.message}` : 'no error (unexpected)';

export async function main(log: Log = console.log): Promise<MultiTenantResult> {
  log(
    'typeorm-envelope multi-tenant example (PostgreSQL: embedded PGlite, in memory; ' +
      'AWS: STS and KMS emulators on 127.0.0.1)',
  );
  const expect = new Expectations(log);
  const server = await startPgliteServer();
  let sts: StsEmulator | undefined;
  let kms: KmsEmulator | undefined;
  let dataSource: DataSource | undefined;
  try {
    sts = await startStsEmulator();
    const stsEmulator = sts;
    // The KMS emulator asks the STS emulator who signed each request and enforces key policies.
    kms = await startKmsEmulator({
      accountId: VENDOR_ACCOUNT,
      principalOf: (accessKeyId) => stsEmulator.principalOf(accessKeyId),
    });

    // The vendor key: the SaaS's own master key. It seals the workspaces that bring no key and wraps
    // the customer-provided keys. Generated for the run; in production it comes from a secret store
    // or stays in the vendor's KMS.
    const vendorKey = new LocalKeyProvider({ key: randomBytes(32).toString('base64') });
    // The SaaS's own AWS credentials (an IAM user of the vendor's account): the role each customer
    // creates trusts them, with that customer's External ID.
    const vendorCredentials = sts.createUser(VENDOR_ACCOUNT, 'saas-app');
    const encryption = new EnvelopeEncryption({
      keys: [{ version: 1, provider: vendorKey }],
      activeVersion: 1,
      tenantKeys: {
        awsKms: {
          stsEndpoint: sts.endpoint,
          clientConfig: { endpoint: kms.endpoint, region: kms.region, credentials: vendorCredentials },
        },
      },
    });
    log(`vendor key: generated for this run, fingerprint ${vendorKey.fingerprint}`);

    dataSource = new DataSource({
      type: 'postgres',
      url: server.url,
      entities: [Contact],
      // The key registry's and the tenant registry's tables; an application runs them with its own.
      migrations: [TypeormEnvelopeKeyRegistry1764300000000, TypeormEnvelopeTenantKeys1764400000000],
      migrationsRun: true,
      synchronize: true,
      logging: false,
    });
    encryption.attach(dataSource); // before initialize()
    await dataSource.initialize();
    const ran: Array<{ name: string }> = await dataSource.query('SELECT name FROM migrations ORDER BY id');
    log(`migrations run: ${ran.map((m) => m.name).join(', ')}`);
    const contacts = dataSource.getRepository(Contact);
    const tenants = encryption.tenants;

    /** Every contact saved, by id, to compare what is read back with. */
    const expected = new Map<number, string>();
    const addContact = async (workspaceId: string, name: string) => {
      const saved = await contacts.save(
        contacts.create({
          workspaceId,
          email: `${name}@${workspaceId}.example`,
          profile: { phone: `+1 555 01${String(expected.size).padStart(2, '0')}` },
        }),
      );
      expected.set(saved.id, saved.email);
      return saved;
    };
    const readsBack = (loaded: Contact[]) =>
      loaded.length > 0 && loaded.every((c) => expected.get(c.id) === c.email);

    for (const ws of WORKSPACES) for (const name of ['ana', 'ben']) await addContact(ws.id, name);
    log(
      `\n1. The SaaS already has ${expected.size} contacts, two per workspace, all under the vendor key` +
        ' (no workspace has a key of its own yet).',
    );

    log('\n2. Onboarding: each workspace brings its key; a job moves its existing rows under it.');
    /** The customer-provided keys, kept only to scan the database for them at the end (never printed). */
    const customerKeys: string[] = [];
    for (const ws of WORKSPACES.filter((w) => w.key === 'customer-key')) {
      const key = randomBytes(32).toString('base64'); // what the customer hands over
      customerKeys.push(key);
      const added = await tenants.addKey(ws.id, { kind: 'customer-key', key });
      const job = await tenants.runJob(ws.id);
      log(
        `  ${ws.id}: customer-provided key ${added.keyReference} (version ${added.version}); ` +
          `${job.kind} job ${job.state}, ${job.rowsDone}/${job.rowsTotal} values re-wrapped`,
      );
      expect.check(
        added.keyReference.startsWith('sha256:') && job.state === 'completed',
        `${ws.id} validated, activated, existing rows moved`,
      );
    }

    // initech: the SaaS shows the customer its External ID; the customer creates, in its own
    // account, a key and a role that only the SaaS may assume, and only with that External ID.
    const externalId = await tenants.externalIdFor(REVOKED);
    sts.defineRole({ roleArn: ROLE_ARN, trust: { principals: [VENDOR_ACCOUNT], externalId } });
    const kmsKey = kms.createKey({
      accountId: CUSTOMER_ACCOUNT,
      description: `${REVOKED} data encryption`,
      policy: [
        { principals: [`arn:aws:iam::${CUSTOMER_ACCOUNT}:role/key-admin`], actions: ['kms:*'] },
        { principals: [ROLE_ARN], actions: ['kms:DescribeKey'] },
        // Only data keys of this workspace: every wrapped data key carries the tenant in its
        // encryption context, so the key cannot serve another workspace of the same SaaS.
        {
          principals: [ROLE_ARN],
          actions: ['kms:GenerateDataKey', 'kms:Decrypt', 'kms:Encrypt'],
          encryptionContextEquals: { 'typeorm-envelope:tenant': REVOKED },
        },
      ],
    });
    log(`  ${REVOKED}: External ID for its role's trust policy: ${externalId}`);
    log(`  ${REVOKED}: its KMS key ${kmsKey.Arn}, reached through ${ROLE_ARN}`);
    // The External ID is what keeps another customer of the SaaS from pointing its workspace at
    // this role (the confused deputy): with any other, AssumeRole is refused and nothing is recorded.
    const wrongId = await errorOf(
      tenants.addKey(REVOKED, {
        kind: 'aws-kms',
        keyId: kmsKey.Arn,
        roleArn: ROLE_ARN,
        externalId: 'te-another-workspace',
      }),
    );
    log(`  ${REVOKED}: the role with another External ID -> ${describeError(wrongId)}`);
    expect.check(
      wrongId instanceof KeyAccessDeniedError &&
        (wrongId as KeyAccessDeniedError).tenant === REVOKED &&
        (await tenants.status(REVOKED)).keys.length === 0,
      `refused with KeyAccessDeniedError naming ${REVOKED}; no key recorded`,
    );
    const added = await tenants.addKey(REVOKED, { kind: 'aws-kms', keyId: kmsKey.Arn, roleArn: ROLE_ARN });
    const job = await tenants.runJob(REVOKED);
    log(
      `  ${REVOKED}: through the role -> version ${added.version}; ` +
        `${job.kind} job ${job.state}, ${job.rowsDone}/${job.rowsTotal} values re-wrapped`,
    );
    expect.check(
      added.keyReference === kmsKey.Arn && job.state === 'completed',
      `${REVOKED} validated through the role, activated, existing rows moved`,
    );

    for (const ws of WORKSPACES) await addContact(ws.id, 'cleo');
    log(`  one more contact per workspace, written under its new key: ${expected.size} contacts`);

    log('\n3. What each workspace uses, and what the database stores (key_version per row):');
    // A fresh instance (another server, a restart) starts with an empty cache.
    encryption.purgeCache();
    const callsBefore = encryption.providerCalls;
    const all = await contacts.find({ order: { id: 'ASC' } });
    const unwraps = encryption.providerCalls.unwrapped - callsBefore.unwrapped;
    const stored: Array<{ ws: string; version: number; n: number }> = await dataSource.query(
      `SELECT "workspaceId" AS ws, email_key_version AS version, count(*)::int AS n
         FROM contact GROUP BY 1, 2 ORDER BY 1, 2`,
    );
    const [{ dataKeys }] = (await dataSource.query(
      `SELECT count(*)::int AS "dataKeys" FROM (
         SELECT "workspaceId", email_wrapped_key FROM contact
         UNION SELECT "workspaceId", profile_wrapped_key FROM contact) AS k`,
    )) as [{ dataKeys: number }];
    const rows: string[][] = [['workspace', 'key', 'key reference (never the key)', 'stored key_version']];
    const versions = new Map<string, number>();
    for (const ws of WORKSPACES) {
      const status = await tenants.status(ws.id);
      const mine = stored.filter((s) => s.ws === ws.id);
      rows.push([
        ws.id,
        ws.key,
        status.activeKeyReference,
        mine.map((s) => `${s.version} (${s.n} rows)`).join(', '),
      ]);
      const only = mine.length === 1 ? mine[0]?.version : undefined;
      if (ws.key === 'vendor key') {
        expect.check(
          status.activeVersion === null && only === 1,
          `${ws.id}: every row under the vendor key, version 1`,
        );
      } else {
        expect.check(
          only !== undefined && only === status.activeVersion && only >= FIRST_TENANT_KEY_VERSION,
          `${ws.id}: every row under its own key's version (from ${FIRST_TENANT_KEY_VERSION} up)`,
        );
        if (only !== undefined) versions.set(ws.id, only);
      }
    }
    for (const line of table(rows)) log(line);
    expect.check(
      new Set(versions.values()).size === versions.size,
      'no two workspaces share a key version: a stored version names exactly one key',
    );
    log(
      `  read all ${all.length} contacts back with a cold cache: ${unwraps} unwraps ` +
        `for ${dataKeys} (workspace, data key) pairs`,
    );
    expect.check(
      readsBack(all) && all.length === expected.size,
      'every contact reads back as written, across all workspaces in one find()',
    );
    expect.check(unwraps === dataKeys, 'one unwrap per (workspace, data key), not one per row');

    log("\n4. Isolation: a value copied from one workspace's row into another's does not decrypt there.");
    const firstOf = (ws: string) => all.find((c) => c.workspaceId === ws) as Contact;
    const columns = ['email_ciphertext', 'email_iv', 'email_wrapped_key', 'email_key_version'];
    for (const [from, to] of [
      ['acme', 'umbrella'],
      ['umbrella', 'hooli'],
    ] as const) {
      const source = firstOf(from);
      const target = firstOf(to);
      const [original] = await dataSource.query(`SELECT ${columns.join(', ')} FROM contact WHERE id = $1`, [
        target.id,
      ]);
      await dataSource.query(
        `UPDATE contact SET ${columns.map((c) => `${c} = src.${c}`).join(', ')}
           FROM contact AS src WHERE contact.id = $1 AND src.id = $2`,
        [target.id, source.id],
      );
      const error = await errorOf(contacts.findOneByOrFail({ id: target.id }));
      log(`  ${from}'s email copied into ${to}'s contact ${target.id} -> ${describeError(error)}`);
      expect.check(
        error instanceof IntegrityError,
        `refused with IntegrityError (${from}: ${WORKSPACES.find((w) => w.id === from)?.key}, ` +
          `${to}: ${WORKSPACES.find((w) => w.id === to)?.key})`,
      );
      // Put the row back as it was.
      await dataSource.query(
        `UPDATE contact SET ${columns.map((c, i) => `${c} = $${i + 2}`).join(', ')} WHERE id = $1`,
        [target.id, ...columns.map((c) => original[c])],
      );
    }

    log(`\n5. Revocation: ${REVOKED} disables its KMS key in its own account.`);
    kms.disableKey(kmsKey.Arn);
    // Cached data keys would serve until cache.unwrappedKeyTtl; purgeCache(tenant) drops only this
    // workspace's (an application calls it on the customer's revocation event).
    encryption.purgeCache(REVOKED);
    const everyone = await errorOf(contacts.find());
    log(`  find() across all workspaces -> ${describeError(everyone)}`);
    expect.check(
      everyone instanceof KeyAccessDeniedError && (everyone as KeyAccessDeniedError).tenant === REVOKED,
      `KeyAccessDeniedError naming tenant ${REVOKED}`,
    );
    const others = await contacts.find({ where: { workspaceId: Not(REVOKED) }, order: { id: 'ASC' } });
    log(`  find() of the other workspaces -> ${others.length} contacts`);
    expect.check(
      readsBack(others) && others.length === all.length - 3,
      'the other workspaces read as before, in the same process and table',
    );
    const written = await Promise.all(['acme', 'umbrella'].map((ws) => addContact(ws, 'dan')));
    expect.check(
      written.every((c) => c.id > 0),
      'the other workspaces still write (acme: customer-provided key, umbrella: vendor key)',
    );
    const revokedWrite = await errorOf(addContact(REVOKED, 'dan'));
    log(`  a new ${REVOKED} contact -> ${describeError(revokedWrite)}`);
    expect.check(revokedWrite instanceof KeyAccessDeniedError, `${REVOKED}'s writes are refused too`);

    log(`\n6. Offboarding: ${OFFBOARDED}'s contract ends; its key is destroyed (crypto-shredding).`);
    const offboarded = await tenants.offboard(OFFBOARDED);
    log(
      `  offboard('${OFFBOARDED}') -> ${offboarded.keysDestroyed} key destroyed, ` +
        `${offboarded.valuesUnderApplicationKey} values left under the vendor key`,
    );
    const gone = await errorOf(contacts.findBy({ workspaceId: OFFBOARDED }));
    log(`  reading its contacts -> ${describeError(gone)}`);
    expect.check(gone instanceof TenantOffboardedError, `${OFFBOARDED}'s rows: TenantOffboardedError`);
    const goneWrite = await errorOf(addContact(OFFBOARDED, 'eve'));
    log(`  a new ${OFFBOARDED} contact -> ${describeError(goneWrite)}`);
    expect.check(goneWrite instanceof TenantOffboardedError, `${OFFBOARDED}'s writes are refused`);
    const remaining = await contacts.find({
      where: WORKSPACES.filter((w) => w.id !== OFFBOARDED && w.id !== REVOKED).map((w) => ({
        workspaceId: w.id,
      })),
    });
    expect.check(
      readsBack(remaining) && remaining.length === others.length - 3 + written.length,
      'acme, umbrella and hooli read as before',
    );

    log('\n7. The tenant registry, and what the database holds:');
    const statusRows: string[][] = [['workspace', 'state', 'active version', 'last job']];
    for (const status of await tenants.list()) {
      statusRows.push([
        status.tenantId,
        status.state,
        String(
          status.activeVersion ?? (status.state === 'offboarded' ? '- (keys destroyed)' : '- (vendor key)'),
        ),
        status.job ? `${status.job.kind} ${status.job.state}` : '-',
      ]);
    }
    for (const line of table(statusRows)) log(line);
    log('  (umbrella and hooli have no record: a workspace without one uses the vendor key)');
    const audit = await new KeyRegistry(dataSource, encryption).auditLog({ tenant: REVOKED });
    log(`  audit log of ${REVOKED}: ${audit.map((e) => e.event).join(', ')}`);
    expect.check(
      audit.some((e) => e.event === 'tenant-key-activated'),
      `the audit log records ${REVOKED}'s key, filtered by tenant`,
    );
    const tableNames: Array<{ name: string }> = await dataSource.query(
      `SELECT table_name AS name FROM information_schema.tables
        WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'`,
    );
    const dump: Buffer[] = [];
    for (const { name } of tableNames) {
      for (const row of (await dataSource.query(`SELECT * FROM "${name}"`)) as Array<
        Record<string, unknown>
      >) {
        for (const value of Object.values(row)) {
          dump.push(Buffer.isBuffer(value) ? value : Buffer.from(JSON.stringify(value) ?? ''));
        }
      }
    }
    const database = Buffer.concat(dump);
    const keyForms = customerKeys.flatMap((key) => {
      const bytes = Buffer.from(key, 'base64');
      return [bytes, Buffer.from(key), Buffer.from(bytes.toString('hex'))];
    });
    const keysFound = keyForms.some((form) => database.includes(form));
    const plaintextFound = [...expected.values()].some((email) => database.includes(Buffer.from(email)));
    log(
      `  scanned ${tableNames.length} tables: customer-provided keys (bytes, base64, hex) anywhere: ` +
        `${keysFound ? 'YES' : 'no'}; plaintext emails anywhere: ${plaintextFound ? 'YES' : 'no'}`,
    );
    expect.check(!keysFound && !plaintextFound, 'no customer-provided key and no plaintext in the database');

    log(
      expect.failures.length === 0
        ? `\nAll ${expect.checked} expectations held.`
        : `\n${expect.failures.length} of ${expect.checked} expectations FAILED.`,
    );
    return { failures: expect.failures, checked: expect.checked };
  } finally {
    if (dataSource?.isInitialized) await dataSource.destroy();
    await server.stop();
    await kms?.close();
    await sts?.close();
  }
}

if (require.main === module) {
  main().then(
    (result) => {
      if (result.failures.length > 0) process.exitCode = 1;
    },
    (error: unknown) => {
      console.error(error);
      process.exitCode = 1;
    },
  );
}
