import type { DataSource } from 'typeorm';
import type { EnvelopeEncryption } from '../envelope-encryption';
import { ConfigError, EnvelopeError, withErrorContext } from '../errors';
import { keyIdentity } from '../keys/key-identity';
import type { KeyProvider } from '../keys/key-provider';
import { FIRST_TENANT_KEY_VERSION } from '../keys/keyring';
import type { TenantKeyDescriptor } from '../keys/tenant-key-factories';
import type { TenantKeyState } from '../keys/tenant-keyrings';
import { describeError } from '../rotation/describe-error';
import { type RewrapProgress, rewrapDataKeys } from '../rotation/rewrap';
import {
  dataSourceOf,
  encryptedColumnsSql,
  type RotationTarget,
  withQueryRunner,
} from '../rotation/rotation-target';
import { tenantIdOf, tenantParameter } from '../typeorm/encryption-tenant';
import { type TenantJob, type TenantKeyRow, TenantRegistry, type TenantRow } from './tenant-registry';

/** What {@link TenantAdmin.addKey} recorded. */
export interface TenantKeyResult {
  tenantId: string;
  /** The key's version: from 1,000,000 up, never the version of any other key. */
  version: number;
  state: TenantKeyState;
  kind: string;
  /** The KMS key ARN, or the fingerprint of a customer-provided key. */
  keyReference: string;
  /** The job that moves the tenant's existing rows under the key, when it was activated. */
  job: TenantJob | null;
}

/** One tenant key as shown to operators: never the key, never its wrapped form. */
export interface TenantKeySummary {
  version: number;
  kind: string;
  keyReference: string;
  state: TenantKeyState;
  createdAt: Date;
  activatedAt: Date | null;
  lastValidatedAt: Date | null;
  destroyedAt: Date | null;
}

/** What {@link TenantAdmin.status} reports of one tenant. */
export interface TenantStatus {
  tenantId: string;
  /** `active`, or `offboarded` (its keys destroyed). A tenant never recorded is `active` on the application's key. */
  state: 'active' | 'offboarded';
  /** The External ID its cross-account role requires; `null` until one is asked for or a key added. */
  externalId: string | null;
  /** The tenant key its new rows use; `null`: the application's keyring. */
  activeVersion: number | null;
  /** The key reference of the active key (the application keyring's active version's when `activeVersion` is null). */
  activeKeyReference: string;
  keys: TenantKeySummary[];
  job: TenantJob | null;
  rotationIntervalDays: number;
  /** Whether its own active key is older than the rotation interval. */
  dueForRotation: boolean;
  keyActivatedAt: Date | null;
  offboardedAt: Date | null;
}

/** What {@link TenantAdmin.offboard} destroyed. */
export interface OffboardResult {
  tenantId: string;
  /** Tenant keys whose records were erased (wrapped customer-provided keys, KMS key and role). */
  keysDestroyed: number;
  /**
   * The tenant's blind-index keys erased (their records kept as `retired`): its indexes can no
   * longer be computed, so no guessed value can be tested against its rows.
   */
  indexKeysErased: number;
  /**
   * The tenant's stored values under the application's keyring (rows never moved to a key of its
   * own): offboarding refuses to read them, but crypto-shredding does not apply; delete them to erase.
   */
  valuesUnderApplicationKey: number;
}

/** Options of {@link TenantAdmin.runJob}. */
export interface TenantJobOptions {
  /** Rows per UPDATE. Default 1,000. */
  batchSize?: number;
  /**
   * Called after each batch, once the job's progress is persisted (so `status`, here or in another
   * process, shows at least as much); a promise it returns is awaited before the next batch.
   */
  onProgress?: (job: TenantJob, progress: RewrapProgress) => unknown;
}

const DEFAULT_ROTATION_DAYS = 365;

/**
 * Tenant keys at run time (`encryption.tenants`): add, validate, activate, list, offboard. Needs
 * the tenant registry's tables (the `TypeormEnvelopeTenantKeys` migration). Every change is
 * recorded in the audit log with the tenant and the key reference, and reaches the other
 * instances within their refresh interval; this instance uses it at once.
 */
