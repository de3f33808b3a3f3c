import { getMetadataArgsStorage } from 'typeorm';
import { maskValue } from '../masking';
import { type EncryptedPropertyDefinition, encryptedDefinitionsOf } from './encrypted-decorator';

// biome-ignore lint/complexity/noBannedTypes: entity and embedded classes are any constructors
type ModelClass = Function;

/** What masking needs to know of one entity or embedded class. */
interface ClassInfo {
  encrypted: Map<string, EncryptedPropertyDefinition>;
  /** The class of each relation and embedded property, resolved when first needed. */
  nested: Map<string, () => ModelClass | undefined>;
}

/**
 * Returns a copy of `entity` for logs and support screens: every `@Encrypted()` property is
 * replaced by its mask (see `EncryptedOptions.mask`; `full` masking when none is set), across the
 * whole object graph: embedded objects, relations (loaded or assigned, also as plain objects) and
 * arrays, at any depth. An object reached twice (a cycle, or one object along two paths) becomes
 * one masked copy, so the copy has the shape of the original. Dates, buffers and other values
 * are kept as they are; promises (lazy relations) become `'[Promise]'`. Nothing is changed in the
 * given graph.
 *
 * @example
 * ```ts
 * logger.info({ customer: maskEntity(customer) });
 * // { id: 7, email: 'j***@***.com', plan: 'pro', orders: [{ id: 1, cardNumber: '****1111' }] }
 * ```
 */
export function maskEntity<T extends object>(entity: T): { [K in keyof T]: T[K] | string | null } {
  return maskAny(entity, undefined, new Map()) as { [K in keyof T]: T[K] | string | null };
}

function maskAny(value: unknown, declared: ModelClass | undefined, seen: Map<object, unknown>): unknown {
  if (value === null || typeof value !== 'object') return value;
  const done = seen.get(value);
  if (done !== undefined) return done;
  if (Array.isArray(value)) {
    const copy: unknown[] = [];
    seen.set(value, copy);
    for (const item of value) copy.push(maskAny(item, declared, seen));
    return copy;
  }
  /* A promise could print its resolved value (a lazily loaded relation) unmasked. */
  if (value instanceof Promise) return '[Promise]';
  const own = value.constructor;
  const model = typeof own === 'function' && infoOf(own) ? own : declared;
  if (!model && !isPlainObject(value)) return value; // a Date, a Buffer, a class of the application
  const info = model ? infoOf(model) : undefined;
  const copy: Record<string, unknown> = {};
  seen.set(value, copy);
  for (const [name, item] of Object.entries(value)) {
    const definition = info?.encrypted.get(name);
    copy[name] = definition
      ? maskValue(item, definition.mask)
      : maskAny(item, info?.nested.get(name)?.(), seen);
  }
  return copy;
}

function isPlainObject(value: object): boolean {
  const prototype = Object.getPrototypeOf(value);
  return prototype === Object.prototype || prototype === null;
}

const infos = new WeakMap<ModelClass, ClassInfo | null>();

/**
 * The encrypted properties and the relation and embedded classes of `model` (a parent class's
 * included), or `undefined` when TypeORM knows no columns or relations of the class.
 */
function infoOf(model: ModelClass): ClassInfo | undefined {
  const cached = infos.get(model);
  if (cached !== undefined) return cached ?? undefined;
  const storage = getMetadataArgsStorage();
  const lineage = new Set<unknown>();
  for (
    let c: unknown = model;
    typeof c === 'function' && c !== Function.prototype;
    c = Object.getPrototypeOf(c)
  ) {
    lineage.add(c);
  }
  const encrypted = new Map(encryptedDefinitionsOf(model).map((d) => [d.propertyName, d]));
  const nested = new Map<string, () => ModelClass | undefined>();
  for (const relation of storage.relations) {
    if (lineage.has(relation.target) && !nested.has(relation.propertyName)) {
      nested.set(
        relation.propertyName,
        once(() => resolveClass(relation.type)),
      );
    }
  }
  for (const embedded of storage.embeddeds) {
    if (lineage.has(embedded.target) && !nested.has(embedded.propertyName)) {
      nested.set(
        embedded.propertyName,
        once(() => resolveClass(embedded.type)),
      );
    }
  }
  const known = encrypted.size > 0 || nested.size > 0 || storage.columns.some((c) => lineage.has(c.target));
  const info = known ? { encrypted, nested } : null;
  infos.set(model, info);
  return info ?? undefined;
}

/** A relation's or embedded's type: a class, or an entity name (looked up among the entities). */
function resolveClass(type: unknown): ModelClass | undefined {
  let resolved: unknown = type;
  try {
    if (typeof type === 'function') resolved = (type as (t?: unknown) => unknown)();
  } catch {
    return undefined; // not a type function (a class given as is): nothing to resolve by
  }
  if (typeof resolved === 'function') return resolved as ModelClass;
  if (typeof resolved !== 'string') return undefined;
  const table = getMetadataArgsStorage().tables.find(
    (t) => t.name === resolved || (typeof t.target === 'function' && t.target.name === resolved),
  );
  return typeof table?.target === 'function' ? table.target : undefined;
}

function once<T>(fn: () => T): () => T {
  let done = false;
  let value: T;
  return () => {
    if (!done) {
      value = fn();
      done = true;
    }
    return value;
  };
}
