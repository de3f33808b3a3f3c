import type { QueryRunner } from 'typeorm';
import type { EnvelopeEncryption } from '../envelope-encryption';
import { ConfigError, IntegrityError } from '../errors';
import type { KeyScope } from '../keys/key-scope';
import { FIRST_TENANT_KEY_VERSION } from '../keys/keyring';
import { rewrapStoredTenantKeys, type StoredTenantKeysRewrap } from '../tenants/stored-key-rewrap';
import { tenantParameter, tenantText } from '../typeorm/encryption-tenant';
import { describeError } from './describe-error';
import { recordJobEnd } from './job';
import { KeyRegistry } from './key-registry';
import {
  inWorkers,
  mergeResults,
  singleRun,
  usesWorkers,
  type WorkerOptions,
  type WorkersReport,
} from './parallel-job';
import type { KeyRange } from './range-leases';
import { type KeyTableRewrapResult, rewrapKeyTable } from './rewrap-key-table';
import { type IndexKeysRewrap, rewrapIndexKeys } from './rotate-index-key';
import {
  type EntitySelector,
  encryptedColumnsSql,
  hasSidecars,
  holdsCompact,
  keyTableExists,
  primaryKeyBatches,
  type RotationTarget,
  rangeCondition,
  type SidecarColumnSql,
  withQueryRunner,
} from './rotation-target';

/** Options of {@link rewrapDataKeys}. */
export interface RewrapOptions extends WorkerOptions {
  /**
   * Only the sidecar rows whose primary key is in this range: one worker's share of the job (set by
   * the workers, or give each process of a job queue one range). The data-key table, stored tenant
   * keys and index keys are left to a run without it, which `workers` make at the end.
   */
  keyRange?: KeyRange;
  /** Entities to re-wrap (classes or names). Default: every entity with encrypted properties. */
  entities?: ReadonlyArray<EntitySelector>;
  /**
   * The master-key version to re-wrap under. Default: the active version (with `tenant`, the
   * version the tenant's new rows use: its own key, or the application keyring's active version).
   */
  toVersion?: number;
  /**
   * Re-wrap only this tenant's rows (of entities with an `@EncryptionTenant()` column), under its
   * key: the job that moves a tenant onto its own key, to a new one, or back to the application's.
   * Without it, rows under the application's keyring are re-wrapped (tenants' rows among them,
   * each within its tenant) and rows under tenants' own keys are left alone.
   */
  tenant?: string;
  /** Rows per UPDATE. Default 1,000. */
  batchSize?: number;
  /** Count what would be re-wrapped; change nothing and call no key provider. */
  dryRun?: boolean;
  /**
   * Called after each batch, once its rows are written; a promise it returns is awaited before the
   * next batch, so what it records never runs ahead of the database (a rejection ends the job, in `error`).
   */
  onProgress?: (progress: RewrapProgress) => unknown;
  /** Called after each key row of the data-key table (compact properties), awaited like `onProgress`. */
  onKeyRowProgress?: (progress: { keyRowsDone: number; keyRowsTotal: number }) => unknown;
}

/** Progress of one encrypted property. */
export interface RewrapProgress {
  entity: string;
  property: string;
  /** Rows re-wrapped so far. */
  rowsDone: number;
  /** Rows under another version when this property's job started. */
  rowsTotal: number;
}

/** What happened to one encrypted property. */
export interface PropertyRewrapResult {
  entity: string;
  property: string;
  /** Rows under another version when the job started. */
  rowsTotal: number;
  /** Rows re-wrapped (a row the application rewrote meanwhile is left to the application). */
  rowsRewrapped: number;
  /** Distinct data keys found under other versions. */
  distinctDataKeys: number;
  /**
   * Rows of offboarded tenants under other versions: left as they are (their tenant's keys were
   * destroyed, so they are unreadable by design), not counted as failures.
   */
  offboardedRows: number;
  /** Re-wrap calls made for this property (data keys shared with properties done before are reused). */
  rewrapCalls: number;
  durationMs: number;
  /** Data keys that could not be re-wrapped; their rows keep their old version. */
  failures: Array<{ keyVersion: number; rows: number; error: string; tenant?: string }>;
}

