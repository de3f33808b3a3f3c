import type { EnvelopeEncryption } from '../envelope-encryption';
import { tenantParameter } from '../typeorm/encryption-tenant';
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
  /** Rows whose value is null (rows pending backfill not included). */
  nullRows: number;
  /**
   * Rows whose value is still only in the old plaintext column (`plaintextColumn`), waiting for
   * the backfill. Always 0 for a property without `plaintextColumn`.
   */
  pendingBackfill: number;
}

/**
 * Counts stored values per master-key version, for every encrypted property, and the rows that
 * still wait for the backfill. With `tenant`, one tenant's rows (versions from 1,000,000 up are its
 * own keys; below, the application keyring's).
 */
export async function encryptionStatus(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  options: {
    entities?: ReadonlyArray<EntitySelector>;
    /** Only this tenant's rows, of the entities with an `@EncryptionTenant()` column (others are left out). */
    tenant?: string;
  } = {},
): Promise<PropertyStatus[]> {
  return withQueryRunner(target, async (runner) => {
    const out: PropertyStatus[] = [];
    for (const column of encryptedColumnsSql(target, encryption, options.entities)) {
      if (options.tenant !== undefined && !column.tenant) continue;
      const filter = options.tenant === undefined ? '' : `WHERE ${column.tenant} = $1`;
      const legacy = column.columns.definition.plaintext?.column;
      const pending = legacy
        ? `${column.ciphertext} IS NULL AND ${runner.connection.driver.escape(legacy)} IS NOT NULL`
        : 'FALSE';
      const rows = (await runner.query(
        `SELECT ${column.keyVersion} AS version, ${pending} AS pending, count(*)::int AS n
         FROM ${column.table} ${filter} GROUP BY 1, 2 ORDER BY 1`,
        options.tenant === undefined || !column.columns.tenant
          ? []
          : [tenantParameter(column.columns.tenant, options.tenant)],
      )) as Array<{ version: number | null; pending: boolean; n: number }>;
      const count = (match: (r: (typeof rows)[number]) => boolean) =>
        rows.filter(match).reduce((n, r) => n + r.n, 0);
      out.push({
        entity: column.entity,
        property: column.property,
        rowsByVersion: Object.fromEntries(
          rows.filter((r) => r.version !== null).map((r) => [String(r.version), r.n]),
        ),
        nullRows: count((r) => r.version === null && !r.pending),
        pendingBackfill: count((r) => r.pending),
      });
    }
    return out;
  });
}
