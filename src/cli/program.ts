import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join, relative, resolve, sep } from 'node:path';
import { Command, Option } from 'commander';
import type { DataSource } from 'typeorm';
import type { EnvelopeEncryption } from '../envelope-encryption';
import { ConfigError, EnvelopeError } from '../errors';
import { FIRST_TENANT_KEY_VERSION } from '../keys/keyring';
import { auditLogToCsv, auditLogToJson } from '../rotation/audit-export';
import { backfillEncryptedColumns } from '../rotation/backfill';
import { AUDIT_EVENTS, type AuditEvent, KeyRegistry } from '../rotation/key-registry';
import { migrateLayout } from '../rotation/migrate-layout';
import { reencryptColumns } from '../rotation/reencrypt';
import { rewrapDataKeys } from '../rotation/rewrap';
import { rotationMigrationName, rotationMigrationSource } from '../rotation/rotation-migration-template';
import { encryptionStatus, type PropertyStatus } from '../rotation/status';
import { type VerifyResult, verifyEncryptedColumns } from '../rotation/verify';
import { oneOf, parseTime, parsePositiveInteger as parseVersion } from './arguments';
import { addIndexKeyCommands } from './index-keys';
import { loadProject } from './load-project';
import { failOn, RawOutput, table } from './output';
import { Progress } from './progress';
import { addTenantCommands, type GlobalOptions, jobOutcome, type Runner, tenantStatusText } from './tenants';

