import type { DataSource, EntityMetadata, QueryRunner } from 'typeorm';
import { DATA_KEYS_TABLE } from '../../migrations/1764500000000-TypeormEnvelopeDataKeys';
import type { EncryptedEntity, EnvelopeEncryption } from '../envelope-encryption';
import { ConfigError } from '../errors';
import type { EncryptedColumns } from '../typeorm/encrypted-columns';
import type { StorageLayout } from '../typeorm/encrypted-decorator';
import type { KeyRange } from './range-leases';

/** An entity, by class or by entity or table name. */
export type EntitySelector = string | (abstract new (...args: never[]) => unknown);

/** Where a rotation job runs: a DataSource, or a QueryRunner (inside a migration's `up`). */
export type RotationTarget = DataSource | QueryRunner;

export type { StorageLayout };

/** The sidecar columns of one property, quoted for SQL (to read and to write). */
export interface SidecarColumnsSql {
  iv: string;
  wrappedKey: string;
  keyVersion: string;
}

/** One encrypted property's table and columns, quoted for SQL. */
export interface EncryptedColumnSql {
  entity: string;
  property: string;
  metadata: EntityMetadata;
  columns: EncryptedColumns;
  table: string;
  primaryKey: string[];
  /** The main column: a sidecar value's ciphertext (format 1), or a whole compact value (format 2). */
  ciphertext: string;
  /** The layout new values of this property are written in. */
  layout: StorageLayout;
  /** The layout the column may still hold values of, while it is migrated (`migrateFrom`). */
  migrateFrom?: StorageLayout;
  /** The sidecar columns, when the property maps them (sidecars layout, or compact migrating from it). */
  sidecars?: SidecarColumnsSql;
  /**
   * The stored value's master-key version as an SQL expression, to read and never to assign: the
   * sidecar column for sidecar values, the `key_version` of the value's row in the data-key table
   * for compact values (NULL for a NULL value).
   */
  keyVersion: string;
  /** The data-key table, quoted (in the DataSource's schema). */
  dataKeyTable: string;
  /** The entity's `@EncryptionTenant()` column, quoted, if it has one. */
  tenant?: string;
  /** Only the rows whose primary key is in this range (one worker's share of a job). */
  range?: KeyRange;
}

/** A property whose column can hold sidecar values (format 1): its sidecar columns are mapped. */
export type SidecarColumnSql = EncryptedColumnSql & { sidecars: SidecarColumnsSql };

/** Whether the property's sidecar columns are mapped (it can hold sidecar values). */
export function hasSidecars(column: EncryptedColumnSql): column is SidecarColumnSql {
  return column.sidecars !== undefined;
}

/** Whether the column can hold compact values (format 2). */
export function holdsCompact(column: EncryptedColumnSql): boolean {
  return column.layout === 'compact' || column.migrateFrom === 'compact';
}

/** The data-key id of a compact value, in SQL: bytes 2-9 of the value, unsigned big-endian. */
export function dataKeyIdSql(value: string): string {
  return `('x' || encode(substring(${value} from 3 for 8), 'hex'))::bit(64)::bigint`;
}

/** Whether a stored value is a compact one (format 2), in SQL (NULL for a NULL value). */
export function isCompactSql(value: string): string {
  return `(get_byte(${value}, 0) = 2)`;
}

/** The data-key table's path in the DataSource's schema, quoted. */
export function dataKeyTablePath(target: RotationTarget): string {
  return libraryTablePath(target, DATA_KEYS_TABLE);
}

/** Whether the data-key table exists (the `TypeormEnvelopeDataKeys` migration ran). */
export async function keyTableExists(runner: QueryRunner): Promise<boolean> {
  return (await runner.hasTable(libraryTablePath(runner, DATA_KEYS_TABLE, false))) as boolean;
}

/**
 * Refuses, with a `ConfigError` naming the migration, to work on compact values without the
 * data-key table (instead of failing on every row, or with a driver error).
 */
