import { type Command, Option } from 'commander';
import { ConfigError } from '../errors';
import type { TenantKeyDescriptor } from '../keys/tenant-key-factories';
import type { TenantKeySummary, TenantStatus } from '../tenants/tenant-admin';
import type { TenantJob } from '../tenants/tenant-registry';
import { parsePositiveInteger } from './arguments';
import { KEY_ON_COMMAND_LINE, readCustomerKey } from './key-input';
import type { Project } from './load-project';
import { table } from './output';
import { Progress } from './progress';

/** Options every command sees. */
export interface GlobalOptions {
  dataSource: string;
  json?: boolean;
}

/** Loads the project, runs `fn`, prints what it returns, and closes the DataSource. */
export type Runner = (
  fn: (project: Project, global: GlobalOptions) => Promise<unknown>,
) => () => Promise<void>;

interface AddOptions {
  customerKeyFile?: string;
  customerKey?: string;
  kmsKey?: string;
  roleArn?: string;
  externalId?: string;
  region?: string;
  azureKey?: string;
  gcpKey?: string;
  vaultKey?: string;
  vaultAddress?: string;
  vaultMount?: string;
  vaultNamespace?: string;
  activate: boolean;
}

/** `typeorm-envelope tenants …`: wiring over `encryption.tenants` (the tenant API does the work). */
export function addTenantCommands(program: Command, run: Runner): void {
  const tenants = program
    .command('tenants')
    .description(
      "tenant keys: each customer's own key (customer-provided, or in its AWS KMS, Azure Key Vault, Google Cloud KMS or Vault), jobs, offboarding",
    );

  tenants
    .command('list')
    .description('every tenant the registry records: its key, job and rotation state')
    .action(
      run(async ({ dataSource, encryption }, global) => {
        const all = await encryption.tenantsOf(dataSource).list();
        return global.json
          ? all
          : listText(all, '(no tenant recorded: every tenant uses the application key)');
      }),
    );

  tenants
    .command('add <tenant>')
    .description(
      "add a key for a tenant, validated with a round trip first: a customer-provided key read from a file (or stdin), or a key in the customer's AWS KMS, Azure Key Vault, Google Cloud KMS or Vault/OpenBao Transit (one per call; the credentials that reach it come from the application's tenantKeys configuration, never from the command line)",
    )
    .option(
      '--customer-key-file <path>',
      'file holding the customer-provided key (base64 of 32 bytes, or the 32 raw bytes); - reads stdin. A key is never taken on the command line',
    )
    .addOption(new Option('--customer-key <key>').hideHelp())
    .option('--kms-key <arn>', "ARN of a symmetric KMS key in the customer's account")
    .option('--role-arn <arn>', 'the role the customer created for this application (assumed to use the key)')
    .option(
      '--external-id <id>',
      "the role's External ID (default: the tenant's own, see `tenants external-id`)",
    )
    .option('--region <region>', "the key's region (default: the one in its ARN)")
    .option(
      '--azure-key <key id>',
      "a key in the customer's Azure Key Vault, https://<vault>.vault.azure.net/keys/<name>[/<version>] (without a version, its current one is recorded)",
    )
    .option(
      '--gcp-key <name>',
      "a key in the customer's Google Cloud KMS, projects/P/locations/L/keyRings/R/cryptoKeys/K (or …/cryptoKeyVersions/N)",
    )
    .option('--vault-key <name>', "a Transit key in the customer's Vault or OpenBao (needs --vault-address)")
    .option('--vault-address <url>', "the Vault server's origin, e.g. https://vault.customer.example:8200")
    .option('--vault-mount <path>', 'the Transit mount (default: transit)')
    .option('--vault-namespace <path>', "the key's Vault namespace, if any")
    .option('--no-activate', 'record the key without making it the one new rows use')
    .action(async (tenant: string, options: AddOptions) => {
      const { descriptor, warnings } = descriptorOf(options);
      await run(async ({ dataSource, encryption }, global) => {
        for (const warning of warnings) process.stderr.write(`typeorm-envelope: warning: ${warning}\n`);
        const result = await encryption.tenantsOf(dataSource).addKey(tenant, descriptor, {
          activate: options.activate,
        });
        if (global.json) return result;
        const added = `tenant ${result.tenantId}: key version ${result.version} added (${result.kind} ${result.keyReference})`;
        return result.state === 'active'
          ? `${added}, active\n${moveHint(result.tenantId)}`
          : `${added}, ${result.state}: make it the active key with typeorm-envelope tenants activate ${result.tenantId} ${result.version}`;
      })();
    });

  tenants
    .command('validate <tenant> [version]')
    .description("check a tenant's key (default: its active one) with a round trip")
    .action((tenant: string, version: string | undefined) =>
      run(async ({ dataSource, encryption }, global) => {
        const key = await encryption
          .tenantsOf(dataSource)
          .validate(tenant, version === undefined ? undefined : parsePositiveInteger(version));
        if (global.json) return { tenantId: tenant, ...key };
        return `tenant ${tenant}: key version ${key.version} (${key.kind} ${key.keyReference}) validated with a round trip`;
      })(),
    );

  tenants
    .command('activate <tenant> <version>')
    .description("validate one of a tenant's keys and make it the one its new rows use")
    .action((tenant: string, version: string) =>
      run(async ({ dataSource, encryption }, global) => {
        const result = await encryption.tenantsOf(dataSource).activate(tenant, parsePositiveInteger(version));
        if (global.json) return result;
        return `tenant ${result.tenantId}: key version ${result.version} is active (${result.kind} ${result.keyReference})\n${moveHint(result.tenantId)}`;
      })(),
    );

  tenants
    .command('status <tenant>')
    .description("one tenant's keys, active key, job and rotation state")
    .action((tenant: string) =>
      run(async ({ dataSource, encryption }, global) => {
        const status = await encryption.tenantsOf(dataSource).status(tenant);
        return global.json ? status : tenantStatusText(status);
      })(),
    );

  tenants
    .command('run-job <tenant>')
    .description(
      "run the tenant's key job: validate its key, re-wrap its data keys under it (data untouched), resumable",
    )
    .option('--batch-size <rows>', 'rows per UPDATE', parsePositiveInteger, 1_000)
    .action((tenant: string, options: { batchSize: number }) =>
      run(async ({ dataSource, encryption }, global) => {
        const progress = new Progress(!global.json, 'values');
        let job: TenantJob;
        try {
          job = await encryption.tenantsOf(dataSource).runJob(tenant, {
            batchSize: options.batchSize,
            onProgress: (current) => progress.update(`tenant ${tenant}`, current.rowsDone, current.rowsTotal),
          });
        } finally {
          progress.stop();
        }
        return jobOutcome(tenant, job, global);
      })(),
    );

  tenants
    .command('revert <tenant>')
    .description('move a tenant back to the application key (its existing rows move with the job); audited')
    .action((tenant: string) =>
      run(async ({ dataSource, encryption }, global) => {
        const job = await encryption.tenantsOf(dataSource).revert(tenant);
        if (global.json) return { tenantId: tenant, job };
        return `tenant ${tenant}: new rows use the application key again\n${moveHint(tenant, 'back to it')}`;
      })(),
    );

  tenants
    .command('offboard <tenant>')
    .description(
      'crypto-shred a tenant: destroy what this application holds of its keys, so its rows can never be read again. Cannot be undone',
    )
    .option('--yes', "confirm: the tenant's rows become unreadable for good")
    .action(async (tenant: string, options: { yes?: boolean }) => {
      if (!options.yes) {
        throw new ConfigError(
          `offboarding destroys what this application holds of the tenant's keys: its rows can never be read again and writes for it are refused. This cannot be undone; run it again with --yes to confirm`,
          { tenant },
        );
      }
      await run(async ({ dataSource, encryption }, global) => {
        const result = await encryption.tenantsOf(dataSource).offboard(tenant);
        if (global.json) return result;
        const lines = [
          `tenant ${result.tenantId} offboarded: ${result.keysDestroyed} key${result.keysDestroyed === 1 ? '' : 's'} destroyed; its rows can no longer be read and its writes are refused`,
        ];
        if (result.indexKeysErased > 0) {
          lines.push(
            `${result.indexKeysErased} blind-index key${result.indexKeysErased === 1 ? '' : 's'} erased: its searchable values can no longer be looked up`,
          );
        }
        if (result.valuesUnderApplicationKey > 0) {
          lines.push(
            `${result.valuesUnderApplicationKey} of its values are under the application key, which offboarding does not destroy: delete those rows to erase them`,
          );
        }
        return lines.join('\n');
      })();
    });

  tenants
    .command('external-id <tenant>')
    .description("the tenant's External ID, for the trust policy of the role its customer creates (stable)")
    .action((tenant: string) =>
      run(async ({ dataSource, encryption }, global) => {
        const externalId = await encryption.tenantsOf(dataSource).externalIdFor(tenant);
        return global.json ? { tenantId: tenant, externalId } : externalId;
      })(),
    );

  tenants
    .command('due')
    .description('tenants whose own key is older than their rotation interval')
    .action(
      run(async ({ dataSource, encryption }, global) => {
        const due = await encryption.tenantsOf(dataSource).due();
        return global.json ? due : listText(due, '(no tenant is due for rotation)');
      }),
    );

  tenants
    .command('rotation-interval <tenant> <days>')
    .description("how often the tenant's key should be rotated (default 365 days); `tenants due` reports it")
    .action((tenant: string, days: string) =>
      run(async ({ dataSource, encryption }, global) => {
        const rotationIntervalDays = parsePositiveInteger(days);
        await encryption.tenantsOf(dataSource).setRotationInterval(tenant, rotationIntervalDays);
        return global.json
          ? { tenantId: tenant, rotationIntervalDays }
          : `tenant ${tenant}: rotate its key every ${rotationIntervalDays} days`;
      })(),
    );
}

