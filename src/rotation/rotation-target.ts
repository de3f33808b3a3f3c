import type { DataSource, EntityMetadata, QueryRunner } from 'typeorm';
import type { EncryptedEntity, EnvelopeEncryption } from '../envelope-encryption';
import { ConfigError } from '../errors';
import type { EncryptedColumns } from '../typeorm/encrypted-columns';

/** An entity, by class or by entity or table name. */
export type EntitySelector = string | (abstract new (...args: never[]) => unknown);

/** Where a rotation job runs: a DataSource, or a QueryRunner (inside a migration's `up`). */
export type RotationTarget = DataSource | QueryRunner;

/** One encrypted property's table and columns, quoted for SQL. */
export interface EncryptedColumnSql {
  entity: string;
  property: string;
  metadata: EntityMetadata;
  columns: EncryptedColumns;
  table: string;
  primaryKey: string[];
  ciphertext: string;
  iv: string;
  wrappedKey: string;
  keyVersion: string;
  /** The entity's `@EncryptionTenant()` column, quoted, if it has one. */
  tenant?: string;
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
 * (all entities with encrypted properties by default), with quoted table and column names.
 */
export function encryptedColumnsSql(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  entities?: ReadonlyArray<EntitySelector>,
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
    return unseen.map((c) => ({
      entity: metadata.name,
      property: c.main.propertyPath,
      metadata,
      columns: c,
      table,
      primaryKey: metadata.primaryColumns.map((p) => quote(p.databaseName)),
      ciphertext: quote(c.main.databaseName),
      iv: quote(c.sidecars.iv.databaseName),
      wrappedKey: quote(c.sidecars.wrappedKey.databaseName),
      keyVersion: quote(c.sidecars.keyVersion.databaseName),
      ...(c.tenant ? { tenant: quote(c.tenant.databaseName) } : {}),
    }));
  });
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
 * `(after, upTo]` as SQL and parameters, so a job holds one batch of keys in memory at most.
 */
export async function* primaryKeyBatches(
  runner: QueryRunner,
  column: EncryptedColumnSql,
  batchSize: number,
): AsyncGenerator<{ condition: string; params: unknown[] }> {
  const key = rowKey(column.primaryKey);
  let after: unknown[] | undefined;
  for (;;) {
    const placeholders = (offset: number) => column.primaryKey.map((_, i) => `$${offset + i + 1}`);
    const lower = after ? `${key} > ${wrap(placeholders(0))}` : 'TRUE';
    const [bound] = (await runner.query(
      `SELECT ${column.primaryKey.join(', ')} FROM ${column.table} WHERE ${lower} ORDER BY ${column.primaryKey.join(', ')} OFFSET ${batchSize - 1} LIMIT 1`,
      after ?? [],
    )) as Record<string, unknown>[];
    const upTo = bound ? Object.values(bound) : undefined;
    const params = [...(after ?? []), ...(upTo ?? [])];
    const upper = upTo ? `${key} <= ${wrap(placeholders(after ? after.length : 0))}` : 'TRUE';
    yield { condition: `${lower} AND ${upper}`, params };
    if (!upTo) return;
    after = upTo;
  }
}

function wrap(placeholders: string[]): string {
  return placeholders.length === 1 ? (placeholders[0] as string) : `(${placeholders.join(', ')})`;
}
