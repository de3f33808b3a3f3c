import { type EntityMetadata, In, type ObjectLiteral, type QueryRunner } from 'typeorm';
import type { EnvelopeEncryption } from '../envelope-encryption';
import { ConfigError } from '../errors';
import type { IndexKey, IndexKeyRecord } from '../keys/index-keys';
import type { KeyScope } from '../keys/key-scope';
import { FIRST_TENANT_KEY_VERSION } from '../keys/keyring';
import {
  inputOf,
  type SearchableColumn,
  searchableColumnOf,
  searchableColumnsOf,
} from '../typeorm/blind-index-columns';
import {
  indexKeysTable,
  indexKeysTableExists,
  missingTable,
  NO_TENANT,
  recordOf,
  SqlIndexKeyStore,
} from '../typeorm/blind-index-store';
import type { EncryptedColumns } from '../typeorm/encrypted-columns';
import { tenantParameter, tenantText } from '../typeorm/encryption-tenant';
import { primaryKeyOf, primaryKeyOfRow } from '../typeorm/primary-key';
import { describeError } from './describe-error';
import { pgErrorCode } from './job';
import { KeyRegistry } from './key-registry';
import { dataSourceOf, type EntitySelector, type RotationTarget, withQueryRunner } from './rotation-target';

/** Options of {@link rotateIndexKey} and {@link fillBlindIndexes}. */
export interface IndexKeyJobOptions {
  /**
   * The scope whose index key is rotated: this tenant's (rows of entities with an
   * `@EncryptionTenant()` column whose tenant it is). Without it, the application keyring's own
   * (rows of entities without a tenant column, and tenant rows whose tenant is NULL). For
   * {@link fillBlindIndexes}: only this tenant's rows (default: all rows).
   */
  tenant?: string;
  /**
   * Entities to work on (classes or names). Default: every entity with searchable properties. A
   * rotation for some of them retires the old key only once no row of any searchable entity of
   * the scope is indexed under it (a later run for the others finishes it).
   */
  entities?: ReadonlyArray<EntitySelector>;
  /** Rows per batch (one UPDATE each). Default 500. */
  batchSize?: number;
  /**
   * How long each step of a rotation waits, in ms, so that every application instance has read it:
   * after the new key is added for queries, before writes use it; after writes use it, before rows
   * are recomputed. Default: this instance's index-key refresh interval (`tenantKeys.refreshInterval`,
   * else `registry.refreshInterval`, else 60 s), which must be the one every instance is configured
   * with. Measured from the step's time stored in the database, so a resumed job does not wait
   * again. Give 0 only when no other instance runs.
   */
  settleTime?: number;
  /**
   * Called after each batch, once its rows are written; a promise it returns is awaited before the
   * next batch, so what it records never runs ahead of the database (a rejection ends the job, in `error`).
   */
  onProgress?: (progress: IndexJobProgress) => unknown;
}

/** Progress of one searchable property. */
export interface IndexJobProgress {
  entity: string;
  property: string;
  /** Rows whose index was recomputed so far. */
  rowsDone: number;
}

/** What happened to one searchable property. */
export interface PropertyIndexResult {
  entity: string;
  property: string;
  /** Rows whose index was (re)computed. */
  rowsIndexed: number;
  /** Rows the application rewrote meanwhile (with their own index): left as written. */
  rowsSkipped: number;
  /**
   * Primary keys (as PostgreSQL prints them) of rows of a unique property whose value another row
   * already holds under the new key (written
   * while the rotation ran, by an instance that did not know the old key yet): left under the old
   * key, which is then kept; resolve the duplicates and run the job again.
   */
  duplicates: string[];
  /** Rows whose value could not be read (primary key and reason; never the value). */
  failures: Array<{ primaryKey: string; error: string }>;
}

