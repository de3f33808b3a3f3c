import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { createTestSchema, rawQuery, type TestSchema } from '../support/database';

describe('test database harness', () => {
  let db: TestSchema;

  beforeAll(async () => {
    db = await createTestSchema('harness');
  });

  afterAll(async () => {
    await db?.drop();
  });

  it('provides a known database kind', () => {
    expect(['DATABASE_URL', 'testcontainers', 'local-binaries', 'pglite']).toContain(inject('databaseKind'));
    expect(inject('databaseUrl')).toMatch(/^postgres(ql)?:\/\//);
  });

  it('round-trips bytes through a bytea column', async () => {
    const table = `"${db.schema}".blobs`;
    await rawQuery(db.url, `CREATE TABLE ${table} (id serial PRIMARY KEY, payload bytea NOT NULL)`);
    const bytes = Buffer.from([0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff, 0x00, 0x5c, 0x27]);
    await rawQuery(db.url, `INSERT INTO ${table} (payload) VALUES ($1)`, [bytes]);

    const rows = await rawQuery<{ payload: Buffer }>(db.url, `SELECT payload FROM ${table}`);
    expect(rows).toHaveLength(1);
    expect(Buffer.isBuffer(rows[0]?.payload)).toBe(true);
    expect(rows[0]?.payload.equals(bytes)).toBe(true);
  });

  it('drops the schema with everything in it', async () => {
    const other = await createTestSchema('harness drop');
    expect(other.schema).toMatch(/^t_harness_drop_[0-9a-f]{12}$/);
    await rawQuery(other.url, `CREATE TABLE "${other.schema}".t (x int)`);
    await other.drop();
    await other.drop();
    const left = await rawQuery(other.url, 'SELECT 1 FROM pg_namespace WHERE nspname = $1', [other.schema]);
    expect(left).toHaveLength(0);
  });
});