/** What `tenants run-job` (and `rotate --tenant` running a job) prints; a failed job exits non-zero. */
export function jobOutcome(tenant: string, job: TenantJob, global: GlobalOptions): unknown {
  if (job.state === 'failed') {
    process.exitCode = 1;
    process.stderr.write(
      `typeorm-envelope: the ${job.kind} job of tenant ${tenant} failed; fix the cause and run it again (it resumes where it stopped)\n`,
    );
  }
  if (global.json) return { tenantId: tenant, job };
  const target = job.toVersion === null ? 'the application key' : `key version ${job.toVersion}`;
  if (job.state === 'failed') {
    return `tenant ${tenant}: ${job.kind} job failed after ${job.rowsDone}/${job.rowsTotal} values: ${job.error}`;
  }
  return `tenant ${tenant}: ${job.kind} job ${job.state}: ${job.rowsDone}/${job.rowsTotal} values re-wrapped to ${target}`;
}

/** One tenant, as `tenants status` and `status --tenant` print it. */
export function tenantStatusText(status: TenantStatus): string {
  const lines = [`tenant ${status.tenantId}: ${status.state}`];
  if (status.state === 'offboarded') {
    lines.push(
      `offboarded ${iso(status.offboardedAt)}: its keys were destroyed, its rows cannot be read and its writes are refused`,
    );
  } else if (status.activeVersion === null) {
    lines.push(`active key: application key (${status.activeKeyReference})`);
  } else {
    const active = status.keys.find((k) => k.version === status.activeVersion);
    lines.push(
      `active key: version ${status.activeVersion} (${active?.kind ?? 'key'} ${status.activeKeyReference}), activated ${iso(status.keyActivatedAt)}`,
    );
  }
  if (status.externalId) lines.push(`external id: ${status.externalId}`);
  lines.push(`job: ${jobText(status.job, true)}`);
  lines.push(
    `rotation: every ${status.rotationIntervalDays} days${status.dueForRotation ? ', due now' : status.activeVersion === null ? '' : ', not due'}`,
  );
  if (status.keys.length) lines.push('', keysTable(status.keys));
  return lines.join('\n');
}

