import type { EnvelopeEncryption } from '../envelope-encryption';
import { tenantParameter } from '../typeorm/encryption-tenant';
import {
  dataKeyIdSql,
  type EntitySelector,
  encryptedColumnsSql,
  holdsCompact,
  isCompactSql,
  type RotationTarget,
  requireKeyTableFor,
  type StorageLayout,
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
  /** The layout new values are written in (only for properties that involve the compact layout). */
  layout?: StorageLayout;
  /** The layout the column still holds values of while it is migrated (`migrateFrom`). */
  migrateFrom?: StorageLayout;
  /** Stored values by layout: what a layout migration has left to convert. */
  valuesByLayout?: { sidecars: number; compact: number };
  /**
   * Compact values whose row in the data-key table is missing: unreadable until the table is
   * restored from the backup taken with the data. Counted in no version.
   */
  valuesWithoutKeyRow?: number;
}

/**
 * Counts stored values per master-key version, for every encrypted property, and the rows that
 * still wait for the backfill. With `tenant`, one tenant's rows (versions from 1,000,000 up are its
 * own keys; below, the application keyring's). A compact value counts under its key row's version
 * (one join on the data-key table); a compact value whose key row is missing counts in
 * `valuesWithoutKeyRow`, under no version.
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
    const columns = encryptedColumnsSql(target, encryption, options.entities);
    await requireKeyTableFor(runner, columns);
    for (const column of columns) {
      if (options.tenant !== undefined && !column.tenant) continue;
      const filter = options.tenant === undefined ? '' : `WHERE t.${column.tenant} = $1`;
      const legacy = column.columns.definition.plaintext?.column;
      const value = `t.${column.ciphertext}`;
      const pending = legacy
        ? `${value} IS NULL AND t.${runner.connection.driver.escape(legacy)} IS NOT NULL`
        : 'FALSE';
      const compact = holdsCompact(column);
      const sidecarVersion = column.sidecars ? `t.${column.sidecars.keyVersion}` : 'NULL::int';
      /* Compact values: the version of their key row, by a join on the data-key table. */
      const rows = (await runner.query(
        compact
          ? `SELECT CASE WHEN ${isCompactSql(value)} THEN k.key_version ELSE ${sidecarVersion} END AS version,
                    ${pending} AS pending, COALESCE(${isCompactSql(value)}, FALSE) AS compact,
                    (${isCompactSql(value)} AND k.id IS NULL) IS TRUE AS missing, count(*)::int AS n
             FROM ${column.table} t LEFT JOIN ${column.dataKeyTable} k
               ON ${isCompactSql(value)} AND k.id = ${dataKeyIdSql(value)}
             ${filter} GROUP BY 1, 2, 3, 4 ORDER BY 1`
          : `SELECT ${sidecarVersion} AS version, ${pending} AS pending, FALSE AS compact, FALSE AS missing,
                    count(*)::int AS n
             FROM ${column.table} t ${filter} GROUP BY 1, 2 ORDER BY 1`,
        options.tenant === undefined || !column.columns.tenant
          ? []
          : [tenantParameter(column.columns.tenant, options.tenant)],
      )) as Array<{
        version: number | null;
        pending: boolean;
        compact: boolean;
        missing: boolean;
        n: number;
      }>;
      const count = (match: (r: (typeof rows)[number]) => boolean) =>
        rows.filter(match).reduce((n, r) => n + r.n, 0);
      const stored = (r: (typeof rows)[number]) => r.version !== null || r.missing;
      out.push({
        entity: column.entity,
        property: column.property,
        rowsByVersion: Object.fromEntries(
          rows.filter((r) => r.version !== null).map((r) => [String(r.version), r.n]),
        ),
        nullRows: count((r) => !stored(r) && !r.pending),
        pendingBackfill: count((r) => r.pending),
        ...(compact || column.migrateFrom
          ? {
              layout: column.layout,
              ...(column.migrateFrom ? { migrateFrom: column.migrateFrom } : {}),
              valuesByLayout: {
                sidecars: count((r) => stored(r) && !r.compact),
                compact: count((r) => r.compact),
              },
              valuesWithoutKeyRow: count((r) => r.missing),
            }
          : {}),
      });
    }
    return out;
  });
}