/** What {@link rotateIndexKey} or {@link fillBlindIndexes} did. They never throw midway: an unexpected error is in `error`. */
export interface IndexJobResult {
  /** The scope rotated (with `tenant`), absent for the application keyring's own and for fills. */
  tenant?: string;
  /** The index-key version the rows are indexed under now (rotation only). */
  toVersion?: number;
  /** The version rotated from (`null`: the scope had no key yet). */
  fromVersion?: number | null;
  /** Whether this run took over a rotation a previous run had started. */
  resumed: boolean;
  properties: PropertyIndexResult[];
  /** Rows still not indexed under the active key when the job ended (0 when it completed). */
  rowsLeft: number;
  /** Whether the previous key was retired (its wrapped key erased): every row is under the new one. */
  previousRetired: boolean;
  durationMs: number;
  error?: unknown;
}

interface Target {
  searchable: SearchableColumn;
  metadata: EntityMetadata;
  table: string;
  primaryKey: string[];
  main: string;
  index: string;
  tenant?: string;
}

/**
 * Rotates the index key of one scope (a tenant's, or the application keyring's own): a new
 * version is added that queries match, then (after `settleTime`, once every instance knows it)
 * made active for writes while queries still match the old one, then (after `settleTime` again)
 * every row of the scope is recomputed under it in primary-key-ordered batches: its value decrypted, normalised and indexed
 * again, and written only if the row still holds the value that was read (a row the application
 * rewrote meanwhile already has its new index). When no row is left under the previous key, that
 * key is retired and its wrapped key erased. Killed part-way, the job is simply run again: it
 * takes the rotation over where the rows show it got to (each index names its key version).
 *
 * @example
 * ```ts
 * const result = await rotateIndexKey(dataSource, encryption, { tenant: 'ws-42' });
 * if (!result.previousRetired) console.warn('run again:', result.rowsLeft, 'rows left');
 * ```
 */
export async function rotateIndexKey(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  options: IndexKeyJobOptions = {},
): Promise<IndexJobResult> {
  return runIndexJob(target, encryption, options, true);
}

/**
 * Computes the blind index of every row that has a value but no index: rows written before the
 * property was declared searchable, or by a release that did not index it yet. Each row is
 * indexed under its own tenant's active index key (created when the tenant has none). Stopped
 * part-way, it is simply run again.
 */
export async function fillBlindIndexes(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  options: Omit<IndexKeyJobOptions, 'settleTime'> = {},
): Promise<IndexJobResult> {
  return runIndexJob(target, encryption, options, false);
}

async function runIndexJob(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  options: IndexKeyJobOptions,
  rotate: boolean,
): Promise<IndexJobResult> {
  const started = performance.now();
  const result: IndexJobResult = {
    ...(options.tenant === undefined ? {} : { tenant: options.tenant }),
    resumed: false,
    properties: [],
    rowsLeft: 0,
    previousRetired: false,
    durationMs: 0,
  };
  try {
    const batchSize = options.batchSize ?? 500;
    if (!Number.isSafeInteger(batchSize) || batchSize < 1)
      throw new ConfigError('batchSize must be a positive integer');
    const dataSource = dataSourceOf(target);
    const targets = searchableTargets(target, encryption, options.entities);
    const scope = rotate ? encryption.keyScope(options.tenant) : undefined;
    const store = new SqlIndexKeyStore(dataSource, encryption.keyring.keyringId);
    await withQueryRunner(target, async (runner) => {
      let filter: RowFilter = { tenant: options.tenant };
      if (rotate && scope) {
        const rotation = await rotateScope(runner, encryption, scope, options.tenant, options.settleTime);
        Object.assign(result, { toVersion: rotation.toVersion, fromVersion: rotation.fromVersion });
        result.resumed = rotation.resumed;
        filter = { scopeOnly: options.tenant ?? null, notVersion: rotation.toVersion };
      }
      for (const t of targets) {
        if (rotate && options.tenant !== undefined && !t.tenant) continue;
        if (!rotate && options.tenant !== undefined && !t.tenant) continue;
        result.properties.push(await indexProperty(runner, encryption, store, t, filter, batchSize, options));
      }
      result.rowsLeft = await rowsLeftOf(runner, targets, filter);
      if (rotate && scope && result.rowsLeft === 0 && result.fromVersion) {
        const duplicates = result.properties.some((p) => p.duplicates.length > 0);
        /* The key serves every searchable entity of the scope, not only the selected ones. */
        const othersLeft = options.entities
          ? await rowsLeftOf(runner, searchableTargets(target, encryption, undefined), filter)
          : 0;
        if (!duplicates && othersLeft === 0)
          result.previousRetired = await retire(runner, encryption, options.tenant, result.fromVersion);
        encryption.indexKeys.refresh(scope);
      }
    });
    const audit = new KeyRegistry(target, encryption);
    await audit
      .record(
        rotate ? 'index-key-rotated' : 'blind-indexes-filled',
        null,
        {
          ...(result.toVersion === undefined ? {} : { indexKeyVersion: result.toVersion }),
          rowsIndexed: result.properties.reduce((n, p) => n + p.rowsIndexed, 0),
          rowsLeft: result.rowsLeft,
          previousRetired: result.previousRetired,
        },
        options.tenant === undefined ? {} : { tenant: options.tenant },
      )
      .catch(() => undefined);
  } catch (error) {
    result.error = error;
  }
  result.durationMs = performance.now() - started;
  return result;
}