export async function requireKeyTableFor(
  runner: QueryRunner,
  columns: readonly EncryptedColumnSql[],
): Promise<void> {
  const compact = columns.find(holdsCompact);
  if (!compact || (await keyTableExists(runner))) return;
  throw new ConfigError(
    'compact values need the data-key table: add TypeormEnvelopeDataKeys1764500000000 to the DataSource migrations and run it',
    { entity: compact.entity, column: compact.property },
  );
}

/** The path of one of the library's tables in the DataSource's schema, quoted (or plain, for `hasTable`). */
export function libraryTablePath(target: RotationTarget, table: string, quoted = true): string {
  const dataSource = dataSourceOf(target);
  const schema = (dataSource.options as { schema?: string }).schema;
  const parts = schema ? [schema, table] : [table];
  return quoted ? parts.map((p) => dataSource.driver.escape(p)).join('.') : parts.join('.');
}

/** Runs `fn` with a query runner: the given one, or a new one released afterwards. */
export async function withQueryRunner<T>(
  target: RotationTarget,
  fn: (runner: QueryRunner) => Promise<T>,
): Promise<T> {
  if (isQueryRunner(target)) return fn(target);
  const runner = target.createQueryRunner();
  try {
    return await fn(runner);
  } finally {
    await runner.release();
  }
}

export function dataSourceOf(target: RotationTarget): DataSource {
  return isQueryRunner(target) ? target.connection : target;
}

function isQueryRunner(target: RotationTarget): target is QueryRunner {
  return typeof (target as QueryRunner).query === 'function' && 'connection' in target;
}

/**
 * The encrypted columns a job works on: every encrypted property of the selected entities
 * (all entities with encrypted properties by default), with quoted table and column names; with
 * `range`, only the rows whose primary key is in it.
 */
export function encryptedColumnsSql(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  entities?: ReadonlyArray<EntitySelector>,
  range?: KeyRange,
): EncryptedColumnSql[] {
  const dataSource = dataSourceOf(target);
  const quote = (name: string) => dataSource.driver.escape(name);
  const selected = encryption
    .encryptedEntities(dataSource)
    .filter((e) => !entities || entities.some((wanted) => matches(e, wanted)));
  if (entities && selected.length === 0) {
    throw new ConfigError(`none of the entities ${entities.map(nameOf).join(', ')} has encrypted properties`);
  }
  /* Entities of one single-table inheritance share a table and its inherited columns: each stored
     column is worked on once. */
  const seen = new Set<string>();
  const dataKeyTable = libraryTablePath(target, DATA_KEYS_TABLE);
  return selected.flatMap(({ metadata, columns }) => {
    if (metadata.primaryColumns.length === 0) {
      throw new ConfigError('rotation needs a primary key', { entity: metadata.name });
    }
    const table = metadata.tablePath.split('.').map(quote).join('.');
    const unseen = columns.filter((c) => {
      const id = `${table}.${quote(c.main.databaseName)}`;
      if (seen.has(id)) return false;
      seen.add(id);
      return true;
    });
    return unseen.map((c) => {
      const { layout, migrateFrom, sidecars: mapped } = layoutOf(c);
      const ciphertext = quote(c.main.databaseName);
      const sidecars = mapped && {
        iv: quote(mapped.iv.databaseName),
        wrappedKey: quote(mapped.wrappedKey.databaseName),
        keyVersion: quote(mapped.keyVersion.databaseName),
      };
      const compact = layout === 'compact' || migrateFrom === 'compact';
      const keyRowVersion = `(SELECT k.key_version FROM ${dataKeyTable} k WHERE k.id = ${dataKeyIdSql(ciphertext)})`;
      const keyVersion = !compact
        ? (sidecars?.keyVersion ?? 'NULL::int')
        : sidecars
          ? `(CASE WHEN ${isCompactSql(ciphertext)} THEN ${keyRowVersion} ELSE ${sidecars.keyVersion} END)`
          : keyRowVersion;
      return {
        entity: metadata.name,
        property: c.main.propertyPath,
        metadata,
        columns: c,
        table,
        primaryKey: metadata.primaryColumns.map((p) => quote(p.databaseName)),
        ciphertext,
        layout,
        ...(migrateFrom ? { migrateFrom } : {}),
        ...(sidecars ? { sidecars } : {}),
        keyVersion,
        dataKeyTable,
        ...(c.tenant ? { tenant: quote(c.tenant.databaseName) } : {}),
        ...(range ? { range } : {}),
      };
    });
  });
}

