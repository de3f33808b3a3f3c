import { createHmac, randomBytes } from 'node:crypto';
import { inspect } from 'node:util';
import {
  type EntityMetadata,
  type FindOperator,
  type ObjectLiteral,
  QueryBuilder,
  type QueryRunner,
  Raw,
  SelectQueryBuilder,
  UpdateQueryBuilder,
} from 'typeorm';
import { PostgresQueryRunner } from 'typeorm/driver/postgres/PostgresQueryRunner';
import {
  type ErrorContext,
  UniqueViolationError,
  UnsupportedOperationError,
  withErrorContext,
} from '../errors';
import type { KeyScope } from '../keys/key-scope';
import {
  inputOf,
  type SearchableColumn,
  scopeKeys,
  searchableColumnsOf,
  whereCopies,
  whileBuildingUpdate,
} from './blind-index-columns';
import { tenantText } from './encryption-tenant';

/**
 * Equality conditions on searchable encrypted properties become conditions on their blind-index
 * columns, wherever TypeORM builds a `where` from an object: `find*`, `count*`, `exists*`, the
 * criteria of `update` and `delete`, and query-builder `where(object)`, through relations and
 * embedded objects. `{ email: x }` becomes `email_bidx = ANY($n)`, the parameter holding the
 * index of `x` under every index key queries match (one; two during an index-key rotation).
 *
 * The index keys may not be in memory when the condition is built (the first query of a tenant,
 * or after their TTL): the parameter is then a placeholder that the query runner fills in, after
 * loading the keys, right before the statement is sent. A placeholder that reaches the driver
 * unfilled refuses to be sent.
 */

/** A per-process key for placeholders' printable tags (logs, query-cache ids): never stored, never an index. */
const TAG_KEY = randomBytes(32);

/** The value of an index condition's parameter: the indexes to match, computed now or before the query runs. */
export class BlindIndexParameter {
  #values: Buffer[] | undefined;
  #resolve: ((runner: QueryRunner | undefined) => Promise<Buffer[]>) | undefined;
  /** Made only when printed (most parameters never are). */
  #tag: string | (() => string);

  constructor(
    tag: () => string,
    values: Buffer[] | undefined,
    resolve?: (runner: QueryRunner | undefined) => Promise<Buffer[]>,
  ) {
    this.#tag = tag;
    this.#values = values;
    this.#resolve = values ? undefined : resolve;
  }

  get resolved(): boolean {
    return this.#values !== undefined;
  }

  /** The one index to match, when it is known already and there is exactly one. */
  get single(): Buffer | undefined {
    return this.#values?.length === 1 ? this.#values[0] : undefined;
  }

