import type { DataSource } from 'typeorm';
import type { EnvelopeEncryption } from '../envelope-encryption';
import { encryptedColumnsSql } from '../rotation/rotation-target';
import type { PropertyStatus } from '../rotation/status';

/**
 * One tenant's stored values per key version, for every encrypted property of entities with an
 * `@EncryptionTenant()` column: what `status --tenant` shows beside the tenant's keys, so an
 * operator sees which rows are still under an old key.
 */
export async function tenantRowsByVersion(
  dataSource: DataSource,
  encryption: EnvelopeEncryption,
  tenantId: string,
): Promise<PropertyStatus[]> {
  const runner = dataSource.createQueryRunner();
  try {
    const out: PropertyStatus[] = [];
    for (const column of encryptedColumnsSql(dataSource, encryption)) {
      if (!column.tenant) continue;
      const legacy = column.columns.definition.plaintext?.column;
      const pending = legacy
        ? `${column.ciphertext} IS NULL AND ${dataSource.driver.escape(legacy)} IS NOT NULL`
        : 'FALSE';
      const rows = (await runner.query(
        `SELECT ${column.keyVersion} AS version, ${pending} AS pending, count(*)::int AS n FROM ${column.table}
         WHERE ${column.tenant} = $1 GROUP BY 1, 2 ORDER BY 1`,
        [tenantId],
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
  } finally {
    await runner.release();
  }
}
