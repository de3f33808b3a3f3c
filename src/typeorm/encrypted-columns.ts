import type { EntityMetadata } from 'typeorm';
import type { ColumnMetadata } from 'typeorm/metadata/ColumnMetadata';
import { FORMAT_V2 } from '../crypto/compact-value';
import { ConfigError, IntegrityError, UnsupportedOperationError } from '../errors';
import type { SealedValue } from '../field-encryptor';
import {
  type EncryptedPropertyDefinition,
  encryptedDefinition,
  SIDECAR_ROLES,
  type SidecarRole,
  type StorageLayout,
} from './encrypted-decorator';
import { tenantColumnOf } from './encryption-tenant';
import { unbindableKeyColumns } from './primary-key';
import { PENDING_SIDECAR, PendingPlaintext, type PropertyStateStore } from './property-state';
import { formerPaths } from './value-binding';

/** The columns of one encrypted property in one entity's built metadata. */
export interface EncryptedColumns {
  definition: EncryptedPropertyDefinition;
  entity: EntityMetadata;
  /** The layout new values of this property are written in. */
  layout: StorageLayout;
  /** The other layout the column may still hold values of (`migrateFrom`). */
  migrateFrom?: StorageLayout;
  /**
   * The main column: a sidecar value's ciphertext, or a whole compact value. TypeORM knows it by
   * the plaintext property's name and path.
   */
  main: ColumnMetadata;
  /**
   * The sidecar columns, when mapped: always in the sidecar layout, in the compact layout only
   * while migrating from sidecars (`migrateFrom: 'sidecars'`).
   */
  sidecars?: Record<SidecarRole, ColumnMetadata>;
  /** The plaintext column being migrated from (`plaintextColumn` option), if any. */
  plaintext?: ColumnMetadata;
  /** The entity's `@EncryptionTenant()` column, if it has one: values are bound to the row's tenant. */
  tenant?: ColumnMetadata;
  /** The object holding the property: the entity, or an embedded object inside it. */
  holderOf(entity: object, create: boolean): Record<string, unknown> | undefined;
}

/**
 * Finds the encrypted properties in built entity metadata and teaches TypeORM to read and write
 * their columns through `store`: the ciphertext and sidecar columns take their values from the
 * sealed state kept beside each entity, never from properties on it. Refuses, with a
 * `ConfigError`, entity shapes under which a write could not be read back.
 */
export function installEncryptedColumns(
  entity: EntityMetadata,
  store: PropertyStateStore,
): EncryptedColumns[] {
  const found: EncryptedColumns[] = [];
  const tenant = tenantColumnOf(entity);
  for (const main of entity.columns) {
    const definition = encryptedDefinition(main.target, main.propertyName);
    if (!definition) continue;
    const context = { entity: entity.name, column: main.propertyPath };
    let sidecars: Record<SidecarRole, ColumnMetadata> | undefined;
    if (definition.mapsSidecars) {
      sidecars = {} as Record<SidecarRole, ColumnMetadata>;
      for (const role of SIDECAR_ROLES) {
        const column = entity.columns.find(
          (c) =>
            c.propertyName === definition.sidecarProperties[role] &&
            c.embeddedMetadata === main.embeddedMetadata,
        );
        if (!column) throw new ConfigError('sidecar column is missing', context);
        sidecars[role] = column;
      }
    }
    if (main.embeddedMetadata?.embeddedMetadataTree.some((e) => e.isArray)) {
      throw new ConfigError('@Encrypted() is not supported inside embedded arrays', context);
    }
    const plaintext = definition.plaintext
      ? entity.columns.find(
          (c) =>
            c.propertyName === definition.plaintext?.property && c.embeddedMetadata === main.embeddedMetadata,
        )
      : undefined;
    const columns: EncryptedColumns = {
      definition,
      entity,
      layout: definition.layout,
      ...(definition.migrateFrom ? { migrateFrom: definition.migrateFrom } : {}),
      main,
      ...(sidecars ? { sidecars } : {}),
      plaintext,
      tenant,
      holderOf: holderFor(main),
    };
    refuseUnreadableShapes(columns);
    overrideColumnAccess(columns, store);
    found.push(columns);
  }
  if (found.length) overridePropertyPathLookup(entity, found);
  return found;
}

/**
 * Shapes that would accept writes nobody can read back, or that silently do nothing: a primary
 * key whose stored form cannot be known (values are bound to it), a unique constraint on a
 * ciphertext (random IVs make every value distinct), two properties sharing a column name.
 */
