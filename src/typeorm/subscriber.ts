import type {
  EntityMetadata,
  EntitySubscriberInterface,
  InsertEvent,
  LoadEvent,
  ObjectLiteral,
  QueryRunner,
  UpdateEvent,
} from 'typeorm';
import type { ValueBinding } from '../crypto/associated-data';
import { FLAG_PRIMARY_KEY_BOUND } from '../crypto/associated-data';
import { compactDataKeyId, FORMAT_V2, parseCompact } from '../crypto/compact-value';
import {
  type ErrorContext,
  IntegrityError,
  UnsupportedOperationError,
  ValueTypeError,
  withErrorContext,
} from '../errors';
import {
  compactSealedValue,
  type DataKeyRecord,
  type FieldEncryptor,
  type SealedValue,
} from '../field-encryptor';
import { NOT_CACHED } from '../keys/data-key-cache';
import type { DataKeyTable } from './data-key-table';
import type { EncryptedColumns } from './encrypted-columns';
import { tenantText } from './encryption-tenant';
import { legacyValue } from './legacy-value';
import { primaryKeyOf } from './primary-key';
import type { LoadedColumns, PropertyState, PropertyStateStore } from './property-state';
import { setMapOf } from './query-guards';
import type { SidecarLoader } from './sidecar-loader';
import { LoadBatch, ReadyValues, SealBatch, type SealRequests } from './turn-batches';
import { valueBinding } from './value-binding';

/** Finds the encrypted columns of an entity's metadata. */
export type EncryptedColumnsLookup = (metadata: EntityMetadata) => readonly EncryptedColumns[] | undefined;

/**
 * The TypeORM adapter: encrypts on `beforeInsert` / `beforeUpdate`, decrypts on `afterLoad`.
 * It holds no crypto: sealing and opening are the field encryptor's.
 *
 * What a write stores is decided from what the write can see, never from state remembered on the
 * caller's objects, which applications copy, re-key and keep across rotations:
 * - an insert seals every value anew, for the row's place (table, property, primary key);
 * - an update keeps a value only when the database copy TypeORM loaded for it (the row as it is
 *   now) holds the same plaintext, and then keeps exactly the stored columns; otherwise it seals;
 * - a query-builder update (a SET map) seals every value it names.
 */
export class EncryptionSubscriber implements EntitySubscriberInterface {
  /** Decryptions under way, so that entity listeners and this subscriber share one per entity. */
  readonly #opening = new WeakMap<object, Promise<void>>();
  /** The entities loaded in this turn of the event loop, decrypted together once it is over. */
  #batch: LoadBatch | undefined;
  /** The values written in this turn of the event loop, sealed together once it is over. */
  #sealing: SealBatch | undefined;
  /** The application's subscribers whose `afterLoad` waits for the decryption (see below). */
  readonly #waiting = new WeakSet<EntitySubscriberInterface>();

  constructor(
    private readonly lookup: EncryptedColumnsLookup,
    private readonly encryptor: FieldEncryptor,
    private readonly store: PropertyStateStore,
    private readonly sidecars: SidecarLoader,
    private readonly dataKeys: DataKeyTable,
  ) {}