/** The `typeorm-envelope` command line: wiring only, the work is in `rotation/`. */
export function buildProgram(): Command {
  const program = new Command('typeorm-envelope')
    .description('Key status, validation, rotation and verification for typeorm-envelope')
    .requiredOption('-d, --data-source <file>', 'module exporting your DataSource and EnvelopeEncryption')
    .option('--json', 'print exactly one JSON document on stdout, for scripts (errors too)')
    .showHelpAfterError()
    // Usage errors reach main's handler, which prints them as JSON with --json.
    .exitOverride();

  const run: Runner = (fn) => async () => {
    const global = program.opts<GlobalOptions>();
    const project = await loadProject(global.dataSource);
    try {
      const output = await fn(project, global);
      if (output !== undefined) print(output, global.json);
    } finally {
      if (project.dataSource.isInitialized) await project.dataSource.destroy();
    }
  };

  program
    .command('status')
    .description('rows per key version for every encrypted property; versions due for rotation')
    .option('--tenant <id>', 'one tenant: its keys, job, and its rows per key version')
    .action((options: { tenant?: string }) =>
      run(async ({ dataSource, encryption }, global) => {
        if (options.tenant !== undefined) return tenantStatus(dataSource, encryption, options.tenant, global);
        const registry = new KeyRegistry(dataSource, encryption);
        const properties = await encryptionStatus(dataSource, encryption);
        const tables = await registry.exists();
        const keys = tables ? await registry.list() : [];
        const registryState = !tables ? 'missing' : keys.length ? 'recorded' : 'empty';
        if (global.json) {
          return {
            activeVersion: encryption.keyring.activeVersion,
            registry: registryState,
            keys,
            properties,
          };
        }
        const lines = [
          `active key version: ${encryption.keyring.activeVersion} (configured: ${encryption.keyring.versions.join(', ')})`,
          '',
          table(properties.map(statusRow)),
        ];
        if (keys.length) {
          lines.push(
            '',
            table(
              keys.map((k) => ({
                version: k.version,
                state: k.state,
                kind: k.providerKind,
                key: k.keyReference,
                activated: k.activatedAt,
                'due for rotation': k.dueForRotation ? 'yes' : '',
              })),
            ),
          );
        } else if (registryState === 'empty') {
          lines.push(
            '',
            '(key registry: no key version recorded yet; `typeorm-envelope validate` or `activate <version>` records the configured versions)',
          );
        } else {
          lines.push(
            '',
            '(no key registry tables: run the TypeormEnvelopeKeyRegistry migration to record versions and audit events; until then the configured activeVersion decides)',
          );
        }
        return lines.join('\n');
      })(),
    );

  program
    .command('validate')
    .description('check every configured master key (the active one with a round trip)')
    .action(
      run(async ({ dataSource, encryption }, global) => {
        const registry = new KeyRegistry(dataSource, encryption);
        const recorded = await registry.exists();
        if (recorded) await registry.sync();
        const results = recorded ? await registry.validate() : await encryption.validate();
        const rows = results.map((r) => ({
          version: r.version,
          kind: r.kind,
          key: r.keyReference,
          check: r.active ? 'round trip' : 'describe',
          registry: r.registry,
          result: 'ok',
        }));
        if (global.json) return rows;
        return [
          table(rows),
          ...(recorded
            ? []
            : [
                '',
                '(no key registry tables: each key was checked, but there is no recorded key reference to compare it with)',
              ]),
        ].join('\n');
      }),
    );

  program
    .command('activate <version>')
    .description('validate a configured version and make it the active one (needs the key registry)')
    .action((version: string) =>
      run(async ({ dataSource, encryption }) => {
        const registry = await requireRegistry(new KeyRegistry(dataSource, encryption));
        await registry.activate(parseVersion(version));
        return `key version ${version} is active`;
      })(),
    );

  program
    .command('retire <version>')
    .description('retire a version no row uses any more (kept on record for audit)')
    .action((version: string) =>
      run(async ({ dataSource, encryption }) => {
        const registry = await requireRegistry(new KeyRegistry(dataSource, encryption));
        await registry.retire(parseVersion(version));
        return `key version ${version} is retired`;
      })(),
    );

  program
    .command('rotate')
    .description('re-wrap every stored data key under a version (data is not re-encrypted)')
    .option('--to <version>', 'target version (default: the active one)', parseVersion)
    .option('--batch-size <rows>', 'rows per UPDATE', parseVersion, 1_000)
    .option('--entity <name...>', 'only these entities')
    .option('--dry-run', 'count what would be re-wrapped, change nothing')
    .option('--force', 're-wrap to a version that is not the active one')
    .option(...WORKERS_OPTION)
    .option(...JOB_ID_OPTION)
    .option(
      '--tenant <id>',
      "only this tenant's rows, under its active key; runs the tenant's pending key job when it has one",
    )
    .action((options: RotateOptions) =>
      run(async ({ dataSource, encryption }, global) => {
        if (options.tenant !== undefined) return rotateTenant(dataSource, encryption, options, global);
        const registry = new KeyRegistry(dataSource, encryption);
        const hasRegistry = await registry.exists();
        const active =
          (hasRegistry ? await registry.activeVersion() : undefined) ?? encryption.keyring.activeVersion;
        const toVersion = options.to ?? active;
        if (toVersion !== active) {
          // New writes keep using the active version: the table would end up on two versions.
          const howToActivate = hasRegistry
            ? `run \`typeorm-envelope activate ${toVersion}\` first`
            : `make it active first (activeVersion: ${toVersion} in the EnvelopeEncryption configuration, or \`typeorm-envelope activate ${toVersion}\` with the key registry)`;
          const problem = `key version ${toVersion} is not the active version (${active}): new values are still written under version ${active}`;
          // A dry run changes nothing: it only warns.
          if (!options.force && !options.dryRun) {
            throw new ConfigError(`${problem}; ${howToActivate}, or pass --force to re-wrap anyway`);
          }
          process.stderr.write(`typeorm-envelope: warning: ${problem}\n`);
        }
        return rewrapAndReport(dataSource, encryption, options, global, toVersion);
      })(),
    );

  program
    .command('reencrypt')
    .description('re-encrypt every value under fresh data keys (after a suspected data-key compromise)')
    .option('--entity <name...>', 'only these entities')
    .option('--batch-size <rows>', 'rows per transaction', parseVersion, 500)
    .option(...WORKERS_OPTION)
    .option(...JOB_ID_OPTION)
    .action((options: { entity?: string[]; batchSize: number } & WorkerFlags) =>
      run(async ({ dataSource, encryption }, global) => {
        const progress = new Progress(!global.json);
        const result = await reencryptColumns(dataSource, encryption, {
          entities: options.entity,
          batchSize: options.batchSize,
          ...workerOptions(options),
          onProgress: (p) => progress.update(`${p.entity}.${p.property}`, p.rowsDone, p.rowsDone),
        });
        progress.stop();
        failOn(
          result.error,
          result.properties.some((p) => p.failures.length > 0),
        );
        return global.json
          ? result
          : table(
              result.properties.map((p) => ({
                entity: p.entity,
                property: p.property,
                reencrypted: p.rowsReencrypted,
                skipped: p.rowsSkipped,
                failures: p.failures.length,
              })),
            );
      })(),
    );

  program
    .command('backfill')
    .description(
      'encrypt existing plaintext columns (properties declared with plaintextColumn) into their sidecars',
    )
    .option('--entity <name...>', 'only these entities')
    .option('--batch-size <rows>', 'rows per transaction', parseVersion, 500)
    .option('--clear-plaintext', 'set the plaintext column to NULL as each row is encrypted')
    .option(...WORKERS_OPTION)
    .option(...JOB_ID_OPTION)
    .action((options: { entity?: string[]; batchSize: number; clearPlaintext?: boolean } & WorkerFlags) =>
      run(async ({ dataSource, encryption }, global) => {
        const progress = new Progress(!global.json);
        const result = await backfillEncryptedColumns(dataSource, encryption, {
          entities: options.entity,
          batchSize: options.batchSize,
          ...workerOptions(options),
          clearPlaintext: options.clearPlaintext,
          onProgress: (p) => progress.update(`${p.entity}.${p.property}`, p.rowsDone, p.rowsDone),
        });
        progress.stop();
        failOn(
          result.error,
          result.properties.some((p) => p.failures.length > 0),
        );
        if (global.json) return result;
        return table(
          result.properties.map((p) => ({
            entity: p.entity,
            property: p.property,
            encrypted: p.rowsEncrypted,
            failures: p.failures.length,
          })),
        );
      })(),
    );

  program
    .command('migrate-layout')
    .description(
      "convert stored values to their property's layout (properties declaring migrateFrom), resumably",
    )
    .option('--entity <name...>', 'only these entities')
    .option('--batch-size <rows>', 'rows per transaction', parseVersion, 500)
    .option('--tenant <id>', "only this tenant's rows")
    .option('--dry-run', 'count the values still in the old layout, change nothing')
    .option(...WORKERS_OPTION)
    .option(...JOB_ID_OPTION)
    .action(
      (options: { entity?: string[]; batchSize: number; tenant?: string; dryRun?: boolean } & WorkerFlags) =>
        run(async ({ dataSource, encryption }, global) => {
          const progress = new Progress(!global.json);
          const result = await migrateLayout(dataSource, encryption, {
            entities: options.entity,
            batchSize: options.batchSize,
            ...workerOptions(options),
            dryRun: options.dryRun,
            ...(options.tenant === undefined ? {} : { tenant: options.tenant }),
            onProgress: (p) => progress.update(`${p.entity}.${p.property}`, p.rowsDone, p.rowsTotal),
          });
          progress.stop();
          failOn(
            result.error,
            result.properties.some((p) => p.failures.length > 0),
          );
          if (global.json) return result;
          return [
            result.dryRun ? 'values still in the old layout (nothing changed):' : 'layout migration:',
            table(
              result.properties.map((p) => ({
                entity: p.entity,
                property: p.property,
                from: p.from,
                to: p.to,
                rows: p.rowsTotal,
                ...(result.dryRun ? {} : { migrated: p.rowsMigrated, skipped: p.rowsSkipped }),
                failures: p.failures.length,
              })),
            ),
          ].join('\n');
        })(),
    );

  program
    .command('verify')
    .description(
      'decrypt every stored value; report failures by primary key (never the values), and rows of offboarded tenants apart',
    )
    .option('--entity <name...>', 'only these entities')
    .option('--tenant <id>', "only this tenant's rows")
    .action((options: { entity?: string[]; tenant?: string }) =>
      run(async ({ dataSource, encryption }, global) => {
        const result = await verifyEncryptedColumns(dataSource, encryption, {
          entities: options.entity,
          ...(options.tenant === undefined ? {} : { tenant: options.tenant }),
        });
        failOn(result.error, result.failed > 0 || (result.keyTable?.failed ?? 0) > 0);
        return global.json ? result : verifyText(result);
      })(),
    );

  program
    .command('audit')
    .description('the audit log, oldest first, filtered; exported as CSV (RFC 4180) or JSON')
    .option('--tenant <id>', "only this tenant's events")
    .addOption(new Option('--event <event...>', 'only these events').choices(AUDIT_EVENTS))
    .option('--actor <actor>', 'only events recorded by this actor')
    .option(
      '--since <time>',
      'only events at or after this time (ISO 8601; a time without a zone is local)',
      parseTime,
    )
    .option('--until <time>', 'only events before this time (ISO 8601)', parseTime)
    .option('--limit <n>', 'at most this many, the most recent', parseVersion, 1_000)
    .option('--format <format>', 'table, csv or json', oneOf(AUDIT_FORMATS, 'table, csv or json'), 'table')
    .action((options: AuditOptions) =>
      run(async ({ dataSource, encryption }, global) => {
        const registry = await requireRegistry(new KeyRegistry(dataSource, encryption));
        const entries = await registry.auditLog({
          limit: options.limit,
          ...(options.tenant === undefined ? {} : { tenant: options.tenant }),
          ...(options.event === undefined ? {} : { event: options.event as AuditEvent[] }),
          ...(options.actor === undefined ? {} : { actor: options.actor }),
          ...(options.since === undefined ? {} : { since: options.since }),
          ...(options.until === undefined ? {} : { until: options.until }),
        });
        if (global.json || options.format === 'json') return new RawOutput(auditLogToJson(entries));
        if (options.format === 'csv') return new RawOutput(auditLogToCsv(entries));
        return table(
          entries.map((e) => ({
            id: e.id,
            at: e.at,
            event: e.event,
            tenant: e.tenant,
            version: e.keyVersion,
            actor: e.actor,
            details: e.details,
          })),
        );
      })(),
    );

  program
    .command('migration:generate-rotation')
    .description('write a TypeORM migration that re-wraps every data key under a version')
    .requiredOption('--to <version>', 'target version', parseVersion)
    .option(
      '--dir <dir>',
      "migrations directory (default: the directory of the DataSource's `migrations` option, else src/migrations if it exists, else migrations)",
    )
    .option(
      '--encryption-import <module>',
      'module exporting the EnvelopeEncryption, relative to the migration file (default: the -d file)',
    )
    .action(async (options: { to: number; dir?: string; encryptionImport?: string }) => {
      const global = program.opts<GlobalOptions>();
      // Only the options are read: no connection is made.
      const project = await loadProject(global.dataSource, { initialize: false });
      const dir = resolve(options.dir ?? defaultMigrationsDir(project.dataSource));
      mkdirSync(dir, { recursive: true });
      const timestamp = Date.now();
      const file = join(dir, `${timestamp}-${rotationMigrationName(options.to)}.ts`);
      const source = rotationMigrationSource(options.to, timestamp, {
        module: options.encryptionImport ?? importPath(dir, project.file),
        exportName: project.encryptionExport,
      });
      writeFileSync(file, source, { flag: 'wx' });
      print(global.json ? { file } : `wrote ${file}`, global.json);
    });

  addTenantCommands(program, run);
  addIndexKeyCommands(program, run);
  return program;
}

