import type { EntityMetadata, QueryRunner } from 'typeorm';
import type { ValueBinding } from '../crypto/associated-data';
import type { DataKeyRecord, SealedValue } from '../field-encryptor';
import type { EncryptedColumns } from './encrypted-columns';
import type { LoadedColumns, PropertyState } from './property-state';

/**
 * The entities whose `afterLoad` ran in one turn of the event loop: TypeORM starts `afterLoad`
 * for every entity of a result set before awaiting any, so they are decrypted together, once
 * that turn is over. Each entity's promise settles when the whole batch has, and rejects only
 * with that entity's own failure: a tampered row fails its own query, never another one read in
 * the same turn.
 */
export class LoadBatch {
  readonly metadatas: EntityMetadata[] = [];
  readonly columns: (readonly EncryptedColumns[])[] = [];
  readonly entities: object[] = [];
  readonly queryRunners: (QueryRunner | undefined)[] = [];
  readonly #failures = new Map<object, unknown>();
  readonly #settled: Promise<void>;
  #settle!: () => void;

  constructor() {
    this.#settled = new Promise((resolve) => {
      this.#settle = resolve;
    });
  }

  get size(): number {
    return this.entities.length;
  }

  add(
    metadata: EntityMetadata,
    columns: readonly EncryptedColumns[],
    entity: object,
    queryRunner: QueryRunner | undefined,
  ): Promise<void> {
    this.metadatas.push(metadata);
    this.columns.push(columns);
    this.entities.push(entity);
    this.queryRunners.push(queryRunner);
    return this.#settled.then(() => {
      if (this.#failures.has(entity)) throw this.#failures.get(entity);
    });
  }

  /** Records `entity`'s first failure: its promise rejects with it. */
  fail(entity: object, error: unknown): void {
    if (!this.#failures.has(entity)) this.#failures.set(entity, error);
  }

  /** Settles every entity's promise once `pending` (the values that needed a round trip) have. */
  finish(pending: Promise<unknown>[]): void {
    if (pending.length === 0) this.#settle();
    else void Promise.allSettled(pending).then(() => this.#settle());
  }
}

/**
 * The loaded values of a batch whose key is at hand, opened in one call per data key: parallel
 * arrays, one entry per value, so that a value costs no object of its own beyond its sealed form.
 */
export class ReadyValues {
  readonly sealed: SealedValue[] = [];
  readonly bindings: ValueBinding[] = [];
  /** Index of the value's entity in the batch. */
  readonly owners: number[] = [];
  readonly columns: EncryptedColumns[] = [];
  readonly holders: Record<string, unknown>[] = [];
  readonly states: PropertyState[] = [];
  readonly loaded: LoadedColumns[] = [];
  /** For a compact value: the data-key row it was opened with (`undefined` for a sidecar value). */
  readonly records: (DataKeyRecord | undefined)[] = [];

  get size(): number {
    return this.sealed.length;
  }

  add(
    owner: number,
    column: EncryptedColumns,
    holder: Record<string, unknown>,
    state: PropertyState,
    loaded: LoadedColumns,
    sealed: SealedValue,
    binding: ValueBinding,
    record: DataKeyRecord | undefined,
  ): void {
    this.owners.push(owner);
    this.columns.push(column);
    this.holders.push(holder);
    this.states.push(state);
    this.loaded.push(loaded);
    this.sealed.push(sealed);
    this.bindings.push(binding);
    this.records.push(record);
  }
}