/** Rows of `targets` the filter still selects (for a rotation: not yet under its new key). */
async function rowsLeftOf(
  runner: QueryRunner,
  targets: readonly Target[],
  filter: RowFilter,
): Promise<number> {
  let left = 0;
  for (const t of targets) left += await rowsLeft(runner, t, filter);
  return left;
}

/** The searchable properties of the selected entities, with quoted names. */
function searchableTargets(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  entities: ReadonlyArray<EntitySelector> | undefined,
): Target[] {
  const dataSource = dataSourceOf(target);
  const quote = (name: string) => dataSource.driver.escape(name);
  const found: Target[] = [];
  const seen = new Set<string>();
  for (const { metadata } of encryption.encryptedEntities(dataSource)) {
    if (
      entities &&
      !entities.some((e) =>
        typeof e === 'string' ? e === metadata.name || e === metadata.tableName : e === metadata.target,
      )
    )
      continue;
    const searchable = searchableColumnsOf(metadata);
    if (!searchable) continue;
    if (metadata.primaryColumns.length === 0)
      throw new ConfigError('index jobs need a primary key', { entity: metadata.name });
    const table = metadata.tablePath.split('.').map(quote).join('.');
    for (const column of searchable.values()) {
      /* Entities of one single-table inheritance share a table: each index column is worked on once. */
      const id = `${table}.${column.index.databaseName}`;
      if (seen.has(id)) continue;
      seen.add(id);
      found.push({
        searchable: column,
        metadata,
        table,
        primaryKey: metadata.primaryColumns.map((c) => quote(c.databaseName)),
        main: quote(column.columns.main.databaseName),
        index: quote(column.index.databaseName),
        ...(column.columns.tenant ? { tenant: quote(column.columns.tenant.databaseName) } : {}),
      });
    }
  }
  if (entities && found.length === 0)
    throw new ConfigError('none of the selected entities has searchable properties');
  return found;
}

/** Which rows a job works on. */
interface RowFilter {
  /** Fill: only this tenant's rows (undefined: all). */
  tenant?: string;
  /** Rotation: only the rows of this scope (`null`: the application keyring's own) … */
  scopeOnly?: string | null;
  /** … whose index is missing or under another version than this one. */
  notVersion?: number;
}