const AUDIT_FORMATS = ['table', 'csv', 'json'] as const;

interface AuditOptions {
  tenant?: string;
  event?: string[];
  actor?: string;
  since?: Date;
  until?: Date;
  limit: number;
  format: (typeof AUDIT_FORMATS)[number];
}

/** `--workers` and `--job-id` of the row-by-row jobs. */
interface WorkerFlags {
  workers?: number;
  jobId?: string;
}

const WORKERS_OPTION = [
  '--workers <n>',
  'workers in this process over primary-key ranges, each on a connection of its own (needs the job-ranges migration)',
  parseVersion,
] as const;
const JOB_ID_OPTION = [
  '--job-id <id>',
  'name the job in the lease table: processes given the same id share its ranges, and a run after a crash resumes it',
] as const;

function workerOptions(flags: WorkerFlags): { workers?: number; jobId?: string } {
  return {
    ...(flags.workers === undefined ? {} : { workers: flags.workers }),
    ...(flags.jobId === undefined ? {} : { jobId: flags.jobId }),
  };
}

interface RotateOptions extends WorkerFlags {
  to?: number;
  batchSize: number;
  entity?: string[];
  dryRun?: boolean;
  force?: boolean;
  tenant?: string;
}

/** `status --tenant`: the tenant's keys and job, and its rows per key version. */
async function tenantStatus(
  dataSource: DataSource,
  encryption: EnvelopeEncryption,
  tenantId: string,
  global: GlobalOptions,
): Promise<unknown> {
  const tenant = await encryption.tenantsOf(dataSource).status(tenantId);
  const properties = await encryptionStatus(dataSource, encryption, { tenant: tenant.tenantId });
  if (global.json) return { tenant, properties };
  return [tenantStatusText(tenant), '', table(properties.map(statusRow))].join('\n');
}

