/**
 * Typed errors. Every error carries context (entity, column, key version, primary key) as
 * fields, never a plaintext value or key material: messages are built only from those fields.
 */

/** Where an error happened. Every field is optional; only what is known is set. */
export interface ErrorContext {
  /** Entity (class) name. */
  entity?: string;
  /** Database table. */
  table?: string;
  /** Entity property name. */
  column?: string;
  /** Master-key version involved. */
  keyVersion?: number;
  /** Primary key of the row, as text. */
  primaryKey?: string;
  /** A printable reference to a master key: a KMS key id/ARN or a key fingerprint. */
  keyId?: string;
  /** The tenant whose key or row is concerned (see `@EncryptionTenant()`). */
  tenant?: string;
}

/** Base class of every error this library throws. */
export class EnvelopeError extends Error {
  override name = 'EnvelopeError';
  readonly entity?: string;
  readonly table?: string;
  readonly column?: string;
  readonly keyVersion?: number;
  readonly primaryKey?: string;
  readonly keyId?: string;
  readonly tenant?: string;
  /** The message without the context suffix. */
  readonly detail: string;

  constructor(message: string, context: ErrorContext = {}, options?: { cause?: unknown }) {
    super(withContext(message, context), options?.cause === undefined ? undefined : { cause: options.cause });
    this.detail = message;
    Object.assign(this, definedOnly(context));
  }

  /** The context fields this error carries. */
  get context(): ErrorContext {
    const { entity, table, column, keyVersion, primaryKey, keyId, tenant } = this;
    return definedOnly({ entity, table, column, keyVersion, primaryKey, keyId, tenant });
  }
}

/**
 * Returns an error of the same class with `context` added (fields already set win), keeping the
 * original as `cause`. Errors that are not ours are returned unchanged.
 */
export function withErrorContext(error: unknown, context: ErrorContext): unknown {
  if (!(error instanceof EnvelopeError)) return error;
  const Class = error.constructor as new (
    m: string,
    c: ErrorContext,
    o: { cause?: unknown },
  ) => EnvelopeError;
  return new Class(error.detail, { ...context, ...error.context }, { cause: error });
}

/** The configuration is invalid (bad key, unknown active version, conflicting options). */
export class ConfigError extends EnvelopeError {
  override name = 'ConfigError';
}

/**
 * Authentication failed: the ciphertext, IV, tag, wrapped data key or associated data (table,
 * column, primary key) is not what was sealed. The stored value was tampered with or moved.
 */
export class IntegrityError extends EnvelopeError {
  override name = 'IntegrityError';
}

/** A stored value names a master-key version that this keyring does not have. */
export class UnknownKeyVersionError extends EnvelopeError {
  override name = 'UnknownKeyVersionError';
}

/** A master-key backend failed (unavailable, throttled, misconfigured). */
export class KeyProviderError extends EnvelopeError {
  override name = 'KeyProviderError';
}

/** The master key refused access: revoked, disabled, pending deletion or not found. */
export class KeyAccessDeniedError extends KeyProviderError {
  override name = 'KeyAccessDeniedError';
}

/**
 * The tenant was offboarded: what the application held of its key was destroyed, so its rows are
 * unreadable by design and writes for it are refused.
 */
export class TenantOffboardedError extends KeyAccessDeniedError {
  override name = 'TenantOffboardedError';
}

/** A value cannot be encoded: its type is not supported or not the declared one. */
export class ValueTypeError extends EnvelopeError {
  override name = 'ValueTypeError';
}

/**
 * An operation that would store plaintext in, or silently mis-query, an encrypted property was
 * refused (a `where` on an encrypted property, an upsert, a write that bypassed encryption).
 */
export class UnsupportedOperationError extends EnvelopeError {
  override name = 'UnsupportedOperationError';
}

/**
 * A write would store a value that another row already holds in a property declared
 * `@Encrypted({ searchable: true, unique: true })` (of the same tenant, for a tenant entity): the
 * database's unique index on its blind index refused it. Names the entity and property, never the
 * value nor its index (nor the database's own message, which quotes the index bytes).
 */
export class UniqueViolationError extends EnvelopeError {
  override name = 'UniqueViolationError';
}

function withContext(message: string, context: ErrorContext): string {
  const parts: string[] = [];
  if (context.tenant !== undefined) parts.push(`tenant ${context.tenant}`);
  if (context.entity) parts.push(`entity ${context.entity}`);
  if (context.column) parts.push(`column ${context.column}`);
  if (context.primaryKey !== undefined) parts.push(`primary key ${context.primaryKey}`);
  if (context.keyVersion !== undefined) parts.push(`key version ${context.keyVersion}`);
  if (context.keyId) parts.push(`key ${context.keyId}`);
  return parts.length ? `${message} (${parts.join(', ')})` : message;
}

function definedOnly(context: ErrorContext): ErrorContext {
  return Object.fromEntries(Object.entries(context).filter(([, v]) => v !== undefined));
}