/** What {@link rewrapDataKeys} did. It never throws midway: an unexpected error ends up in `error`. */
export interface RewrapResult {
  toVersion: number;
  /** The tenant whose rows were re-wrapped, when one was given. */
  tenant?: string;
  dryRun: boolean;
  properties: PropertyRewrapResult[];
  /** Key-provider calls that re-wrapped a data key: one per distinct data key. */
  rewrapCalls: number;
  /** Key-provider calls that checked a new wrapped key before it was written. */
  verificationCalls: number;
  /**
   * The data-key table's rows re-wrapped for compact properties (present when a selected property
   * is compact, or, without `entities`, whenever the table exists). No data row is written for them.
   */
  keyTable?: KeyTableRewrapResult;
  /**
   * Customer-provided tenant keys (stored wrapped by the application keyring) re-wrapped under
   * `toVersion`, and those that could not be; only when re-wrapping the application keyring's rows.
   */
  storedTenantKeys?: StoredTenantKeysRewrap;
  /**
   * Index keys of searchable properties re-wrapped under `toVersion` (the keys, and so every stored
   * blind index, stay the same), and those that could not be.
   */
  indexKeys?: IndexKeysRewrap;
  durationMs: number;
  error?: unknown;
  /** How the row-by-row part was shared between workers, when it ran with `workers` or `jobId`. */
  workers?: WorkersReport;
}

/**
 * Re-wraps every stored data key under master-key version `toVersion` without touching the data:
 * `<col>_wrapped_key` and `<col>_key_version` change, `<col>_ciphertext` and `<col>_iv` stay
 * byte for byte the same. With the key registry, both the source and the target versions' master
 * keys must be the ones it recorded (a `ConfigError` otherwise, in `error` for the target and in
 * `failures` for a source).
 *
 * One provider call per distinct data key (KMS `ReEncrypt` between KMS keys, unwrap + wrap
 * otherwise); each new wrapped key is unwrapped and compared before it is written. Rows are then
 * updated in primary-key-ordered batches, each only where the row still holds the old wrapped key
 * and version, so a row the application rewrote meanwhile is never overwritten. Each batch commits
 * on its own (unless `target` is a QueryRunner in a transaction), so after a crash the job is
 * simply run again. Memory holds one batch of keys and the distinct data keys.
 *
 * Compact properties (`layout: 'compact'`) keep their wrapped keys in the data-key table: its rows
 * are re-wrapped instead, each verified the same way and updated only while it still holds the
 * wrapped key and version that were read (see `result.keyTable`). The work is one provider call per
 * data key, whatever the number of data rows, and no data row is written.
 *
 * @example
 * ```ts
 * const result = await rewrapDataKeys(dataSource, encryption, { toVersion: 2 });
 * ```
 */