/**
 * `rotate --tenant`: the tenant's pending key job when it has one (it validates the key and
 * records its state, so it is what an onboarding or a new tenant key needs), else a re-wrap of
 * the tenant's rows left under other keys to its active one.
 */
async function rotateTenant(
  dataSource: DataSource,
  encryption: EnvelopeEncryption,
  options: RotateOptions,
  global: GlobalOptions,
): Promise<unknown> {
  const tenants = encryption.tenantsOf(dataSource);
  const status = await tenants.status(options.tenant as string);
  const tenant = status.tenantId;
  const registry = new KeyRegistry(dataSource, encryption);
  const active =
    status.activeVersion ??
    ((await registry.exists()) ? await registry.activeVersion() : undefined) ??
    encryption.keyring.activeVersion;
  const toVersion = options.to ?? active;
  if (toVersion !== active) {
    const problem = `key version ${toVersion} is not the active key of tenant ${tenant} (${status.activeVersion === null ? `the application key, version ${active}` : `version ${active}`}): its new values are still written under version ${active}`;
    const howToActivate =
      toVersion >= FIRST_TENANT_KEY_VERSION
        ? `run \`typeorm-envelope tenants activate ${tenant} ${toVersion}\` first`
        : `run \`typeorm-envelope tenants revert ${tenant}\` to move it back to the application key`;
    if (!options.force && !options.dryRun) {
      throw new ConfigError(`${problem}; ${howToActivate}, or pass --force to re-wrap anyway`);
    }
    process.stderr.write(`typeorm-envelope: warning: ${problem}\n`);
  }
  const pending = status.job !== null && status.job.state !== 'completed';
  if (pending && !options.dryRun && toVersion === active) {
    if (options.entity) {
      throw new ConfigError(
        "the tenant's pending key job moves all of its rows: run rotate --tenant without --entity",
        { tenant },
      );
    }
    const progress = new Progress(!global.json, 'values');
    try {
      const job = await tenants.runJob(tenant, {
        batchSize: options.batchSize,
        onProgress: (current) => progress.update(`tenant ${tenant}`, current.rowsDone, current.rowsTotal),
      });
      return jobOutcome(tenant, job, global);
    } finally {
      progress.stop();
    }
  }
  return rewrapAndReport(dataSource, encryption, options, global, toVersion, tenant);
}