/**
 * The layout of an installed property, the layout it migrates from, and its sidecar columns when
 * they are mapped.
 */
function layoutOf(columns: EncryptedColumns): {
  layout: StorageLayout;
  migrateFrom?: StorageLayout;
  sidecars?: EncryptedColumns['sidecars'];
} {
  const { layout, migrateFrom, sidecars } = columns;
  return {
    layout,
    ...(migrateFrom && migrateFrom !== layout ? { migrateFrom } : {}),
    ...(sidecars ? { sidecars } : {}),
  };
}

function matches(entity: EncryptedEntity, wanted: EntitySelector): boolean {
  return typeof wanted === 'string'
    ? entity.metadata.name === wanted || entity.metadata.tableName === wanted
    : entity.metadata.target === wanted;
}

function nameOf(wanted: EntitySelector): string {
  return typeof wanted === 'string' ? wanted : wanted.name;
}

/** `(a, b)` for a composite key, `a` for a single one. */
export function rowKey(primaryKey: string[], prefix = ''): string {
  const parts = primaryKey.map((p) => `${prefix}${p}`);
  return parts.length === 1 ? (parts[0] as string) : `(${parts.join(', ')})`;
}

/**
 * Walks a table in primary-key order, `batchSize` rows at a time: each step gets the bounds
 * `(after, upTo]` as SQL and parameters, so a job holds one batch of keys in memory at most. A
 * column with a `range` is walked from the range's start to its end only.
 */
export async function* primaryKeyBatches(
  runner: QueryRunner,
  column: EncryptedColumnSql,
  batchSize: number,
): AsyncGenerator<{ condition: string; params: unknown[] }> {
  const key = rowKey(column.primaryKey);
  const end: readonly unknown[] | undefined = column.range?.upTo;
  let after: readonly unknown[] | undefined = column.range?.after;
  for (;;) {
    const placeholders = (offset: number) => column.primaryKey.map((_, i) => `$${offset + i + 1}`);
    const lower = after ? `${key} > ${wrap(placeholders(0))}` : 'TRUE';
    const within = end ? `${key} <= ${wrap(placeholders(after ? after.length : 0))}` : 'TRUE';
    const [bound] = (await runner.query(
      `SELECT ${column.primaryKey.join(', ')} FROM ${column.table} WHERE ${lower} AND ${within}
       ORDER BY ${column.primaryKey.join(', ')} OFFSET ${batchSize - 1} LIMIT 1`,
      [...(after ?? []), ...(end ?? [])],
    )) as Record<string, unknown>[];
    /* The last batch reaches the end of the range (or of the table). */
    const upTo = bound ? Object.values(bound) : end;
    const params = [...(after ?? []), ...(upTo ?? [])];
    const upper = upTo ? `${key} <= ${wrap(placeholders(after ? after.length : 0))}` : 'TRUE';
    yield { condition: `${lower} AND ${upper}`, params };
    if (!bound) return;
    after = upTo;
  }
}

/**
 * The column's `range` as an SQL condition on the primary key (`TRUE` without one), its
 * parameters numbered from `$first`.
 */
export function rangeCondition(
  column: EncryptedColumnSql,
  first: number,
): { sql: string; params: unknown[] } {
  const key = rowKey(column.primaryKey);
  const parts: string[] = [];
  const params: unknown[] = [];
  const bound = (operator: string, values: readonly unknown[] | undefined) => {
    if (!values) return;
    parts.push(`${key} ${operator} ${wrap(values.map((_, i) => `$${first + params.length + i}`))}`);
    params.push(...values);
  };
  bound('>', column.range?.after);
  bound('<=', column.range?.upTo);
  return { sql: parts.length ? parts.join(' AND ') : 'TRUE', params };
}

function wrap(placeholders: string[]): string {
  return placeholders.length === 1 ? (placeholders[0] as string) : `(${placeholders.join(', ')})`;
}
