import type { EntityMetadata, EntitySubscriberInterface, InsertEvent, LoadEvent, UpdateEvent } from 'typeorm';
import type { ValueBinding } from '../crypto/associated-data';
import { FLAG_PRIMARY_KEY_BOUND } from '../crypto/associated-data';
import { type ErrorContext, IntegrityError, UnsupportedOperationError, withErrorContext } from '../errors';
import type { FieldEncryptor, SealedValue } from '../field-encryptor';
import { NOT_CACHED } from '../keys/data-key-cache';
import type { EncryptedColumns } from './encrypted-columns';
import { primaryKeyOf } from './primary-key';
import type { LoadedColumns, PropertyStateStore } from './property-state';
import type { SidecarLoader } from './sidecar-loader';

/** Finds the encrypted columns of an entity's metadata. */
export type EncryptedColumnsLookup = (metadata: EntityMetadata) => readonly EncryptedColumns[] | undefined;

/**
 * The TypeORM adapter: encrypts on `beforeInsert` / `beforeUpdate`, decrypts on `afterLoad`.
 * It holds no crypto: sealing and opening are the field encryptor's.
 */
export class EncryptionSubscriber implements EntitySubscriberInterface {
  /** The values each query-builder update's SET map had sealed, to release after the update. */
  readonly #updates = new WeakMap<object, Array<{ column: EncryptedColumns; value: unknown }>>();

  constructor(
    private readonly lookup: EncryptedColumnsLookup,
    private readonly encryptor: FieldEncryptor,
    private readonly store: PropertyStateStore,
    private readonly sidecars: SidecarLoader,
  ) {}

  beforeInsert(event: InsertEvent<object>): Promise<void> | undefined {
    const columns = this.lookup(event.metadata);
    if (!columns || !event.entity) return undefined;
    return this.#sealChanged(event.metadata, columns, event.entity, undefined, 'insert');
  }

  beforeUpdate(event: UpdateEvent<object>): Promise<void> | undefined {
    const columns = this.lookup(event.metadata);
    if (!columns || !event.entity) return undefined;
    /* Without a database copy this is a query-builder update: `entity` is its SET map. */
    const mode = event.databaseEntity ? 'update' : 'set-map';
    return this.#sealChanged(event.metadata, columns, event.entity as object, event.databaseEntity, mode);
  }

  afterUpdate(event: UpdateEvent<object>): void {
    const sealed = event.entity ? this.#updates.get(event.entity as object) : undefined;
    if (!sealed) return;
    for (const { column, value } of sealed) this.store.releaseUpdate(column, value);
    this.#updates.delete(event.entity as object);
  }

  afterLoad(entity: object, event?: LoadEvent<object>): Promise<void> | undefined {
    const metadata = event?.metadata;
    const columns = metadata && this.lookup(metadata);
    if (!columns) return undefined;
    const pending: Promise<void>[] = [];
    for (const column of columns) {
      const opened = this.#openLoaded(metadata, column, entity, event);
      if (opened) pending.push(opened);
    }
    return pending.length ? Promise.all(pending).then(() => undefined) : undefined;
  }

