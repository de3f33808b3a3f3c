import { type ColumnType, getMetadataArgsStorage, type ValueTransformer } from 'typeorm';
import type { ValueType } from '../crypto/codec';
import { ConfigError } from '../errors';
import type { Mask } from '../masking';
import { registerBlindIndex, type SearchableOption } from './blind-index-decorator';

/** Database column names of the four sidecar columns of one encrypted property. */
export interface SidecarColumnNames {
  /** `bytea`: format header, AES-256-GCM ciphertext and tag. Default `<name>_ciphertext`. */
  ciphertext: string;
  /** `bytea`: the 96-bit IV. Default `<name>_iv`. */
  iv: string;
  /** `bytea`: the data key wrapped by the master key. Default `<name>_wrapped_key`. */
  wrappedKey: string;
  /** `integer`: the master-key version that wrapped the data key. Default `<name>_key_version`. */
  keyVersion: string;
}

/**
 * How an encrypted property is stored:
 * - `'sidecars'`: four columns (`<name>_ciphertext`, `_iv`, `_wrapped_key`, `_key_version`), each
 *   value carrying its own wrapped data key;
 * - `'compact'`: one `bytea` column (`<name>_ciphertext`) holding a self-describing value that
 *   names its data key's row in the library's data-key table (the `TypeormEnvelopeDataKeys`
 *   migration), which must then be backed up and restored with the data.
 */
export type StorageLayout = 'sidecars' | 'compact';

/** Options of {@link Encrypted}. */
export interface EncryptedOptions {
  /**
   * How the property is stored (see {@link StorageLayout}). Default `'sidecars'`, or the default
   * of the decorator made by {@link encryptedWith}.
   */
  layout?: StorageLayout;
  /**
   * While a table moves from one layout to the other: the layout its rows may still hold. Both
   * formats are read from the main column (the sidecar columns stay mapped, nullable); every write
   * stores the declared `layout` (from sidecars to compact, the sidecar columns are set to NULL).
   * Remove it, and the sidecar columns if the target is compact, once the layout migration job has
   * converted every row.
   */
  migrateFrom?: StorageLayout;
  /**
   * The value type. Values of another type are refused on write. Default: from the property's
   * TypeScript type where TypeORM can see it (`string`, `number`, `boolean`, `Date`, `Buffer`,
   * `bigint`), otherwise any supported type; use `'json'` for objects and arrays.
   */
  type?: ValueType;
  /** Whether the value may be `null` (all four columns are then null). Default `false`. */
  nullable?: boolean;
  /** Base name of the sidecar columns. Default: the property name. */
  name?: string;
  /** Per-column overrides of the sidecar column names. */
  columnNames?: Partial<SidecarColumnNames> & {
    /** `bytea`: the blind index of a searchable property. Default `<name>_bidx`. */
    blindIndex?: string;
  };
  /**
   * Bind each ciphertext to its row's primary key when the key is known before the write
   * (client-assigned keys, and every update). Default `true`.
   */
  bindPrimaryKey?: boolean;
  /**
   * Former names of this property, after a rename that kept its columns (with `name`). Values are
   * bound to the property name, so rows written under a former name would no longer decrypt:
   * they are opened under each former name in turn, and `reencryptColumns` rewrites them under
   * the current one, after which this option can be removed. New values always use the current
   * name.
   */
  renamedFrom?: string | readonly string[];
  /** How {@link maskEntity} shows this property: a built-in mask or a function. */
  mask?: Mask;
  /**
   * The existing plaintext column this property is being migrated from (its name and TypeORM
   * type). It is read so that `backfillEncryptedColumns` can encrypt its values and so that a row
   * not yet backfilled is noticed; every write of the property sets it to NULL.
   */
  plaintextColumn?: { name: string; type: ColumnType };
  /**
   * While backfilling: read the plaintext column when a row has no ciphertext yet. Default `false`:
   * such a row is then an error, never silently read as plaintext.
   */
  readPlaintextFallback?: boolean;
  /**
   * Find rows by this property's value: a blind index (a keyed HMAC-SHA256 of the normalised
   * value, under an index key of the row's keyring or tenant) is stored beside the ciphertext, in
   * the `<name>_bidx` column, with a B-tree index. `where: { email }`, `In`, `Not` and `IsNull`
   * then work as on a plaintext column (equality only: no `LIKE`, ranges or ordering). Give
   * `{ normalize }` to index a normalised form (`'email'`, `'lowercase'`, `'trim'`, `'digits'` or
   * a function). See docs/blind-indexes.md for what the database learns (equality and frequency).
   */
  searchable?: SearchableOption;
  /**
   * With `searchable`: makes the blind index unique, per tenant where the entity has an
   * `@EncryptionTenant()` column. A duplicate is refused with a `UniqueViolationError`.
   */
  unique?: boolean;
}