/** The SQL condition (and parameters from `$first`) selecting the rows a job still has to index. */
function pending(t: Target, filter: RowFilter, first: number): { sql: string; params: unknown[] } {
  const params: unknown[] = [];
  const parts = [`${t.main} IS NOT NULL`];
  const tenantColumn = t.searchable.columns.tenant;
  const scopeTenant = filter.scopeOnly !== undefined ? filter.scopeOnly : filter.tenant;
  if (filter.notVersion !== undefined) {
    params.push(versionPrefix(filter.notVersion));
    parts.push(`(${t.index} IS NULL OR substring(${t.index} from 1 for 2) <> $${first + params.length - 1})`);
  } else {
    parts.push(`${t.index} IS NULL`);
  }
  if (scopeTenant === null) {
    if (tenantColumn && t.tenant) parts.push(`${t.tenant} IS NULL`);
  } else if (scopeTenant !== undefined) {
    if (!tenantColumn || !t.tenant) return { sql: 'FALSE', params: [] };
    params.push(tenantParameter(tenantColumn, scopeTenant));
    parts.push(`${t.tenant} = $${first + params.length - 1}`);
  }
  return { sql: parts.join(' AND '), params };
}

function versionPrefix(version: number): Buffer {
  const prefix = Buffer.alloc(2);
  prefix.writeUInt16BE(version);
  return prefix;
}

async function rowsLeft(runner: QueryRunner, t: Target, filter: RowFilter): Promise<number> {
  const condition = pending(t, filter, 1);
  const [row] = (await runner.query(
    `SELECT count(*)::int AS n FROM ${t.table} WHERE ${condition.sql}`,
    condition.params,
  )) as Array<{ n: number }>;
  return row?.n ?? 0;
}

/** `(a)` or `ROW(a, b)`: the primary key as one value, printed as text to match rows again. */
function keyExpression(t: Target): string {
  return t.primaryKey.length === 1 ? `(${t.primaryKey[0]})` : `ROW(${t.primaryKey.join(', ')})`;
}

/**
 * Walks the table in primary-key order, `batchSize` rows at a time: each step gets the bounds
 * `(after, upTo]` as SQL and parameters, so a job holds one batch of keys in memory at most.
 */
async function* keyBatches(
  runner: QueryRunner,
  t: Target,
  batchSize: number,
): AsyncGenerator<{ condition: string; params: unknown[] }> {
  const key = t.primaryKey.length === 1 ? (t.primaryKey[0] as string) : `(${t.primaryKey.join(', ')})`;
  const list = t.primaryKey.join(', ');
  const placeholders = (offset: number) => {
    const p = t.primaryKey.map((_, i) => `$${offset + i + 1}`);
    return p.length === 1 ? (p[0] as string) : `(${p.join(', ')})`;
  };
  let after: unknown[] | undefined;
  for (;;) {
    const lower = after ? `${key} > ${placeholders(0)}` : 'TRUE';
    const [bound] = (await runner.query(
      `SELECT ${list} FROM ${t.table} WHERE ${lower} ORDER BY ${list} OFFSET ${batchSize - 1} LIMIT 1`,
      after ?? [],
    )) as Record<string, unknown>[];
    const upTo = bound ? Object.values(bound) : undefined;
    const upper = upTo ? `${key} <= ${placeholders(after ? after.length : 0)}` : 'TRUE';
    yield { condition: `${lower} AND ${upper}`, params: [...(after ?? []), ...(upTo ?? [])] };
    if (!upTo) return;
    after = upTo;
  }
}

