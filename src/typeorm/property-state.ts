import { inspect } from 'node:util';
import { type ErrorContext, UnsupportedOperationError } from '../errors';
import type { SealedValue } from '../field-encryptor';

/**
 * What the library knows of one encrypted property of one entity. It lives beside the entity,
 * never on it: the entity only ever holds plaintext, so nothing needs restoring after a write,
 * whether it succeeded or not.
 */
export interface PropertyState {
  /** Raw column values read from the database, until `afterLoad` decrypts them. */
  loaded?: LoadedColumns;
  /** The sealed form of `plaintext`: what the row holds, or will hold after this write. */
  sealed?: SealedValue;
  /** The plaintext `sealed` encrypts, kept in a comparable form to detect changes. */
  snapshot?: unknown;
  /**
   * The value of the plaintext column being migrated from, as read; `undefined` once the property
   * is written (the write sets that column to NULL).
   */
  legacy?: unknown;
}

/** Column values as read; `null` where the database holds NULL, absent where not selected. */
export interface LoadedColumns {
  ciphertext?: Buffer | null;
  iv?: Buffer | null;
  wrappedKey?: Buffer | null;
  keyVersion?: number | null;
  /** The row's primary key, when it was read apart from the entity (a partial select). */
  primaryKey?: string;
  /** The row's tenant, when it was read apart from the entity (`null`: no tenant). */
  tenant?: string | null;
}

/** The plaintext a sealed ciphertext stands for; prints nothing of it. */
export class SealedOrigin {
  constructor(
    readonly value: unknown,
    readonly sealed: SealedValue,
  ) {}

  toJSON(): undefined {
    return undefined;
  }

  [inspect.custom](): string {
    return 'SealedOrigin { [hidden] }';
  }
}

/**
 * Per-entity, per-property state, held weakly. It is keyed by the root entity and the property
 * path, never by an embedded object, so one embedded instance shared by two entities keeps a
 * state for each. Writes never trust it: an insert always seals anew, and an update reuses only
 * what the database copy TypeORM loads for the update holds (see the subscriber). It serves
 * change detection, and carries what a read loaded until `afterLoad` decrypts it.
 */
export class PropertyStateStore {
  readonly #states = new WeakMap<object, Map<string, PropertyState>>();
  /**
   * Where each sealed ciphertext buffer came from, kept on the buffer under a key of this store's
   * own (cheaper than a WeakMap of many buffers; hidden from JSON and from `inspect`). TypeORM's
   * insert and update value sets copy the ciphertext column's value, and are read through it.
   */
  readonly #origin = Symbol('typeorm-envelope origin');

  get(entity: object, path: string): PropertyState | undefined {
    return this.#states.get(entity)?.get(path);
  }

  /** Whether a read loaded column values into some encrypted property of `entity`, not yet decrypted. */
  hasLoaded(entity: object): boolean {
    const forEntity = this.#states.get(entity);
    if (!forEntity) return false;
    for (const state of forEntity.values()) if (state.loaded) return true;
    return false;
  }

  /** The state, created empty when missing. */
  upsert(entity: object, path: string): PropertyState {
    let forEntity = this.#states.get(entity);
    if (!forEntity) {
      forEntity = new Map();
      this.#states.set(entity, forEntity);
    }
    let state = forEntity.get(path);
    if (!state) {
      state = {};
      forEntity.set(path, state);
    }
    return state;
  }

  /**
   * Records that the entity's property at `path` now encrypts to `sealed`. The ciphertext is
   * marked with its origin only once TypeORM is handed it ({@link markOnce}): most values read are
   * never written back.
   */
  seal(entity: object, path: string, value: unknown, sealed: SealedValue): void {
    this.sealState(this.upsert(entity, path), value, sealed);
  }

  /** Like {@link seal}, given the property's state. */
  sealState(state: PropertyState, value: unknown, sealed: SealedValue): void {
    state.sealed = sealed;
    state.snapshot = snapshotOf(value);
    state.loaded = undefined;
  }