export class TenantAdmin {
  readonly #target: RotationTarget;
  readonly #encryption: EnvelopeEncryption;
  readonly #registry: TenantRegistry;

  constructor(target: RotationTarget, encryption: EnvelopeEncryption) {
    this.#target = target;
    this.#encryption = encryption;
    this.#registry = new TenantRegistry(target, encryption);
  }

  /**
   * The tenant's External ID, for the trust policy of the role its customer creates for this
   * application (`sts:ExternalId`). Random, made once per tenant and stored; the same at every call.
   */
  async externalIdFor(tenantId: string): Promise<string> {
    const id = this.#tenantId(tenantId);
    await this.#requireTables();
    return this.#registry.transaction(
      async (runner) => (await this.#registry.ensureTenant(runner, id)).externalId,
    );
  }

  /**
   * Adds a key for the tenant: a customer-provided key (`{ kind: 'customer-key', key }`, stored
   * wrapped by the application's keyring, shown only by fingerprint) or a KMS key in the
   * customer's account (`{ kind: 'aws-kms', keyId, roleArn?, externalId?, region? }`). The key is
   * validated first with a round trip under the tenant's encryption context; a key that fails is
   * not recorded. With `activate` (default), the tenant's new rows use it at once, and its existing
   * rows wait for {@link runJob} (state `pending`).
   */
  async addKey(
    tenantId: string,
    descriptor: TenantKeyDescriptor,
    options: { activate?: boolean } = {},
  ): Promise<TenantKeyResult> {
    const id = this.#tenantId(tenantId);
    if (!descriptor || typeof descriptor !== 'object' || typeof descriptor.kind !== 'string') {
      throw new ConfigError('a tenant key descriptor needs a kind (customer-key, aws-kms, …)', {
        tenant: id,
      });
    }
    await this.#requireTables();
    const before = await this.#registry.readTenant(id);
    this.#refuseOffboarded(before.tenant);
    const externalId = await this.externalIdFor(id);
    const factory = this.#encryption.tenantKeyrings.factories.get(descriptor.kind);
    const context = { tenantId: id, vendor: this.#encryption.keyring, externalId };
    const stored = await factory
      .prepare(descriptor as Record<string, unknown>, context)
      .catch((error: unknown) => {
        throw withErrorContext(error, { tenant: id });
      });
    const provider = await factory.create(stored, context);
    /* Before the key is used at all: another customer's key (or role) is never touched for this tenant. */
    await this.#refuseSharedKey(id, provider.describe().keyReference).catch((error: unknown) => {
      (provider as { destroy?: () => void }).destroy?.();
      throw error;
    });
    let keyReference: string;
    try {
      keyReference = await this.#validated(id, provider, 'new key', descriptor.kind);
    } finally {
      (provider as { destroy?: () => void }).destroy?.();
    }
    /* Again with the reference the provider resolved (a KMS alias or key id becomes its ARN). */
    await this.#refuseSharedKey(id, keyReference);
    const activate = options.activate ?? true;
    const result = await this.#registry.transaction(async (runner) => {
      const tenant = await this.#registry.ensureTenant(runner, id);
      this.#refuseOffboarded(tenant);
      const version = await this.#registry.insertKey(runner, id, descriptor.kind, keyReference, stored);
      const details = { kind: descriptor.kind, keyReference };
      await this.#registry.record(runner, 'tenant-key-added', id, version, details);
      await this.#registry.record(runner, 'tenant-key-validated', id, version, {
        keyReference,
        roundTrip: true,
      });
      let job: TenantJob | null = null;
      if (activate) job = await this.#activateIn(runner, tenant, version, keyReference);
      return { version, job };
    });
    await this.refresh(id);
    return {
      tenantId: id,
      version: result.version,
      state: activate ? 'active' : 'decrypt-only',
      kind: descriptor.kind,
      keyReference,
      job: result.job,
    };
  }

  /**
   * Makes one of the tenant's keys the one its new rows use, after validating it with a round
   * trip; its existing rows wait for {@link runJob} (state `pending`).
   */
  async activate(tenantId: string, version: number): Promise<TenantKeyResult> {
    const id = this.#tenantId(tenantId);
    await this.#requireTables();
    const key = await this.#ownKey(id, version);
    const provider = await this.#encryption.keyScope(id).checkedProvider(version);
    await this.#validated(id, provider, `version ${version}`, key.kind);
    const job = await this.#registry.transaction(async (runner) => {
      const tenant = await this.#registry.ensureTenant(runner, id);
      this.#refuseOffboarded(tenant);
      await this.#registry.markValidated(runner, id, version);
      await this.#registry.record(runner, 'tenant-key-validated', id, version, {
        keyReference: key.keyReference,
        roundTrip: true,
      });
      return this.#activateIn(runner, tenant, version, key.keyReference);
    });
    await this.refresh(id);
    return { tenantId: id, version, state: 'active', kind: key.kind, keyReference: key.keyReference, job };
  }

  /**
   * Validates the tenant's key (`version`, default the active one) with a round trip, records it,
   * and returns its summary. A failure is recorded too, and thrown naming the tenant and key.
   */
  async validate(tenantId: string, version?: number): Promise<TenantKeySummary> {
    const id = this.#tenantId(tenantId);
    await this.#requireTables();
    const { tenant } = await this.#registry.readTenant(id);
    this.#refuseOffboarded(tenant);
    const wanted = version ?? tenant?.activeVersion;
    if (wanted === undefined || wanted === null) {
      throw new ConfigError('the tenant has no key of its own to validate (it uses the application key)', {
        tenant: id,
      });
    }
    const key = await this.#ownKey(id, wanted);
    const provider = await this.#encryption.keyScope(id).checkedProvider(wanted);
    await this.#validated(id, provider, `version ${wanted}`, key.kind);
    await this.#registry.transaction(async (runner) => {
      await this.#registry.markValidated(runner, id, wanted);
      await this.#registry.record(runner, 'tenant-key-validated', id, wanted, {
        keyReference: key.keyReference,
        roundTrip: true,
      });
    });
    return summary({ ...key, lastValidatedAt: new Date() });
  }

  /**
   * Moves the tenant back to the application's keyring: its new rows use it at once, its existing
   * rows wait for {@link runJob}. Audited as `tenant-reverted`.
   */
  async revert(tenantId: string): Promise<TenantJob> {
    const id = this.#tenantId(tenantId);
    await this.#requireTables();
    const job = await this.#registry.transaction(async (runner) => {
      const tenant = await this.#registry.ensureTenant(runner, id);
      this.#refuseOffboarded(tenant);
      await this.#registry.setActive(runner, id, null);
      const next = newJob('revert', null);
      await this.#registry.setJob(runner, id, next);
      await this.#registry.record(runner, 'tenant-reverted', id, null, {
        from: tenant.activeVersion,
        keyReference: await this.#vendorReference(),
      });
      return next;
    });
    await this.refresh(id);
    return job;
  }

  /**
   * Runs the tenant's key job: validates the key its rows move to, re-wraps its data keys under it
   * (ciphertexts and IVs untouched, each new wrap checked before it is written, batches committed
   * one by one beside live writes), and marks it `completed`, or `failed` with the reason. Its
   * state is persisted at each step, so a job stopped by a crash is simply run again. Without a
   * pending job, re-wraps whatever is left under other keys (a rotation).
   */
  async runJob(tenantId: string, options: TenantJobOptions = {}): Promise<TenantJob> {
    const id = this.#tenantId(tenantId);
    await this.#requireTables();
    const { tenant } = await this.#registry.readTenant(id);
    this.#refuseOffboarded(tenant);
    let job: TenantJob =
      tenant?.job && tenant.job.state !== 'completed'
        ? { ...tenant.job }
        : newJob('rotation', tenant?.activeVersion ?? null);
    const target = job.toVersion ?? this.#encryption.keyring.activeVersion;
    const resumedFrom = job.state === 'pending' ? undefined : job.state;
    /*
     * Saves run one after another, so the persisted state never goes back to an older one, and
     * stop once the tenant's job was replaced (another key activated, a revert, offboarding): this
     * run must not hide the job that replaced it.
     */
    let saving: Promise<void> = Promise.resolve();
    let saves = 0;
    let replaced = false;
    const save = (changes: Partial<TenantJob>): Promise<void> => {
      job = { ...job, ...changes, updatedAt: new Date().toISOString() };
      const snapshot = job;
      const start = saves++ === 0;
      /* After the previous save settled: one that failed must not stop the later ones. */
      saving = saving
        .catch(() => undefined)
        .then(async () => {
          if (replaced) return;
          const saved = await this.#registry.run((runner) =>
            this.#registry.saveRunningJob(runner, id, snapshot, start),
          );
          if (!saved) replaced = true;
        });
      return saving;
    };
    const replacedError = () =>
      new ConfigError(
        "the tenant's job was replaced while it ran (another key activated, a revert or offboarding); " +
          'rows moved so far stay readable, and the job that replaced it moves them on',
        { tenant: id, keyVersion: target },
      );
    const stillCurrent = () => {
      if (replaced) throw replacedError();
    };
    await this.refresh(id);
    const keyReference = await this.#referenceOf(id, target);
    await save({ state: 'validating', startedAt: job.startedAt ?? new Date().toISOString(), error: null });
    await this.#record('tenant-job-started', id, target, {
      kind: job.kind,
      toVersion: target,
      keyReference,
      ...(resumedFrom ? { resumedFrom } : {}),
    });
    try {
      const scope = this.#encryption.keyScope(id);
      const provider = await scope.checkedProvider(target);
      await this.#validated(id, provider, `version ${target}`, provider.describe().kind);
      const pending = await rewrapDataKeys(this.#target, this.#encryption, {
        tenant: id,
        toVersion: target,
        dryRun: true,
      });
      if (pending.error) throw pending.error;
      const rowsTotal = pending.properties.reduce((n, p) => n + p.rowsTotal, 0);
      await save({ state: 'rewrapping', rowsTotal, rowsDone: 0 });
      stillCurrent();
      const done = new Map<string, number>();
      const result = await rewrapDataKeys(this.#target, this.#encryption, {
        tenant: id,
        toVersion: target,
        ...(options.batchSize ? { batchSize: options.batchSize } : {}),
        onProgress: async (progress) => {
          done.set(`${progress.entity}.${progress.property}`, progress.rowsDone);
          /*
           * Persisted at each batch, so status (here or in another process) shows how far it got,
           * and awaited before the caller is told: a process killed after reporting a batch has
           * that batch in its persisted state. A save that failed is not reported (the job goes
           * on, and the next batch's save carries the count).
           */
          const persisted = await save({ rowsDone: [...done.values()].reduce((a, b) => a + b, 0) }).then(
            () => true,
            () => false,
          );
          /* A replaced job stops here rather than after its last batch. */
          stillCurrent();
          if (persisted) await options.onProgress?.(job, progress);
        },
      });
      await saving.catch(() => undefined);
      stillCurrent();
      if (result.error) throw result.error;
      const failures = result.properties.flatMap((p) => p.failures);
      if (failures.length) {
        throw new ConfigError(
          `${failures.length} data keys could not be re-wrapped: ${failures.map((f) => f.error).join('; ')}`,
          { tenant: id },
        );
      }
      const left = await this.#valuesNotUnder(id, target);
      if (left > 0) {
        throw new ConfigError(`${left} stored values are still under other keys; run the job again`, {
          tenant: id,
        });
      }
      const rowsDone = result.properties.reduce((n, p) => n + p.rowsRewrapped, 0);
      await save({ state: 'completed', rowsDone, finishedAt: new Date().toISOString() });
      stillCurrent();
      await this.#record('tenant-job-finished', id, target, {
        kind: job.kind,
        keyReference,
        rowsRewrapped: rowsDone,
        rewrapCalls: result.rewrapCalls,
      });
    } catch (error) {
      await saving.catch(() => undefined);
      const reason = jobFailure(replaced ? replacedError() : error);
      await save({ state: 'failed', error: reason });
      await this.#record('tenant-job-failed', id, target, {
        kind: job.kind,
        keyReference,
        error: reason,
        rowsDone: job.rowsDone,
      });
    }
    return job;
  }

  /** Every tenant the registry records, with its keys (never key material) and job. */
  async list(): Promise<TenantStatus[]> {
    await this.#requireTables();
    const { tenants, keys } = await this.#registry.readAll();
    const vendor = await this.#vendorReference();
    return tenants
      .sort((a, b) => a.tenantId.localeCompare(b.tenantId))
      .map((t) =>
        statusOf(
          t,
          t.tenantId,
          keys.filter((k) => k.tenantId === t.tenantId),
          vendor,
        ),
      );
  }

  /** One tenant's keys, active key, job and rotation state. A tenant never recorded uses the application key. */
  async status(tenantId: string): Promise<TenantStatus> {
    const id = this.#tenantId(tenantId);
    await this.#requireTables();
    const { tenant, keys } = await this.#registry.readTenant(id);
    return statusOf(tenant, id, keys, await this.#vendorReference());
  }

  /** Tenants whose own active key is older than their rotation interval. */
  async due(): Promise<TenantStatus[]> {
    return (await this.list()).filter((t) => t.dueForRotation);
  }

  /** Sets how often the tenant's key should be rotated (default 365 days); `due()` reports it when passed. */
  async setRotationInterval(tenantId: string, days: number): Promise<void> {
    const id = this.#tenantId(tenantId);
    if (!Number.isSafeInteger(days) || days < 1)
      throw new ConfigError('a rotation interval is a positive number of days');
    await this.#requireTables();
    await this.#registry.transaction(async (runner) => {
      await this.#registry.ensureTenant(runner, id);
      await this.#registry.setRotationInterval(runner, id, days);
      await this.#registry.record(runner, 'tenant-rotation-interval-set', id, null, { days });
    });
  }

  /**
   * Offboards the tenant (crypto-shredding): destroys what the application holds of its keys (a
   * wrapped customer-provided key; a KMS key's record) and every cached key of the tenant in this
   * instance. Its rows are then unreadable by design (`TenantOffboardedError`; `verify` counts them
   * as offboarded, not corrupt) and writes for it are refused, here at once and in other instances
   * within their refresh interval. Cannot be undone.
   */
  async offboard(tenantId: string): Promise<OffboardResult> {
    const id = this.#tenantId(tenantId);
    await this.#requireTables();
    const erased = await this.#registry.transaction(async (runner) => {
      await this.#registry.ensureTenant(runner, id);
      const { keys } = await this.#registry.readTenant(id, runner);
      const destroyed = await this.#registry.offboard(runner, id);
      await this.#registry.record(runner, 'tenant-offboarded', id, null, {
        keysDestroyed: destroyed.keys,
        indexKeysErased: destroyed.indexKeys,
        keyReferences: keys.filter((k) => k.state !== 'destroyed').map((k) => k.keyReference),
      });
      return destroyed;
    });
    await this.refresh(id);
    this.#encryption.purgeCache(id);
    return {
      tenantId: id,
      keysDestroyed: erased.keys,
      indexKeysErased: erased.indexKeys,
      valuesUnderApplicationKey: await this.#valuesUnderApplicationKey(id),
    };
  }

  /**
   * Reads the tenant's records (or all) from the registry into this instance's keyrings: what is
   * committed (a change made through a QueryRunner in a transaction is used once it commits, at the
   * next refresh).
   */
  async refresh(tenantId?: string): Promise<void> {
    /* Committed records only: a change made in a caller's transaction that is then rolled back
       (a failed migration) must never seal rows under a key no record keeps. */
    const registry = new TenantRegistry(dataSourceOf(this.#target), this.#encryption);
    if (!(await registry.exists())) return;
    const read = this.#encryption.tenantKeyrings.beginRead();
    if (tenantId === undefined) {
      const { tenants, keys } = await registry.readAll();
      this.#encryption.applyTenantRecords(tenants, keys, undefined, read);
    } else {
      const { tenant, keys } = await registry.readTenant(tenantId);
      this.#encryption.applyTenantRecords(tenant ? [tenant] : [], keys, tenantId, read);
    }
  }

  async #activateIn(
    runner: Parameters<TenantRegistry['setJob']>[0],
    tenant: TenantRow,
    version: number,
    keyReference: string,
  ): Promise<TenantJob> {
    await this.#registry.setActive(runner, tenant.tenantId, version);
    const job = newJob(tenant.activeVersion === null ? 'onboarding' : 'rotation', version);
    await this.#registry.setJob(runner, tenant.tenantId, job);
    await this.#registry.record(runner, 'tenant-key-activated', tenant.tenantId, version, {
      keyReference,
      from: tenant.activeVersion,
    });
    return job;
  }

  /** Validates `provider` with a round trip under the tenant's context; returns its key reference. */
  async #validated(tenantId: string, provider: KeyProvider, what: string, kind: string): Promise<string> {
    const context = this.#encryption.tenantKeyrings.contextOf(tenantId);
    try {
      await provider.validate(context);
      return await provider.resolveKeyReference();
    } catch (error) {
      const keyId = provider.describe().keyReference;
      const reason = describeError(error);
      await this.#record('tenant-key-validation-failed', tenantId, null, {
        kind,
        keyReference: keyId,
        what,
        error: reason,
      });
      throw withErrorContext(error, { tenant: tenantId, keyId });
    }
  }

  async #record(
    event: Parameters<TenantRegistry['record']>[1],
    tenantId: string,
    version: number | null,
    details: Record<string, unknown>,
  ) {
    await this.#registry
      .run((runner) => this.#registry.record(runner, event, tenantId, version, details))
      .catch(() => undefined);
  }

  async #ownKey(tenantId: string, version: number): Promise<TenantKeyRow> {
    if (!Number.isSafeInteger(version) || version < FIRST_TENANT_KEY_VERSION) {
      throw new ConfigError(`tenant key versions start at ${FIRST_TENANT_KEY_VERSION}`, {
        tenant: tenantId,
        keyVersion: version,
      });
    }
    const { tenant, keys } = await this.#registry.readTenant(tenantId);
    this.#refuseOffboarded(tenant);
    const key = keys.find((k) => k.version === version);
    if (!key)
      throw new ConfigError('the tenant has no key of this version', {
        tenant: tenantId,
        keyVersion: version,
      });
    if (key.state === 'destroyed') {
      throw new ConfigError('this tenant key was destroyed', { tenant: tenantId, keyVersion: version });
    }
    return key;
  }

  /**
   * A key is one customer's alone: the same key (ARN or fingerprint) is refused twice, and any
   * version of it (see {@link keyIdentity}) is refused for a second tenant.
   */
  async #refuseSharedKey(tenantId: string, keyReference: string): Promise<void> {
    const { keys } = await this.#registry.readAll();
    const live = keys.filter((k) => k.state !== 'destroyed');
    const identity = keyIdentity(keyReference);
    const same =
      live.find((k) => k.keyReference === keyReference) ??
      live.find((k) => k.tenantId !== tenantId && keyIdentity(k.keyReference) === identity);
    if (!same) return;
    if (same.tenantId === tenantId) {
      throw new ConfigError(
        `this key is already the tenant's version ${same.version}; activate that version instead`,
        {
          tenant: tenantId,
          keyId: keyReference,
        },
      );
    }
    throw new ConfigError(
      'this key is already registered for another tenant; a tenant key serves one tenant only',
      {
        tenant: tenantId,
        keyId: keyReference,
      },
    );
  }

  #refuseOffboarded(tenant: TenantRow | undefined): void {
    if (tenant?.state !== 'offboarded') return;
    throw new ConfigError('the tenant was offboarded; its keys cannot be used or replaced', {
      tenant: tenant.tenantId,
    });
  }

  /** The tenant id in the form this DataSource's rows bind it (see `tenantIdOf`). */
  #tenantId(tenantId: string): string {
    const columns = this.#encryption
      .encryptedEntities(dataSourceOf(this.#target))
      .flatMap(({ columns: [first] }) => (first?.tenant ? [first.tenant] : []));
    return tenantIdOf(columns, tenantId);
  }

  async #requireTables(): Promise<void> {
    if (await this.#registry.exists()) return;
    throw new ConfigError(
      'tenant keys need the tenant registry tables: add the TypeormEnvelopeKeyRegistry and TypeormEnvelopeTenantKeys ' +
        'migrations to the DataSource and run them',
    );
  }

  /** The key reference of `version` as this tenant uses it: one of its own keys, or the application keyring's. */
  async #referenceOf(tenantId: string, version: number): Promise<string> {
    if (version < FIRST_TENANT_KEY_VERSION) {
      try {
        return this.#encryption.keyring.provider(version).describe().keyReference;
      } catch {
        return `version ${version}`; // not configured here: the job fails, naming the version
      }
    }
    const { keys } = await this.#registry.readTenant(tenantId);
    return keys.find((k) => k.version === version)?.keyReference ?? `version ${version}`;
  }

  async #vendorReference(): Promise<string> {
    const { keyring } = this.#encryption;
    return keyring.provider(keyring.activeVersion).describe().keyReference;
  }

  /** The tenant's stored values under any key other than `version`. */
  async #valuesNotUnder(tenantId: string, version: number): Promise<number> {
    return this.#countValues(tenantId, (kv) => `${kv} <> ${Number(version)}`);
  }

  async #valuesUnderApplicationKey(tenantId: string): Promise<number> {
    return this.#countValues(tenantId, (kv) => `${kv} < ${FIRST_TENANT_KEY_VERSION}`);
  }

  async #countValues(tenantId: string, condition: (keyVersion: string) => string): Promise<number> {
    return withQueryRunner(this.#target, async (runner) => {
      let total = 0;
      for (const column of encryptedColumnsSql(this.#target, this.#encryption)) {
        const tenant = column.columns.tenant && tenantParameter(column.columns.tenant, tenantId);
        if (!tenant) continue;
        const [row] = (await runner.query(
          `SELECT count(*)::int AS n FROM ${column.table} WHERE ${column.tenant} = $1 AND ${column.keyVersion} IS NOT NULL AND ${condition(column.keyVersion)}`,
          [tenant],
        )) as Array<{ n: number }>;
        total += row?.n ?? 0;
      }
      return total;
    });
  }
}

