import { userInfo } from 'node:os';
import type { QueryRunner } from 'typeorm';
import {
  AUDIT_LOG_TABLE,
  KEY_VERSIONS_TABLE,
} from '../../migrations/1764300000000-TypeormEnvelopeKeyRegistry';
import { TENANT_KEYS_TABLE } from '../../migrations/1764400000000-TypeormEnvelopeTenantKeys';
import type { EnvelopeEncryption, KeyValidation } from '../envelope-encryption';
import { ConfigError, UnsupportedOperationError } from '../errors';
import { indexKeysWrappedBy } from './rotate-index-key';
import {
  dataKeyIdSql,
  dataKeyTablePath,
  dataSourceOf,
  encryptedColumnsSql,
  holdsCompact,
  isCompactSql,
  keyTableExists,
  type RotationTarget,
  withQueryRunner,
} from './rotation-target';

/** The lifecycle state of a master-key version. */
export type KeyState = 'active' | 'decrypt-only' | 'retired';

/** One master-key version as recorded in the registry. */
export interface KeyVersionRecord {
  version: number;
  providerKind: string;
  /** The KMS key ARN, or a fingerprint of a customer-provided key; never the key. */
  keyReference: string;
  state: KeyState;
  createdAt: Date;
  activatedAt: Date | null;
  retiredAt: Date | null;
  lastValidatedAt: Date | null;
  rotationIntervalDays: number;
  /** Whether the configured rotation interval has passed since activation (active versions only). */
  dueForRotation: boolean;
}

/** Every audit event the library records. */
export const AUDIT_EVENTS = [
  'key-created',
  'key-validated',
  'key-activated',
  'key-retired',
  'rotation-started',
  'rotation-finished',
  'rotation-failed',
  'reencryption-started',
  'reencryption-finished',
  'reencryption-failed',
  'backfill-started',
  'backfill-finished',
  'backfill-failed',
  'index-key-rotated',
  'blind-indexes-filled',
  'layout-migration-started',
  'layout-migration-finished',
  'layout-migration-failed',
  'tenant-key-added',
  'tenant-key-validated',
  'tenant-key-activated',
  'tenant-key-validation-failed',
  'tenant-key-rewrapped',
  'tenant-reverted',
  'tenant-offboarded',
  'tenant-job-started',
  'tenant-job-finished',
  'tenant-job-failed',
  'tenant-rotation-interval-set',
] as const;

/** Audit events the library records. */
export type AuditEvent = (typeof AUDIT_EVENTS)[number];

/** One audit log entry. */
export interface AuditEntry {
  id: number;
  at: Date;
  event: AuditEvent;
  keyVersion: number | null;
  /** The tenant the event concerns, if any. */
  tenant: string | null;
  actor: string;
  details: Record<string, unknown>;
}

/** Filters of {@link KeyRegistry.auditLog}. */
export interface AuditFilter {
  /** Only events of this tenant. */
  tenant?: string;
  /** Only these events. */
  event?: AuditEvent | readonly AuditEvent[];
  /** Only events recorded by this actor. */
  actor?: string;
  /** Only events at or after this time. */
  since?: Date;
  /** Only events before this time. */
  until?: Date;
  /** At most this many, the newest ones. Default 1,000. */
  limit?: number;
}

/**
 * Who runs a job, for the audit log: `TYPEORM_ENVELOPE_ACTOR` when set (e.g. a CI job or an
 * operator's name), otherwise the operating-system user.
 */
export function currentActor(): string {
  const fromEnv = process.env.TYPEORM_ENVELOPE_ACTOR;
  if (fromEnv) return fromEnv;
  try {
    return userInfo().username;
  } catch {
    return 'unknown';
  }
}

/**
 * The key registry and audit log (tables made by the `TypeormEnvelopeKeyRegistry` migration).
 * With them, the registry decides which configured version is active; `activate` validates the
 * key first and every change is recorded. Without them, the configuration's `activeVersion`
 * decides and nothing is recorded.
 */
export class KeyRegistry {
  readonly #target: RotationTarget;
  readonly #encryption: EnvelopeEncryption;

  constructor(target: RotationTarget, encryption: EnvelopeEncryption) {
    this.#target = target;
    this.#encryption = encryption;
  }