function refuseUnreadableShapes(columns: EncryptedColumns): void {
  const { entity, main, sidecars, definition } = columns;
  const context = { entity: entity.name, column: main.propertyPath };
  if (definition.bindPrimaryKey) {
    const [unbindable] = unbindableKeyColumns(entity);
    if (unbindable) {
      throw new ConfigError(
        `values are bound to the primary key, but the stored form of primary-key column ` +
          `"${unbindable.propertyPath}" (${String(entity.connection.driver.normalizeType(unbindable))}` +
          `${unbindable.transformer ? ', with a transformer' : ''}) cannot be known before the write; ` +
          'use a uuid, integer or text key, or set bindPrimaryKey: false on this property',
        context,
      );
    }
  }
  if (definition.bindPrimaryKey) {
    const cascading = entity.relations.find(
      (r) => r.onUpdate === 'CASCADE' && r.joinColumns.some((c) => c.isPrimary),
    );
    if (cascading) {
      throw new ConfigError(
        `relation "${cascading.propertyPath}" updates part of the primary key ON UPDATE CASCADE, which would ` +
          'leave values bound to the old key unreadable; drop onUpdate: CASCADE or set bindPrimaryKey: false',
        context,
      );
    }
  }
  for (const former of formerPaths(columns)) {
    const live = entity.columns.find(
      (c) => c !== main && c.propertyPath === former && encryptedDefinition(c.target, c.propertyName),
    );
    if (live) {
      throw new ConfigError(
        `renamedFrom names "${former}", which is another encrypted property of this entity: its values would ` +
          'decrypt here too',
        context,
      );
    }
  }
  const own = new Set<ColumnMetadata>([main, ...Object.values(sidecars ?? {})]);
  const constraints = [...entity.uniques, ...entity.indices.filter((index) => index.isUnique)];
  if (constraints.some((constraint) => constraint.columns.some((c) => own.has(c)))) {
    throw new ConfigError(
      'a unique constraint on an encrypted property has no effect (every value is encrypted with a ' +
        'random IV, so equal values never look equal); enforce uniqueness on another column',
      context,
    );
  }
  for (const column of own) {
    const clash = entity.columns.find((c) => c !== column && c.databaseName === column.databaseName);
    if (clash) {
      throw new ConfigError(
        `column name "${column.databaseName}" is used twice (by ${main.propertyPath} and ${clash.propertyPath}); ` +
          'give one of them another name',
        context,
      );
    }
  }
}

/**
 * Reads of the ciphertext column return the sealed ciphertext while it still encrypts the current
 * plaintext, and a `PendingPlaintext` once the plaintext changed (so TypeORM's diff sees the
 * change, and a write that skips encryption is refused by the driver). Hydration stores raw column
 * values beside the entity for `afterLoad` to decrypt.
 */