  /** Like {@link mark}, unless `sealed.ciphertext` already leads back to exactly these. */
  markOnce(value: unknown, sealed: SealedValue): void {
    const origin = this.originOf(sealed.ciphertext);
    if (origin?.sealed !== sealed || !Object.is(origin.value, value)) this.mark(value, sealed);
  }

  /** Makes `sealed.ciphertext` lead back to `value` and `sealed`. */
  mark(value: unknown, sealed: SealedValue): void {
    Object.defineProperty(sealed.ciphertext, this.#origin, {
      value: new SealedOrigin(value, sealed),
      configurable: true,
      writable: true,
    });
  }

  /** The plaintext and sealed value a ciphertext buffer came from, if this store sealed or opened it. */
  originOf(ciphertext: unknown): SealedOrigin | undefined {
    return Buffer.isBuffer(ciphertext)
      ? (ciphertext as unknown as Record<symbol, SealedOrigin | undefined>)[this.#origin]
      : undefined;
  }

  /** The sealed form, when it still encrypts `value`, the property's current plaintext. */
  currentSealed(entity: object, path: string, value: unknown): SealedValue | undefined {
    const state = this.get(entity, path);
    return state?.sealed && sameSnapshot(state.snapshot, value) ? state.sealed : undefined;
  }
}

/**
 * JSON text of a value, or `undefined` for one JSON cannot hold (a cycle, a bigint): such a value
 * never equals a snapshot, so the write goes on to the codec, which refuses it with a typed error.
 */
function jsonOf(value: unknown): string | undefined {
  try {
    return JSON.stringify(value);
  } catch {
    return undefined;
  }
}

/** A JSON value's snapshot; a class of its own so that it never equals a string value. */
class JsonSnapshot {
  constructor(readonly json: string | undefined) {}
}

/**
 * A comparable copy of a plaintext value: objects by their JSON (so that changes made inside an
 * object are seen), bytes and dates by content, primitives by identity.
 */
function snapshotOf(value: unknown): unknown {
  if (value instanceof Date) return new Date(value.getTime());
  if (value instanceof Uint8Array) return Buffer.from(value);
  if (typeof value === 'object' && value !== null) return new JsonSnapshot(jsonOf(value));
  return value;
}

function sameSnapshot(snapshot: unknown, value: unknown): boolean {
  if (value instanceof Date)
    return snapshot instanceof Date && Object.is(snapshot.getTime(), value.getTime());
  if (value instanceof Uint8Array) {
    return Buffer.isBuffer(snapshot) && snapshot.equals(value);
  }
  if (typeof value === 'object' && value !== null) {
    const json = jsonOf(value);
    return json !== undefined && snapshot instanceof JsonSnapshot && snapshot.json === json;
  }
  return Object.is(snapshot, value);
}

const REFUSED =
  'a plaintext value reached an encrypted column without being encrypted, and was refused: either the ' +
  'write bypassed the encryption subscriber (listeners: false, callListeners(false)), or the value was ' +
  'changed after it was encrypted (by an async listener or by a subscriber awaiting something before ' +
  'it changed the value; make such changes synchronously, or before saving)';

/**
 * Stands for a plaintext value that is not encrypted yet. TypeORM sees it as the value of the
 * ciphertext column, so its change detection notices the change; if it ever reaches the driver
 * (a write that skipped encryption), `pg` calls `toPostgres()` and the write is refused.
 */
export class PendingPlaintext {
  readonly #value: unknown;
  readonly #context: ErrorContext;

  constructor(value: unknown, context: ErrorContext = {}) {
    this.#value = value;
    this.#context = context;
  }

  get value(): unknown {
    return this.#value;
  }

  toPostgres(): never {
    throw new UnsupportedOperationError(REFUSED, this.#context);
  }

  toJSON(): string {
    return '[unencrypted value, refused]';
  }

  [inspect.custom](): string {
    return 'PendingPlaintext { [hidden] }';
  }
}

/** Stands for a sidecar column whose value is not computed yet; refused if it reaches the driver. */
export const PENDING_SIDECAR = Object.freeze({
  toPostgres(): never {
    throw new UnsupportedOperationError(REFUSED);
  },
  toJSON: () => '[pending sidecar, refused]',
});
