import type { EntityMetadata } from 'typeorm';
import type { ColumnMetadata } from 'typeorm/metadata/ColumnMetadata';
import { ConfigError, UnsupportedOperationError } from '../errors';
import type { SealedValue } from '../field-encryptor';
import {
  type EncryptedPropertyDefinition,
  encryptedDefinition,
  SIDECAR_ROLES,
  type SidecarRole,
} from './encrypted-decorator';
import { PENDING_SIDECAR, PendingPlaintext, type PropertyStateStore } from './property-state';

/** The four columns of one encrypted property in one entity's built metadata. */
export interface EncryptedColumns {
  definition: EncryptedPropertyDefinition;
  entity: EntityMetadata;
  /** The ciphertext column; TypeORM knows it by the plaintext property's name and path. */
  main: ColumnMetadata;
  sidecars: Record<SidecarRole, ColumnMetadata>;
  /** The plaintext column being migrated from (`plaintextColumn` option), if any. */
  plaintext?: ColumnMetadata;
  /** The object holding the property: the entity, or an embedded object inside it. */
  holderOf(entity: object, create: boolean): Record<string, unknown> | undefined;
}

/**
 * Finds the encrypted properties in built entity metadata and teaches TypeORM to read and write
 * their columns through `store`: the ciphertext and sidecar columns take their values from the
 * sealed state kept beside each object, never from properties on it.
 */
export function installEncryptedColumns(
  entity: EntityMetadata,
  store: PropertyStateStore,
): EncryptedColumns[] {
  const found: EncryptedColumns[] = [];
  for (const main of entity.columns) {
    const definition = encryptedDefinition(main.target, main.propertyName);
    if (!definition) continue;
    const sidecars = {} as Record<SidecarRole, ColumnMetadata>;
    for (const role of SIDECAR_ROLES) {
      const column = entity.columns.find(
        (c) =>
          c.propertyName === definition.sidecarProperties[role] &&
          c.embeddedMetadata === main.embeddedMetadata,
      );
      if (!column)
        throw new ConfigError('sidecar column is missing', {
          entity: entity.name,
          column: main.propertyPath,
        });
      sidecars[role] = column;
    }
    if (main.embeddedMetadata?.embeddedMetadataTree.some((e) => e.isArray)) {
      throw new ConfigError('@Encrypted() is not supported inside embedded arrays', {
        entity: entity.name,
        column: main.propertyPath,
      });
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
      main,
      sidecars,
      plaintext,
      holderOf: holderFor(main),
    };
    overrideColumnAccess(columns, store);
    found.push(columns);
  }
  if (found.length) overridePropertyPathLookup(entity, found);
  return found;
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

  const partOf = (entity: object | null | undefined, role: 'ciphertext' | SidecarRole): unknown => {
    if (entity === null || entity === undefined) return entity;
    const holder = holderOf(entity, false);
    if (!holder) return undefined;
    const value = holder[property];
    if (value === undefined || value === null) return value;
    if (value instanceof PendingPlaintext) return role === 'ciphertext' ? value : PENDING_SIDECAR;
    /* TypeORM's insert and update value sets copy the ciphertext column's value: follow it back. */
    const origin = store.originOf(value);
    if (origin)
      return role === 'ciphertext' || role === 'iv'
        ? origin.sealed[role]
        : sharedPartSql(origin.sealed, role);
    const sealed = store.currentSealed(holder, property, value) ?? store.sealedForUpdate(columns, value);
    if (sealed) return sealed[role];
    return role === 'ciphertext' ? new PendingPlaintext(value) : PENDING_SIDECAR;
  };

  main.getEntityValue = (entity: object) => partOf(entity, 'ciphertext');
  main.setEntityValue = (entity: object, value: unknown) => {
    const holder = holderOf(entity, true) as Record<string, unknown>;
    const origin = store.originOf(value);
    if (value instanceof PendingPlaintext) {
      holder[property] = value.value; // create()/merge() copying from a plain object
    } else if (origin) {
      holder[property] = origin.value; // a copy of an entity this library sealed or decrypted
      store.seal(holder, property, origin.value, origin.sealed);
    } else {
      /* Hydration: the raw column value, decrypted in `afterLoad`. */
      const state = store.upsert(holder, property);
      state.loaded ??= {};
      state.loaded.ciphertext = value as Buffer | null;
    }
  };
  main.transformer = whereGuard(columns);

  if (columns.plaintext) {
    /* Reads give back what the database holds; once the property is written, the column is NULL. */
    columns.plaintext.getEntityValue = (entity: object) => {
      const holder = entity && holderOf(entity, false);
      if (!holder || holder[property] === undefined) return undefined;
      const legacy = store.get(holder, property)?.legacy;
      return legacy === undefined ? null : legacy;
    };
    columns.plaintext.setEntityValue = (entity: object, value: unknown) => {
      if (value === null || value === undefined || value instanceof PendingPlaintext) return;
      store.upsert(holderOf(entity, true) as object, property).legacy = value;
    };
  }

  for (const role of SIDECAR_ROLES) {
    const column = sidecars[role];
    column.getEntityValue = (entity: object) => partOf(entity, role);
    column.setEntityValue = (entity: object, value: unknown) => {
      if (value === PENDING_SIDECAR || !isRawColumnValue(value)) return;
      const holder = holderOf(entity, true) as Record<string, unknown>;
      const state = store.upsert(holder, property);
      state.loaded ??= {};
      (state.loaded as Record<SidecarRole, unknown>)[role] = value;
    };
  }
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

/** Raw values as the driver returns them: bytes, a key version, or null. */
function isRawColumnValue(value: unknown): boolean {
  return value === null || Buffer.isBuffer(value) || typeof value === 'number';
}

/**
 * TypeORM applies a column's transformer to `where` values. Encrypted values use a random IV, so
 * an equality test against them can never match: refuse instead of returning nothing.
 */
function whereGuard(columns: EncryptedColumns) {
  return {
    to(value: unknown): unknown {
      if (
        value === null ||
        value === undefined ||
        Buffer.isBuffer(value) ||
        value instanceof PendingPlaintext
      ) {
        return value;
      }
      throw new UnsupportedOperationError(
        'an encrypted property cannot be used in a where condition (values are encrypted with random IVs, ' +
          'so the database cannot compare them); load rows by another column and filter in the application',
        { entity: columns.entity.name, column: columns.main.propertyPath },
      );
    },
    from: (value: unknown) => value,
  };
}

/**
 * An update's SET map names the plaintext property; TypeORM then writes the columns this returns
 * for that path, so all four sidecar columns are written together.
 */
function overridePropertyPathLookup(entity: EntityMetadata, found: EncryptedColumns[]): void {
  const byPath = new Map(
    found.map((c) => [
      c.main.propertyPath,
      [c.main, ...SIDECAR_ROLES.map((r) => c.sidecars[r]), ...(c.plaintext ? [c.plaintext] : [])],
    ]),
  );
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
