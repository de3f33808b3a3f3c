import type { EnvelopeEncryption } from '../envelope-encryption';
import {
  type EntitySelector,
  encryptedColumnsSql,
  type RotationTarget,
  withQueryRunner,
} from './rotation-target';

/** Stored values of one encrypted property, by master-key version. */
export interface PropertyStatus {
  entity: string;
  property: string;
  /** Rows per key version (`{ '1': 120, '2': 3 }`). */
  rowsByVersion: Record<string, number>;
  /** Rows whose value is null. */
  nullRows: number;
}

/** Counts stored values per master-key version, for every encrypted property. */
export async function encryptionStatus(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  options: { entities?: ReadonlyArray<EntitySelector> } = {},
): Promise<PropertyStatus[]> {
  return withQueryRunner(target, async (runner) => {
    const out: PropertyStatus[] = [];
    for (const column of encryptedColumnsSql(target, encryption, options.entities)) {
      const rows = (await runner.query(
        `SELECT ${column.keyVersion} AS version, count(*)::int AS n FROM ${column.table} GROUP BY 1 ORDER BY 1`,
      )) as Array<{ version: number | null; n: number }>;
      out.push({
        entity: column.entity,
        property: column.property,
        rowsByVersion: Object.fromEntries(
          rows.filter((r) => r.version !== null).map((r) => [String(r.version), r.n]),
        ),
        nullRows: rows.find((r) => r.version === null)?.n ?? 0,
      });
    }
    return out;
  });
}
