import { randomBytes } from 'node:crypto';
import type { QueryRunner } from 'typeorm';
import { TENANT_KEYS_TABLE, TENANTS_TABLE } from '../../migrations/1764400000000-TypeormEnvelopeTenantKeys';
import type { EnvelopeEncryption } from '../envelope-encryption';
import type { TenantKeyRecord, TenantKeyState, TenantRecord } from '../keys/tenant-keyrings';
import { type AuditEvent, KeyRegistry } from '../rotation/key-registry';
import { type RotationTarget, withQueryRunner } from '../rotation/rotation-target';
import { indexKeysTable, indexKeysTableExists } from '../typeorm/blind-index-store';

/** The state of a tenant's key job (onboarding, rotation or revert), as persisted. */
export type TenantJobState = 'pending' | 'validating' | 'rewrapping' | 'completed' | 'failed';

/** A tenant's key job: moves its existing rows under the key its new rows use. */
export interface TenantJob {
  /** `onboarding` (onto a key of its own), `rotation` (to another key of its own), `revert` (back to the application's key). */
  kind: 'onboarding' | 'rotation' | 'revert';
  state: TenantJobState;
  /** The tenant key version the rows move to; `null` for the application keyring's active version. */
  toVersion: number | null;
  /** Rows re-wrapped so far, and rows that were to be when the job started re-wrapping. */
  rowsDone: number;
  rowsTotal: number;
  startedAt: string | null;
  updatedAt: string;
  finishedAt: string | null;
  /** Why the job failed (no key material, no plaintext). */
  error: string | null;
}

/** A tenant as the registry records it, with what is shown to operators. */
export interface TenantRow extends TenantRecord {
  rotationIntervalDays: number;
  createdAt: Date;
  keyActivatedAt: Date | null;
  offboardedAt: Date | null;
  job: TenantJob | null;
}

/** A tenant key as the registry records it, with its dates. */
export interface TenantKeyRow extends TenantKeyRecord {
  createdAt: Date;
  activatedAt: Date | null;
  lastValidatedAt: Date | null;
  destroyedAt: Date | null;
}

/**
 * SQL over the tenant registry's tables (the `TypeormEnvelopeTenantKeys` migration). It stores
 * and reads records; deciding what they mean is the tenant API's.
 */
export class TenantRegistry {
  readonly #target: RotationTarget;
  readonly #encryption: EnvelopeEncryption;
  readonly audit: KeyRegistry;

  constructor(target: RotationTarget, encryption: EnvelopeEncryption) {
    this.#target = target;
    this.#encryption = encryption;
    this.audit = new KeyRegistry(target, encryption);
  }