async function indexProperty(
  runner: QueryRunner,
  encryption: EnvelopeEncryption,
  store: SqlIndexKeyStore,
  t: Target,
  filter: RowFilter,
  batchSize: number,
  options: IndexKeyJobOptions,
): Promise<PropertyIndexResult> {
  const { searchable, metadata } = t;
  const outcome: PropertyIndexResult = {
    entity: metadata.name,
    property: searchable.columns.main.propertyPath,
    rowsIndexed: 0,
    rowsSkipped: 0,
    duplicates: [],
    failures: [],
  };
  const keyNames = metadata.primaryColumns.map((c) => c.databaseName);
  for await (const batch of keyBatches(runner, t, batchSize)) {
    const condition = pending(t, filter, batch.params.length + 1);
    const rows = (await runner.query(
      `SELECT ${t.primaryKey.join(', ')}, ${keyExpression(t)}::text AS typeorm_envelope_key, ${t.main} AS typeorm_envelope_stored${t.tenant ? `, ${t.tenant} AS typeorm_envelope_tenant` : ''}
       FROM ${t.table} WHERE ${batch.condition} AND ${condition.sql}`,
      [...batch.params, ...condition.params],
    )) as Array<Record<string, unknown>>;
    if (rows.length === 0) continue;
    const values = await loadValues(
      runner,
      t,
      rows.map((r) => Object.fromEntries(keyNames.map((n) => [n, r[n]]))),
      outcome,
    );
    const updates: Array<[string, Buffer, Buffer]> = [];
    for (const row of rows) {
      const primaryKey = primaryKeyOfRow(metadata, row) as string;
      const value = values.get(primaryKey);
      if (value === undefined) continue; // gone meanwhile, or unreadable (in failures)
      const tenant = t.searchable.columns.tenant
        ? (tenantText(t.searchable.columns.tenant, row.typeorm_envelope_tenant) ?? null)
        : null;
      try {
        const scope = encryption.keyScope(tenant);
        const keys = await encryption.indexKeys.load(scope, store.on(runner), true);
        const key = keys.write as IndexKey;
        const index = key.index(searchable.place, searchable.placeId, inputOf(searchable, value, tenant));
        updates.push([String(row.typeorm_envelope_key), row.typeorm_envelope_stored as Buffer, index]);
      } catch (error) {
        outcome.failures.push({ primaryKey, error: describeError(error) });
      }
    }
    const { written, duplicates } = await writeIndexes(runner, t, batch, updates);
    outcome.rowsIndexed += written;
    outcome.rowsSkipped += updates.length - written - duplicates.length;
    outcome.duplicates.push(...duplicates);
    await options.onProgress?.({
      entity: outcome.entity,
      property: outcome.property,
      rowsDone: outcome.rowsIndexed,
    });
  }
  return outcome;
}

/**
 * The plaintext of each row, read through TypeORM (so either storage layout, and every check the
 * entity integration makes, applies), by primary key. A batch that fails to read is read row by
 * row, so one unreadable row is reported without stopping the others.
 */
async function loadValues(
  runner: QueryRunner,
  t: Target,
  keys: Array<Record<string, unknown>>,
  outcome: PropertyIndexResult,
): Promise<Map<string, unknown>> {
  const { metadata, searchable } = t;
  const path = searchable.columns.main.propertyPath.split('.');
  const select: ObjectLiteral = {};
  for (const c of metadata.primaryColumns) select[c.propertyPath] = true;
  let holder = select;
  for (const [i, part] of path.entries()) {
    if (i === path.length - 1) holder[part] = true;
    else holder = holder[part] ??= {};
  }
  if (searchable.columns.tenant) select[searchable.columns.tenant.propertyPath] = true;
  const whereOf = (key: Record<string, unknown>) =>
    Object.fromEntries(metadata.primaryColumns.map((c) => [c.propertyPath, key[c.databaseName]]));
  const single = metadata.primaryColumns.length === 1 ? metadata.primaryColumns[0] : undefined;
  const read = (batch: Array<Record<string, unknown>>) =>
    runner.manager.find(metadata.target, {
      select,
      /* One key column: one IN list; a composite key: one condition per row. */
      where: single
        ? { [single.propertyPath]: In(batch.map((k) => k[single.databaseName])) }
        : batch.map(whereOf),
      withDeleted: true,
      loadEagerRelations: false,
    });
  const found = new Map<string, unknown>();
  const take = (entities: ObjectLiteral[]) => {
    for (const entity of entities) {
      const value = searchable.columns.holderOf(entity, false)?.[searchable.columns.definition.propertyName];
      if (value !== undefined && value !== null) found.set(primaryKeyOf(metadata, entity) as string, value);
    }
  };
  try {
    take(await read(keys));
  } catch {
    for (const key of keys) {
      try {
        take(await read([key]));
      } catch (error) {
        outcome.failures.push({
          primaryKey: primaryKeyOfRow(metadata, key) as string,
          error: describeError(error),
        });
      }
    }
  }
  return found;
}