/**
 * A job's failure reason: our errors with their context (tenant, key version, key reference, never
 * key material), so `status` names the key that failed; anything else as `describeError` has it.
 */
function jobFailure(error: unknown): string {
  return error instanceof EnvelopeError ? `${error.name}: ${error.message}` : describeError(error);
}

function newJob(kind: TenantJob['kind'], toVersion: number | null): TenantJob {
  return {
    kind,
    state: 'pending',
    toVersion,
    rowsDone: 0,
    rowsTotal: 0,
    startedAt: null,
    updatedAt: new Date().toISOString(),
    finishedAt: null,
    error: null,
  };
}

function summary(key: TenantKeyRow): TenantKeySummary {
  const { version, kind, keyReference, state, createdAt, activatedAt, lastValidatedAt, destroyedAt } = key;
  return { version, kind, keyReference, state, createdAt, activatedAt, lastValidatedAt, destroyedAt };
}

function statusOf(
  tenant: TenantRow | undefined,
  tenantId: string,
  keys: TenantKeyRow[],
  vendorReference: string,
): TenantStatus {
  const activeVersion = tenant?.activeVersion ?? null;
  const active = keys.find((k) => k.version === activeVersion);
  const interval = tenant?.rotationIntervalDays ?? DEFAULT_ROTATION_DAYS;
  const since = tenant?.keyActivatedAt ?? active?.activatedAt ?? null;
  return {
    tenantId,
    state: tenant?.state ?? 'active',
    externalId: tenant?.externalId ?? null,
    activeVersion,
    activeKeyReference: active?.keyReference ?? vendorReference,
    keys: keys.map(summary),
    job: tenant?.job ?? null,
    rotationIntervalDays: interval,
    dueForRotation:
      activeVersion !== null && since !== null && Date.now() - since.getTime() > interval * 86_400_000,
    keyActivatedAt: tenant?.keyActivatedAt ?? null,
    offboardedAt: tenant?.offboardedAt ?? null,
  };
}

/** The tenant API of `dataSource`, for tools given a DataSource. */
export function tenantsOf(dataSource: DataSource, encryption: EnvelopeEncryption): TenantAdmin {
  return new TenantAdmin(dataSource, encryption);
}