  beforeInsert(event: InsertEvent<object>): Promise<void> | undefined {
    const columns = this.lookup(event.metadata);
    if (!columns || !event.entity) return undefined;
    const entity = event.entity;
    const primaryKey = event.metadata.primaryColumns.some((c) => c.isGenerated)
      ? undefined // TypeORM leaves generated keys to the database, even when one is given
      : primaryKeyOf(event.metadata, entity);
    return this.#afterLaterSubscribers(event, 'beforeInsert', () =>
      this.#seal(event.metadata, columns, entity, undefined, primaryKey, false, tenantOf(columns, entity)),
    );
  }

  beforeUpdate(event: UpdateEvent<object>): Promise<void> | undefined {
    const columns = this.lookup(event.metadata);
    if (!columns || !event.entity) return undefined;
    const entity = event.entity as object;
    const databaseEntity = event.databaseEntity;
    if (databaseEntity) {
      const primaryKey = primaryKeyOf(event.metadata, databaseEntity);
      const before = tenantOf(columns, databaseEntity);
      const given = tenantOf(columns, entity);
      const tenant = given === undefined ? before : given;
      /* A row moved to another tenant has all its values sealed anew for that tenant. */
      const moved = tenant !== before;
      if (moved) refuseIncompleteMove(event.metadata, columns, entity);
      return this.#afterLaterSubscribers(event, 'beforeUpdate', () =>
        this.#seal(
          event.metadata,
          columns,
          entity,
          moved ? undefined : databaseEntity,
          primaryKey,
          false,
          tenant,
        ),
      );
    }
    /* Without a database copy this is a query-builder update: `entity` is its SET map. */
    refuseKeyChange(event.metadata, columns, entity);
    const setMap = setMapOf(entity);
    const writesValues = columns.some((c) => definedIn(c, entity));
    if (!setMap) {
      if (!writesValues) return undefined;
      throw new UnsupportedOperationError(
        'an update of encrypted properties must name its entity before its values ' +
          '(createQueryBuilder().update(Entity).set(values))',
        { entity: event.metadata.name },
      );
    }
    const tenant = tenantOf(columns, entity);
    const tenantColumn = columns[0]?.tenant;
    if (tenantColumn && writesValues) {
      if (tenant === undefined) {
        throw new UnsupportedOperationError(
          `an update of encrypted properties must name the tenant in its values (set({ ${tenantColumn.propertyPath}, … })): ` +
            'the values are sealed for that tenant, and only its rows are updated',
          { entity: event.metadata.name },
        );
      }
      setMap.restrictTo(tenantColumn, tenantColumn.getEntityValue(entity));
    } else if (tenantColumn && tenant !== undefined) {
      throw new UnsupportedOperationError(
        `changing the tenant column "${tenantColumn.propertyPath}" in a query-builder update would leave the rows' ` +
          'encrypted values bound to their old tenant, unreadable; save the loaded entity instead',
        { entity: event.metadata.name },
      );
    }
    return this.#afterLaterSubscribers(event, 'beforeUpdate', () =>
      this.#seal(event.metadata, columns, entity, undefined, setMap.primaryKey(), true, tenant),
    );
  }

  /**
   * Subscribers registered after this one (for example pushed onto `dataSource.subscribers` after
   * `initialize()`) run after it and may still change a value, such as normalising an email:
   * sealing then waits one microtask, after their synchronous changes.
   */
  #afterLaterSubscribers(
    event: InsertEvent<object> | UpdateEvent<object>,
    hook: 'beforeInsert' | 'beforeUpdate',
    seal: () => Promise<void> | undefined,
  ): Promise<void> | undefined {
    const subscribers = event.connection.subscribers;
    for (let i = subscribers.indexOf(this) + 1; i < subscribers.length; i++) {
      if (typeof subscribers[i]?.[hook] === 'function') return Promise.resolve().then(seal);
    }
    return seal();
  }

  afterLoad(entity: object, event?: LoadEvent<object>): Promise<void> | undefined {
    const metadata = event?.metadata;
    const columns = metadata && this.lookup(metadata);
    if (!columns) return undefined;
    /* Once per turn: subscribers added since (after initialize()) also get to see plaintext. */
    if (!this.#batch && event?.connection) this.openBeforeSubscribers(event.connection.subscribers);
    return this.open(metadata, columns, entity, event?.queryRunner);
  }

  /**
   * The application's own subscribers see loaded entities decrypted, as entity listeners do: the
   * `afterLoad` of each other subscriber is made to wait for the decryption of its entity. TypeORM
   * calls the subscribers of the DataSource options before this one and those added later after
   * it, each for a whole result set; either way the wait is one microtask, by which time this
   * subscriber's `afterLoad` (which has the query runner) has started the decryption (see
   * {@link #afterOpening}).
   */
  openBeforeSubscribers(subscribers: readonly EntitySubscriberInterface[]): void {
    for (const subscriber of subscribers) {
      if (subscriber === this || this.#waiting.has(subscriber)) continue;
      this.#waiting.add(subscriber);
      const afterLoad = subscriber.afterLoad;
      if (typeof afterLoad !== 'function') continue;
      const waiting = (entity: object, event: LoadEvent<object>) => {
        const metadata = event?.metadata;
        const columns = metadata && this.lookup(metadata);
        const run = () => afterLoad.call(subscriber, entity, event);
        return columns ? this.#afterOpening(metadata, columns, entity, event.queryRunner, run) : run();
      };
      try {
        subscriber.afterLoad = waiting;
      } catch {
        /* A frozen subscriber keeps its own afterLoad: it sees properties before decryption. */
      }
    }
  }

  /**
   * TypeORM runs an entity's own `@AfterLoad()` listeners before subscribers: each listener of
   * `metadata` is made to wait for the decryption, so it sees plaintext. TypeORM calls this
   * subscriber's `afterLoad` in the same synchronous pass, right after the listeners (see
   * {@link #afterOpening}).
   */
  openBeforeListeners(metadata: EntityMetadata, columns: readonly EncryptedColumns[]): void {
    for (const listener of metadata.afterLoadListeners) {
      const execute = listener.execute.bind(listener);
      listener.execute = (entity: ObjectLiteral) =>
        this.#afterOpening(metadata, columns, entity, undefined, () => execute(entity));
    }
  }

  /**
   * Runs `then` once `entity` is decrypted, for a listener or another subscriber: one microtask
   * later, by which time this subscriber's `afterLoad` has started the decryption with the query
   * runner (a partial select inside a transaction reads its sidecars there), and joins it; at once
   * when the entity has nothing to decrypt.
   */
  #afterOpening<T>(
    metadata: EntityMetadata,
    columns: readonly EncryptedColumns[],
    entity: object,
    queryRunner: QueryRunner | undefined,
    then: () => T,
  ): T | Promise<T> {
    if (!this.#opening.has(entity) && !this.store.hasLoaded(entity)) return then();
    return Promise.resolve()
      .then(() => this.open(metadata, columns, entity, queryRunner))
      .then(then);
  }

  /**
   * Decrypts what a read loaded into `entity`, once: entity `@AfterLoad()` listeners (which
   * TypeORM runs before subscribers) wait for the same decryption. The entities loaded in one turn
   * of the event loop (a result set: TypeORM starts every `afterLoad` before awaiting any) are
   * decrypted together once that turn is over, with one AES-GCM call per data key.
   */
  open(
    metadata: EntityMetadata,
    columns: readonly EncryptedColumns[],
    entity: object,
    queryRunner?: QueryRunner,
  ): Promise<void> | undefined {
    const running = this.#opening.get(entity);
    if (running) return running;
    if (!this.store.hasLoaded(entity)) return undefined;
    let batch = this.#batch;
    if (!batch) {
      const started = new LoadBatch();
      this.#batch = batch = started;
      queueMicrotask(() => this.#flush(started));
    }
    const opening = batch.add(metadata, columns, entity, queryRunner);
    this.#opening.set(entity, opening);
    return opening;
  }

  /**
   * Decrypts a batch: the values whose data key is at hand in one call per data key, the others
   * once their key or key row is had (see {@link #openReady}); a partial select to complete goes
   * its own way. An entity stays joinable (`#opening`) until the whole batch has settled.
   */
  #flush(batch: LoadBatch): void {
    if (this.#batch === batch) this.#batch = undefined;
    const ready = new ReadyValues(true);
    const pending: Promise<unknown>[] = [];
    for (let owner = 0; owner < batch.size; owner++) {
      for (const column of batch.columns[owner] as readonly EncryptedColumns[]) {
        this.#prepare(batch, owner, column, ready, pending);
      }
    }
    this.#openReady(batch, ready, pending);
    batch.outcomes.finish(pending);
    void batch.outcomes.settled.then(() => {
      for (const entity of batch.entities) this.#opening.delete(entity);
    });
  }

  /** Adds `column`'s loaded value of the batch's entity `owner` to `ready`, or starts its own way. */
  #prepare(
    batch: LoadBatch,
    owner: number,
    column: EncryptedColumns,
    ready: ReadyValues,
    pending: Promise<unknown>[],
  ): void {
    const entity = batch.entities[owner] as object;
    try {
      const opening = this.#openLoaded(
        batch.metadatas[owner] as EntityMetadata,
        column,
        entity,
        batch.queryRunners[owner],
        false,
        ready,
        owner,
      );
      if (opening) pending.push(opening.catch((error: unknown) => batch.outcomes.fail(entity, error)));
    } catch (error) {
      batch.outcomes.fail(entity, error);
    }
  }

  /**
   * Opens the batch's values whose key is at hand in one call per data key. A data key that is not
   * cached is unwrapped once and its values opened while it is held; the compact values whose key
   * row is not held wait for one read of the rows, then join a second round.
   */
  #openReady(batch: LoadBatch, ready: ReadyValues, pending: Promise<unknown>[]): void {
    if (ready.size) {
      const { values, failures } = this.encryptor.tryOpenMany(ready.sealed, ready.bindings);
      const cold: number[] = [];
      for (let i = 0; i < ready.size; i++) {
        if (failures[i] === undefined && values[i] === NOT_CACHED) cold.push(i);
        else this.#settleReady(batch, ready, i, values[i], failures[i], pending);
      }
      if (cold.length) {
        const opening = this.encryptor
          .openMany(
            cold.map((i) => ready.sealed[i] as SealedValue),
            cold.map((i) => ready.bindings[i] as ValueBinding),
          )
          .then(({ values: opened, failures: failed }) => {
            const more: Promise<unknown>[] = [];
            cold.forEach((i, j) => {
              this.#settleReady(batch, ready, i, opened[j], failed[j], more);
            });
            return Promise.all(more);
          });
        pending.push(
          opening.catch((error: unknown) => {
            for (const i of cold)
              batch.outcomes.fail(batch.entities[ready.owners[i] as number] as object, error);
          }),
        );
      }
    }
    const awaiting = ready.awaitingRows;
    if (awaiting?.size) {
      /* One read of the key rows for all of them (the data-key table reads them in one query). */
      const rows = [...awaiting.keys()].map((id) => this.dataKeys.resolve(id).catch(() => undefined));
      pending.push(
        Promise.all(rows).then(() => {
          const again = new ReadyValues(false);
          const more: Promise<unknown>[] = [];
          for (const waiting of awaiting.values()) {
            for (const [owner, column] of waiting) this.#prepare(batch, owner, column, again, more);
          }
          this.#openReady(batch, again, more);
          return Promise.allSettled(more);
        }),
      );
    }
  }

  /** Records value `i` of `ready` once opened, or its failure (a compact value tries its key row anew). */
  #settleReady(
    batch: LoadBatch,
    ready: ReadyValues,
    i: number,
    value: unknown,
    failure: unknown,
    pending: Promise<unknown>[],
  ): void {
    const owner = ready.owners[i] as number;
    const entity = batch.entities[owner] as object;
    const column = ready.columns[i] as EncryptedColumns;
    const holder = ready.holders[i] as Record<string, unknown>;
    const sealed = ready.sealed[i] as SealedValue;
    if (failure === undefined) {
      holder[column.definition.propertyName] = value;
      this.store.sealState(ready.states[i] as PropertyState, value, sealed);
      return;
    }
    const metadata = batch.metadatas[owner] as EntityMetadata;
    const loaded = ready.loaded[i] as LoadedColumns;
    const record = ready.records[i];
    if (!record) {
      batch.outcomes.fail(entity, withErrorContext(failure, loadContext(metadata, column, entity, loaded)));
      return;
    }
    /* A compact value: with the data-key row as it is now, when the one held no longer serves. */
    const args = [
      sealed.ciphertext,
      record.id,
      ready.bindings[i] as ValueBinding,
      loaded,
      metadata,
      column,
      entity,
      holder,
    ] as const;
    pending.push(
      this.#openAgain(failure, record, args).catch((error: unknown) => batch.outcomes.fail(entity, error)),
    );
  }

  /**
   * Seals the encrypted properties a write names: a value the row already holds is kept as
   * stored; the others join the turn's batch (see {@link #sealAll}). Checks that need no key run
   * at once, so a misuse fails before anything is sealed.
   */
  #seal(
    metadata: EntityMetadata,
    columns: readonly EncryptedColumns[],
    entity: object,
    databaseEntity: object | undefined,
    primaryKey: string | undefined,
    setMap: boolean,
    tenant: string | null | undefined,
  ): Promise<void> | undefined {
    let batch: SealBatch | undefined;
    for (const column of columns) {
      const { propertyName: property, type, bindPrimaryKey } = column.definition;
      const path = column.main.propertyPath;
      const holder = column.holderOf(entity, false);
      const value = holder?.[property];
      if (!holder || value === undefined) continue;
      if (Object.hasOwn(holder, column.definition.sidecarProperties.iv)) {
        /* Only TypeORM's own column access, on a DataSource without this library, puts them there. */
        throw new UnsupportedOperationError(
          'this object was loaded through a DataSource without encryption attached, so it holds ciphertext, ' +
            'not plaintext; load it through a DataSource with encryption attached before saving it',
          { entity: metadata.name, column: path },
        );
      }
      if (value === null) {
        if (column.definition.nullable) continue;
        throw new ValueTypeError('null is not allowed: the encrypted property is not nullable', {
          entity: metadata.name,
          column: path,
        });
      }
      const record = (sealed: SealedValue) => {
        if (setMap) {
          /* The SET map is the library's own copy of the caller's (see query-guards). */
          this.store.mark(value, sealed);
          holder[property] = sealed.ciphertext;
          return;
        }
        this.store.seal(entity, path, value, sealed);
        /* A written property leaves no plaintext behind in the column it is migrated from. */
        this.store.upsert(entity, path).legacy = undefined;
      };
      const stored = databaseEntity && this.store.currentSealed(databaseEntity, path, value);
      if (stored) {
        record(stored);
        continue;
      }
      if (column.tenant && tenant === undefined) {
        throw new UnsupportedOperationError(
          `the tenant property "${column.tenant.propertyPath}" must be set before encrypted values are written: ` +
            "each value is sealed for its row's tenant",
          { entity: metadata.name, column: path },
        );
      }
      const binding = valueBinding(metadata, column, bindPrimaryKey ? primaryKey : undefined, tenant);
      const failed = (error: unknown): never => {
        throw withErrorContext(error, { entity: metadata.name, column: path });
      };
      if (!batch) batch = this.#sealBatch();
      (column.layout === 'compact' ? batch.compact : batch.sidecars).add(
        entity,
        value,
        binding,
        type,
        record,
        failed,
      );
    }
    return batch?.outcomes.promiseFor(entity);
  }

  /** The batch the values written in this turn join; sealed once the turn is over. */
  #sealBatch(): SealBatch {
    let batch = this.#sealing;
    if (!batch) {
      const started = new SealBatch();
      this.#sealing = batch = started;
      queueMicrotask(() => this.#sealAll(started));
    }
    return batch;
  }

  /**
   * Seals a turn's values: those whose data key is cached in one call per data key; the others
   * once a data key is generated. A compact value is recorded only once its data key's row is
   * committed (see DataKeyTable).
   */
  #sealAll(batch: SealBatch): void {
    if (this.#sealing === batch) this.#sealing = undefined;
    const pending: Promise<unknown>[] = [];
    this.#sealRequests(batch, batch.sidecars, undefined, pending);
    this.#sealRequests(batch, batch.compact, this.dataKeys, pending);
    batch.outcomes.finish(pending);
  }

  #sealRequests(
    batch: SealBatch,
    requests: SealRequests,
    registrar: DataKeyTable | undefined,
    pending: Promise<unknown>[],
  ): void {
    if (!requests.size) return;
    const { sealed, failures } = this.encryptor.trySealMany(
      requests.values,
      requests.bindings,
      requests.declared,
      registrar,
    );
    for (let i = 0; i < requests.size; i++) {
      const entity = requests.entities[i] as object;
      const record = requests.records[i] as (sealed: SealedValue) => void;
      const failed = requests.failures[i] as (error: unknown) => never;
      let result = sealed[i];
      try {
        if (failures[i] !== undefined) failed(failures[i]);
        if (result === NOT_CACHED) {
          const value = requests.values[i];
          const binding = requests.bindings[i] as ValueBinding;
          result = registrar
            ? this.encryptor.sealCompact(value, binding, requests.declared[i], registrar)
            : this.encryptor.seal(value, binding, requests.declared[i]);
        }
        if (result instanceof Promise) {
          pending.push(
            result.then(record, failed).catch((error: unknown) => batch.outcomes.fail(entity, error)),
          );
        } else if (result !== undefined) {
          record(result);
        }
      } catch (error) {
        batch.outcomes.fail(entity, error);
      }
    }
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
    if (column.definition.plaintext?.fallback) return legacyValue(legacy, column.definition.type);
    throw new UnsupportedOperationError(
      'this row holds a plaintext value that is not encrypted yet; run the backfill ' +
        '(typeorm-envelope backfill) or set readPlaintextFallback on the property while it runs',
      loadContext(metadata, column, entity, {}),
    );
  }

  /**
   * Opens what was loaded for `column`. With `ready`, a value whose data key is at hand is added
   * to it instead, to be opened with the rest of the batch.
   */
  #openLoaded(
    metadata: EntityMetadata,
    column: EncryptedColumns,
    entity: object,
    queryRunner: QueryRunner | undefined,
    refetched = false,
    ready?: ReadyValues,
    owner = 0,
  ): Promise<void> | undefined {
    const property = column.definition.propertyName;
    const path = column.main.propertyPath;
    const holder = column.holderOf(entity, false);
    const state = this.store.get(entity, path);
    const loaded = state?.loaded;
    if (!holder || !state || !loaded || loaded.ciphertext === undefined) return undefined;
    const { ciphertext, iv, wrappedKey, keyVersion } = loaded;
    const tenant = loaded.tenant !== undefined ? loaded.tenant : tenantOf([column], entity);
    const sidecarsMissing =
      column.sidecars !== undefined &&
      (iv === undefined || wrappedKey === undefined || keyVersion === undefined);
    /* A value bound to its row's key cannot be opened without it (a partial select may leave it out). */
    const keyMissing =
      !!ciphertext &&
      ((ciphertext[1] ?? 0) & FLAG_PRIMARY_KEY_BOUND) !== 0 &&
      loaded.primaryKey === undefined &&
      primaryKeyOf(metadata, entity) === undefined;
    if (!refetched && (sidecarsMissing || tenant === undefined || keyMissing)) {
      /* A partial `select` named the property: fetch its other columns (and the row's tenant and key), then decrypt. */
      return this.sidecars
        .load(metadata, column, entity, queryRunner)
        .then(() => this.#openLoaded(metadata, column, entity, undefined, true));
    }
    if (ciphertext === null) {
      if ((iv ?? null) !== null || (wrappedKey ?? null) !== null || (keyVersion ?? null) !== null) {
        throw new IntegrityError(
          'encrypted value is null but its sidecar columns are not',
          loadContext(metadata, column, entity, loaded),
        );
      }
      state.loaded = undefined;
      const value = this.#notYetEncrypted(column, state.legacy, metadata, entity);
      if (value === null && !column.definition.nullable) {
        throw new IntegrityError(
          'a non-nullable encrypted property is NULL in the database',
          loadContext(metadata, column, entity, loaded),
        );
      }
      holder[property] = value;
      return undefined;
    }
    if (tenant === undefined) {
      throw new IntegrityError(
        'the row of this value could not be read again to learn its tenant',
        loadContext(metadata, column, entity, loaded),
      );
    }
    if (ciphertext[0] === FORMAT_V2)
      return this.#openCompact(metadata, column, entity, holder, loaded, tenant, ready, owner, state);
    if (!column.sidecars) {
      throw new IntegrityError(
        ciphertext[0] === 1
          ? "a sidecar-layout value is in a compact column whose sidecar columns are not mapped (declare migrateFrom: 'sidecars' until the table is migrated)"
          : 'ciphertext has an unknown format',
        loadContext(metadata, column, entity, loaded),
      );
    }
    if ((iv ?? null) === null || (wrappedKey ?? null) === null || (keyVersion ?? null) === null) {
      throw new IntegrityError(
        'encrypted value is missing a sidecar column',
        loadContext(metadata, column, entity, loaded),
      );
    }
    /* The loaded columns are the sealed value: no copy per row. */
    const sealed = loaded as SealedValue;
    const bound = ((ciphertext[1] ?? 0) & FLAG_PRIMARY_KEY_BOUND) !== 0;
    const primaryKey = bound ? (loaded.primaryKey ?? primaryKeyOf(metadata, entity)) : undefined;
    const binding = valueBinding(metadata, column, primaryKey, tenant);
    if (ready) {
      ready.add(owner, column, holder, state, loaded, sealed, binding, undefined);
      return undefined;
    }
    let opened: unknown;
    try {
      opened = this.encryptor.tryOpen(sealed, binding);
    } catch (error) {
      throw withErrorContext(error, loadContext(metadata, column, entity, loaded));
    }
    if (opened === NOT_CACHED) {
      return this.encryptor.open(sealed, binding).then(
        (value) => this.#recordOpened(entity, column, holder, value, sealed),
        (error: unknown) =>
          Promise.reject(withErrorContext(error, loadContext(metadata, column, entity, loaded))),
      );
    }
    this.#recordOpened(entity, column, holder, opened, sealed);
    return undefined;
  }

  /**
   * Opens a compact value: its data key's row comes from this instance's copy when it holds one,
   * else from the data-key table, read with every other id the result set needs (one query). A
   * missing row, or one of another keyring or tenant, is an `IntegrityError` naming the data-key id,
   * raised before any key is used. A value that fails to open with a copy held from an earlier
   * read is tried once more with the row as it is now (another instance may have re-wrapped it).
   */
  #openCompact(
    metadata: EntityMetadata,
    column: EncryptedColumns,
    entity: object,
    holder: Record<string, unknown>,
    loaded: LoadedColumns,
    tenant: string | null,
    ready: ReadyValues | undefined,
    owner: number,
    state: PropertyState,
  ): Promise<void> | undefined {
    const ciphertext = loaded.ciphertext as Buffer;
    const id = compactDataKeyId(ciphertext);
    if (id === undefined) {
      try {
        parseCompact(ciphertext); // says what is wrong with it
      } catch (error) {
        throw withErrorContext(error, loadContext(metadata, column, entity, loaded));
      }
      throw new IntegrityError(
        'compact encrypted value is malformed',
        loadContext(metadata, column, entity, loaded),
      );
    }
    const bound = ((ciphertext[1] ?? 0) & FLAG_PRIMARY_KEY_BOUND) !== 0;
    const primaryKey = bound ? (loaded.primaryKey ?? primaryKeyOf(metadata, entity)) : undefined;
    const binding = valueBinding(metadata, column, primaryKey, tenant);
    const held = this.dataKeys.peek(id);
    if (held && ready) {
      try {
        this.encryptor.checkKeyRecord(held, binding);
      } catch (error) {
        return this.#openAgain(error, held, [
          ciphertext,
          id,
          binding,
          loaded,
          metadata,
          column,
          entity,
          holder,
        ]);
      }
      ready.add(owner, column, holder, state, loaded, compactSealed(ciphertext, id, held), binding, held);
      return undefined;
    }
    if (!held && ready?.awaitingRows) {
      ready.awaitRow(id, owner, column);
      return undefined;
    }
    const args = [ciphertext, id, binding, loaded, metadata, column, entity, holder] as const;
    if (!held) {
      return this.dataKeys
        .resolve(id)
        .then((record) => this.#openWithRecord(record, ...args))
        .catch((error: unknown) => this.#failedToOpen(error, metadata, column, entity, loaded));
    }
    return this.#openHeld(held, args);
  }

  /** Opens with the row this instance holds; if that fails, once more with the row as it is now. */
  #openHeld(held: DataKeyRecord, args: OpenCompactArgs): Promise<void> | undefined {
    let opening: Promise<void> | undefined;
    try {
      opening = this.#openWithRecord(held, ...args);
    } catch (error) {
      return this.#openAgain(error, held, args);
    }
    return opening?.catch((error: unknown) => this.#openAgain(error, held, args));
  }

  /** A held copy of a key row that no longer opens the value is read again, once (re-wrapped elsewhere). */
  #openAgain(error: unknown, held: DataKeyRecord, args: OpenCompactArgs): Promise<void> {
    const [, id, , loaded, metadata, column, entity] = args;
    this.dataKeys.forget(id);
    return this.dataKeys
      .resolve(id)
      .then((now) => {
        if (now && sameRecord(now, held)) throw error;
        return this.#openWithRecord(now, ...args);
      })
      .catch((failure: unknown) => this.#failedToOpen(failure, metadata, column, entity, loaded));
  }

  #failedToOpen(
    error: unknown,
    metadata: EntityMetadata,
    column: EncryptedColumns,
    entity: object,
    loaded: LoadedColumns,
  ): Promise<never> {
    return Promise.reject(withErrorContext(error, loadContext(metadata, column, entity, loaded)));
  }

  #openWithRecord(
    record: DataKeyRecord | undefined,
    ciphertext: Buffer,
    id: bigint,
    binding: ValueBinding,
    loaded: LoadedColumns,
    metadata: EntityMetadata,
    column: EncryptedColumns,
    entity: object,
    holder: Record<string, unknown>,
  ): Promise<void> | undefined {
    if (!record) {
      throw new IntegrityError(
        `data key ${id} is not in the data-key table: restore it from the backup taken with the data`,
        loadContext(metadata, column, entity, loaded),
      );
    }
    this.encryptor.checkKeyRecord(record, binding);
    const sealed = compactSealed(ciphertext, id, record);
    const opened = this.encryptor.tryOpen(sealed, binding);
    if (opened === NOT_CACHED) {
      return this.encryptor
        .open(sealed, binding)
        .then((value) => this.#recordOpened(entity, column, holder, value, sealed));
    }
    this.#recordOpened(entity, column, holder, opened, sealed);
    return undefined;
  }

  #recordOpened(
    entity: object,
    column: EncryptedColumns,
    holder: Record<string, unknown>,
    value: unknown,
    sealed: SealedValue,
  ): void {
    holder[column.definition.propertyName] = value;
    this.store.seal(entity, column.main.propertyPath, value, sealed);
  }
}