/**
 * Writes one batch of indexes in one UPDATE, each only where the row still holds the stored value
 * it was computed from. A duplicate in a unique index makes the batch be written row by row, so
 * the duplicates alone are left out.
 */
async function writeIndexes(
  runner: QueryRunner,
  t: Target,
  batch: { condition: string; params: unknown[] },
  updates: Array<[string, Buffer, Buffer]>,
): Promise<{ written: number; duplicates: string[] }> {
  const duplicates: string[] = [];
  if (updates.length === 0) return { written: 0, duplicates };
  const statement = (list: Array<[string, Buffer, Buffer]>) => {
    const base = batch.params.length;
    const values = list.map(
      (_, i) => `($${base + 3 * i + 1}::text, $${base + 3 * i + 2}::bytea, $${base + 3 * i + 3}::bytea)`,
    );
    return runner.query(
      `UPDATE ${t.table} SET ${t.index} = v.idx FROM (VALUES ${values.join(', ')}) AS v(k, stored, idx)
       WHERE ${batch.condition} AND ${keyExpression(t)}::text = v.k AND ${t.main} = v.stored`,
      [...batch.params, ...list.flat()],
      true,
    ) as Promise<{ affected?: number }>;
  };
  try {
    return { written: (await statement(updates)).affected ?? 0, duplicates };
  } catch (error) {
    if (!isUniqueViolation(error) || runner.isTransactionActive) throw error;
  }
  let written = 0;
  for (const update of updates) {
    try {
      written += (await statement([update])).affected ?? 0;
    } catch (error) {
      if (!isUniqueViolation(error)) throw error;
      duplicates.push(update[0]);
    }
  }
  return { written, duplicates };
}

function isUniqueViolation(error: unknown): boolean {
  return (
    (error as { name?: unknown } | null)?.name === 'UniqueViolationError' || pgErrorCode(error) === '23505'
  );
}

/**
 * Moves the scope to a new index-key version in two steps, each followed by `settleTime`, so that
 * every instance can find every row at any time: the new version is added as `next` (queries
 * match it, writes do not use it yet), then made `active` while the old one becomes `previous`
 * (writes use the new one, queries match both). A run that finds a rotation under way takes it
 * over at the step it reached. A scope without any key just gets its first one.
 */
async function rotateScope(
  runner: QueryRunner,
  encryption: EnvelopeEncryption,
  scope: KeyScope,
  tenant: string | undefined,
  settleTime: number | undefined,
): Promise<{ toVersion: number; fromVersion: number | null; resumed: boolean }> {
  const table = indexKeysTable(runner.connection);
  const keyring = encryption.keyring.keyringId;
  const tenantId = tenant ?? NO_TENANT;
  const records = await new SqlIndexKeyStore(runner.connection, keyring, runner).read(tenant);
  const active = records.find((r) => r.state === 'active');
  const previous = records.find((r) => r.state === 'previous');
  let next = records.find((r) => r.state === 'next');
  if (active && previous) {
    await settle(runner, encryption, tenant, active.version, 'activated_at', settleTime);
    return { toVersion: active.version, fromVersion: previous.version, resumed: true };
  }
  const resumed = next !== undefined;
  if (!next) {
    const version = Math.max(0, ...records.map((r) => r.version)) + 1;
    const { key, record } = await encryption.indexKeys.generate(scope, version);
    const state = active ? 'next' : 'active';
    try {
      await missingTable(
        runner.query(
          `INSERT INTO ${table} (keyring_id, tenant_id, version, state, key_version, wrapped_key, activated_at)
           VALUES ($1, $2, $3, $4, $5, $6, ${state === 'active' ? 'now()' : 'NULL'})`,
          [keyring, tenantId, record.version, state, record.keyVersion, record.wrappedKey],
        ),
      );
    } catch (error) {
      key.destroy();
      throw error;
    }
    next = { ...record, state };
    encryption.indexKeys.remember(scope, next, key);
    encryption.indexKeys.refresh(scope);
    if (!active) return { toVersion: record.version, fromVersion: null, resumed: false };
  }
  if (!active) throw new ConfigError('the scope has a next index key but no active one; run the job again');
  await settle(runner, encryption, tenant, next.version, 'created_at', settleTime);
  const owned = !runner.isTransactionActive;
  try {
    if (owned) await runner.startTransaction();
    const demoted = (await runner.query(
      `UPDATE ${table} SET state = 'previous' WHERE keyring_id = $1 AND tenant_id = $2 AND version = $3 AND state = 'active'`,
      [keyring, tenantId, active.version],
      true,
    )) as { affected?: number };
    const promoted = (await runner.query(
      `UPDATE ${table} SET state = 'active', activated_at = now() WHERE keyring_id = $1 AND tenant_id = $2 AND version = $3 AND state = 'next'`,
      [keyring, tenantId, next.version],
      true,
    )) as { affected?: number };
    if ((demoted.affected ?? 0) !== 1 || (promoted.affected ?? 0) !== 1) {
      throw new ConfigError('the index key changed while it was being rotated; run the job again');
    }
    if (owned) await runner.commitTransaction();
  } catch (error) {
    if (owned && runner.isTransactionActive) await runner.rollbackTransaction();
    throw error;
  }
  encryption.indexKeys.refresh(scope);
  await settle(runner, encryption, tenant, next.version, 'activated_at', settleTime);
  return { toVersion: next.version, fromVersion: active.version, resumed };
}

