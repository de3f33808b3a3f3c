import type { EntityMetadata, QueryRunner } from 'typeorm';
import type { EncryptedColumns } from './encrypted-columns';
import { primaryKeyOf } from './primary-key';
import type { PropertyStateStore } from './property-state';

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
 * Fetches the sidecar columns of rows that a partial `select` loaded with only the ciphertext.
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
   * so its four parts always belong together.
   */
  async #run({ metadata, column, queryRunner, requests }: Batch) {
    try {
      const property = column.definition.propertyName;
      const ciphertextOf = (entity: object) => {
        const holder = column.holderOf(entity, false);
        return holder ? this.store.get(holder, property)?.loaded?.ciphertext : undefined;
      };
      const byKey = requests.every((r) => primaryKeyOf(metadata, r.entity) !== undefined);
      const identify = (entity: object) =>
        byKey ? primaryKeyOf(metadata, entity) : ciphertextOf(entity)?.toString('hex');
      const manager = queryRunner?.manager ?? metadata.connection.manager;
      const query = manager
        .createQueryBuilder(metadata.target, 'row')
        .select(
          [
            ...metadata.primaryColumns.map((c) => c.propertyPath),
            column.main.propertyPath,
            ...Object.values(column.sidecars).map((c) => c.propertyPath),
          ].map((path) => `row.${path}`),
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
        const freshHolder = row && column.holderOf(row, false);
        const loaded = freshHolder ? this.store.get(freshHolder, property)?.loaded : undefined;
        const target = column.holderOf(request.entity, true) as object;
        this.store.upsert(target, property).loaded = loaded
          ? { ...loaded, primaryKey: row && primaryKeyOf(metadata, row) }
          : { ciphertext: null };
        request.resolve();
      }
    } catch (error) {
      for (const request of requests) request.reject(error);
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