  /**
   * Seals every encrypted property whose value changed. Runs synchronously while the data key is
   * cached (the common case), so a write costs no extra promise per entity.
   */
  #sealChanged(
    metadata: EntityMetadata,
    columns: readonly EncryptedColumns[],
    entity: object,
    databaseEntity: object | undefined,
    mode: 'insert' | 'update' | 'set-map',
  ): Promise<void> | undefined {
    const primaryKey = this.#knownPrimaryKey(metadata, entity, mode);
    const pending: Promise<void>[] = [];
    for (const column of columns) {
      const { propertyName: property, type, bindPrimaryKey } = column.definition;
      const holder = column.holderOf(entity, false);
      const value = holder?.[property];
      if (!holder || value === undefined || value === null) continue;
      if (this.store.currentSealed(holder, property, value)) continue;
      const record = (sealed: SealedValue) => this.#record(entity, column, holder, value, sealed, mode);
      const databaseHolder = databaseEntity && column.holderOf(databaseEntity, false);
      const unchanged = databaseHolder && this.store.currentSealed(databaseHolder, property, value);
      if (unchanged) {
        record(unchanged);
        continue;
      }
      const binding = bindingOf(metadata, column, bindPrimaryKey ? primaryKey : undefined);
      const sealed = this.encryptor.trySeal(value, binding, type);
      if (sealed !== NOT_CACHED) record(sealed);
      else pending.push(this.encryptor.seal(value, binding, type).then(record));
    }
    return pending.length ? Promise.all(pending).then(() => undefined) : undefined;
  }

  #record(
    entity: object,
    column: EncryptedColumns,
    holder: Record<string, unknown>,
    value: unknown,
    sealed: SealedValue,
    mode: 'insert' | 'update' | 'set-map',
  ): void {
    const property = column.definition.propertyName;
    if (mode !== 'set-map') {
      this.store.seal(holder, property, value, sealed);
      /* A written property leaves no plaintext behind in the column it is migrated from. */
      this.store.upsert(holder, property).legacy = undefined;
      return;
    }
    this.store.sealForUpdate(column, value, sealed);
    const recorded = this.#updates.get(entity) ?? [];
    recorded.push({ column, value });
    this.#updates.set(entity, recorded);
  }

  /**
   * A row with no ciphertext may still hold its value in the plaintext column it is being migrated
   * from: read it only when the property allows it, otherwise refuse rather than guess.
   */
  #notYetEncrypted(
    column: EncryptedColumns,
    legacy: unknown,
    metadata: EntityMetadata,
    entity: object,
  ): unknown {
    if (legacy === undefined || legacy === null) return null;
    if (column.definition.plaintext?.fallback) return legacy;
    throw new UnsupportedOperationError(
      'this row holds a plaintext value that is not encrypted yet; run the backfill ' +
        '(typeorm-envelope backfill) or set readPlaintextFallback on the property while it runs',
      loadContext(metadata, column, entity, {}),
    );
  }

  /**
   * The primary key a value can be bound to: known on update; on insert only when no primary
   * column is generated (TypeORM leaves generated keys to the database even when one is given);
   * never for a SET map, which may update many rows.
   */
  #knownPrimaryKey(metadata: EntityMetadata, entity: object, mode: 'insert' | 'update' | 'set-map') {
    if (mode === 'set-map') return undefined;
    if (mode === 'insert' && metadata.primaryColumns.some((c) => c.isGenerated)) return undefined;
    return primaryKeyOf(metadata, entity);
  }

  #openLoaded(
    metadata: EntityMetadata,
    column: EncryptedColumns,
    entity: object,
    event: LoadEvent<object> | undefined,
  ): Promise<void> | undefined {
    const property = column.definition.propertyName;
    const holder = column.holderOf(entity, false);
    const state = holder && this.store.get(holder, property);
    const loaded = state?.loaded;
    if (!holder || !state || !loaded || loaded.ciphertext === undefined) return undefined;
    const { ciphertext, iv, wrappedKey, keyVersion } = loaded;
    if (ciphertext === null) {
      if ((iv ?? null) !== null || (wrappedKey ?? null) !== null || (keyVersion ?? null) !== null) {
        throw new IntegrityError(
          'encrypted value is null but its sidecar columns are not',
          loadContext(metadata, column, entity, loaded),
        );
      }
      state.loaded = undefined;
      holder[property] = this.#notYetEncrypted(column, state.legacy, metadata, entity);
      return undefined;
    }
    if (iv === undefined || wrappedKey === undefined || keyVersion === undefined) {
      /* A partial `select` named the property: fetch its sidecar columns, then decrypt. */
      return this.sidecars
        .load(metadata, column, entity, event?.queryRunner)
        .then(() => this.#openLoaded(metadata, column, entity, undefined));
    }
    if (iv === null || wrappedKey === null || keyVersion === null) {
      throw new IntegrityError(
        'encrypted value is missing a sidecar column',
        loadContext(metadata, column, entity, loaded),
      );
    }
    /* The loaded columns are the sealed value: no copy per row. */
    const sealed = loaded as SealedValue;
    const bound = ((ciphertext[1] ?? 0) & FLAG_PRIMARY_KEY_BOUND) !== 0;
    const primaryKey = bound ? (loaded.primaryKey ?? primaryKeyOf(metadata, entity)) : undefined;
    const binding = bindingOf(metadata, column, primaryKey);
    let opened: unknown;
    try {
      opened = this.encryptor.tryOpen(sealed, binding);
    } catch (error) {
      throw withErrorContext(error, loadContext(metadata, column, entity, loaded));
    }
    if (opened === NOT_CACHED) {
      return this.encryptor.open(sealed, binding).then(
        (value) => this.#recordOpened(holder, property, value, sealed),
        (error: unknown) =>
          Promise.reject(withErrorContext(error, loadContext(metadata, column, entity, loaded))),
      );
    }
    this.#recordOpened(holder, property, opened, sealed);
    return undefined;
  }

  #recordOpened(
    holder: Record<string, unknown>,
    property: string,
    value: unknown,
    sealed: SealedValue,
  ): void {
    holder[property] = value;
    this.store.seal(holder, property, value, sealed);
  }
}

/** Where a loaded value came from, for errors (computed only when one is raised). */
function loadContext(
  metadata: EntityMetadata,
  column: EncryptedColumns,
  entity: object,
  loaded: LoadedColumns,
): ErrorContext {
  return {
    entity: metadata.name,
    column: column.main.propertyPath,
    primaryKey: loaded.primaryKey ?? primaryKeyOf(metadata, entity),
  };
}

/** The place a value is bound to: table, base column name, and the primary key when given. */
function bindingOf(
  metadata: EntityMetadata,
  column: EncryptedColumns,
  primaryKey: string | undefined,
): ValueBinding {
  return { table: metadata.tableName, column: column.main.propertyPath, primaryKey };
}