function overrideColumnAccess(columns: EncryptedColumns, store: PropertyStateStore): void {
  const { main, sidecars, holderOf, definition } = columns;
  const property = definition.propertyName;
  const path = main.propertyPath;
  const context = () => ({ entity: columns.entity.name, column: path });

  const partOf = (
    entity: object | null | undefined,
    role: 'ciphertext' | SidecarRole,
    transform?: boolean,
  ) => {
    if (entity === null || entity === undefined) return entity;
    const holder = holderOf(entity, false);
    if (!holder) return undefined;
    const value = holder[property];
    if (value === undefined) {
      /* A value set naming a sidecar without its ciphertext would write part of a value. */
      if (role !== 'ciphertext' && Object.hasOwn(holder, definition.sidecarProperties[role])) {
        throw new UnsupportedOperationError(PARTIAL_WRITE, context());
      }
      return undefined;
    }
    if (value === null) return null;
    if (value instanceof PendingPlaintext) return role === 'ciphertext' ? value : PENDING_SIDECAR;
    /* TypeORM's insert and update value sets copy the ciphertext column's value: follow it back. */
    const origin = store.originOf(value);
    if (origin) return sealedPart(origin.sealed, role, true);
    const sealed = store.currentSealed(entity, path, value);
    if (sealed) {
      /* The ciphertext handed to TypeORM leads back to its plaintext when TypeORM copies it. */
      if (role === 'ciphertext') store.markOnce(value, sealed);
      return sealedPart(sealed, role, false);
    }
    /* Only where conditions ask for a transformed value of an object the library never saw. */
    if (transform === true && !store.get(entity, path)) {
      if (isNullTest(value)) return value; // null-ness is not encrypted: IsNull() and Not(IsNull())
      throw whereRefusal(columns);
    }
    return role === 'ciphertext' ? new PendingPlaintext(value, context()) : PENDING_SIDECAR;
  };

  main.getEntityValue = (entity: object, transform?: boolean) => partOf(entity, 'ciphertext', transform);
  main.setEntityValue = (entity: object, value: unknown) => {
    const holder = holderOf(entity, true) as Record<string, unknown>;
    const origin = store.originOf(value);
    if (value instanceof PendingPlaintext) {
      holder[property] = value.value; // create()/merge() copying from a plain object
    } else if (origin) {
      /* A copy of an entity this library sealed or decrypted: the plaintext, never its sealed state. */
      holder[property] = origin.value;
    } else {
      /* Hydration: the raw column value, decrypted in `afterLoad`. */
      const state = store.upsert(entity, path);
      state.sealed = undefined;
      state.loaded = { ciphertext: rawBytes(value, columns, 'ciphertext') };
      /* A null is also what create()/merge() copy from a plain object, and no afterLoad follows
         them: the property takes it now (after a read, afterLoad decides again). */
      if (value === null) holder[property] = null;
    }
  };
  main.transformer = whereGuard(columns, store);

  if (columns.plaintext) {
    /* Reads give back what the database holds; once the property is written, the column is NULL. */
    columns.plaintext.getEntityValue = (entity: object) => {
      const holder = entity && holderOf(entity, false);
      if (!holder || holder[property] === undefined) return undefined;
      const legacy = store.get(entity, path)?.legacy;
      return legacy === undefined ? null : legacy;
    };
    columns.plaintext.setEntityValue = (entity: object, value: unknown) => {
      if (value === null || value === undefined || value instanceof PendingPlaintext) return;
      holderOf(entity, true);
      store.upsert(entity, path).legacy = value;
    };
  }

  for (const role of sidecars ? SIDECAR_ROLES : []) {
    const column = (sidecars as Record<SidecarRole, ColumnMetadata>)[role];
    column.getEntityValue = (entity: object, transform?: boolean) => partOf(entity, role, transform);
    column.setEntityValue = (entity: object, value: unknown) => {
      if (value === PENDING_SIDECAR || value === undefined || typeof value === 'function') return;
      holderOf(entity, true);
      const state = store.upsert(entity, path);
      state.loaded ??= {};
      const loaded = state.loaded as Record<SidecarRole, unknown>;
      loaded[role] =
        role === 'keyVersion' ? (value === null ? null : Number(value)) : rawBytes(value, columns, role);
    };
  }
}

/**
 * What a column of the value holds for `sealed`: a compact value is all in the main column (its
 * sidecar columns, where still mapped, are NULL); a sidecar value's wrapped key and key version
 * are given as SQL literals in TypeORM's value sets (`sql`).
 */
function sealedPart(sealed: SealedValue, role: 'ciphertext' | SidecarRole, sql: boolean): unknown {
  if (role === 'ciphertext') return sealed.ciphertext;
  if (isCompact(sealed)) return null;
  if (role === 'iv' || !sql) return sealed[role];
  return sharedPartSql(sealed, role);
}

/** Whether a sealed value is a compact one (format 2): its first byte says. */
export function isCompact(sealed: SealedValue): boolean {
  return sealed.ciphertext[0] === FORMAT_V2;
}

/** The sidecar columns of a property, where mapped (none for a compact property not migrating). */
export function sidecarColumnsOf(columns: EncryptedColumns): ColumnMetadata[] {
  const { sidecars } = columns;
  return sidecars ? SIDECAR_ROLES.map((role) => sidecars[role]) : [];
}

/**
 * Every column one value of the property is written to: the main column, the sidecar columns where
 * mapped, the plaintext column being migrated from. A write names all of them or none.
 */
export function storedColumnsOf(columns: EncryptedColumns): ColumnMetadata[] {
  return [columns.main, ...sidecarColumnsOf(columns), ...(columns.plaintext ? [columns.plaintext] : [])];
}

const PARTIAL_WRITE =
  'a write would change only some of the columns of an encrypted value, which would make the row ' +
  'unreadable; it was refused';