export async function rewrapDataKeys(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  options: RewrapOptions = {},
): Promise<RewrapResult> {
  if (usesWorkers(options)) return rewrapWithWorkers(target, encryption, options);
  const started = performance.now();
  const tenant = options.tenant;
  const targetScope = encryption.keyScope(tenant);
  const toVersion = options.toVersion ?? targetScope.activeVersion;
  const result: RewrapResult = {
    toVersion,
    ...(tenant === undefined ? {} : { tenant }),
    dryRun: options.dryRun ?? false,
    properties: [],
    rewrapCalls: 0,
    verificationCalls: 0,
    durationMs: 0,
  };
  const audit = new KeyRegistry(target, encryption);
  let keyReference: string | undefined;
  try {
    /* An unknown target version, or one whose master key is not the recorded one, fails before any work. */
    await audit.loadReferences();
    if (tenant === undefined && toVersion >= FIRST_TENANT_KEY_VERSION) {
      throw new ConfigError('re-wrapping under a tenant key needs the tenant option', {
        keyVersion: toVersion,
      });
    }
    if (result.dryRun && toVersion < FIRST_TENANT_KEY_VERSION) encryption.keyring.provider(toVersion);
    else if (!result.dryRun) {
      keyReference = (await targetScope.checkedProvider(toVersion)).describe().keyReference;
    }
    const batchSize = options.batchSize ?? 1_000;
    if (!Number.isSafeInteger(batchSize) || batchSize < 1)
      throw new ConfigError('batchSize must be a positive integer');
    const rewrapper = new Rewrapper(encryption, toVersion, result);
    const audited = { ...(tenant === undefined ? {} : { tenant }) };
    if (!result.dryRun)
      await audit.record(
        'rotation-started',
        toVersion,
        { entities: entityNames(options), ...(keyReference ? { keyReference } : {}) },
        audited,
      );
    await withQueryRunner(target, async (runner) => {
      const columns = encryptedColumnsSql(target, encryption, options.entities, options.keyRange);
      for (const column of columns) {
        if (tenant !== undefined && !column.tenant) continue;
        /* Sidecar values (a compact property migrating from sidecars holds some) are re-wrapped row by row. */
        if (hasSidecars(column))
          result.properties.push(await rewrapProperty(runner, column, rewrapper, batchSize, options));
      }
      /*
       * Compact values refer to rows of the data-key table: those rows are re-wrapped, never the
       * data rows. A key row may serve any compact property, so with `entities` the table is
       * re-wrapped when one of them is compact; without, whenever the table exists (leftover key
       * rows would keep their master-key version from being retired).
       */
      const compact =
        options.keyRange === undefined &&
        (options.entities ? columns.some(holdsCompact) : await keyTableExists(runner));
      if (compact) {
        result.keyTable = await rewrapKeyTable(runner, rewrapper, {
          ...(tenant === undefined ? {} : { tenant }),
          dryRun: result.dryRun,
          ...(options.onKeyRowProgress ? { onProgress: options.onKeyRowProgress } : {}),
        });
      }
    });
    if (tenant === undefined && !result.dryRun && options.keyRange === undefined) {
      result.storedTenantKeys = await rewrapStoredTenantKeys(target, encryption, toVersion);
    }
    if (!result.dryRun && options.keyRange === undefined) {
      result.indexKeys = await rewrapIndexKeys(target, encryption, toVersion, tenant);
    }
  } catch (error) {
    result.error = error;
  }
  result.durationMs = performance.now() - started;
  if (!result.dryRun) {
    await recordJobEnd(audit, 'rotation', result.toVersion, {
      ...(tenant === undefined ? {} : { tenant }),
      ...(keyReference === undefined ? {} : { keyReference }),
      error: result.error,
      failures:
        result.properties.reduce((n, p) => n + p.failures.length, 0) +
        (result.indexKeys?.failures.length ?? 0) +
        (result.storedTenantKeys?.failures.length ?? 0) +
        (result.keyTable?.failures.length ?? 0),
      counts: {
        ...(result.storedTenantKeys ? { storedTenantKeysRewrapped: result.storedTenantKeys.rewrapped } : {}),
        ...(result.indexKeys ? { indexKeysRewrapped: result.indexKeys.rewrapped } : {}),
        ...(result.keyTable
          ? {
              keyRowsRewrapped: result.keyTable.keyRowsRewrapped,
              keyRowsTotal: result.keyTable.keyRowsTotal,
              dataRowsTouched: result.keyTable.dataRowsTouched,
            }
          : {}),
        rowsRewrapped: result.properties.reduce((n, p) => n + p.rowsRewrapped, 0),
        rowsTotal: result.properties.reduce((n, p) => n + p.rowsTotal, 0),
        rewrapCalls: result.rewrapCalls,
        durationMs: Math.round(result.durationMs),
      },
    });
  }
  return result;
}

/**
 * The sidecar rows re-wrapped by workers over primary-key ranges, then one run without them for
 * the rest (the data-key table, stored tenant keys and index keys; the rows it finds are those
 * written under old versions meanwhile, usually none), reported as one result.
 */
async function rewrapWithWorkers(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  options: RewrapOptions,
): Promise<RewrapResult> {
  const started = performance.now();
  const toVersion = options.toVersion ?? encryption.keyScope(options.tenant).activeVersion;
  const rows = await inWorkers(target, encryption, 'rotation', { ...options, toVersion }, rewrapDataKeys, {
    empty: () => ({
      toVersion,
      dryRun: options.dryRun ?? false,
      properties: [],
      rewrapCalls: 0,
      verificationCalls: 0,
      durationMs: 0,
    }),
    sum: ['rewrapCalls', 'verificationCalls'],
    columns: hasSidecars,
  });
  if (rows.error !== undefined) return rows;
  const rest = await rewrapDataKeys(target, encryption, { ...singleRun(options), toVersion });
  /* The rest's key table, stored tenant keys and index keys, with both runs' rows and calls. */
  const merged = mergeResults([rest, rows], rest, ['rewrapCalls', 'verificationCalls']);
  merged.durationMs = performance.now() - started;
  if (rows.workers) merged.workers = rows.workers;
  return merged;
}

