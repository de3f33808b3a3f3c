import type { QueryRunner } from 'typeorm';
import type { ValueBinding } from '../crypto/associated-data';
import { parseCompact } from '../crypto/compact-value';
import type { EnvelopeEncryption } from '../envelope-encryption';
import { type ErrorContext, IntegrityError } from '../errors';
import type { StoredValue } from './job';
import type { KeyRow } from './rewrap-key-table';
import { dataKeyTablePath, type EncryptedColumnSql } from './rotation-target';
import type { SealedRow } from './sealed-rows';

/**
 * Opens the stored values of one batch of rows for a job, whatever their format: sidecar values
 * with their own columns, compact values with their rows of the data-key table, read fresh for
 * each batch (one query for the batch's ids), so a key row deleted or altered since any earlier
 * read is seen. A compact value whose key row is missing, or belongs to another keyring or tenant,
 * is an `IntegrityError` naming the data-key id, before any key is used.
 */
export class StoredValueOpener {
  readonly #runner: QueryRunner;
  readonly #encryption: EnvelopeEncryption;
  #keyRows = new Map<string, KeyRow>();

  constructor(runner: QueryRunner, encryption: EnvelopeEncryption) {
    this.#runner = runner;
    this.#encryption = encryption;
  }

  /** Reads the key rows the compact values of `rows` name (one query; none without compact values). */
  async load(rows: readonly SealedRow[]): Promise<void> {
    const ids = [
      ...new Set(rows.flatMap((r) => (r.value.format === 2 && r.value.dataKeyId ? [r.value.dataKeyId] : []))),
    ];
    this.#keyRows = ids.length ? await readKeyRows(this.#runner, ids) : new Map();
  }

  /** The key row a compact value of the last loaded batch names, if it exists. */
  keyRow(id: string): KeyRow | undefined {
    return this.#keyRows.get(id);
  }

  /** Decrypts one row's value (of the batch last given to {@link load}). */
  async open(row: SealedRow, context: ErrorContext): Promise<unknown> {
    const { encryptor } = this.#encryption;
    const at = {
      ...context,
      primaryKey: row.primaryKey,
      ...(row.tenant === null ? {} : { tenant: row.tenant }),
    };
    if (row.value.format === 1) {
      if (!row.value.sealed) {
        throw new IntegrityError('the sidecar columns of this value are missing (NULL or not mapped)', at);
      }
      return encryptor.open(row.value.sealed, row.binding, context);
    }
    const parsed = parseCompact(row.value.value);
    const id = String(parsed.dataKeyId);
    const key = this.#keyRows.get(id);
    if (!key) {
      throw new IntegrityError(
        `data key ${id} is not in the data-key table: restore it from the backup taken with the data`,
        at,
      );
    }
    if (key.keyring !== this.#encryption.keyring.keyringId) {
      throw new IntegrityError(`data key ${id} belongs to another keyring`, at);
    }
    if ((key.tenant ?? null) !== row.tenant) {
      throw new IntegrityError(`data key ${id} belongs to another tenant than the row`, at);
    }
    return encryptor.open(
      {
        ciphertext: row.value.value,
        iv: parsed.iv,
        wrappedKey: key.wrappedKey,
        keyVersion: key.keyVersion,
        dataKeyId: parsed.dataKeyId,
      },
      row.binding,
      context,
    );
  }
}

/** Rows of the data-key table by id (decimal text), in one query. */
export async function readKeyRows(runner: QueryRunner, ids: readonly string[]): Promise<Map<string, KeyRow>> {
  const rows = (await runner.query(
    `SELECT id::text AS id, keyring, tenant_id, key_version, wrapped_key
     FROM ${dataKeyTablePath(runner)} WHERE id = ANY($1::bigint[])`,
    [ids],
  )) as Array<{
    id: string;
    keyring: string;
    tenant_id: string | null;
    key_version: number;
    wrapped_key: Buffer;
  }>;
  return new Map(
    rows.map((r) => [
      r.id,
      {
        id: r.id,
        keyring: r.keyring,
        tenant: r.tenant_id,
        keyVersion: r.key_version,
        wrappedKey: r.wrapped_key,
      },
    ]),
  );
}

/**
 * Seals `value` for `column` in the layout its new values are written in: a sidecar value (four
 * columns), or a compact value whose data key's row is committed in the data-key table before
 * this returns (so no value written with it can name a key row that does not exist).
 */
export async function sealStored(
  runner: QueryRunner,
  encryption: EnvelopeEncryption,
  column: EncryptedColumnSql,
  value: unknown,
  binding: ValueBinding,
): Promise<StoredValue> {
  const type = column.columns.definition.type;
  if (column.layout === 'sidecars') {
    return { format: 1, sealed: await encryption.encryptor.seal(value, binding, type) };
  }
  return { format: 2, value: await encryption.sealCompact(runner.connection, value, binding, type) };
}