/** The sidecar roles, in the order their columns are declared. */
export const SIDECAR_ROLES = ['iv', 'wrappedKey', 'keyVersion'] as const;
export type SidecarRole = (typeof SIDECAR_ROLES)[number];

/** Everything the library knows of one `@Encrypted()` property. */
export interface EncryptedPropertyDefinition {
  /** The layout new values are written in. */
  layout: StorageLayout;
  /** The other layout rows may still hold (see `migrateFrom`). */
  migrateFrom?: StorageLayout;
  /** Whether the sidecar columns are mapped: the sidecar layout, or compact migrating from it. */
  mapsSidecars: boolean;
  /** The class the decorator was applied to (an entity, a parent class or an embedded class). */
  // biome-ignore lint/complexity/noBannedTypes: decorators receive any class constructor
  target: Function;
  propertyName: string;
  type?: ValueType;
  nullable: boolean;
  bindPrimaryKey: boolean;
  /** Names the property had before a rename (see `renamedFrom`). */
  formerNames: readonly string[];
  mask?: Mask;
  /** Base of the default sidecar column names. */
  baseName: string;
  columns: SidecarColumnNames;
  /** Hidden property names TypeORM knows the sidecar columns by; never set on entities. */
  sidecarProperties: Record<SidecarRole, string>;
  /** The plaintext column being migrated from, and the hidden property TypeORM knows it by. */
  plaintext?: { column: string; property: string; fallback: boolean };
  plaintextType?: ColumnType;
}

// biome-ignore lint/complexity/noBannedTypes: keyed by any class constructor
const definitions = new Map<Function, Map<string, EncryptedPropertyDefinition>>();

/**
 * Marks an entity property as encrypted. By default the property is stored in four sidecar columns
 * (`<name>_ciphertext`, `<name>_iv`, `<name>_wrapped_key`, `<name>_key_version`); with
 * `layout: 'compact'` in one (`<name>_ciphertext`) beside the data-key table. Never as plaintext;
 * reads and writes through repositories and query builders stay as they were.
 *
 * @example
 * ```ts
 * @Entity()
 * class Customer {
 *   @PrimaryGeneratedColumn() id!: number;
 *   @Encrypted() email!: string;
 *   @Encrypted({ type: 'json', nullable: true }) address!: Address | null;
 * }
 * ```
 */
export function Encrypted(options: EncryptedOptions = {}): PropertyDecorator {
  return (prototype: object, property: string | symbol) => {
    if (typeof property !== 'string') throw new ConfigError('@Encrypted() needs a string property name');
    const target = prototype.constructor;
    const baseName = options.name ?? property;
    const layout = checkedLayout(options.layout ?? 'sidecars', 'layout', target, property);
    const migrateFrom =
      options.migrateFrom === undefined
        ? undefined
        : checkedLayout(options.migrateFrom, 'migrateFrom', target, property);
    if (migrateFrom === layout) {
      throw new ConfigError(`migrateFrom names the property's own layout ('${layout}')`, {
        entity: target.name,
        column: property,
      });
    }
    const definition: EncryptedPropertyDefinition = {
      layout,
      ...(migrateFrom ? { migrateFrom } : {}),
      mapsSidecars: layout === 'sidecars' || migrateFrom === 'sidecars',
      target,
      propertyName: property,
      type: options.type ?? typeFromDesign(Reflect.getMetadata?.('design:type', prototype, property)),
      nullable: options.nullable ?? false,
      bindPrimaryKey: options.bindPrimaryKey ?? true,
      formerNames:
        options.renamedFrom === undefined
          ? []
          : typeof options.renamedFrom === 'string'
            ? [options.renamedFrom]
            : [...options.renamedFrom],
      mask: options.mask,
      baseName,
      columns: {
        ciphertext: `${baseName}_ciphertext`,
        iv: `${baseName}_iv`,
        wrappedKey: `${baseName}_wrapped_key`,
        keyVersion: `${baseName}_key_version`,
        ...options.columnNames,
      },
      sidecarProperties: {
        iv: `${property}$iv`,
        wrappedKey: `${property}$wrappedKey`,
        keyVersion: `${property}$keyVersion`,
      },
      plaintextType: options.plaintextColumn?.type,
      plaintext: options.plaintextColumn && {
        column: options.plaintextColumn.name,
        property: `${property}$plaintext`,
        fallback: options.readPlaintextFallback ?? false,
      },
    };
    register(definition);
    registerBlindIndex(definition, options);
  };
}