function entityNames(options: RewrapOptions): string[] | 'all' {
  return options.entities?.map((e) => (typeof e === 'string' ? e : e.name)) ?? 'all';
}

async function rewrapProperty(
  runner: QueryRunner,
  column: SidecarColumnSql,
  rewrapper: Rewrapper,
  batchSize: number,
  options: RewrapOptions,
): Promise<PropertyRewrapResult> {
  const started = performance.now();
  const callsBefore = rewrapper.result.rewrapCalls;
  const keys = await distinctDataKeys(runner, column, rewrapper.toVersion, options.tenant);
  const outcome: PropertyRewrapResult = {
    entity: column.entity,
    property: column.property,
    rowsTotal: keys.reduce((n, k) => n + k.rows, 0),
    rowsRewrapped: 0,
    distinctDataKeys: keys.length,
    offboardedRows: 0,
    rewrapCalls: 0,
    durationMs: 0,
    failures: [],
  };
  if (!options.dryRun && keys.length > 0) {
    const mapping: Mapping[] = [];
    for (const key of keys) {
      const tenant = key.tenant === null ? undefined : key.tenant;
      if (
        tenant !== undefined &&
        rewrapper.encryption.tenantKeyrings.tenant(tenant)?.state === 'offboarded'
      ) {
        /* Unreadable by design: counted apart, not as failures (delete them to erase them). */
        outcome.offboardedRows += key.rows;
        continue;
      }
      try {
        const scope = rewrapper.encryption.keyScope(tenant);
        mapping.push([
          key.wrapped,
          key.version,
          key.tenantText,
          await rewrapper.rewrap(scope, key.version, key.wrapped),
        ]);
      } catch (error) {
        outcome.failures.push({
          keyVersion: key.version,
          rows: key.rows,
          error: describeError(error),
          ...(tenant === undefined ? {} : { tenant }),
        });
      }
    }
    if (mapping.length > 0) {
      for await (const batch of primaryKeyBatches(runner, column, batchSize)) {
        outcome.rowsRewrapped += await updateBatch(runner, column, batch, mapping, rewrapper.toVersion);
        await options.onProgress?.({
          entity: column.entity,
          property: column.property,
          rowsDone: outcome.rowsRewrapped,
          rowsTotal: outcome.rowsTotal,
        });
      }
    }
  }
  outcome.rewrapCalls = rewrapper.result.rewrapCalls - callsBefore;
  outcome.durationMs = performance.now() - started;
  return outcome;
}

/** Old wrapped key, old version, the rows' tenant as text (`null`: none), new wrapped key. */
type Mapping = [Buffer, number, string | null, Buffer];

interface DistinctDataKey {
  version: number;
  wrapped: Buffer;
  rows: number;
  /** The tenant as bound into values (`null`: none). */
  tenant: string | null;
  /** The tenant column as PostgreSQL prints it, to match the rows again. */
  tenantText: string | null;
}

/**
 * The distinct data keys of one property not yet under `toVersion`: with `tenant`, that tenant's
 * rows; without, rows under the application's keyring (never a tenant's own key), by tenant.
 */