function listText(all: TenantStatus[], empty: string): string {
  if (!all.length) return empty;
  return table(
    all.map((t) => ({
      tenant: t.tenantId,
      state: t.state,
      'key version': t.state === 'offboarded' ? '' : (t.activeVersion ?? 'application key'),
      key: t.state === 'offboarded' ? '' : t.activeKeyReference,
      job: jobText(t.job, false),
      due: t.dueForRotation ? 'yes' : '',
    })),
  );
}

function keysTable(keys: TenantKeySummary[]): string {
  return table(
    keys.map((k) => ({
      version: k.version,
      kind: k.kind,
      key: k.keyReference,
      state: k.state,
      created: k.createdAt,
      activated: k.activatedAt,
      validated: k.lastValidatedAt,
      destroyed: k.destroyedAt,
    })),
  );
}

function jobText(job: TenantJob | null, detailed: boolean): string {
  if (!job) return detailed ? 'none' : '';
  const text = `${job.kind} ${job.state}`;
  if (!detailed) return text;
  const counts = job.state === 'pending' ? '' : ` (${job.rowsDone}/${job.rowsTotal} values)`;
  return `${text}${counts}${job.state === 'failed' && job.error ? `: ${job.error}` : ''}`;
}

function moveHint(tenant: string, where = 'under it'): string {
  return `its existing rows move ${where} with the job: typeorm-envelope tenants run-job ${tenant}`;
}

