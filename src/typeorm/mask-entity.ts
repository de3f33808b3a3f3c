import { maskValue } from '../masking';
import { encryptedDefinitionsOf } from './encrypted-decorator';

/**
 * Returns a copy of `entity` for logs and support screens: every `@Encrypted()` property is
 * replaced by its mask (see `EncryptedOptions.mask`; `full` masking when none is set), also inside
 * embedded objects. Other properties are copied as they are; the entity is not changed.
 *
 * @example
 * ```ts
 * logger.info({ customer: maskEntity(customer) }); // { id: 7, email: 'j***@***.com', plan: 'pro' }
 * ```
 */
export function maskEntity<T extends object>(entity: T): { [K in keyof T]: T[K] | string | null } {
  const copy: Record<string, unknown> = { ...(entity as Record<string, unknown>) };
  const definitions = encryptedDefinitionsOf(entity.constructor);
  for (const definition of definitions) {
    if (definition.propertyName in copy) {
      copy[definition.propertyName] = maskValue(copy[definition.propertyName], definition.mask);
    }
  }
  for (const [name, value] of Object.entries(copy)) {
    if (
      value !== null &&
      typeof value === 'object' &&
      !definitions.some((d) => d.propertyName === name) &&
      encryptedDefinitionsOf(value.constructor).length > 0
    ) {
      copy[name] = maskEntity(value);
    }
  }
  return copy as { [K in keyof T]: T[K] | string | null };
}
