import type { QueryRunner } from 'typeorm';
import type { EnvelopeEncryption } from '../envelope-encryption';
import { ConfigError, IntegrityError } from '../errors';
import { describeError } from './describe-error';
import { recordJobEnd } from './job';
import { KeyRegistry } from './key-registry';
import {
  type EncryptedColumnSql,
  type EntitySelector,
  encryptedColumnsSql,
  primaryKeyBatches,
  type RotationTarget,
  withQueryRunner,
} from './rotation-target';

/** Options of {@link rewrapDataKeys}. */
export interface RewrapOptions {
  /** Entities to re-wrap (classes or names). Default: every entity with encrypted properties. */
  entities?: ReadonlyArray<EntitySelector>;
  /** The master-key version to re-wrap under. Default: the active version. */
  toVersion?: number;
  /** Rows per UPDATE. Default 1,000. */
  batchSize?: number;
  /** Count what would be re-wrapped; change nothing and call no key provider. */
  dryRun?: boolean;
  /** Called after each batch. */
  onProgress?: (progress: RewrapProgress) => void;
}

/** Progress of one encrypted property. */
export interface RewrapProgress {
  entity: string;
  property: string;
  /** Rows re-wrapped so far. */
  rowsDone: number;
  /** Rows under another version when this property's job started. */
  rowsTotal: number;
}

/** What happened to one encrypted property. */
export interface PropertyRewrapResult {
  entity: string;
  property: string;
  /** Rows under another version when the job started. */
  rowsTotal: number;
  /** Rows re-wrapped (a row the application rewrote meanwhile is left to the application). */
  rowsRewrapped: number;
  /** Distinct data keys found under other versions. */
  distinctDataKeys: number;
  /** Re-wrap calls made for this property (data keys shared with properties done before are reused). */
  rewrapCalls: number;
  durationMs: number;
  /** Data keys that could not be re-wrapped; their rows keep their old version. */
  failures: Array<{ keyVersion: number; rows: number; error: string }>;
}

/** What {@link rewrapDataKeys} did. It never throws midway: an unexpected error ends up in `error`. */
export interface RewrapResult {
  toVersion: number;
  dryRun: boolean;
  properties: PropertyRewrapResult[];
  /** Key-provider calls that re-wrapped a data key: one per distinct data key. */
  rewrapCalls: number;
  /** Key-provider calls that checked a new wrapped key before it was written. */
  verificationCalls: number;
  durationMs: number;
  error?: unknown;
}

/**
 * Re-wraps every stored data key under master-key version `toVersion` without touching the data:
 * `<col>_wrapped_key` and `<col>_key_version` change, `<col>_ciphertext` and `<col>_iv` stay
 * byte for byte the same. With the key registry, both the source and the target versions' master
 * keys must be the ones it recorded (a `ConfigError` otherwise, in `error` for the target and in
 * `failures` for a source).
 *
 * One provider call per distinct data key (KMS `ReEncrypt` between KMS keys, unwrap + wrap
 * otherwise); each new wrapped key is unwrapped and compared before it is written. Rows are then
 * updated in primary-key-ordered batches, each only where the row still holds the old wrapped key
 * and version, so a row the application rewrote meanwhile is never overwritten. Each batch commits
 * on its own (unless `target` is a QueryRunner in a transaction), so after a crash the job is
 * simply run again. Memory holds one batch of keys and the distinct data keys.
 *
 * @example
 * ```ts
 * const result = await rewrapDataKeys(dataSource, encryption, { toVersion: 2 });
 * ```
 */
export async function rewrapDataKeys(
  target: RotationTarget,
  encryption: EnvelopeEncryption,
  options: RewrapOptions = {},
): Promise<RewrapResult> {
  const started = performance.now();
  const toVersion = options.toVersion ?? encryption.keyring.activeVersion;
  const result: RewrapResult = {
    toVersion,
    dryRun: options.dryRun ?? false,
    properties: [],
    rewrapCalls: 0,
    verificationCalls: 0,
    durationMs: 0,
  };
  const audit = new KeyRegistry(target, encryption);
  try {
    /* An unknown target version, or one whose master key is not the recorded one, fails before any work. */
    await audit.loadReferences();
    if (result.dryRun) encryption.keyring.provider(toVersion);
    else await encryption.keyring.checkedProvider(toVersion);
    const batchSize = options.batchSize ?? 1_000;
    if (!Number.isSafeInteger(batchSize) || batchSize < 1)
      throw new ConfigError('batchSize must be a positive integer');
    const rewrapper = new Rewrapper(encryption, toVersion, result);
    if (!result.dryRun) await audit.record('rotation-started', toVersion, { entities: entityNames(options) });
    await withQueryRunner(target, async (runner) => {
      for (const column of encryptedColumnsSql(target, encryption, options.entities)) {
        result.properties.push(await rewrapProperty(runner, column, rewrapper, batchSize, options));
      }
    });
  } catch (error) {
    result.error = error;
  }
  result.durationMs = performance.now() - started;
  if (!result.dryRun) {
    await recordJobEnd(audit, 'rotation', result.toVersion, {
      error: result.error,
      failures: result.properties.reduce((n, p) => n + p.failures.length, 0),
      counts: {
        rowsRewrapped: result.properties.reduce((n, p) => n + p.rowsRewrapped, 0),
        rowsTotal: result.properties.reduce((n, p) => n + p.rowsTotal, 0),
        rewrapCalls: result.rewrapCalls,
        durationMs: Math.round(result.durationMs),
      },
    });
  }
  return result;
}

