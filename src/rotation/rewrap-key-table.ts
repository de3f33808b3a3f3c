import type { QueryRunner } from 'typeorm';
import { FIRST_TENANT_KEY_VERSION } from '../keys/keyring';
import { describeError } from './describe-error';
import type { Rewrapper } from './rewrap';
import { dataKeyTablePath } from './rotation-target';

/** What re-wrapping the data-key table did (compact properties). */
export interface KeyTableRewrapResult {
  /** Key rows of this keyring (with `tenant`, of that tenant) under another version when the job started. */
  keyRowsTotal: number;
  /** Key rows re-wrapped, each checked before it was written. */
  keyRowsRewrapped: number;
  /**
   * Key rows changed by someone else between this job's read and its write (another re-wrap running
   * at the same time): left as they are, not counted as failures.
   */
  keyRowsSkipped: number;
  /** Key rows of offboarded tenants: left as they are (unreadable by design). */
  offboardedKeyRows: number;
  /** Data rows written: none, ever (values name their key row by an id that never changes). */
  dataRowsTouched: 0;
  /** Key rows that could not be re-wrapped (they keep their version), by data-key id. */
  failures: KeyRowFailure[];
  durationMs: number;
}

/** A key row a job could not use: which one (by data-key id) and why (never key material). */
export interface KeyRowFailure {
  /** The row's id in the data-key table: the id compact values carry (decimal text). */
  dataKeyId: string;
  keyVersion: number;
  tenant?: string;
  error: string;
}

/** One row of the data-key table, as jobs read it. */
export interface KeyRow {
  id: string;
  keyring: string;
  tenant: string | null;
  keyVersion: number;
  wrappedKey: Buffer;
}

/** Key rows read per query: memory holds one page, whatever the number of data keys. */
const PAGE = 500;

/**
 * Re-wraps the data-key table's rows of this keyring under `rewrapper.toVersion`: with `tenant`,
 * that tenant's rows (to its active key); without, rows under the application keyring's versions
 * (tenants' rows among them, each in its tenant's scope), never rows under a tenant's own key.
 *
 * Each row is re-wrapped in its own scope (keyring and tenant bound into the wrapped key), the new
 * wrap is unwrapped and compared with the old key before anything is written, and the row is
 * updated only while it still holds the wrapped key and version that were read. `fingerprint` is
 * never changed (it identifies the key as first registered), nor is any data row. A row that fails
 * is reported by its id and keeps its version; the others go on. Running it again resumes: rows
 * already under the target are no longer selected.
 */
export async function rewrapKeyTable(
  runner: QueryRunner,
  rewrapper: Rewrapper,
  options: {
    tenant?: string;
    dryRun?: boolean;
    onProgress?: (progress: { keyRowsDone: number; keyRowsTotal: number }) => unknown;
  },
): Promise<KeyTableRewrapResult> {
  const started = performance.now();
  const { encryption, toVersion } = rewrapper;
  const table = dataKeyTablePath(runner);
  const keyring = encryption.keyring.keyringId;
  const tenant = options.tenant;
  /* Which rows: a tenant's (under any key), or those under the application keyring's versions. */
  const filter =
    tenant === undefined
      ? { sql: `key_version < ${FIRST_TENANT_KEY_VERSION}`, params: [] as unknown[] }
      : { sql: 'tenant_id = $3', params: [tenant] };
  const [count] = (await runner.query(
    `SELECT count(*)::int AS n FROM ${table} WHERE keyring = $1 AND key_version <> $2 AND ${filter.sql}`,
    [keyring, toVersion, ...filter.params],
  )) as Array<{ n: number }>;
  const result: KeyTableRewrapResult = {
    keyRowsTotal: count?.n ?? 0,
    keyRowsRewrapped: 0,
    keyRowsSkipped: 0,
    offboardedKeyRows: 0,
    dataRowsTouched: 0,
    failures: [],
    durationMs: 0,
  };
  if (options.dryRun || result.keyRowsTotal === 0) {
    result.durationMs = performance.now() - started;
    return result;
  }
  let done = 0;
  let after = '0';
  for (;;) {
    const page = (await runner.query(
      `SELECT id::text AS id, tenant_id, key_version, wrapped_key FROM ${table}
       WHERE keyring = $1 AND key_version <> $2 AND ${filter.sql} AND id > $${filter.params.length + 3}::bigint
       ORDER BY id LIMIT ${PAGE}`,
      [keyring, toVersion, ...filter.params, after],
    )) as Array<{ id: string; tenant_id: string | null; key_version: number; wrapped_key: Buffer }>;
    for (const row of page) {
      after = row.id;
      done += 1;
      const rowTenant = row.tenant_id ?? undefined;
      if (rowTenant !== undefined && encryption.tenantKeyrings.tenant(rowTenant)?.state === 'offboarded') {
        result.offboardedKeyRows += 1;
        continue;
      }
      try {
        /* The row's own scope: its tenant's keys are never used for another tenant's row, nor the reverse. */
        const scope = encryption.keyScope(rowTenant);
        const rewrapped = await rewrapper.rewrap(scope, row.key_version, row.wrapped_key);
        const written = (await runner.query(
          `UPDATE ${table} SET wrapped_key = $1, key_version = $2, rewrapped_at = now()
           WHERE id = $3::bigint AND keyring = $4 AND tenant_id IS NOT DISTINCT FROM $5
             AND key_version = $6 AND wrapped_key = $7`,
          [rewrapped, toVersion, row.id, keyring, row.tenant_id, row.key_version, row.wrapped_key],
          true,
        )) as { affected?: number };
        if ((written.affected ?? 0) > 0) result.keyRowsRewrapped += 1;
        else result.keyRowsSkipped += 1;
      } catch (error) {
        result.failures.push({
          dataKeyId: row.id,
          keyVersion: row.key_version,
          ...(rowTenant === undefined ? {} : { tenant: rowTenant }),
          error: describeError(error),
        });
      }
      await options.onProgress?.({ keyRowsDone: done, keyRowsTotal: result.keyRowsTotal });
    }
    if (page.length < PAGE) break;
  }
  result.durationMs = performance.now() - started;
  return result;
}