/** Waits until `since` (a time of the version's record) is `settleTime` ago, by the database's clock. */
async function settle(
  runner: QueryRunner,
  encryption: EnvelopeEncryption,
  tenant: string | undefined,
  version: number,
  since: 'created_at' | 'activated_at',
  settleTime: number | undefined,
): Promise<void> {
  const wait = settleTime ?? encryption.indexKeys.refreshInterval;
  if (!Number.isFinite(wait) || wait < 0)
    throw new ConfigError('settleTime must be a number of ms, at least 0');
  if (wait === 0) return;
  const [row] = (await runner.query(
    `SELECT (EXTRACT(EPOCH FROM (now() - ${since})) * 1000)::float8 AS age FROM ${indexKeysTable(runner.connection)}
     WHERE keyring_id = $1 AND tenant_id = $2 AND version = $3`,
    [encryption.keyring.keyringId, tenant ?? NO_TENANT, version],
  )) as Array<{ age: number | null }>;
  const remaining = wait - Number(row?.age ?? 0);
  if (remaining > 0) await new Promise((resolve) => setTimeout(resolve, remaining + 50));
}

/** Retires the previous version (erasing its wrapped key) once no row uses it. */
async function retire(
  runner: QueryRunner,
  encryption: EnvelopeEncryption,
  tenant: string | undefined,
  version: number,
): Promise<boolean> {
  const result = (await runner.query(
    `UPDATE ${indexKeysTable(runner.connection)} SET state = 'retired', wrapped_key = NULL, retired_at = now()
     WHERE keyring_id = $1 AND tenant_id = $2 AND version = $3 AND state = 'previous'`,
    [encryption.keyring.keyringId, tenant ?? NO_TENANT, version],
    true,
  )) as { affected?: number };
  return (result.affected ?? 0) > 0;
}

/** What {@link rewrapIndexKeys} did. */
export interface IndexKeysRewrap {
  /** Index keys re-wrapped under the target master-key version. */
  rewrapped: number;
  /** Index keys that could not be (they keep their old wrap), with the reason. */
  failures: Array<{ tenant?: string; indexKeyVersion: number; error: string }>;
}

/**
 * Re-wraps stored index keys under master-key version `toVersion`, without recomputing any index
 * (the keys themselves do not change): with `tenant`, that tenant's; without, those wrapped by the
 * application keyring (its own, and tenants' that are not under a key of their own). Each new
 * wrap is checked before it is stored, and stored only if the record did not change meanwhile. A
 * no-op without the index-key table. Run by every `rewrapDataKeys`.
 */