/** What opening a compact value needs, passed along when it takes another round trip. */
type OpenCompactArgs = readonly [
  Buffer,
  bigint,
  ValueBinding,
  LoadedColumns,
  EntityMetadata,
  EncryptedColumns,
  object,
  Record<string, unknown>,
];

/** A compact value with its data-key row's wrapped key and version, as the field encryptor opens it. */
function compactSealed(ciphertext: Buffer, id: bigint, record: DataKeyRecord): SealedValue {
  return compactSealedValue(ciphertext, id, record.wrappedKey, record.keyVersion);
}

/**
 * A query-builder update that writes a primary key would leave the row's bound values bound to
 * the key it had: refused for entities with bound values.
 */
function refuseKeyChange(
  metadata: EntityMetadata,
  columns: readonly EncryptedColumns[],
  setMap: object,
): void {
  const bound = columns.find((c) => c.definition.bindPrimaryKey);
  if (!bound) return;
  const key = metadata.primaryColumns.find((c) => c.getEntityValue(setMap) !== undefined);
  if (!key) return;
  throw new UnsupportedOperationError(
    `changing primary-key column "${key.propertyPath}" would leave this row's encrypted values bound to ` +
      'its old key, unreadable; insert a new row and delete the old one, or set bindPrimaryKey: false',
    { entity: metadata.name, column: bound.main.propertyPath },
  );
}