  /** Whether the registry tables exist. */
  async exists(): Promise<boolean> {
    return this.#run(
      async (runner) => (await runner.hasTable(this.#path(KEY_VERSIONS_TABLE, false))) as boolean,
    );
  }

  /** Records configured versions the registry does not know yet (`key-created`); returns the registry. */
  async sync(): Promise<KeyVersionRecord[]> {
    await this.#run(async (runner) => {
      const recorded = await this.#rows(runner);
      const known = new Set(recorded.map((r) => r.version));
      const hasActive = recorded.some((r) => r.state === 'active');
      const { keyring } = this.#encryption;
      for (const version of keyring.versions) {
        if (known.has(version)) continue;
        const provider = keyring.provider(version);
        const { kind } = provider.describe();
        /* Recorded resolved (a KMS alias as its key ARN), as later comparisons resolve it. */
        const keyReference = await provider.resolveKeyReference();
        const state: KeyState = !hasActive && version === keyring.activeVersion ? 'active' : 'decrypt-only';
        await runner.query(
          `INSERT INTO ${this.#path(KEY_VERSIONS_TABLE)} (keyring_id, version, provider_kind, key_reference, state, activated_at)
           VALUES ($1, $2, $3, $4, $5::varchar, CASE WHEN $5::varchar = 'active' THEN now() END)`,
          [keyring.keyringId, version, kind, keyReference, state],
        );
        await this.#audit(runner, 'key-created', version, { kind, keyReference, state });
      }
    });
    return this.list();
  }

  /**
   * Reads the recorded key references and gives them to the keyring, which from then on refuses
   * to use a version whose configured master key is not the recorded one. Returns the records
   * (none when the tables do not exist).
   */
  async loadReferences(): Promise<KeyVersionRecord[]> {
    if (!(await this.exists())) return [];
    const records = await this.list();
    this.#encryption.keyring.recordReferences(records.map((r) => [r.version, r.keyReference] as const));
    return records;
  }

  /** Every recorded version of this keyring, retired ones included. */
  async list(): Promise<KeyVersionRecord[]> {
    return this.#run((runner) => this.#rows(runner));
  }

  /** The version the registry names active, if any. */
  async activeVersion(): Promise<number | undefined> {
    return (await this.list()).find((r) => r.state === 'active')?.version;
  }

  /**
   * Validates every configured version against its recorded key reference and with the key
   * provider (see `EnvelopeEncryption.validate`), and records it (`key-validated`).
   */
  async validate(): Promise<KeyValidation[]> {
    await this.loadReferences();
    const results = await this.#encryption.validate();
    await this.#run(async (runner) => {
      for (const result of results) {
        await runner.query(
          `UPDATE ${this.#path(KEY_VERSIONS_TABLE)} SET last_validated_at = now() WHERE keyring_id = $1 AND version = $2`,
          [this.#encryption.keyring.keyringId, result.version],
        );
        await this.#audit(runner, 'key-validated', result.version, { roundTrip: result.active });
      }
    });
    return results;
  }

  /**
   * Validates `version` (its master key must be the one recorded for it, then a full round trip),
   * then makes it the active one: new writes use it at once here, and other instances pick it up
   * within their refresh interval.
   */
  async activate(version: number): Promise<void> {
    await this.sync();
    await this.loadReferences();
    const state = await this.#run((runner) => this.#stateOf(runner, version));
    if (state === 'retired') {
      throw new ConfigError('a retired key version cannot be activated again', { keyVersion: version });
    }
    const validation = await this.#encryption.activate(version);
    await this.#run(async (runner) => {
      const table = this.#path(KEY_VERSIONS_TABLE);
      const keyringId = this.#encryption.keyring.keyringId;
      await runner.query(
        `UPDATE ${table} SET state = 'decrypt-only' WHERE keyring_id = $1 AND state = 'active'`,
        [keyringId],
      );
      await runner.query(
        `UPDATE ${table} SET state = 'active', activated_at = now(), last_validated_at = now() WHERE keyring_id = $1 AND version = $2`,
        [keyringId, version],
      );
      await this.#audit(runner, 'key-validated', version, { roundTrip: true });
      await this.#audit(runner, 'key-activated', version, { keyReference: validation.keyReference });
    });
  }

  /**
   * Retires `version`: kept on record for audit, no longer expected to decrypt anything. Refused
   * while it is active, while any row still uses it, or while a row of the data-key table is still
   * wrapped by it (run the re-wrap first).
   */
  async retire(version: number): Promise<void> {
    const rows = await this.rowsUsingVersion(version);
    await this.#run(async (runner) => {
      const state = await this.#stateOf(runner, version);
      if (!state) throw new ConfigError('key version is not in the registry', { keyVersion: version });
      if (state === 'active') {
        throw new UnsupportedOperationError(
          'the active key version cannot be retired; activate another first',
          {
            keyVersion: version,
          },
        );
      }
      if (rows > 0) {
        throw new UnsupportedOperationError(
          `${rows} stored values still use this key version; re-wrap them first (typeorm-envelope rotate)`,
          { keyVersion: version },
        );
      }
      const keyRows = await this.#keyRowsWrappedBy(runner, version);
      if (keyRows > 0) {
        throw new UnsupportedOperationError(
          `${keyRows} rows of the data-key table are still wrapped by this key version; re-wrap them first (typeorm-envelope rotate)`,
          { keyVersion: version },
        );
      }
      const indexKeys = await indexKeysWrappedBy(runner, this.#encryption.keyring.keyringId, version);
      if (indexKeys > 0) {
        throw new UnsupportedOperationError(
          `${indexKeys} index keys of searchable properties are still wrapped by this key version; re-wrap first (typeorm-envelope rotate)`,
          { keyVersion: version },
        );
      }
      const tenantKeys = await this.#tenantKeysWrappedBy(runner, version);
      if (tenantKeys > 0) {
        throw new UnsupportedOperationError(
          `${tenantKeys} customer-provided tenant keys are still wrapped by this key version; re-wrap first (typeorm-envelope rotate)`,
          { keyVersion: version },
        );
      }
      await runner.query(
        `UPDATE ${this.#path(KEY_VERSIONS_TABLE)} SET state = 'retired', retired_at = now() WHERE keyring_id = $1 AND version = $2`,
        [this.#encryption.keyring.keyringId, version],
      );
      await this.#audit(runner, 'key-retired', version, {});
    });
  }

  /**
   * How many stored values (across all encrypted properties) use `version`: sidecar values by their
   * version column, compact values by their key row's (a join, made only when a key row of this
   * keyring has that version).
   */
  async rowsUsingVersion(version: number): Promise<number> {
    return this.#run(async (runner) => {
      let total = 0;
      const keyRows = await this.#keyRowsWrappedBy(runner, version);
      for (const column of encryptedColumnsSql(this.#target, this.#encryption)) {
        if (column.sidecars) {
          const [row] = (await runner.query(
            `SELECT count(*)::int AS n FROM ${column.table} WHERE ${column.sidecars.keyVersion} = $1`,
            [version],
          )) as Array<{ n: number }>;
          total += row?.n ?? 0;
        }
        if (keyRows > 0 && holdsCompact(column)) {
          const value = `t.${column.ciphertext}`;
          const [row] = (await runner.query(
            `SELECT count(*)::int AS n FROM ${column.table} t JOIN ${column.dataKeyTable} k ON k.id = ${dataKeyIdSql(value)}
             WHERE ${isCompactSql(value)} AND k.keyring = $1 AND k.key_version = $2`,
            [this.#encryption.keyring.keyringId, version],
          )) as Array<{ n: number }>;
          total += row?.n ?? 0;
        }
      }
      return total;
    });
  }

  /** Rows of the data-key table of this keyring whose key this version wraps (none without the table). */
  async #keyRowsWrappedBy(runner: QueryRunner, version: number): Promise<number> {
    if (!(await keyTableExists(runner))) return 0;
    const [row] = (await runner.query(
      `SELECT count(*)::int AS n FROM ${dataKeyTablePath(this.#target)} WHERE keyring = $1 AND key_version = $2`,
      [this.#encryption.keyring.keyringId, version],
    )) as Array<{ n: number }>;
    return row?.n ?? 0;
  }

  /** Appends an entry to the audit log (a no-op when the tables do not exist). */
  async record(
    event: AuditEvent,
    keyVersion: number | null,
    details: Record<string, unknown> = {},
    about: { tenant?: string } = {},
  ): Promise<void> {
    await this.#run(async (runner) => {
      if (await runner.hasTable(this.#path(AUDIT_LOG_TABLE, false)))
        await this.#audit(runner, event, keyVersion, details, about.tenant);
    });
  }

  /**
   * The audit log of this keyring, oldest first: the newest `limit` entries (default 1,000) that
   * pass the filters. Filtering by tenant needs the `TypeormEnvelopeTenantKeys` migration.
   */
  async auditLog(filter: AuditFilter = {}): Promise<AuditEntry[]> {
    return this.#run(async (runner) => {
      const table = this.#path(AUDIT_LOG_TABLE);
      const hasTenant = await runner.hasColumn(this.#path(AUDIT_LOG_TABLE, false), 'tenant_id');
      const params: unknown[] = [this.#encryption.keyring.keyringId];
      const where = ['keyring_id = $1'];
      const add = (sql: (p: string) => string, value: unknown) => {
        params.push(value);
        where.push(sql(`$${params.length}`));
      };
      if (filter.tenant !== undefined) {
        if (!hasTenant) return [];
        add((p) => `tenant_id = ${p}`, filter.tenant);
      }
      if (filter.event !== undefined) {
        add(
          (p) => `event = ANY(${p}::varchar[])`,
          Array.isArray(filter.event) ? filter.event : [filter.event],
        );
      }
      if (filter.actor !== undefined) add((p) => `actor = ${p}`, filter.actor);
      if (filter.since !== undefined) add((p) => `at >= ${p}`, filter.since);
      if (filter.until !== undefined) add((p) => `at < ${p}`, filter.until);
      params.push(filter.limit ?? 1_000);
      const rows = (await runner.query(
        `SELECT id, at, event, key_version, ${hasTenant ? 'tenant_id' : 'NULL AS tenant_id'}, actor, details
         FROM ${table} WHERE ${where.join(' AND ')} ORDER BY id DESC LIMIT $${params.length}`,
        params,
      )) as Array<{
        id: string;
        at: Date;
        event: AuditEvent;
        key_version: number | null;
        tenant_id: string | null;
        actor: string;
        details: Record<string, unknown>;
      }>;
      return rows.reverse().map((r) => ({
        id: Number(r.id),
        at: r.at,
        event: r.event,
        keyVersion: r.key_version,
        tenant: r.tenant_id,
        actor: r.actor,
        details: r.details,
      }));
    });
  }

  /** Tenant keys whose stored secret this version wraps (the `wrappedBy` of customer-provided keys). */
  async #tenantKeysWrappedBy(runner: QueryRunner, version: number): Promise<number> {
    if (!(await runner.hasTable(this.#path(TENANT_KEYS_TABLE, false)))) return 0;
    const [row] = (await runner.query(
      `SELECT count(*)::int AS n FROM ${this.#path(TENANT_KEYS_TABLE)}
       WHERE keyring_id = $1 AND state <> 'destroyed' AND (descriptor->>'wrappedBy')::int = $2`,
      [this.#encryption.keyring.keyringId, version],
    )) as Array<{ n: number }>;
    return row?.n ?? 0;
  }

  async #stateOf(runner: QueryRunner, version: number): Promise<KeyState | undefined> {
    const [record] = (await runner.query(
      `SELECT state FROM ${this.#path(KEY_VERSIONS_TABLE)} WHERE keyring_id = $1 AND version = $2`,
      [this.#encryption.keyring.keyringId, version],
    )) as Array<{ state: KeyState }>;
    return record?.state;
  }

  async #rows(runner: QueryRunner): Promise<KeyVersionRecord[]> {
    const rows = (await runner.query(
      `SELECT version, provider_kind, key_reference, state, created_at, activated_at, retired_at, last_validated_at,
              rotation_interval_days, (state = 'active' AND activated_at + make_interval(days => rotation_interval_days) < now()) AS due
       FROM ${this.#path(KEY_VERSIONS_TABLE)} WHERE keyring_id = $1 ORDER BY version`,
      [this.#encryption.keyring.keyringId],
    )) as Array<Record<string, unknown>>;
    return rows.map((r) => ({
      version: r.version as number,
      providerKind: r.provider_kind as string,
      keyReference: r.key_reference as string,
      state: r.state as KeyState,
      createdAt: r.created_at as Date,
      activatedAt: r.activated_at as Date | null,
      retiredAt: r.retired_at as Date | null,
      lastValidatedAt: r.last_validated_at as Date | null,
      rotationIntervalDays: r.rotation_interval_days as number,
      dueForRotation: r.due === true,
    }));
  }

  async #audit(
    runner: QueryRunner,
    event: AuditEvent,
    keyVersion: number | null,
    details: Record<string, unknown>,
    tenant?: string,
  ) {
    const values = [
      this.#encryption.keyring.keyringId,
      event,
      keyVersion,
      currentActor(),
      JSON.stringify(details),
    ];
    await runner.query(
      tenant === undefined
        ? `INSERT INTO ${this.#path(AUDIT_LOG_TABLE)} (keyring_id, event, key_version, actor, details) VALUES ($1, $2, $3, $4, $5)`
        : `INSERT INTO ${this.#path(AUDIT_LOG_TABLE)} (keyring_id, event, key_version, actor, details, tenant_id) VALUES ($1, $2, $3, $4, $5, $6)`,
      tenant === undefined ? values : [...values, tenant],
    );
  }

  /** Appends an entry inside the caller's transaction (tenant operations record as they commit). */
  async recordWith(
    runner: QueryRunner,
    event: AuditEvent,
    keyVersion: number | null,
    details: Record<string, unknown>,
    tenant?: string,
  ): Promise<void> {
    await this.#audit(runner, event, keyVersion, details, tenant);
  }

  /** The path of one of the library's tables, quoted (or plain, for `hasTable`). */
  tablePath(table: string, quoted = true): string {
    return this.#path(table, quoted);
  }

  /** The table's path in the DataSource's schema, quoted for SQL (or plain, for `hasTable`). */
  #path(table: string, quoted = true): string {
    const dataSource = dataSourceOf(this.#target);
    const schema = (dataSource.options as { schema?: string }).schema;
    const parts = schema ? [schema, table] : [table];
    return quoted ? parts.map((p) => dataSource.driver.escape(p)).join('.') : parts.join('.');
  }

  #run<T>(fn: (runner: QueryRunner) => Promise<T>): Promise<T> {
    return withQueryRunner(this.#target, fn);
  }
}
