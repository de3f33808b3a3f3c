import type { EntityMetadata, QueryRunner } from 'typeorm';
import { type EncryptedColumns, sidecarColumnsOf } from './encrypted-columns';
import { tenantText } from './encryption-tenant';
import { primaryKeyOf } from './primary-key';
import type { PropertyStateStore } from './property-state';

/** PostgreSQL binds at most 65,535 parameters per statement; stay well below it. */
const MAX_PARAMETERS_PER_QUERY = 30_000;

interface Batch {
  metadata: EntityMetadata;
  column: EncryptedColumns;
  queryRunner?: QueryRunner;
  requests: Request[];
}

interface Request {
  entity: object;
  resolve(): void;
  reject(error: unknown): void;
}

/**
 * Fetches what a partial `select` left out of rows it loaded with only the ciphertext: the sidecar
 * columns, and the primary key and tenant a value is bound to (a compact value needs only those).
 * TypeORM starts `afterLoad` for every row of a result before awaiting any, so the requests of one
 * result are gathered in a microtask and served by one query per entity and property.
 */
export class SidecarLoader {
  readonly #batches = new Map<string, Batch>();
  readonly #runnerIds = new WeakMap<object, number>();
  #nextRunnerId = 1;

  constructor(private readonly store: PropertyStateStore) {}

  /** Resolves once the sidecars of `entity` are in the store. */
  load(
    metadata: EntityMetadata,
    column: EncryptedColumns,
    entity: object,
    queryRunner?: QueryRunner,
  ): Promise<void> {
    const key = `${this.#runnerId(queryRunner)}:${metadata.name}:${column.main.propertyPath}`;
    let batch = this.#batches.get(key);
    if (!batch) {
      const created: Batch = { metadata, column, queryRunner, requests: [] };
      this.#batches.set(key, created);
      queueMicrotask(() => {
        this.#batches.delete(key);
        void this.#run(created);
      });
      batch = created;
    }
    const requests = batch.requests;
    return new Promise((resolve, reject) => requests.push({ entity, resolve, reject }));
  }

  /**
   * Reads the four columns again, by primary key where the rows have one, else by the ciphertext
   * itself (a partial select without the key). The whole sealed value comes from this second read,
   * so its four parts always belong together. Large results are read in chunks, each well below
   * PostgreSQL's limit on bound parameters.
   */
  async #run({ metadata, column, queryRunner, requests }: Batch) {
    const byKey = requests.every((r) => primaryKeyOf(metadata, r.entity) !== undefined);
    const perRow = byKey ? Math.max(1, metadata.primaryColumns.length) : 1;
    const chunkSize = Math.floor(MAX_PARAMETERS_PER_QUERY / perRow);
    for (let start = 0; start < requests.length; start += chunkSize) {
      const chunk = requests.slice(start, start + chunkSize);
      try {
        await this.#fetch(metadata, column, queryRunner, chunk, byKey);
      } catch (error) {
        for (const request of chunk) request.reject(error);
      }
    }
  }

  async #fetch(
    metadata: EntityMetadata,
    column: EncryptedColumns,
    queryRunner: QueryRunner | undefined,
    requests: Request[],
    byKey: boolean,
  ): Promise<void> {
    const path = column.main.propertyPath;
    const ciphertextOf = (entity: object) => this.store.get(entity, path)?.loaded?.ciphertext;
    const identify = (entity: object) =>
      byKey ? primaryKeyOf(metadata, entity) : ciphertextOf(entity)?.toString('hex');
    const manager = queryRunner?.manager ?? metadata.connection.manager;
    const query = manager
      .createQueryBuilder(metadata.target, 'row')
      .select(
        [
          ...metadata.primaryColumns.map((c) => c.propertyPath),
          column.main.propertyPath,
          ...sidecarColumnsOf(column).map((c) => c.propertyPath),
          ...(column.plaintext ? [column.plaintext.propertyPath] : []),
          ...(column.tenant ? [column.tenant.propertyPath] : []),
        ].map((p) => `row.${p}`),
      )
      .callListeners(false);
    if (byKey) query.whereInIds(requests.map((r) => metadata.getEntityIdMap(r.entity)));
    else
      query.where(`row.${column.main.propertyPath} IN (:...ciphertexts)`, {
        ciphertexts: requests.map((r) => ciphertextOf(r.entity)),
      });
    const fresh = new Map<string | undefined, object>();
    for (const row of await query.getMany()) fresh.set(identify(row), row);
    for (const request of requests) {
      const row = fresh.get(identify(request.entity));
      const fetched = row ? this.store.get(row, path) : undefined;
      const loaded = fetched?.loaded;
      column.holderOf(request.entity, true);
      const state = this.store.upsert(request.entity, path);
      const tenant =
        row && column.tenant ? tenantText(column.tenant, column.tenant.getEntityValue(row)) : null;
      state.loaded = loaded
        ? { ...loaded, primaryKey: row && primaryKeyOf(metadata, row), tenant }
        : { ciphertext: null };
      /* A row not yet backfilled still holds its value in the column it is migrated from. */
      if (fetched?.legacy !== undefined) state.legacy = fetched.legacy;
      request.resolve();
    }
  }

  #runnerId(queryRunner: QueryRunner | undefined): number {
    if (!queryRunner) return 0;
    let id = this.#runnerIds.get(queryRunner);
    if (id === undefined) {
      id = this.#nextRunnerId++;
      this.#runnerIds.set(queryRunner, id);
    }
    return id;
  }
}
