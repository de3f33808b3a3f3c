/**
 * The KMS storage section of `npm run bench`: the bytes per row of both layouts when data keys are
 * wrapped by a KMS (184-byte wrapped keys instead of a customer-provided key's 61), measured on the
 * same people as the main section, with a key provider whose wrapped keys have the KMS's size
 * (./kms-sized-key-provider.ts). Storage only: no timings.
 */
import 'reflect-metadata';
import { type BenchDatabase, withBenchSchema } from './database';
import { KmsSizedCompactPerson, KmsSizedEnvelopePerson, type PersonData } from './entities';
import { KMS_WRAPPED_KEY_BYTES, KmsSizedKeyProvider } from './kms-sized-key-provider';
import { DATA_KEYS_TABLE, TypeormEnvelopeDataKeys1764500000000 } from './library';
import { round1 } from './stats';

/** What the section adds to bench/results.json: bytes per row, the compact one with its key table. */
export interface KmsStorageResult {
  wrappedKeyBytes: number;
  rows: number;
  sidecarsBytesPerRow: number;
  compactBytesPerRow: number;
  compactKeyTableBytes: number;
}

/** Saves `people` into both layouts under KMS-sized wrapped keys, in a schema of its own. */
export async function runKmsStorageBench(
  db: BenchDatabase,
  people: readonly PersonData[],
): Promise<KmsStorageResult> {
  const schemaOptions = {
    prefix: 'bench_kms',
    entities: [KmsSizedEnvelopePerson, KmsSizedCompactPerson],
    migrations: [TypeormEnvelopeDataKeys1764500000000],
    keys: [new KmsSizedKeyProvider()],
  };
  return withBenchSchema(db, schemaOptions, async ({ schema, dataSource }) => {
    for (const entity of [KmsSizedEnvelopePerson, KmsSizedCompactPerson]) {
      const repository = dataSource.getRepository(entity);
      await repository.save(
        people.map((p) => Object.assign(new entity(), p)),
        { chunk: 500 },
      );
    }
    const size = async (table: string) => {
      await dataSource.query(`VACUUM (ANALYZE) ${table}`);
      const [row] = (await dataSource.query(
        `SELECT pg_total_relation_size('${table}'::regclass)::bigint AS total`,
      )) as Array<{ total: string }>;
      return Number(row?.total);
    };
    const [sample] = (await dataSource.query(
      `SELECT octet_length(email_wrapped_key)::int AS n FROM "${schema}".bench_envelope_kms_sized LIMIT 1`,
    )) as Array<{ n: number }>;
    if (sample?.n !== KMS_WRAPPED_KEY_BYTES) throw new Error(`wrapped keys of ${sample?.n} bytes stored`);
    const keyTable = await size(`"${schema}"."${DATA_KEYS_TABLE}"`);
    return {
      wrappedKeyBytes: KMS_WRAPPED_KEY_BYTES,
      rows: people.length,
      sidecarsBytesPerRow: round1((await size(`"${schema}".bench_envelope_kms_sized`)) / people.length),
      compactBytesPerRow: round1(
        ((await size(`"${schema}".bench_compact_kms_sized`)) + keyTable) / people.length,
      ),
      compactKeyTableBytes: keyTable,
    };
  });
}
