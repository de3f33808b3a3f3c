import type { EntityMetadata, QueryRunner } from 'typeorm';
import { UnsupportedOperationError } from '../errors';
import type { EncryptedColumns } from './encrypted-columns';
import { primaryKeyOf } from './primary-key';
import type { PropertyStateStore } from './property-state';

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
  readonly #batches = new Map<
    string,
    { metadata: EntityMetadata; column: EncryptedColumns; queryRunner?: QueryRunner; requests: Request[] }
  >();
  #runnerIds = new WeakMap<object, number>();
  #nextRunnerId = 1;

  constructor(private readonly store: PropertyStateStore) {}

  /** Resolves once the sidecars of `entity` are in the store. */
  load(
    metadata: EntityMetadata,
    column: EncryptedColumns,
    entity: object,
    queryRunner?: QueryRunner,
  ): Promise<void> {
    if (primaryKeyOf(metadata, entity) === undefined) {
      return Promise.reject(
        new UnsupportedOperationError('select the primary key together with an encrypted property', {
          entity: metadata.name,
          column: column.main.propertyPath,
        }),
      );
    }
    const key = `${this.#runnerId(queryRunner)}:${metadata.name}:${column.main.propertyPath}`;
    let batch = this.#batches.get(key);
    if (!batch) {
      batch = { metadata, column, queryRunner, requests: [] };
      this.#batches.set(key, batch);
      queueMicrotask(() => {
        this.#batches.delete(key);
        void this.#run(batch as NonNullable<typeof batch>);
      });
    }
    return new Promise((resolve, reject) => batch.requests.push({ entity, resolve, reject }));
  }

  async #run(batch: {
    metadata: EntityMetadata;
    column: EncryptedColumns;
    queryRunner?: QueryRunner;
    requests: Request[];
  }) {
    const { metadata, column, queryRunner, requests } = batch;
    try {
      const manager = queryRunner?.manager ?? metadata.connection.manager;
      const paths = [...metadata.primaryColumns.map((c) => c.propertyPath), column.main.propertyPath];
      const sidecarPaths = Object.values(column.sidecars).map((c) => c.propertyPath);
      const rows = await manager
        .createQueryBuilder(metadata.target, 'row')
        .select([...paths, ...sidecarPaths].map((p) => `row.${p}`))
        .whereInIds(requests.map((r) => metadata.getEntityIdMap(r.entity)))
        .callListeners(false)
        .getMany();
      const byKey = new Map(rows.map((row) => [primaryKeyOf(metadata, row), row]));
      const property = column.definition.propertyName;
      for (const request of requests) {
        const row = byKey.get(primaryKeyOf(metadata, request.entity));
        const fresh = row && column.holderOf(row, false);
        const target = column.holderOf(request.entity, true);
        /* The whole sealed value comes from the second read, so its four parts belong together. */
        const loaded = fresh ? this.store.get(fresh, property)?.loaded : undefined;
        if (target)
          this.store.upsert(target, property).loaded = loaded ? { ...loaded } : { ciphertext: null };
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