  /** Computes the indexes (loading the index keys through `runner` when it is given). */
  async resolve(runner: QueryRunner | undefined): Promise<void> {
    if (this.#values || !this.#resolve) return;
    this.#values = await this.#resolve(runner);
    this.#resolve = undefined;
  }

  /** What `pg` sends: a `bytea[]`. */
  toPostgres(): Buffer[] {
    if (!this.#values) {
      throw new UnsupportedOperationError(
        'a condition on a searchable encrypted property reached the driver before its blind index was ' +
          'computed; run the query through a PostgreSQL DataSource with encryption attached',
      );
    }
    return this.#values;
  }

  /** Logs and TypeORM's query-cache ids see a tag that tells conditions apart, never an index. */
  toJSON(): string {
    return `[blind index ${this.#tagText()}]`;
  }

  [inspect.custom](): string {
    return `BlindIndexParameter { ${this.#tagText()} }`;
  }

  #tagText(): string {
    if (typeof this.#tag === 'function') this.#tag = this.#tag();
    return this.#tag;
  }
}

let parameterCount = 0;

/**
 * The where object TypeORM will read, with every condition on a searchable property of
 * `metadata` (and, with `relations`, of related entities) rewritten; the caller's object is never
 * changed. `where` itself when nothing needed rewriting.
 */
export function rewriteWhere(
  metadata: EntityMetadata,
  where: ObjectLiteral,
  relations: boolean,
): ObjectLiteral {
  if (!isWalkable(where)) return where;
  const searchable = searchableColumnsOf(metadata);
  if (!searchable && !relations) return where;
  let tenant: { value: string | null } | undefined;
  const tenantOf = (column: SearchableColumn): string | null => {
    tenant ??= { value: whereTenant(column, where) };
    return tenant.value;
  };
  return walk(metadata, searchable, where, '', relations, tenantOf) ?? where;
}

function walk(
  metadata: EntityMetadata,
  searchable: ReadonlyMap<string, SearchableColumn> | undefined,
  where: ObjectLiteral,
  prefix: string,
  relations: boolean,
  tenantOf: (column: SearchableColumn) => string | null,
): ObjectLiteral | undefined {
  let copy: ObjectLiteral | undefined;
  const copyOnce = () => {
    if (!copy) {
      copy = { ...where };
      whereCopies.add(copy);
    }
    return copy;
  };
  for (const key of Object.keys(where)) {
    const path = prefix ? `${prefix}.${key}` : key;
    const value = where[key];
    const column = searchable?.get(path);
    if (column) {
      const condition = indexCondition(column, value, tenantOf);
      if (condition === undefined) continue;
      const target = copyOnce();
      delete target[key];
      target[column.definition.property] = condition;
      continue;
    }
    if (!isWalkable(value)) continue;
    let rewritten: ObjectLiteral | undefined;
    if (metadata.hasEmbeddedWithPropertyPath(path)) {
      rewritten = walk(metadata, searchable, value, path, relations, tenantOf);
    } else if (relations && metadata.hasRelationWithPropertyPath(path)) {
      const related = metadata.findRelationWithPropertyPath(path)?.inverseEntityMetadata;
      const inner = related ? rewriteWhere(related, value, true) : value;
      rewritten = inner === value ? undefined : inner;
    }
    if (rewritten) copyOnce()[key] = rewritten;
  }
  return copy;
}

function isWalkable(value: unknown): value is ObjectLiteral {
  return (
    typeof value === 'object' &&
    value !== null &&
    !Array.isArray(value) &&
    !isFindOperator(value) &&
    !(value instanceof Date) &&
    !(value instanceof Uint8Array)
  );
}

function isFindOperator(value: unknown): value is FindOperator<unknown> {
  return (value as { '@instanceof'?: symbol } | null)?.['@instanceof'] === Symbol.for('FindOperator');
}

const RANGES = new Set(['moreThan', 'lessThan', 'moreThanOrEqual', 'lessThanOrEqual', 'between']);

function refusal(column: SearchableColumn, why: string): UnsupportedOperationError {
  return new UnsupportedOperationError(why, {
    entity: column.columns.entity.name,
    column: column.columns.main.propertyPath,
  });
}

/** The values an equality operator compares with (a plain value, `Equal`, `In`, `Any`). */
function equalityValues(column: SearchableColumn, value: unknown): unknown[] {
  if (!isFindOperator(value)) return [value];
  switch (value.type) {
    case 'equal':
      return [value.value];
    case 'in':
    case 'any':
      return [...(value.value as unknown as unknown[])];
    case 'like':
    case 'ilike':
      throw refusal(
        column,
        'LIKE cannot be used on a searchable encrypted property: its blind index is a keyed hash of the whole ' +
          '(normalised) value, so only equality can be matched; use equality, or normalise values (searchable: { normalize })',
      );
    default:
      if (RANGES.has(value.type)) {
        throw refusal(
          column,
          `${value.type} cannot be used on a searchable encrypted property: its blind index keeps no order ` +
            '(a keyed hash), so only equality, In() and Not() can be matched',
        );
      }
      throw refusal(
        column,
        `the ${value.type} operator cannot be used on a searchable encrypted property: only equality, In(), ` +
          'Not(), IsNull() and Not(IsNull()) can be matched by its blind index',
      );
  }
}

/**
 * The condition replacing `value` on a searchable property, or `undefined` to leave it as it is
 * (`undefined`, `null` and null tests, which the ciphertext column answers: a NULL value has a
 * NULL index).
 */
function indexCondition(
  column: SearchableColumn,
  value: unknown,
  tenantOf: (column: SearchableColumn) => string | null,
): FindOperator<unknown> | undefined {
  if (value === undefined || value === null) return undefined;
  let negate = false;
  let operand: unknown = value;
  if (isFindOperator(value)) {
    if (value.type === 'isNull') return undefined;
    if (value.type === 'not') {
      const child = value.child ?? value.value;
      if (isFindOperator(child) && child.type === 'isNull') return undefined;
      if (isFindOperator(child) && child.type === 'not') {
        throw refusal(column, 'Not(Not(…)) cannot be used on a searchable encrypted property; use equality');
      }
      negate = true;
      operand = child;
    }
  }
  const values = equalityValues(column, operand);
  for (const v of values) {
    if (v === null || v === undefined || isFindOperator(v)) {
      throw refusal(
        column,
        'In() on a searchable encrypted property takes plain values only (no null, undefined or operators); ' +
          'use IsNull() for null',
      );
    }
  }
  const tenant = tenantOf(column);
  const parameter = indexParameter(column, column.runtime.scopeOf(tenant), values, tenant);
  parameterCount = (parameterCount + 1) % Number.MAX_SAFE_INTEGER;
  const name = `typeormEnvelopeIndex${parameterCount}`;
  /* One index known now (the common case: one value, no rotation): the plain comparison a
     plaintext column would get. Otherwise the indexes, known now or before the query runs, as one array. */
  const single = parameter.single;
  if (single) {
    return Raw((alias) => (negate ? `${alias} <> :${name}` : `${alias} = :${name}`), { [name]: single });
  }
  return Raw((alias) => (negate ? `NOT (${alias} = ANY(:${name}))` : `${alias} = ANY(:${name})`), {
    [name]: parameter,
  });
}

/**
 * The indexes of `values` under every key queries match in `scope`: computed at once when the
 * keys are in memory, otherwise when the query runs. Each value is normalised now, so a
 * normaliser's error is raised where the condition was written.
 */
export function indexParameter(
  column: SearchableColumn,
  scope: KeyScope,
  values: readonly unknown[],
  tenant: string | null,
): BlindIndexParameter {
  const inputs = values.map((v) => inputOf(column, v, tenant));
  const tag = () => {
    const mac = createHmac('sha256', TAG_KEY).update(scope.cacheId).update('\0').update(column.placeId);
    for (const input of inputs) mac.update('\0').update(input);
    return mac.digest('hex').slice(0, 16);
  };
  const compute = (keys: {
    query: readonly { index: (p: typeof column.place, id: string, i: Buffer) => Buffer }[];
  }) => keys.query.flatMap((key) => inputs.map((input) => key.index(column.place, column.placeId, input)));
  const known = column.runtime.indexKeys.peek(scope);
  if (known) return new BlindIndexParameter(tag, compute(known));
  return new BlindIndexParameter(tag, undefined, async (runner) => {
    try {
      return compute(await scopeKeys(column, scope, false, runner));
    } catch (error) {
      throw withErrorContext(error, {
        entity: column.columns.entity.name,
        column: column.columns.main.propertyPath,
        ...(tenant === null ? {} : { tenant }),
      });
    }
  });
}

/**
 * The tenant a where object fixes for a tenant entity's searchable property: its tenant property
 * must hold one plain value (or `Equal`), since the index depends on the tenant's index key.
 */
function whereTenant(column: SearchableColumn, where: ObjectLiteral): string | null {
  const tenantColumn = column.columns.tenant;
  if (!tenantColumn) return null;
  let value: unknown = where[tenantColumn.propertyName];
  if (isFindOperator(value) && value.type === 'equal') value = value.value;
  if (value === undefined || value === null || isFindOperator(value)) {
    throw refusal(
      column,
      `a condition on a searchable encrypted property of a tenant entity must fix the tenant in the same where ` +
        `({ ${tenantColumn.propertyPath}: …, ${column.columns.main.propertyPath}: … }, one plain value): each tenant's ` +
        'values are indexed under its own key; for several tenants, query each',
    );
  }
  const tenant = tenantText(tenantColumn, value);
  return tenant ?? null;
}

/** Resolves the placeholders among `parameters` before they are sent. */
function unresolvedIn(parameters: readonly unknown[] | undefined): BlindIndexParameter[] | undefined {
  let found: BlindIndexParameter[] | undefined;
  if (!parameters) return undefined;
  for (const parameter of parameters) {
    if (parameter instanceof BlindIndexParameter && !parameter.resolved) {
      found ??= [];
      found.push(parameter);
    }
  }
  return found;
}

/** Unique blind indexes by table and index name, for the error a duplicate raises. */
const uniqueIndexes = new Map<string, ErrorContext>();

/** Makes a unique violation of `column`'s index a `UniqueViolationError`. */
export function registerUniqueIndex(column: SearchableColumn): void {
  if (!column.uniqueIndexName) return;
  uniqueIndexes.set(`${column.place.table}\0${column.uniqueIndexName}`, {
    entity: column.columns.entity.name,
    column: column.columns.main.propertyPath,
  });
}

/** A duplicate in a unique blind index, as a typed error without the database's message (it quotes the index). */
export function uniqueViolation(error: unknown): unknown {
  const driverError = ((error as { driverError?: unknown })?.driverError ?? error) as {
    code?: unknown;
    table?: unknown;
    constraint?: unknown;
  } | null;
  if (driverError?.code !== '23505') return error;
  const context = uniqueIndexes.get(`${String(driverError.table)}\0${String(driverError.constraint)}`);
  if (!context) return error;
  return new UniqueViolationError(
    'another row already holds this value of a unique encrypted property; nothing was written',
    context,
  );
}

let installed = false;

/** Installs the hooks above into TypeORM's query builders and the PostgreSQL query runner, once. */
export function installQueryRewriting(): void {
  if (installed) return;
  installed = true;
  const select = SelectQueryBuilder.prototype as unknown as Record<string, (...args: unknown[]) => unknown>;
  const buildWhere = select.buildWhere as (this: unknown, ...args: unknown[]) => unknown;
  select.buildWhere = function (this: unknown, where: unknown, metadata: unknown, ...rest: unknown[]) {
    const embedPrefix = rest[1];
    const rewritten =
      embedPrefix === undefined && isWalkable(where)
        ? rewriteWhere(metadata as EntityMetadata, where, false)
        : where;
    return buildWhere.call(this, rewritten, metadata, ...rest);
  };
  const base = QueryBuilder.prototype as unknown as Record<string, (...args: unknown[]) => unknown>;
  const getWhereCondition = base.getWhereCondition as (this: unknown, where: unknown) => unknown;
  base.getWhereCondition = function (
    this: { expressionMap: { mainAlias?: { hasMetadata: boolean; metadata: EntityMetadata } } },
    where: unknown,
  ) {
    const alias = this.expressionMap.mainAlias;
    if (!alias?.hasMetadata || typeof where !== 'object' || where === null) {
      return getWhereCondition.call(this, where);
    }
    const rewrite = (w: unknown) => (isWalkable(w) ? rewriteWhere(alias.metadata, w, true) : w);
    return getWhereCondition.call(this, Array.isArray(where) ? where.map(rewrite) : rewrite(where));
  };
  const update = UpdateQueryBuilder.prototype as unknown as Record<string, (...args: unknown[]) => unknown>;
  const createUpdateExpression = update.createUpdateExpression as (this: unknown) => unknown;
  update.createUpdateExpression = function (this: { expressionMap: { valuesSet?: object } }) {
    return whileBuildingUpdate(this.expressionMap.valuesSet, () => createUpdateExpression.call(this));
  };
  const runner = PostgresQueryRunner.prototype as unknown as Record<
    string,
    (...args: unknown[]) => Promise<unknown>
  >;
  for (const method of ['query', 'stream'] as const) {
    const original = runner[method] as (this: QueryRunner, ...args: unknown[]) => Promise<unknown>;
    runner[method] = function (this: QueryRunner, ...args: unknown[]) {
      const pending = unresolvedIn(args[1] as unknown[] | undefined);
      const run = () =>
        original.apply(this, args).catch((error: unknown) => Promise.reject(uniqueViolation(error)));
      if (!pending) return run();
      return Promise.all(pending.map((p) => p.resolve(this))).then(run);
    };
  }
}
