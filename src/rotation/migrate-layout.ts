import type { QueryRunner } from 'typeorm';
import type { EnvelopeEncryption } from '../envelope-encryption';
import { ConfigError } from '../errors';
import { tenantParameter } from '../typeorm/encryption-tenant';
import { describeError } from './describe-error';
import { inBatchTransaction, recordJobEnd, type StoredValue, writeValue } from './job';
import { KeyRegistry } from './key-registry';
import { inWorkers, usesWorkers, type WorkerOptions, type WorkersReport } from './parallel-job';
import type { KeyRange } from './range-leases';
import {
  type EncryptedColumnSql,
  type EntitySelector,
  encryptedColumnsSql,
  isCompactSql,
  type RotationTarget,
  requireKeyTableFor,
  type StorageLayout,
  withQueryRunner,
} from './rotation-target';
import { type SealedRow, sealedRowBatches } from './sealed-rows';
import { StoredValueOpener, sealStored } from './stored-values';

/** Options of {@link migrateLayout}. */
export interface MigrateLayoutOptions extends WorkerOptions {
  /**
   * Only the rows whose primary key is in this range: one worker's share of the job (set by the
   * workers; or give each process of a job queue one range).
   */
  keyRange?: KeyRange;

  /** Entities to migrate (classes or names). Default: every entity with a property declaring `migrateFrom`. */
  entities?: ReadonlyArray<EntitySelector>;
  /** Rows per batch (one transaction each). Default 500. */
  batchSize?: number;
  /** Only this tenant's rows (of entities with an `@EncryptionTenant()` column; others are left out). */
  tenant?: string;
  /** Count the rows still in the old layout; change nothing and call no key provider. */
  dryRun?: boolean;
  /**
   * Called after each batch, once its rows are written; a promise it returns is awaited before the
   * next batch, so what it records never runs ahead of the database (a rejection ends the job, in `error`).
   */
  onProgress?: (progress: MigrateLayoutProgress) => unknown;
}

/** Progress of one property's migration. */
export interface MigrateLayoutProgress {
  entity: string;
  property: string;
  /** Rows converted so far. */
  rowsDone: number;
  /** Rows in the old layout when this property's migration started. */
  rowsTotal: number;
}

/** What happened to one property. */
export interface PropertyLayoutMigration {
  entity: string;
  property: string;
  /** The layout its values were converted from (`migrateFrom`). */
  from: StorageLayout;
  /** The layout they were converted to (the property's `layout`). */
  to: StorageLayout;
  /** Rows in the old layout when the job started. */
  rowsTotal: number;
  /** Rows converted. */
  rowsMigrated: number;
  /** Rows the application wrote meanwhile (already in the new layout): left as the application wrote them. */
  rowsSkipped: number;
  /** Rows that could not be read (they keep their value, in the old layout), by primary key. */
  failures: Array<{ primaryKey: string; error: string; dataKeyId?: string }>;
}

/** What {@link migrateLayout} did. It never throws midway: an unexpected error is in `error`. */
export interface MigrateLayoutResult {
  dryRun: boolean;
  properties: PropertyLayoutMigration[];
  durationMs: number;
  error?: unknown;
  /** How the job was shared between workers, when it ran with `workers` or `jobId`. */
  workers?: WorkersReport;
}

/**
 * Converts the stored values of properties declared with `migrateFrom` into the layout they are
 * declared with: `@Encrypted({ layout: 'compact', migrateFrom: 'sidecars' })` turns each row's four
 * sidecar columns into one compact value (and sets the sidecars to NULL);
 * `@Encrypted({ layout: 'sidecars', migrateFrom: 'compact' })` turns compact values back into four
 * columns. The values are decrypted and sealed again (the associated data binds the format), so
 * each stays bound to its table, column, row and tenant.
 *
 * Rows are taken in primary-key-ordered batches; each batch commits on its own (inside a migration's
 * transaction, it joins it). Each row is written only if it still holds the value that was read, so
 * a row the application wrote meanwhile (in the new layout, as every write of a migrating property
 * is) is left as written. Rows already converted are not read again: after a crash, run it again.
 * Once `encryptionStatus` shows no value left in the old layout, drop `migrateFrom` (and, from
 * sidecars to compact, the sidecar columns).
 *
 * @example
 * ```ts
 * const result = await migrateLayout(dataSource, encryption, { entities: [Customer] });
 * if (result.error || result.properties.some((p) => p.failures.length)) process.exitCode = 1;
 * ```
 */