function entityNames(options: RewrapOptions): string[] | 'all' {
  return options.entities?.map((e) => (typeof e === 'string' ? e : e.name)) ?? 'all';
}

async function rewrapProperty(
  runner: QueryRunner,
  column: EncryptedColumnSql,
  rewrapper: Rewrapper,
  batchSize: number,
  options: RewrapOptions,
): Promise<PropertyRewrapResult> {
  const started = performance.now();
  const callsBefore = rewrapper.result.rewrapCalls;
  const keys = (await runner.query(
    `SELECT ${column.keyVersion} AS version, ${column.wrappedKey} AS wrapped, count(*)::int AS rows FROM ${column.table}
     WHERE ${column.keyVersion} IS NOT NULL AND ${column.keyVersion} <> $1 GROUP BY 1, 2`,
    [rewrapper.toVersion],
  )) as Array<{ version: number; wrapped: Buffer; rows: number }>;
  const outcome: PropertyRewrapResult = {
    entity: column.entity,
    property: column.property,
    rowsTotal: keys.reduce((n, k) => n + k.rows, 0),
    rowsRewrapped: 0,
    distinctDataKeys: keys.length,
    rewrapCalls: 0,
    durationMs: 0,
    failures: [],
  };
  if (!options.dryRun && keys.length > 0) {
    const mapping: Array<[Buffer, number, Buffer]> = [];
    for (const key of keys) {
      try {
        mapping.push([key.wrapped, key.version, await rewrapper.rewrap(key.version, key.wrapped)]);
      } catch (error) {
        outcome.failures.push({ keyVersion: key.version, rows: key.rows, error: describeError(error) });
      }
    }
    if (mapping.length > 0) {
      for await (const batch of primaryKeyBatches(runner, column, batchSize)) {
        outcome.rowsRewrapped += await updateBatch(runner, column, batch, mapping, rewrapper.toVersion);
        options.onProgress?.({
          entity: column.entity,
          property: column.property,
          rowsDone: outcome.rowsRewrapped,
          rowsTotal: outcome.rowsTotal,
        });
      }
    }
  }
  outcome.rewrapCalls = rewrapper.result.rewrapCalls - callsBefore;
  outcome.durationMs = performance.now() - started;
  return outcome;
}

/** One UPDATE for the rows of one key range: old wrapped key → new wrapped key, via a VALUES map. */
async function updateBatch(
  runner: QueryRunner,
  column: EncryptedColumnSql,
  batch: { condition: string; params: unknown[] },
  mapping: Array<[Buffer, number, Buffer]>,
  toVersion: number,
): Promise<number> {
  const base = batch.params.length;
  const values = mapping.map(
    (_, i) => `($${base + 3 * i + 1}::bytea, $${base + 3 * i + 2}::int, $${base + 3 * i + 3}::bytea)`,
  );
  const toParam = `$${base + 3 * mapping.length + 1}`;
  const result = await runner.query(
    `UPDATE ${column.table} SET ${column.wrappedKey} = m.new_wrapped, ${column.keyVersion} = ${toParam}::int
     FROM (VALUES ${values.join(', ')}) AS m(old_wrapped, old_version, new_wrapped)
     WHERE ${column.wrappedKey} = m.old_wrapped AND ${column.keyVersion} = m.old_version AND ${batch.condition}`,
    [...batch.params, ...mapping.flat(), toVersion],
    true,
  );
  return (result as { affected?: number }).affected ?? 0;
}

/**
 * Re-wraps each distinct data key once per job (keys shared by several properties are re-wrapped
 * once) and checks every new wrapped key before it is used.
 */
class Rewrapper {
  readonly #done = new Map<string, Promise<Buffer>>();

  constructor(
    readonly encryption: EnvelopeEncryption,
    readonly toVersion: number,
    readonly result: RewrapResult,
  ) {}

  rewrap(fromVersion: number, wrapped: Buffer): Promise<Buffer> {
    const id = `${fromVersion}:${wrapped.toString('base64')}`;
    let done = this.#done.get(id);
    if (!done) {
      done = this.#rewrapChecked(fromVersion, wrapped);
      this.#done.set(id, done);
    }
    return done;
  }

  async #rewrapChecked(fromVersion: number, wrapped: Buffer): Promise<Buffer> {
    const { keyring, cache } = this.encryption;
    /* Both keys must be the recorded ones: a wrong target would leave rows nobody else can read. */
    const from = await keyring.checkedProvider(fromVersion);
    const to = await keyring.checkedProvider(this.toVersion);
    this.result.rewrapCalls += 1;
    const rewrapped = await from.rewrapDataKey(wrapped, keyring.context, to);
    /* Check the new wrapped key before anything is written with it. */
    this.result.verificationCalls += 1;
    const fresh = await to.unwrapDataKey(rewrapped, keyring.context);
    try {
      const same = await cache.withDecryptionKey(fromVersion, wrapped, (old) => old.equals(fresh));
      if (!same) {
        throw new IntegrityError('a re-wrapped data key does not unwrap to the original key', {
          keyVersion: this.toVersion,
        });
      }
    } finally {
      fresh.fill(0);
    }
    return rewrapped;
  }
}