  get #keyringId(): string {
    return this.#encryption.keyring.keyringId;
  }

  #table(name: string): string {
    return this.audit.tablePath(name);
  }

  run<T>(fn: (runner: QueryRunner) => Promise<T>): Promise<T> {
    return withQueryRunner(this.#target, fn);
  }

  /** Runs `fn` in a transaction (or inside the caller's, when the target is a runner in one). */
  transaction<T>(fn: (runner: QueryRunner) => Promise<T>): Promise<T> {
    return this.run(async (runner) => {
      if (runner.isTransactionActive) return fn(runner);
      await runner.startTransaction();
      try {
        const result = await fn(runner);
        await runner.commitTransaction();
        return result;
      } catch (error) {
        await runner.rollbackTransaction();
        throw error;
      }
    });
  }

  /** Whether the tenant tables exist. */
  async exists(): Promise<boolean> {
    return this.run(
      async (runner) => (await runner.hasTable(this.audit.tablePath(TENANTS_TABLE, false))) as boolean,
    );
  }

  /** Every tenant and tenant key of this keyring. */
  async readAll(runner?: QueryRunner): Promise<{ tenants: TenantRow[]; keys: TenantKeyRow[] }> {
    const read = async (r: QueryRunner) => ({
      tenants: await this.#tenants(r, 'keyring_id = $1', [this.#keyringId]),
      keys: await this.#keys(r, 'keyring_id = $1', [this.#keyringId]),
    });
    return runner ? read(runner) : this.run(read);
  }

  /** One tenant and its keys (`tenant` undefined when it has no record). */
  async readTenant(
    tenantId: string,
    runner?: QueryRunner,
  ): Promise<{ tenant: TenantRow | undefined; keys: TenantKeyRow[] }> {
    const read = async (r: QueryRunner) => {
      const params = [this.#keyringId, tenantId];
      const [tenant] = await this.#tenants(r, 'keyring_id = $1 AND tenant_id = $2', params);
      return { tenant, keys: await this.#keys(r, 'keyring_id = $1 AND tenant_id = $2', params) };
    };
    return runner ? read(runner) : this.run(read);
  }

  /** The key of `version` and its tenant, if the registry has them. */
  async readVersion(version: number): Promise<{ tenant: TenantRow; key: TenantKeyRow } | undefined> {
    return this.run(async (runner) => {
      const [key] = await this.#keys(runner, 'keyring_id = $1 AND version = $2', [this.#keyringId, version]);
      if (!key) return undefined;
      const [tenant] = await this.#tenants(runner, 'keyring_id = $1 AND tenant_id = $2', [
        this.#keyringId,
        key.tenantId,
      ]);
      return tenant ? { tenant, key } : undefined;
    });
  }

  /**
   * The tenant's record, made when it has none (with a new random External ID). Locks the row for
   * the rest of the transaction, so two instances changing one tenant take turns.
   */
  async ensureTenant(runner: QueryRunner, tenantId: string): Promise<TenantRow> {
    await runner.query(
      `INSERT INTO ${this.#table(TENANTS_TABLE)} (keyring_id, tenant_id, external_id) VALUES ($1, $2, $3)
       ON CONFLICT (keyring_id, tenant_id) DO NOTHING`,
      [this.#keyringId, tenantId, newExternalId()],
    );
    const [tenant] = await this.#tenants(runner, 'keyring_id = $1 AND tenant_id = $2 FOR UPDATE', [
      this.#keyringId,
      tenantId,
    ]);
    return tenant as TenantRow;
  }

  /** Records a new tenant key; returns its version (allocated from 1,000,000 up). */
  async insertKey(
    runner: QueryRunner,
    tenantId: string,
    kind: string,
    keyReference: string,
    descriptor: Record<string, unknown>,
  ): Promise<number> {
    const [row] = (await runner.query(
      `INSERT INTO ${this.#table(TENANT_KEYS_TABLE)} (keyring_id, tenant_id, provider_kind, key_reference, descriptor, state, last_validated_at)
       VALUES ($1, $2, $3, $4, $5, 'decrypt-only', now()) RETURNING version`,
      [this.#keyringId, tenantId, kind, keyReference, JSON.stringify(descriptor)],
    )) as Array<{ version: number }>;
    return (row as { version: number }).version;
  }

  /** Makes `version` (or the application's keyring, `null`) the one the tenant's new rows use. */
  async setActive(runner: QueryRunner, tenantId: string, version: number | null): Promise<void> {
    const keys = this.#table(TENANT_KEYS_TABLE);
    await runner.query(
      `UPDATE ${keys} SET state = 'decrypt-only' WHERE keyring_id = $1 AND tenant_id = $2 AND state = 'active'`,
      [this.#keyringId, tenantId],
    );
    if (version !== null) {
      await runner.query(
        `UPDATE ${keys} SET state = 'active', activated_at = now() WHERE keyring_id = $1 AND tenant_id = $2 AND version = $3`,
        [this.#keyringId, tenantId, version],
      );
    }
    await runner.query(
      `UPDATE ${this.#table(TENANTS_TABLE)} SET active_version = $3, key_activated_at = now()
       WHERE keyring_id = $1 AND tenant_id = $2`,
      [this.#keyringId, tenantId, version],
    );
  }

  /** Records that `version` passed validation now. */
  async markValidated(runner: QueryRunner, tenantId: string, version: number): Promise<void> {
    await runner.query(
      `UPDATE ${this.#table(TENANT_KEYS_TABLE)} SET last_validated_at = now()
       WHERE keyring_id = $1 AND tenant_id = $2 AND version = $3`,
      [this.#keyringId, tenantId, version],
    );
  }

  /** Persists the tenant's job (`null` clears it). */
  async setJob(runner: QueryRunner, tenantId: string, job: TenantJob | null): Promise<void> {
    await runner.query(
      `UPDATE ${this.#table(TENANTS_TABLE)} SET job = $3 WHERE keyring_id = $1 AND tenant_id = $2`,
      [this.#keyringId, tenantId, job === null ? null : JSON.stringify(job)],
    );
  }

  /**
   * Persists a running job's state, unless the tenant's job was replaced meanwhile (another key
   * activated, a revert, offboarding): then nothing is written and `false` is returned, so a job
   * that lost its target never hides the one that replaced it. The job still recorded must move
   * rows to the same version; at the `start` of a run, no job or a completed one may be recorded
   * too (a rotation the run starts itself). A tenant with no record has nothing to replace: `true`.
   */
  async saveRunningJob(
    runner: QueryRunner,
    tenantId: string,
    job: TenantJob,
    start: boolean,
  ): Promise<boolean> {
    const tenants = this.#table(TENANTS_TABLE);
    const sameTarget = `(job IS NOT NULL AND (job->>'toVersion') IS NOT DISTINCT FROM $4::text)`;
    const condition = start ? `(job IS NULL OR job->>'state' = 'completed' OR ${sameTarget})` : sameTarget;
    const saved = (await runner.query(
      `UPDATE ${tenants} SET job = $3 WHERE keyring_id = $1 AND tenant_id = $2 AND state <> 'offboarded' AND ${condition}`,
      [this.#keyringId, tenantId, JSON.stringify(job), job.toVersion === null ? null : String(job.toVersion)],
      true,
    )) as { affected?: number };
    if ((saved.affected ?? 0) > 0) return true;
    const [exists] = (await runner.query(
      `SELECT 1 FROM ${tenants} WHERE keyring_id = $1 AND tenant_id = $2`,
      [this.#keyringId, tenantId],
    )) as unknown[];
    return exists === undefined;
  }

  async setRotationInterval(runner: QueryRunner, tenantId: string, days: number): Promise<void> {
    await runner.query(
      `UPDATE ${this.#table(TENANTS_TABLE)} SET rotation_interval_days = $3 WHERE keyring_id = $1 AND tenant_id = $2`,
      [this.#keyringId, tenantId, days],
    );
  }

  /**
   * Destroys what the application holds of the tenant's keys: every descriptor (a wrapped
   * customer-provided key, a KMS key and role) is erased, the records are kept as `destroyed` for
   * audit, the tenant's blind-index keys are erased (records kept as `retired`), and the tenant is
   * marked offboarded. Returns how many keys and index keys were.
   */
  async offboard(runner: QueryRunner, tenantId: string): Promise<{ keys: number; indexKeys: number }> {
    return {
      keys: await this.#destroyKeys(runner, tenantId),
      indexKeys: await this.#eraseIndexKeys(runner, tenantId),
    };
  }

  /**
   * Erases the tenant's blind-index keys (records kept as `retired`): with them its indexes could
   * still be computed, and a guessed value tested against its rows, even on the application's key.
   */
  async #eraseIndexKeys(runner: QueryRunner, tenantId: string): Promise<number> {
    if (!(await indexKeysTableExists(runner))) return 0;
    const result = (await runner.query(
      `UPDATE ${indexKeysTable(runner.connection)} SET state = 'retired', wrapped_key = NULL, retired_at = now()
       WHERE keyring_id = $1 AND tenant_id = $2 AND wrapped_key IS NOT NULL`,
      [this.#keyringId, tenantId],
      true,
    )) as { affected?: number };
    return result.affected ?? 0;
  }

  async #destroyKeys(runner: QueryRunner, tenantId: string): Promise<number> {
    const result = (await runner.query(
      `UPDATE ${this.#table(TENANT_KEYS_TABLE)} SET state = 'destroyed', descriptor = '{}'::jsonb, destroyed_at = now()
       WHERE keyring_id = $1 AND tenant_id = $2 AND state <> 'destroyed'`,
      [this.#keyringId, tenantId],
      true,
    )) as { affected?: number };
    await runner.query(
      `UPDATE ${this.#table(TENANTS_TABLE)} SET state = 'offboarded', active_version = NULL, offboarded_at = now(), job = NULL
       WHERE keyring_id = $1 AND tenant_id = $2`,
      [this.#keyringId, tenantId],
    );
    return result.affected ?? 0;
  }

  /** Replaces a key's descriptor, only if it is still `before` (a concurrent change wins). Returns whether it did. */
  async replaceDescriptor(
    runner: QueryRunner,
    version: number,
    before: Readonly<Record<string, unknown>>,
    after: Record<string, unknown>,
  ): Promise<boolean> {
    const result = (await runner.query(
      `UPDATE ${this.#table(TENANT_KEYS_TABLE)} SET descriptor = $3 WHERE keyring_id = $1 AND version = $2 AND descriptor = $4::jsonb`,
      [this.#keyringId, version, JSON.stringify(after), JSON.stringify(before)],
      true,
    )) as { affected?: number };
    return (result.affected ?? 0) > 0;
  }

  /** Appends a tenant event to the audit log, in `runner`'s transaction. */
  async record(
    runner: QueryRunner,
    event: AuditEvent,
    tenantId: string,
    keyVersion: number | null,
    details: Record<string, unknown>,
  ): Promise<void> {
    await this.audit.recordWith(runner, event, keyVersion, details, tenantId);
  }

  async #tenants(runner: QueryRunner, where: string, params: unknown[]): Promise<TenantRow[]> {
    const rows = (await runner.query(
      `SELECT tenant_id, external_id, state, active_version, rotation_interval_days, created_at, key_activated_at,
              offboarded_at, job
       FROM ${this.#table(TENANTS_TABLE)} WHERE ${where}`,
      params,
    )) as Array<Record<string, unknown>>;
    return rows.map((r) => ({
      tenantId: r.tenant_id as string,
      externalId: r.external_id as string,
      state: r.state as TenantRecord['state'],
      activeVersion: (r.active_version as number | null) ?? null,
      rotationIntervalDays: r.rotation_interval_days as number,
      createdAt: r.created_at as Date,
      keyActivatedAt: r.key_activated_at as Date | null,
      offboardedAt: r.offboarded_at as Date | null,
      job: (r.job as TenantJob | null) ?? null,
    }));
  }

  async #keys(runner: QueryRunner, where: string, params: unknown[]): Promise<TenantKeyRow[]> {
    const rows = (await runner.query(
      `SELECT version, tenant_id, provider_kind, key_reference, descriptor, state, created_at, activated_at,
              last_validated_at, destroyed_at
       FROM ${this.#table(TENANT_KEYS_TABLE)} WHERE ${where} ORDER BY version`,
      params,
    )) as Array<Record<string, unknown>>;
    return rows.map((r) => ({
      version: r.version as number,
      tenantId: r.tenant_id as string,
      kind: r.provider_kind as string,
      keyReference: r.key_reference as string,
      state: r.state as TenantKeyState,
      descriptor: Object.freeze({ ...(r.descriptor as Record<string, unknown>) }),
      createdAt: r.created_at as Date,
      activatedAt: r.activated_at as Date | null,
      lastValidatedAt: r.last_validated_at as Date | null,
      destroyedAt: r.destroyed_at as Date | null,
    }));
  }
}

/** A stable, random External ID for a tenant's cross-account role (AWS allows 2-1224 characters of `[\w+=,.@:/-]`). */
function newExternalId(): string {
  return `te-${randomBytes(18).toString('base64url')}`;
}
