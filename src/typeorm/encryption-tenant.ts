import type { EntityMetadata } from 'typeorm';
import type { ColumnMetadata } from 'typeorm/metadata/ColumnMetadata';
import { ConfigError, UnsupportedOperationError } from '../errors';
import { encryptedDefinition } from './encrypted-decorator';
import { keyFormOf } from './primary-key';

// biome-ignore lint/complexity/noBannedTypes: keyed by any class constructor
const tenantProperties = new Map<Function, string>();

/** Tenant ids are stored in the registry's `varchar(200)` columns. */
const MAX_TENANT_ID_LENGTH = 200;

/**
 * Marks the column that holds a row's tenant (e.g. `workspaceId`). Every encrypted value of the
 * entity is then bound to that tenant and sealed under the tenant's own master key when it has
 * one (see `encryption.tenants`), else under the application's keyring. Put it beside an ordinary
 * `@Column()` of type uuid, integer or text.
 *
 * @example
 * ```ts
 * @Entity()
 * class Contact {
 *   @PrimaryGeneratedColumn('uuid') id!: string;
 *   @EncryptionTenant() @Column() workspaceId!: string;
 *   @Encrypted() email!: string;
 * }
 * ```
 */
export function EncryptionTenant(): PropertyDecorator {
  return (prototype: object, property: string | symbol) => {
    if (typeof property !== 'string')
      throw new ConfigError('@EncryptionTenant() needs a string property name');
    const target = prototype.constructor;
    const existing = tenantProperties.get(target);
    if (existing !== undefined && existing !== property) {
      throw new ConfigError(
        `@EncryptionTenant() is applied to two properties of ${target.name} (${existing}, ${property})`,
      );
    }
    tenantProperties.set(target, property);
  };
}

/** The property marked `@EncryptionTenant()` on `target` or a parent class, if any. */
function tenantPropertyOf(target: unknown): string | undefined {
  for (let t = target; typeof t === 'function' && t !== Function.prototype; t = Object.getPrototypeOf(t)) {
    const found = tenantProperties.get(t);
    if (found !== undefined) return found;
  }
  return undefined;
}

/**
 * The tenant column of an entity's built metadata, checked: an ordinary column whose stored form
 * is known (uuid, integer, text, char), so the tenant bound into a value is the one the row reads
 * back with.
 */
export function tenantColumnOf(metadata: EntityMetadata): ColumnMetadata | undefined {
  const property = tenantPropertyOf(metadata.target);
  if (property === undefined) return undefined;
  const context = { entity: metadata.name, column: property };
  const column = metadata.columns.find((c) => c.propertyPath === property);
  if (!column) {
    throw new ConfigError('@EncryptionTenant() must be on a column (add @Column() beside it)', context);
  }
  if (encryptedDefinition(column.target, column.propertyName)) {
    throw new ConfigError('the tenant column cannot itself be encrypted: queries filter on it', context);
  }
  const type = String(metadata.connection.driver.normalizeType(column)).toLowerCase();
  /* A char(n) tenant prints padded to n: the id given to the tenant API would not be the one bound. */
  if (!keyFormOf(column) || ['char', 'character', 'nchar'].includes(type)) {
    throw new ConfigError(
      `the tenant column's stored form (${type}` +
        `${column.transformer ? ', with a transformer' : ''}) is not one the tenant can be bound in; use a uuid, integer or text column`,
      context,
    );
  }
  return column;
}

/**
 * The tenant id as bound into values (the form the database prints: lower-case UUIDs, integers
 * without leading zeros), `null` for a row without a tenant (a NULL in a nullable tenant column),
 * `undefined` when the object does not say.
 */
export function tenantText(column: ColumnMetadata, value: unknown): string | null | undefined {
  if (value === undefined) return undefined;
  if (value === null) return null;
  const text = (keyFormOf(column) as (v: unknown) => string)(value);
  if (text === '' || text.length > MAX_TENANT_ID_LENGTH) {
    throw new UnsupportedOperationError(`a tenant id must be 1 to ${MAX_TENANT_ID_LENGTH} characters long`, {
      entity: column.entityMetadata.name,
      column: column.propertyPath,
    });
  }
  return text;
}

/** A tenant id given to the tenant API: a non-empty string of at most 200 characters. */
export function checkTenantId(tenantId: unknown): string {
  if (typeof tenantId !== 'string' || tenantId === '' || tenantId.length > MAX_TENANT_ID_LENGTH) {
    throw new ConfigError(`a tenant id must be a string of 1 to ${MAX_TENANT_ID_LENGTH} characters`);
  }
  return tenantId;
}

const INTEGER_RANGES: Record<string, bigint> = {
  int2: 2n ** 15n,
  smallint: 2n ** 15n,
  int: 2n ** 31n,
  int4: 2n ** 31n,
  integer: 2n ** 31n,
  int8: 2n ** 63n,
  bigint: 2n ** 63n,
};
const PRINTED_UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/**
 * `tenantId` (as bound into values) as an SQL parameter compared with the tenant column, or
 * `null` when no row of that column can hold it (an integer column and the tenant `acme`): the
 * comparison then matches nothing instead of failing the statement.
 */
export function tenantParameter(column: ColumnMetadata, tenantId: string): string | null {
  const type = String(column.entityMetadata.connection.driver.normalizeType(column)).toLowerCase();
  const range = INTEGER_RANGES[type];
  if (range !== undefined) {
    if (!/^(0|-?[1-9]\d*)$/.test(tenantId)) return null;
    const value = BigInt(tenantId);
    return value >= -range && value < range ? tenantId : null;
  }
  if (type === 'uuid') return PRINTED_UUID.test(tenantId) ? tenantId : null;
  return tenantId;
}

/**
 * A tenant id given to the tenant API, in the form the rows of `columns` (the DataSource's tenant
 * columns) bind it: lower case for a uuid column, without leading zeros for an integer column, as
 * given for text. The form must be the same for every column that can hold the id; a text column
 * keeps the case of a GUID, so the same GUID in upper case is another tenant there.
 */
export function tenantIdOf(columns: readonly ColumnMetadata[], tenantId: unknown): string {
  const given = checkTenantId(tenantId);
  const forms = new Set<string>();
  for (const column of columns) {
    const form = (keyFormOf(column) as (v: unknown) => string)(given);
    if (tenantParameter(column, form) !== null) forms.add(form);
  }
  if (forms.size > 1) {
    throw new ConfigError(
      `the tenant id is stored differently by this DataSource's tenant columns (${[...forms].map((f) => JSON.stringify(f)).join(', ')}); ` +
        'give it in the one form they all store (lower-case UUIDs, integers without leading zeros)',
    );
  }
  return forms.values().next().value ?? given;
}
