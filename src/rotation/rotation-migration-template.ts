/**
 * The class name stem of a rotation migration: `RewrapDataKeysToV3`. The class name adds `At` and
 * the timestamp TypeORM requires at its end (`RewrapDataKeysToV3At1796109641658`), so the version
 * and the timestamp cannot run into each other.
 */
export function rotationMigrationName(toVersion: number): string {
  return `RewrapDataKeysToV${toVersion}`;
}

/** Where a rotation migration imports the application's EnvelopeEncryption from. */
export interface EncryptionImport {
  /** Module specifier, relative to the migration file (e.g. `../data-source`). */
  module: string;
  /** The export's name; `default` for a default export. Defaults to `encryption`. */
  exportName?: string;
}

/**
 * The source of a TypeORM migration that re-wraps every stored data key under `toVersion`, so
 * that `typeorm migration:run` performs the rotation. The migration imports the application's
 * EnvelopeEncryption from `encryptionImport` (a module path relative to the migration file, or
 * the module and export name).
 */
export function rotationMigrationSource(
  toVersion: number,
  timestamp: number,
  encryptionImport: string | EncryptionImport,
): string {
  const from = typeof encryptionImport === 'string' ? { module: encryptionImport } : encryptionImport;
  const exportName = from.exportName ?? 'encryption';
  const importLine =
    exportName === 'default'
      ? `import encryption from '${from.module}';`
      : exportName === 'encryption'
        ? `import { encryption } from '${from.module}';`
        : `import { ${exportName} as encryption } from '${from.module}';`;
  const name = `${rotationMigrationName(toVersion)}At${timestamp}`;
  return `import type { MigrationInterface, QueryRunner } from 'typeorm';
import { rewrapDataKeys } from 'typeorm-envelope';
${importLine}

/** Re-wraps every stored data key under master-key version ${toVersion} (data is not re-encrypted). */
export class ${name} implements MigrationInterface {
  name = '${name}';

  async up(queryRunner: QueryRunner): Promise<void> {
    const result = await rewrapDataKeys(queryRunner, encryption, { toVersion: ${toVersion} });
    const failures = result.properties.flatMap((p) => p.failures);
    if (result.error || failures.length > 0) {
      throw new Error(\`re-wrap to version ${toVersion} failed: \${String(result.error ?? failures[0]?.error)}\`);
    }
  }

  async down(): Promise<void> {
    // Nothing to undo: values re-wrapped under version ${toVersion} stay readable while it is configured.
  }
}
`;
}