/** Runs `rewrapDataKeys` with a progress bar and reports it (fails the command on any failure). */
async function rewrapAndReport(
  dataSource: DataSource,
  encryption: EnvelopeEncryption,
  options: RotateOptions,
  global: GlobalOptions,
  toVersion: number,
  tenant?: string,
): Promise<unknown> {
  const progress = new Progress(!global.json);
  const result = await rewrapDataKeys(dataSource, encryption, {
    ...(tenant === undefined ? {} : { tenant }),
    toVersion,
    batchSize: options.batchSize,
    entities: options.entity,
    dryRun: options.dryRun,
    ...workerOptions(options),
    onProgress: (p) => progress.update(`${p.entity}.${p.property}`, p.rowsDone, p.rowsTotal),
    onKeyRowProgress: (p) => progress.update('data-key table', p.keyRowsDone, p.keyRowsTotal),
  });
  progress.stop();
  const keyTable = result.keyTable;
  failOn(
    result.error,
    result.properties.some((p) => p.failures.length > 0) || (keyTable?.failures.length ?? 0) > 0,
  );
  if (global.json) return result;
  const offboarded = result.properties.reduce((n, p) => n + p.offboardedRows, 0);
  const keyRowLines = keyTable
    ? [
        `data-key table (compact properties): ${result.dryRun ? 'would re-wrap' : 're-wrapped'} ${result.dryRun ? keyTable.keyRowsTotal : keyTable.keyRowsRewrapped} of ${keyTable.keyRowsTotal} key rows, ${keyTable.dataRowsTouched} data rows written` +
          (keyTable.keyRowsSkipped
            ? `; ${keyTable.keyRowsSkipped} changed meanwhile by another job, left as they are`
            : '') +
          (keyTable.offboardedKeyRows
            ? `; ${keyTable.offboardedKeyRows} of offboarded tenants left as they are`
            : ''),
        ...(keyTable.failures.length
          ? [
              table(
                keyTable.failures.map((f) => ({
                  'data key': f.dataKeyId,
                  keyVersion: f.keyVersion,
                  ...(f.tenant === undefined ? {} : { tenant: f.tenant }),
                  error: f.error,
                })),
              ),
            ]
          : []),
      ]
    : [];
  return [
    `${tenant === undefined ? '' : `tenant ${tenant}: `}${result.dryRun ? 'would re-wrap' : 're-wrapped'} to key version ${result.toVersion}: ${result.rewrapCalls} data keys re-wrapped, ${result.verificationCalls} checked` +
      (offboarded ? `; ${offboarded} values of offboarded tenants left as they are` : ''),
    table(
      result.properties.map((p) => ({
        entity: p.entity,
        property: p.property,
        rows: p.rowsTotal,
        rewrapped: p.rowsRewrapped,
        'data keys': p.distinctDataKeys,
        failures: p.failures.length,
        ms: Math.round(p.durationMs),
      })),
    ),
    ...keyRowLines,
  ].join('\n');
}