function iso(date: Date | string | null): string {
  if (date === null) return '-';
  return date instanceof Date ? date.toISOString() : date;
}

/** The options of each kind of key `tenants add` takes: the one naming the key first, then what only it uses. */
const KINDS = [
  { key: 'customerKeyFile', flag: '--customer-key-file', what: 'a customer-provided key', extras: [] },
  {
    key: 'kmsKey',
    flag: '--kms-key',
    what: 'a key in AWS KMS',
    extras: [
      ['roleArn', '--role-arn'],
      ['externalId', '--external-id'],
      ['region', '--region'],
    ],
  },
  { key: 'azureKey', flag: '--azure-key', what: 'a key in Azure Key Vault', extras: [] },
  { key: 'gcpKey', flag: '--gcp-key', what: 'a key in Google Cloud KMS', extras: [] },
  {
    key: 'vaultKey',
    flag: '--vault-key',
    what: 'a key in Vault Transit',
    extras: [
      ['vaultAddress', '--vault-address'],
      ['vaultMount', '--vault-mount'],
      ['vaultNamespace', '--vault-namespace'],
    ],
  },
] as const satisfies ReadonlyArray<{
  key: keyof AddOptions;
  flag: string;
  what: string;
  extras: ReadonlyArray<readonly [keyof AddOptions, string]>;
}>;

/**
 * The descriptor `tenants add` was given, refusing a key on the command line, two kinds of key,
 * or one kind's options with another, before anything is loaded.
 */
function descriptorOf(options: AddOptions): { descriptor: TenantKeyDescriptor; warnings: string[] } {
  if (options.customerKey !== undefined) throw new ConfigError(KEY_ON_COMMAND_LINE);
  const given = KINDS.filter((kind) => options[kind.key] !== undefined);
  if (given.length > 1) {
    throw new ConfigError(
      `tenants add takes one key, not ${given.map((kind) => kind.flag).join(' and ')}: add each with its own call`,
    );
  }
  const [kind] = given;
  if (kind === undefined) {
    throw new ConfigError(
      'tenants add needs one key: --customer-key-file <path> (a customer-provided key; - reads stdin), ' +
        '--kms-key <arn> (AWS KMS), --azure-key <key id> (Azure Key Vault), --gcp-key <name> (Google Cloud KMS) ' +
        'or --vault-key <name> with --vault-address <url> (Vault Transit), in the customer account',
    );
  }
  for (const other of KINDS) {
    if (other === kind) continue;
    const stray = other.extras.find(([name]) => options[name] !== undefined);
    if (stray) throw new ConfigError(`${stray[1]} is for ${other.flag}, not for ${kind.flag} (${kind.what})`);
  }
  const { customerKeyFile, kmsKey, roleArn, externalId, region, azureKey, gcpKey, vaultKey } = options;
  if (kmsKey !== undefined) {
    return {
      descriptor: {
        kind: 'aws-kms',
        keyId: kmsKey,
        ...(roleArn !== undefined ? { roleArn } : {}),
        ...(externalId !== undefined ? { externalId } : {}),
        ...(region !== undefined ? { region } : {}),
      },
      warnings: [],
    };
  }
  if (azureKey !== undefined)
    return { descriptor: { kind: 'azure-key-vault', keyId: azureKey }, warnings: [] };
  if (gcpKey !== undefined) return { descriptor: { kind: 'gcp-kms', keyName: gcpKey }, warnings: [] };
  if (vaultKey !== undefined) {
    const { vaultAddress, vaultMount, vaultNamespace } = options;
    if (vaultAddress === undefined) {
      throw new ConfigError(
        "--vault-key needs --vault-address <url>: the origin of the customer's Vault (one listed in tenantKeys.vaultTransit.addresses)",
      );
    }
    return {
      descriptor: {
        kind: 'vault-transit',
        address: vaultAddress,
        keyName: vaultKey,
        ...(vaultMount !== undefined ? { mount: vaultMount } : {}),
        ...(vaultNamespace !== undefined ? { namespace: vaultNamespace } : {}),
      },
      warnings: [],
    };
  }
  const { key, warnings } = readCustomerKey(customerKeyFile as string);
  return { descriptor: { kind: 'customer-key', key }, warnings };
}