/**
 * The row's tenant as `entity` gives it: `undefined` when the entity has no tenant column or the
 * object does not say, `null` for a row without a tenant.
 */
function tenantOf(columns: readonly EncryptedColumns[], entity: object): string | null | undefined {
  const column = columns[0]?.tenant;
  return column ? tenantText(column, column.getEntityValue(entity)) : null;
}

/** A row moved to another tenant must have every encrypted value at hand, to seal it for the new tenant. */
function refuseIncompleteMove(
  metadata: EntityMetadata,
  columns: readonly EncryptedColumns[],
  entity: object,
) {
  const missing = columns.find((c) => c.holderOf(entity, false)?.[c.definition.propertyName] === undefined);
  if (!missing) return;
  throw new UnsupportedOperationError(
    'moving a row to another tenant seals all its encrypted values anew, but this object does not hold ' +
      'this one; load the whole entity, change its tenant and save it',
    { entity: metadata.name, column: missing.main.propertyPath },
  );
}

/** Whether `entity` (a SET map) names the encrypted property of `column`. */
function definedIn(column: EncryptedColumns, entity: object): boolean {
  const value = column.holderOf(entity, false)?.[column.definition.propertyName];
  return value !== undefined;
}

/** Whether two reads of one data-key row found it the same. */
function sameRecord(a: DataKeyRecord, b: DataKeyRecord): boolean {
  return (
    a.keyVersion === b.keyVersion &&
    a.keyring === b.keyring &&
    a.tenant === b.tenant &&
    a.wrappedKey.equals(b.wrappedKey)
  );
}

/** Where a loaded value came from, for errors (computed only when one is raised). */
function loadContext(
  metadata: EntityMetadata,
  column: EncryptedColumns,
  entity: object,
  loaded: LoadedColumns,
): ErrorContext {
  const tenant = loaded.tenant ?? tenantOf([column], entity);
  return {
    entity: metadata.name,
    column: column.main.propertyPath,
    primaryKey: loaded.primaryKey ?? primaryKeyOf(metadata, entity),
    ...(typeof tenant === 'string' ? { tenant } : {}),
  };
}
