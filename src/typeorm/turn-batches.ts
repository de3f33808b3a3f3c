import type { EntityMetadata, QueryRunner } from 'typeorm';
import type { ValueBinding } from '../crypto/associated-data';
import type { ValueType } from '../crypto/codec';
import type { DataKeyRecord, SealedValue } from '../field-encryptor';
import type { EncryptedColumns } from './encrypted-columns';
import type { LoadedColumns, PropertyState } from './property-state';

/**
 * The outcome of each entity handled together in one turn of the event loop: each entity's
 * promise settles once the whole turn's work has, and rejects only with that entity's own failure.
 */
export class TurnOutcomes {
  readonly #failures = new Map<object, unknown>();
  /** Settles (never rejects) once the turn's work has. */
  readonly settled: Promise<void>;
  #settle!: () => void;

  constructor() {
    this.settled = new Promise((resolve) => {
      this.#settle = resolve;
    });
  }

  /** Settles when the turn's work has; rejects with `entity`'s first failure, if it had one. */
  promiseFor(entity: object): Promise<void> {
    return this.settled.then(() => {
      if (this.#failures.has(entity)) throw this.#failures.get(entity);
    });
  }

  /** Records `entity`'s first failure: its promise rejects with it. */
  fail(entity: object, error: unknown): void {
    if (!this.#failures.has(entity)) this.#failures.set(entity, error);
  }

  /** Settles every entity's promise once `pending` (the work that needed a round trip) have. */
  finish(pending: Promise<unknown>[]): void {
    if (pending.length === 0) this.#settle();
    else void Promise.allSettled(pending).then(() => this.#settle());
  }
}

/**
 * The entities whose `afterLoad` ran in one turn of the event loop: TypeORM starts `afterLoad`
 * for every entity of a result set before awaiting any, so they are decrypted together, once
 * that turn is over. A tampered row fails its own entity's promise, never another one read in
 * the same turn.
 */
export class LoadBatch {
  readonly metadatas: EntityMetadata[] = [];
  readonly columns: (readonly EncryptedColumns[])[] = [];
  readonly entities: object[] = [];
  readonly queryRunners: (QueryRunner | undefined)[] = [];
  readonly outcomes = new TurnOutcomes();

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
    return this.outcomes.promiseFor(entity);
  }
}

/**
 * The values the writes of one turn of the event loop seal (TypeORM starts `beforeInsert` and
 * `beforeUpdate` for every entity of a `save([...])` before awaiting any): sealed together once
 * that turn is over, one AES-GCM call per data key, each layout apart.
 */
export class SealBatch {
  readonly outcomes = new TurnOutcomes();
  readonly sidecars = new SealRequests();
  readonly compact = new SealRequests();
}

/** Values to seal in one layout, and what to do with each sealed value or failure. */
export class SealRequests {
  readonly values: unknown[] = [];
  readonly bindings: ValueBinding[] = [];
  readonly declared: (ValueType | undefined)[] = [];
  readonly entities: object[] = [];
  readonly records: ((sealed: SealedValue) => void)[] = [];
  /** Throws the value's failure with its context (entity and column). */
  readonly failures: ((error: unknown) => never)[] = [];

  get size(): number {
    return this.values.length;
  }

  add(
    entity: object,
    value: unknown,
    binding: ValueBinding,
    declared: ValueType | undefined,
    record: (sealed: SealedValue) => void,
    failed: (error: unknown) => never,
  ): void {
    this.entities.push(entity);
    this.values.push(value);
    this.bindings.push(binding);
    this.declared.push(declared);
    this.records.push(record);
    this.failures.push(failed);
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
  /**
   * In a batch's first round: the compact values whose data-key row this instance does not hold,
   * by id (entity index and column), read once for all of them before a second round.
   */
  readonly awaitingRows: Map<bigint, [number, EncryptedColumns][]> | undefined;

  constructor(firstRound: boolean) {
    this.awaitingRows = firstRound ? new Map() : undefined;
  }

  awaitRow(id: bigint, owner: number, column: EncryptedColumns): void {
    const waiting = this.awaitingRows?.get(id);
    if (waiting) waiting.push([owner, column]);
    else this.awaitingRows?.set(id, [[owner, column]]);
  }

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