/** `verify` as text: the counts, the failures, and the rows of offboarded tenants apart from them. */
function verifyText(result: VerifyResult): string {
  const failures = result.properties.flatMap((p) =>
    p.failures.filter((f) => !f.offboarded).map((f) => ({ entity: p.entity, property: p.property, ...f })),
  );
  const withTenant = failures.some((f) => f.tenant !== undefined);
  const lines = [
    `${result.rowsChecked} values checked, ${result.failed} failed` +
      (result.pendingBackfill ? ` (${result.pendingBackfill} pending backfill)` : '') +
      (result.offboarded
        ? `, ${result.offboarded} of offboarded tenants (unreadable by design: their keys were destroyed)`
        : ''),
  ];
  if (failures.length) {
    lines.push(
      table(
        failures.map((f) => ({
          entity: f.entity,
          property: f.property,
          primaryKey: f.primaryKey,
          keyVersion: f.keyVersion,
          ...(withTenant ? { tenant: f.tenant } : {}),
          error: f.error,
        })),
      ),
    );
  }
  const keyTable = result.keyTable;
  if (keyTable) {
    lines.push(
      '',
      `data-key table: ${keyTable.keyRowsChecked} key rows checked, ${keyTable.failed} failed` +
        (keyTable.offboarded ? `, ${keyTable.offboarded} of offboarded tenants` : ''),
    );
    if (keyTable.failures.length) {
      lines.push(
        table(
          keyTable.failures.map((f) => ({
            'data key': f.dataKeyId,
            keyVersion: f.keyVersion,
            ...(f.tenant === undefined ? {} : { tenant: f.tenant }),
            error: f.error,
          })),
        ),
        'restore the failed key rows from the backup taken with the data: the values that name them cannot be read without them',
      );
    }
  }
  const offboarded = result.properties.filter((p) => p.offboarded > 0);
  if (offboarded.length) {
    lines.push(
      '',
      'rows of offboarded tenants:',
      table(
        offboarded.map((p) => ({
          tenant: [...new Set(p.failures.filter((f) => f.offboarded).map((f) => f.tenant))].join(', '),
          entity: p.entity,
          property: p.property,
          rows: p.offboarded,
        })),
      ),
    );
  }
  return lines.join('\n');
}