export async function rewrapIndexKeys(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  toVersion: number,
  tenant?: string,
): Promise<IndexKeysRewrap> {
  const outcome: IndexKeysRewrap = { rewrapped: 0, failures: [] };
  const dataSource = dataSourceOf(target);
  await withQueryRunner(target, async (runner) => {
    if (!(await indexKeysTableExists(runner))) return;
    const table = indexKeysTable(dataSource);
    const rows = (await runner.query(
      `SELECT tenant_id, version, state, key_version, wrapped_key FROM ${table}
       WHERE keyring_id = $1 AND wrapped_key IS NOT NULL AND key_version <> $2 AND ${
         tenant === undefined ? `key_version < ${FIRST_TENANT_KEY_VERSION}` : 'tenant_id = $3'
       }`,
      tenant === undefined
        ? [encryption.keyring.keyringId, toVersion]
        : [encryption.keyring.keyringId, toVersion, tenant],
    )) as Array<{
      tenant_id: string;
      version: number;
      state: IndexKeyRecord['state'];
      key_version: number;
      wrapped_key: Buffer;
    }>;
    for (const row of rows) {
      const rowTenant = row.tenant_id === NO_TENANT ? undefined : row.tenant_id;
      const record = recordOf(row);
      if (rowTenant !== undefined && encryption.tenantKeyrings.tenant(rowTenant)?.state === 'offboarded')
        continue;
      try {
        const scope = encryption.keyScope(rowTenant);
        const rewrapped = await encryption.indexKeys.rewrap(scope, record, toVersion);
        const result = (await runner.query(
          `UPDATE ${table} SET wrapped_key = $1, key_version = $2, rewrapped_at = now()
           WHERE keyring_id = $3 AND tenant_id = $4 AND version = $5 AND key_version = $6 AND wrapped_key = $7`,
          [
            rewrapped,
            toVersion,
            encryption.keyring.keyringId,
            row.tenant_id,
            record.version,
            record.keyVersion,
            record.wrappedKey,
          ],
          true,
        )) as { affected?: number };
        outcome.rewrapped += result.affected ?? 0;
        encryption.indexKeys.refresh(scope);
      } catch (error) {
        outcome.failures.push({
          ...(rowTenant === undefined ? {} : { tenant: rowTenant }),
          indexKeyVersion: record.version,
          error: describeError(error),
        });
      }
    }
  });
  return outcome;
}

/** How many stored index keys are still wrapped by master-key version `version` (0 without the table). */
export async function indexKeysWrappedBy(
  runner: QueryRunner,
  keyringId: string,
  version: number,
): Promise<number> {
  const dataSource = runner.connection;
  if (!(await indexKeysTableExists(runner))) return 0;
  const [row] = (await runner.query(
    `SELECT count(*)::int AS n FROM ${indexKeysTable(dataSource)} WHERE keyring_id = $1 AND key_version = $2 AND wrapped_key IS NOT NULL`,
    [keyringId, version],
  )) as Array<{ n: number }>;
  return row?.n ?? 0;
}

/**
 * The SQL a job appends to the SET list of a value it writes, so the blind index is written with
 * it (`, "email_bidx" = decode('…', 'hex')`, built only from bytes this library computed), or `''`
 * for a property that is not searchable. The index is computed under the active index key of the
 * row's tenant (made if the tenant has none), as the entity integration's writes do.
 */
export async function blindIndexSet(
  runner: QueryRunner,
  encryption: EnvelopeEncryption,
  columns: EncryptedColumns,
  value: unknown,
  tenant: string | null,
): Promise<string> {
  const searchable = searchableColumnOf(columns);
  if (!searchable) return '';
  const name = runner.connection.driver.escape(searchable.index.databaseName);
  if (value === null || value === undefined) return `, ${name} = NULL`;
  const keys = await encryption.indexKeys.load(
    encryption.keyScope(tenant),
    searchable.runtime.store.on(runner),
    true,
  );
  const index = (keys.write as IndexKey).index(
    searchable.place,
    searchable.placeId,
    inputOf(searchable, value, tenant),
  );
  return `, ${name} = decode('${index.toString('hex')}', 'hex')`;
}
