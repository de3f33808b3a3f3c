import { getMetadataArgsStorage } from 'typeorm';
import { checkIndexableType, type Normalizer, normalizerFunction } from '../crypto/blind-index';
import { ConfigError } from '../errors';
import type { EncryptedPropertyDefinition } from './encrypted-decorator';

/** The `searchable` option of `@Encrypted()`: `true`, or how values are normalised first. */
export type SearchableOption = boolean | SearchableOptions;

/** Options of a searchable encrypted property. */
export interface SearchableOptions {
  /**
   * Applied to every value before it is indexed, on writes and in queries alike, so that
   * `' Ada@Example.COM '` finds `'ada@example.com'` with `'email'`. The stored value itself is
   * not changed. Built in: `'lowercase'`, `'trim'`, `'email'` (trim, then lower-case) and
   * `'digits'` (ASCII digits only, for phone numbers); or a function of the string. Changing it
   * later needs the index recomputed (`rotateIndexKey`).
   */
  normalize?: Normalizer;
}

/** The options of `@Encrypted()` that concern the blind index. */
export interface BlindIndexOptions {
  searchable?: SearchableOption;
  unique?: boolean;
  columnNames?: { blindIndex?: string };
}

/** Everything the library knows of one searchable property's blind index. */
export interface BlindIndexDefinition {
  /** The class the decorator was applied to. */
  // biome-ignore lint/complexity/noBannedTypes: decorators receive any class constructor
  target: Function;
  propertyName: string;
  /** Database name of the `bytea` index column. Default `<name>_bidx`. */
  column: string;
  /** The hidden property TypeORM knows the index column by; never set on entities. */
  property: string;
  normalizer?: Normalizer;
  normalize?: (value: string) => string;
  /** Whether the index carries a unique constraint (per tenant: see the README). */
  unique: boolean;
}

// biome-ignore lint/complexity/noBannedTypes: keyed by any class constructor
const definitions = new Map<Function, Map<string, BlindIndexDefinition>>();

/**
 * Registers the blind-index column of a searchable property and its index, with TypeORM's
 * metadata (so `synchronize` and `migration:generate` create both): a nullable `bytea` column
 * that is never selected by reads (nothing needs it back), and a B-tree index on it, unique with
 * `unique: true`.
 *
 * The unique index is on the index column alone and still unique per tenant: each tenant's values
 * are indexed under a key of its own, so equal values of two tenants have different indexes.
 */
export function registerBlindIndex(
  definition: EncryptedPropertyDefinition,
  options: BlindIndexOptions,
): void {
  const { target, propertyName } = definition;
  const context = { entity: target.name, column: propertyName };
  const searchable = options.searchable;
  if (!searchable) {
    if (options.unique) {
      throw new ConfigError(
        'unique: true needs searchable: true (a unique constraint needs a blind index: encrypted values ' +
          'never look equal)',
        context,
      );
    }
    if (options.columnNames?.blindIndex !== undefined) {
      throw new ConfigError('columnNames.blindIndex is given, but the property is not searchable', context);
    }
    return;
  }
  const normalizer = typeof searchable === 'object' ? searchable.normalize : undefined;
  let normalize: ((value: string) => string) | undefined;
  try {
    checkIndexableType(definition.type, normalizer);
    normalize = normalizerFunction(normalizer);
  } catch (error) {
    throw new ConfigError((error as ConfigError).detail ?? 'invalid searchable option', context);
  }
  const blindIndex: BlindIndexDefinition = {
    target,
    propertyName,
    column: options.columnNames?.blindIndex ?? `${definition.baseName}_bidx`,
    property: `${propertyName}$bidx`,
    ...(normalizer === undefined ? {} : { normalizer }),
    ...(normalize === undefined ? {} : { normalize }),
    unique: options.unique ?? false,
  };
  let forTarget = definitions.get(target);
  if (!forTarget) {
    forTarget = new Map();
    definitions.set(target, forTarget);
  }
  forTarget.set(propertyName, blindIndex);
  const storage = getMetadataArgsStorage();
  storage.columns.push({
    target,
    propertyName: blindIndex.property,
    mode: 'regular',
    options: { name: blindIndex.column, type: 'bytea', nullable: true, select: false },
  });
  storage.indices.push({
    target,
    columns: [blindIndex.property],
    unique: blindIndex.unique,
    synchronize: true,
  });
}

/** The blind index of `propertyName` declared on `target`, if it is searchable. */
export function blindIndexDefinition(
  target: unknown,
  propertyName: string,
): BlindIndexDefinition | undefined {
  return typeof target === 'function' ? definitions.get(target)?.get(propertyName) : undefined;
}
