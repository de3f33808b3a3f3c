/**
 * The source of a TypeORM migration that re-wraps every stored data key under `toVersion`, so
 * that `typeorm migration:run` performs the rotation. The migration imports the application's
 * EnvelopeEncryption from `encryptionImport` (a module path, relative to the migration file).
 */
export function rotationMigrationSource(
  toVersion: number,
  timestamp: number,
  encryptionImport: string,
): string {
  const name = `RewrapDataKeysToVersion${toVersion}${timestamp}`;
  return `import type { MigrationInterface, QueryRunner } from 'typeorm';
import { rewrapDataKeys } from 'typeorm-envelope';
import { encryption } from '${encryptionImport}';

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