async function distinctDataKeys(
  runner: QueryRunner,
  column: SidecarColumnSql,
  toVersion: number,
  tenant: string | undefined,
): Promise<DistinctDataKey[]> {
  const tenantSql = column.tenant ? `${column.tenant}` : 'NULL';
  const { keyVersion, wrappedKey } = column.sidecars;
  const filter =
    tenant === undefined ? `${keyVersion} < ${FIRST_TENANT_KEY_VERSION}` : `${column.tenant} = $2`;
  const params =
    tenant === undefined || !column.columns.tenant
      ? [toVersion]
      : [toVersion, tenantParameter(column.columns.tenant, tenant)];
  const range = rangeCondition(column, params.length + 1);
  const rows = (await runner.query(
    `SELECT ${keyVersion} AS version, ${wrappedKey} AS wrapped, ${tenantSql} AS tenant,
            ${tenantSql}::text AS tenant_text, count(*)::int AS rows
     FROM ${column.table}
     WHERE ${keyVersion} IS NOT NULL AND ${keyVersion} <> $1 AND ${filter} AND ${range.sql} GROUP BY 1, 2, 3`,
    [...params, ...range.params],
  )) as Array<{
    version: number;
    wrapped: Buffer;
    tenant: unknown;
    tenant_text: string | null;
    rows: number;
  }>;
  const tenantColumn = column.columns.tenant;
  return rows.map((r) => ({
    version: r.version,
    wrapped: r.wrapped,
    rows: r.rows,
    tenant: tenantColumn ? (tenantText(tenantColumn, r.tenant) ?? null) : null,
    tenantText: r.tenant_text,
  }));
}

/** One UPDATE for the rows of one key range: old wrapped key → new wrapped key, via a VALUES map. */
async function updateBatch(
  runner: QueryRunner,
  column: SidecarColumnSql,
  batch: { condition: string; params: unknown[] },
  mapping: Mapping[],
  toVersion: number,
): Promise<number> {
  const base = batch.params.length;
  const values = mapping.map((_, i) => {
    const p = base + 4 * i;
    return `($${p + 1}::bytea, $${p + 2}::int, $${p + 3}::text, $${p + 4}::bytea)`;
  });
  const toParam = `$${base + 4 * mapping.length + 1}`;
  /* A wrapped key is bound to its tenant: it is replaced only in rows of that tenant. */
  const sameTenant = column.tenant ? ` AND ${column.tenant}::text IS NOT DISTINCT FROM m.tenant` : '';
  const { keyVersion, wrappedKey } = column.sidecars;
  const result = await runner.query(
    `UPDATE ${column.table} SET ${wrappedKey} = m.new_wrapped, ${keyVersion} = ${toParam}::int
     FROM (VALUES ${values.join(', ')}) AS m(old_wrapped, old_version, tenant, new_wrapped)
     WHERE ${wrappedKey} = m.old_wrapped AND ${keyVersion} = m.old_version${sameTenant} AND ${batch.condition}`,
    [...batch.params, ...mapping.flat(), toVersion],
    true,
  );
  return (result as { affected?: number }).affected ?? 0;
}

/**
 * Re-wraps each distinct data key once per job (keys shared by several properties are re-wrapped
 * once) and checks every new wrapped key before it is used.
 */
export class Rewrapper {
  readonly #done = new Map<string, Promise<Buffer>>();

  constructor(
    readonly encryption: EnvelopeEncryption,
    readonly toVersion: number,
    readonly result: RewrapResult,
  ) {}

  rewrap(scope: KeyScope, fromVersion: number, wrapped: Buffer): Promise<Buffer> {
    const id = `${scope.cacheId}\0${fromVersion}:${wrapped.toString('base64')}`;
    let done = this.#done.get(id);
    if (!done) {
      done = this.#rewrapChecked(scope, fromVersion, wrapped);
      this.#done.set(id, done);
    }
    return done;
  }

  async #rewrapChecked(scope: KeyScope, fromVersion: number, wrapped: Buffer): Promise<Buffer> {
    const { cache } = this.encryption;
    /* Both keys must be the recorded ones: a wrong target would leave rows nobody else can read. */
    const from = await scope.checkedProvider(fromVersion);
    const to = await scope.checkedProvider(this.toVersion);
    this.result.rewrapCalls += 1;
    const rewrapped = await from.rewrapDataKey(wrapped, scope.context, to);
    /* Check the new wrapped key before anything is written with it. */
    this.result.verificationCalls += 1;
    const fresh = await to.unwrapDataKey(rewrapped, scope.context);
    try {
      const same = await cache.withDecryptionKey(fromVersion, wrapped, (old) => old.equals(fresh), scope);
      if (!same) {
        throw new IntegrityError('a re-wrapped data key does not unwrap to the original key', {
          keyVersion: this.toVersion,
          ...(scope.tenant === undefined ? {} : { tenant: scope.tenant }),
        });
      }
    } finally {
      fresh.fill(0);
    }
    return rewrapped;
  }
}