export async function migrateLayout(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  options: MigrateLayoutOptions = {},
): Promise<MigrateLayoutResult> {
  if (usesWorkers(options)) {
    return inWorkers(target, encryption, 'layout-migration', options, migrateLayout, {
      empty: () => ({ dryRun: options.dryRun ?? false, properties: [], durationMs: 0 }),
      columns: (c) => c.migrateFrom !== undefined,
    });
  }
  const started = performance.now();
  const result: MigrateLayoutResult = { dryRun: options.dryRun ?? false, properties: [], durationMs: 0 };
  const audit = new KeyRegistry(target, encryption);
  const tenant = options.tenant;
  const about = tenant === undefined ? {} : { tenant };
  const version = encryption.keyScope(tenant).activeVersion;
  try {
    const batchSize = options.batchSize ?? 500;
    if (!Number.isSafeInteger(batchSize) || batchSize < 1)
      throw new ConfigError('batchSize must be a positive integer');
    const columns = encryptedColumnsSql(target, encryption, options.entities, options.keyRange).filter(
      (c) => c.migrateFrom !== undefined && (tenant === undefined || c.tenant !== undefined),
    );
    if (options.entities && columns.length === 0) {
      throw new ConfigError(
        'none of the selected entities has a property declaring migrateFrom: there is no layout to migrate',
      );
    }
    if (!result.dryRun) await audit.record('layout-migration-started', version, {}, about);
    await withQueryRunner(target, async (runner) => {
      await requireKeyTableFor(runner, columns);
      for (const column of columns) {
        const outcome: PropertyLayoutMigration = {
          entity: column.entity,
          property: column.property,
          from: column.migrateFrom as StorageLayout,
          to: column.layout,
          rowsTotal: await rowsInOldLayout(runner, column, tenant),
          rowsMigrated: 0,
          rowsSkipped: 0,
          failures: [],
        };
        result.properties.push(outcome);
        if (result.dryRun || outcome.rowsTotal === 0) continue;
        const opener = new StoredValueOpener(runner, encryption);
        const context = { entity: column.entity, column: column.property };
        const bindKey = column.columns.definition.bindPrimaryKey;
        const oldFormat = column.migrateFrom === 'compact' ? 2 : 1;
        for await (const rows of sealedRowBatches(runner, column, batchSize, tenant, oldFormat)) {
          /* Decrypt and seal first, outside the transaction: no row is locked during key-provider calls. */
          await opener.load(rows);
          const prepared: Array<{ row: SealedRow; fresh: StoredValue }> = [];
          for (const row of rows) {
            try {
              const value = await opener.open(row, context);
              const binding = bindKey ? row.binding : { ...row.binding, primaryKey: undefined };
              prepared.push({ row, fresh: await sealStored(runner, encryption, column, value, binding) });
            } catch (error) {
              const id = row.value.format === 2 ? row.value.dataKeyId : undefined;
              outcome.failures.push({
                primaryKey: row.primaryKey,
                error: describeError(error),
                ...(id === undefined ? {} : { dataKeyId: id }),
              });
            }
          }
          const written = await inBatchTransaction(runner, async () => {
            let n = 0;
            for (const { row, fresh } of prepared) {
              /*
               * Only where the row still holds the value that was read: a value the application
               * wrote meanwhile is already in the new layout, and wins. A re-wrap meanwhile changes
               * only the wrapped key of the same value (or its key row), so nothing is lost.
               */
              const done = await writeValue(runner, column, row.key, fresh, (p) => ({
                sql: `${column.ciphertext} = $${p}`,
                params: [row.stored],
              }));
              if (done) n += 1;
            }
            return n;
          });
          outcome.rowsMigrated += written;
          outcome.rowsSkipped += prepared.length - written;
          await options.onProgress?.({
            entity: column.entity,
            property: column.property,
            rowsDone: outcome.rowsMigrated,
            rowsTotal: outcome.rowsTotal,
          });
        }
      }
    });
  } catch (error) {
    result.error = error;
  }
  result.durationMs = performance.now() - started;
  if (!result.dryRun) {
    await recordJobEnd(audit, 'layout-migration', version, {
      ...about,
      error: result.error,
      failures: result.properties.reduce((n, p) => n + p.failures.length, 0),
      counts: {
        rowsMigrated: result.properties.reduce((n, p) => n + p.rowsMigrated, 0),
        rowsTotal: result.properties.reduce((n, p) => n + p.rowsTotal, 0),
        durationMs: Math.round(result.durationMs),
      },
    });
  }
  return result;
}

/** Rows of one property whose value is still in the layout it migrates from. */
async function rowsInOldLayout(
  runner: QueryRunner,
  column: EncryptedColumnSql,
  tenant: string | undefined,
): Promise<number> {
  const compact = isCompactSql(column.ciphertext);
  const old = column.migrateFrom === 'compact' ? compact : `NOT ${compact}`;
  const tenantColumn = column.columns.tenant;
  const [row] = (await runner.query(
    `SELECT count(*)::int AS n FROM ${column.table} WHERE ${column.ciphertext} IS NOT NULL AND ${old}${tenant === undefined ? '' : ` AND ${column.tenant} = $1`}`,
    tenant === undefined || !tenantColumn ? [] : [tenantParameter(tenantColumn, tenant)],
  )) as Array<{ n: number }>;
  return row?.n ?? 0;
}
