import type { MigrationInterface, QueryRunner } from 'typeorm';

/** Table name of the primary-key ranges that parallel workers of a job lease. */
export const JOB_RANGES_TABLE = 'typeorm_envelope_job_ranges';

/**
 * Creates the table through which several workers share one job (re-encryption, backfill, layout
 * migration, sidecar re-wrap): one row per primary-key range of a table, leased by one worker at a
 * time. A worker renews its lease while it works; a range whose lease ran out (its worker was
 * killed) is taken over by the next worker that asks. Bounds are stored as the text form of the
 * key columns, never any encrypted value. Independent of the other migrations; add it to the
 * DataSource's `migrations` to run jobs with more than one worker.
 */
export class TypeormEnvelopeJobRanges1764700000000 implements MigrationInterface {
  name = 'TypeormEnvelopeJobRanges1764700000000';

  async up(queryRunner: QueryRunner): Promise<void> {
    await queryRunner.query(
      `CREATE TABLE IF NOT EXISTS ${qualified(queryRunner, JOB_RANGES_TABLE)} (
        "job_id" text NOT NULL,
        "range_no" integer NOT NULL,
        "job_kind" text NOT NULL,
        "entity" text NOT NULL,
        "after_key" text[] NULL,
        "up_to_key" text[] NULL,
        "state" text NOT NULL DEFAULT 'pending' CHECK ("state" IN ('pending', 'running', 'done', 'failed')),
        "lease_owner" text NULL,
        "lease_expires_at" timestamptz NULL,
        "attempts" integer NOT NULL DEFAULT 0,
        "result" jsonb NULL,
        "error" text NULL,
        "created_at" timestamptz NOT NULL DEFAULT now(),
        "finished_at" timestamptz NULL,
        PRIMARY KEY ("job_id", "range_no")
      )`,
    );
  }

  async down(queryRunner: QueryRunner): Promise<void> {
    await queryRunner.query(`DROP TABLE IF EXISTS ${qualified(queryRunner, JOB_RANGES_TABLE)}`);
  }
}

/** A name in the DataSource's schema (when it names one), quoted. */
function qualified(queryRunner: QueryRunner, name: string): string {
  const { driver, options } = queryRunner.connection;
  const schema = (options as { schema?: string }).schema;
  return (schema ? [schema, name] : [name]).map((p) => driver.escape(p)).join('.');
}