/**
 * Where TypeORM looks for migrations: the directory part (before any glob character) of the first
 * path in the DataSource's `migrations` option, preferring TypeScript sources over compiled output.
 */
function defaultMigrationsDir(dataSource: DataSource): string {
  const option = dataSource.options.migrations ?? [];
  const entries: unknown[] = Array.isArray(option) ? option : Object.values(option);
  const paths = entries.filter((m): m is string => typeof m === 'string');
  const path = paths.find((p) => /\.ts\b|\{[^}]*\bts\b/.test(p)) ?? paths[0];
  if (path) {
    const literal = path.split(/[*?{[]/)[0] ?? '';
    const dir = /[\\/]$/.test(literal) || literal === '' ? literal : dirname(literal);
    return dir === '' ? '.' : dir;
  }
  return existsSync(join('src', 'migrations')) ? join('src', 'migrations') : 'migrations';
}

/** The module specifier of `file` from a migration in `dir`, without its extension. */
function importPath(dir: string, file: string): string {
  // CommonJS resolution finds `.ts` and `.js` without the extension; other extensions stay.
  const path = relative(dir, file.replace(/\.[jt]s$/, ''))
    .split(sep)
    .join('/');
  return path.startsWith('.') ? path : `./${path}`;
}

function print(output: unknown, json?: boolean): void {
  if (output instanceof RawOutput) {
    process.stdout.write(/\n$/.test(output.text) ? output.text : `${output.text}\n`);
  } else if (json || typeof output !== 'string') {
    process.stdout.write(`${JSON.stringify(output, jsonSafe, 2)}\n`);
  } else {
    process.stdout.write(`${output}\n`);
  }
}

/** Errors become their name and message (our messages carry no plaintext); bigints become text. */
function jsonSafe(_key: string, value: unknown): unknown {
  if (value instanceof EnvelopeError) return { name: value.name, message: value.message };
  if (value instanceof Error) return { name: value.name, message: value.message };
  if (typeof value === 'bigint') return value.toString();
  return value;
}

/** One property in the `status` table; the layout columns only for properties that involve the compact layout. */
function statusRow(p: PropertyStatus): Record<string, unknown> {
  return {
    entity: p.entity,
    property: p.property,
    ...byVersion(p.rowsByVersion),
    null: p.nullRows,
    'pending backfill': p.pendingBackfill,
    ...(p.layout === undefined
      ? {}
      : {
          layout: p.migrateFrom ? `${p.migrateFrom} → ${p.layout}` : p.layout,
          ...(p.migrateFrom ? { 'left to migrate': p.valuesByLayout?.[p.migrateFrom] ?? 0 } : {}),
          'no key row': p.valuesWithoutKeyRow ?? 0,
        }),
  };
}

function byVersion(rows: Record<string, number>): Record<string, number> {
  return Object.fromEntries(Object.entries(rows).map(([v, n]) => [`v${v}`, n]));
}

async function requireRegistry(registry: KeyRegistry): Promise<KeyRegistry> {
  if (!(await registry.exists())) {
    throw new EnvelopeError(
      'this needs the key registry: run the TypeormEnvelopeKeyRegistry migration first',
    );
  }
  await registry.sync();
  return registry;
}