/** `IsNull()` or `Not(IsNull())`. */
function isNullTest(value: unknown): boolean {
  const operator = value as { '@instanceof'?: symbol; type?: string; child?: unknown; value?: unknown };
  if (operator?.['@instanceof'] !== Symbol.for('FindOperator')) return false;
  if (operator.type === 'isNull') return true;
  return operator.type === 'not' && isNullTest(operator.child ?? operator.value);
}

function whereRefusal(columns: EncryptedColumns): UnsupportedOperationError {
  return new UnsupportedOperationError(
    'an encrypted property cannot be used in a where condition (values are encrypted with random IVs, ' +
      'so the database cannot compare them); load rows by another column and filter in the application',
    { entity: columns.entity.name, column: columns.main.propertyPath },
  );
}

/**
 * Column bytes as read: a `Buffer` from `pg`, a `Uint8Array` from other drivers, or the JSON form
 * of a `Buffer` (`{ type: 'Buffer', data }`) from TypeORM's query result cache.
 */
function rawBytes(value: unknown, columns: EncryptedColumns, role: string): Buffer | null {
  if (value === null || Buffer.isBuffer(value)) return value as Buffer | null;
  if (value instanceof Uint8Array) return Buffer.from(value.buffer, value.byteOffset, value.byteLength);
  const json = value as { type?: unknown; data?: unknown };
  if (json && typeof json === 'object' && json.type === 'Buffer' && Array.isArray(json.data)) {
    return Buffer.from(json.data as number[]);
  }
  throw new IntegrityError(`the ${role} column holds a value that is not bytes`, {
    entity: columns.entity.name,
    column: columns.main.propertyPath,
  });
}

const wrappedKeyLiterals = new WeakMap<Buffer, () => string>();

/**
 * The wrapped key and key version are the same for every value sealed under one data key. In the
 * value sets TypeORM builds for INSERT and UPDATE they are given as SQL literals (TypeORM inlines a
 * function's result) instead of one bound parameter per row: TypeORM's cost grows with the number
 * of parameters. Both are built only from bytes and an integer this library produced.
 */
function sharedPartSql(sealed: SealedValue, role: 'wrappedKey' | 'keyVersion'): () => string {
  if (role === 'keyVersion') {
    const version = sealed.keyVersion;
    if (!Number.isSafeInteger(version)) throw new ConfigError('key version must be an integer');
    return () => String(version);
  }
  let literal = wrappedKeyLiterals.get(sealed.wrappedKey);
  if (!literal) {
    const sql = `decode('${sealed.wrappedKey.toString('hex')}', 'hex')`;
    literal = () => sql;
    wrappedKeyLiterals.set(sealed.wrappedKey, literal);
  }
  return literal;
}

/**
 * TypeORM applies a column's transformer to `find` conditions, and also to the values its diff
 * compares and its queries write. Those are sealed values or pending plaintext; anything else is
 * a condition on an encrypted property, which could never match (random IVs): refuse it.
 */
function whereGuard(columns: EncryptedColumns, store: PropertyStateStore) {
  return {
    to(value: unknown): unknown {
      if (value === null || value === undefined || value instanceof PendingPlaintext) return value;
      if (store.originOf(value)) return value;
      throw whereRefusal(columns);
    },
    from: (value: unknown) => value,
  };
}

/**
 * An update's SET map names the plaintext property; TypeORM then writes the columns this returns
 * for that path, so all four sidecar columns are written together.
 */
function overridePropertyPathLookup(entity: EntityMetadata, found: EncryptedColumns[]): void {
  const byPath = new Map(found.map((c) => [c.main.propertyPath, storedColumnsOf(c)]));
  const original = entity.findColumnsWithPropertyPath.bind(entity);
  entity.findColumnsWithPropertyPath = (propertyPath: string) =>
    byPath.get(propertyPath) ?? original(propertyPath);
}

function holderFor(column: ColumnMetadata): EncryptedColumns['holderOf'] {
  const path = column.embeddedMetadata?.embeddedMetadataTree ?? [];
  if (path.length === 0) return (entity) => entity as Record<string, unknown>;
  return (entity, create) => {
    let holder = entity as Record<string, unknown>;
    for (const embedded of path) {
      let next = holder[embedded.propertyName];
      if (next === undefined || next === null) {
        if (!create) return undefined;
        next = holder[embedded.propertyName] = embedded.create();
      }
      holder = next as Record<string, unknown>;
    }
    return holder;
  };
}
