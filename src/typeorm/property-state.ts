import { inspect } from 'node:util';
import { UnsupportedOperationError } from '../errors';
import type { SealedValue } from '../field-encryptor';

/**
 * What the library knows of one encrypted property of one object (an entity, an embedded object
 * or an update's SET map). It lives beside the object, never on it: the object only ever holds
 * plaintext, so nothing needs restoring after a write, whether it succeeded or not.
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
}

/** Updates whose sealed values are kept at most, should their queries fail before release. */
const MAX_PENDING_UPDATES = 1_000;

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

/** Per-object, per-property state, held weakly. */
export class PropertyStateStore {
  readonly #states = new WeakMap<object, Map<string, PropertyState>>();
  /** Which plaintext each sealed ciphertext buffer stands for, to follow copies made by `create()`. */
  /**
   * Where each sealed ciphertext buffer came from, kept on the buffer under a key of this store's
   * own (cheaper than a WeakMap of many buffers; hidden from JSON and from `inspect`).
   */
  readonly #origin = Symbol('typeorm-envelope origin');
  /**
   * Values sealed for query-builder updates, by property and plaintext. TypeORM copies the top
   * level of an update's SET map before reading it, so the sealed value is found by the value the
   * copy holds, and the caller's map is never changed. Released after the update; if updates
   * fail, at most `MAX_PENDING_UPDATES` are kept.
   */
  readonly #forUpdate = new Map<object, Map<unknown, { sealed: SealedValue; updates: number }>>();
  #pendingUpdates = 0;

  get(holder: object, property: string): PropertyState | undefined {
    return this.#states.get(holder)?.get(property);
  }

  /** The state, created empty when missing. */
  upsert(holder: object, property: string): PropertyState {
    let forHolder = this.#states.get(holder);
    if (!forHolder) {
      forHolder = new Map();
      this.#states.set(holder, forHolder);
    }
    let state = forHolder.get(property);
    if (!state) {
      state = {};
      forHolder.set(property, state);
    }
    return state;
  }

  /** Records that `holder[property]` now encrypts to `sealed`. */
  seal(holder: object, property: string, value: unknown, sealed: SealedValue): void {
    const state = this.upsert(holder, property);
    state.sealed = sealed;
    state.snapshot = snapshotOf(value);
    state.loaded = undefined;
    Object.defineProperty(sealed.ciphertext, this.#origin, {
      value: new SealedOrigin(value, sealed),
      configurable: true,
      writable: true,
    });
  }

  /** Records `sealed` as the value an update of `property` (any object naming it) writes for `value`. */
  sealForUpdate(property: object, value: unknown, sealed: SealedValue): void {
    let byValue = this.#forUpdate.get(property);
    if (!byValue) {
      byValue = new Map();
      this.#forUpdate.set(property, byValue);
    }
    /* Concurrent updates to the same value share one entry: any of their sealed values is right. */
    const entry = byValue.get(value);
    if (entry) {
      entry.sealed = sealed;
      entry.updates += 1;
      return;
    }
    byValue.set(value, { sealed, updates: 1 });
    this.#pendingUpdates += 1;
    if (this.#pendingUpdates > MAX_PENDING_UPDATES) this.#dropOldestUpdate();
  }

  /** The sealed value recorded for an update of `property` to `value`, if any. */
  sealedForUpdate(property: object, value: unknown): SealedValue | undefined {
    return this.#forUpdate.get(property)?.get(value)?.sealed;
  }

  /** Forgets what {@link sealForUpdate} recorded, once the update has run. */
  releaseUpdate(property: object, value: unknown, all = false): void {
    const byValue = this.#forUpdate.get(property);
    const entry = byValue?.get(value);
    if (!byValue || !entry) return;
    entry.updates -= 1;
    if (entry.updates > 0 && !all) return;
    byValue.delete(value);
    this.#pendingUpdates -= 1;
    if (byValue.size === 0) this.#forUpdate.delete(property);
  }

  #dropOldestUpdate(): void {
    for (const [property, byValue] of this.#forUpdate) {
      const oldest = byValue.keys().next();
      if (!oldest.done) {
        this.releaseUpdate(property, oldest.value, true);
        return;
      }
    }
  }

  /** The plaintext and sealed value a ciphertext buffer came from, if this store sealed or opened it. */
  originOf(ciphertext: unknown): SealedOrigin | undefined {
    return Buffer.isBuffer(ciphertext)
      ? (ciphertext as unknown as Record<symbol, SealedOrigin | undefined>)[this.#origin]
      : undefined;
  }

  /** The sealed form, when it still encrypts the current value of `holder[property]`. */
  currentSealed(holder: object, property: string, value: unknown): SealedValue | undefined {
    const state = this.get(holder, property);
    return state?.sealed && sameSnapshot(state.snapshot, value) ? state.sealed : undefined;
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
  if (typeof value === 'object' && value !== null) return new JsonSnapshot(JSON.stringify(value));
  return value;
}

function sameSnapshot(snapshot: unknown, value: unknown): boolean {
  if (value instanceof Date)
    return snapshot instanceof Date && Object.is(snapshot.getTime(), value.getTime());
  if (value instanceof Uint8Array) {
    return Buffer.isBuffer(snapshot) && snapshot.equals(value);
  }
  if (typeof value === 'object' && value !== null) {
    return snapshot instanceof JsonSnapshot && snapshot.json === JSON.stringify(value);
  }
  return Object.is(snapshot, value);
}

const REFUSED =
  'a plaintext value reached an encrypted column without being encrypted, and was refused: either a ' +
  'write bypassed the encryption subscriber (listeners disabled), or the value was used in a where ' +
  'condition, which encrypted properties do not support (values are encrypted with random IVs)';

/**
 * Stands for a plaintext value that is not encrypted yet. TypeORM sees it as the value of the
 * ciphertext column, so its change detection notices the change; if it ever reaches the driver
 * (a write that skipped encryption), `pg` calls `toPostgres()` and the write is refused.
 */
export class PendingPlaintext {
  readonly #value: unknown;

  constructor(value: unknown) {
    this.#value = value;
  }

  get value(): unknown {
    return this.#value;
  }

  toPostgres(): never {
    throw new UnsupportedOperationError(REFUSED);
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