function register(definition: EncryptedPropertyDefinition): void {
  const { target, propertyName, columns, nullable } = definition;
  let forTarget = definitions.get(target);
  if (!forTarget) {
    forTarget = new Map();
    definitions.set(target, forTarget);
  }
  if (forTarget.has(propertyName)) {
    throw new ConfigError(`@Encrypted() is applied twice to ${target.name}.${propertyName}`);
  }
  forTarget.set(propertyName, definition);
  const storage = getMetadataArgsStorage();
  /* While an old plaintext column is migrated from, its rows have no ciphertext until the backfill
     reaches them: NOT NULL sidecars could not even be added to a populated table. */
  const columnsNullable = nullable || definition.plaintext !== undefined;
  /* Between layouts, rows of the other one have no sidecar values (or compact ones have none). */
  const sidecarsNullable = columnsNullable || definition.migrateFrom !== undefined;
  const column = (
    property: string,
    name: string,
    type: 'bytea' | 'int',
    transformer?: ValueTransformer,
    isNullable = columnsNullable,
  ) =>
    storage.columns.push({
      target,
      propertyName: property,
      mode: 'regular',
      options: { name, type, nullable: isNullable, ...(transformer ? { transformer } : {}) },
    });
  column(propertyName, columns.ciphertext, 'bytea', refuseWithoutEncryption(definition));
  if (definition.mapsSidecars) {
    column(definition.sidecarProperties.iv, columns.iv, 'bytea', undefined, sidecarsNullable);
    column(definition.sidecarProperties.wrappedKey, columns.wrappedKey, 'bytea', undefined, sidecarsNullable);
    column(definition.sidecarProperties.keyVersion, columns.keyVersion, 'int', undefined, sidecarsNullable);
  }
  const plaintext = definition.plaintext;
  if (plaintext) {
    storage.columns.push({
      target,
      propertyName: plaintext.property,
      mode: 'regular',
      options: { name: plaintext.column, type: definition.plaintextType, nullable: true },
    });
  }
}

/**
 * The ciphertext column's transformer until `attach()` replaces it: a DataSource without the
 * library attached would write the plaintext as bytes, so every value is refused before it
 * reaches the driver (reads pass through: the ciphertext is no secret).
 */
function refuseWithoutEncryption(definition: EncryptedPropertyDefinition): ValueTransformer {
  return {
    to(value: unknown): unknown {
      if (value === undefined) return value;
      throw new ConfigError(
        'this DataSource has no EnvelopeEncryption attached, so the encrypted property was not written ' +
          '(call encryption.attach(dataSource) before dataSource.initialize())',
        { entity: definition.target.name, column: definition.propertyName },
      );
    },
    from: (value: unknown) => value,
  };
}

/** Options an application-wide `@Encrypted()` default may set (see {@link encryptedWith}). */
export type EncryptedDefaults = Pick<EncryptedOptions, 'layout' | 'bindPrimaryKey'>;

/**
 * Makes an `@Encrypted()` decorator with other defaults, for an application-wide choice decided at
 * import time (so TypeORM's CLI, which reads only the entity classes, sees the same columns as the
 * running application). Options given to the decorator win over the defaults.
 *
 * @example
 * ```ts
 * // encrypted.ts, imported by every entity
 * export const Encrypted = encryptedWith({ layout: 'compact' });
 * ```
 */
export function encryptedWith(
  defaults: EncryptedDefaults,
): (options?: EncryptedOptions) => PropertyDecorator {
  if (!defaults || typeof defaults !== 'object') throw new ConfigError('encryptedWith() needs its defaults');
  const fixed = { ...defaults };
  return (options: EncryptedOptions = {}) => Encrypted({ ...fixed, ...definedOnly(options) });
}

function definedOnly(options: EncryptedOptions): EncryptedOptions {
  return Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)) as EncryptedOptions;
}

// biome-ignore lint/complexity/noBannedTypes: decorators receive any class constructor
function checkedLayout(value: unknown, option: string, target: Function, property: string): StorageLayout {
  if (value === 'sidecars' || value === 'compact') return value;
  throw new ConfigError(`${option} must be 'sidecars' or 'compact', got ${JSON.stringify(String(value))}`, {
    entity: target.name,
    column: property,
  });
}

/** The definition of `propertyName` declared on `target`, if it is encrypted. */
export function encryptedDefinition(
  target: unknown,
  propertyName: string,
): EncryptedPropertyDefinition | undefined {
  return typeof target === 'function' ? definitions.get(target)?.get(propertyName) : undefined;
}

/** Every encrypted property declared on `target` or a parent class, nearest first. */
export function encryptedDefinitionsOf(target: unknown): EncryptedPropertyDefinition[] {
  const found = new Map<string, EncryptedPropertyDefinition>();
  for (let t = target; typeof t === 'function' && t !== Function.prototype; t = Object.getPrototypeOf(t)) {
    for (const [name, definition] of definitions.get(t) ?? [])
      if (!found.has(name)) found.set(name, definition);
  }
  return [...found.values()];
}

function typeFromDesign(designType: unknown): ValueType | undefined {
  switch (designType) {
    case String:
      return 'string';
    case Number:
      return 'number';
    case Boolean:
      return 'boolean';
    case Date:
      return 'date';
    case Buffer:
      return 'buffer';
    case BigInt:
      return 'bigint';
    default:
      return undefined;
  }
}
