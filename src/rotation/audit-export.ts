import { ConfigError } from '../errors';
import type { AuditEntry } from './key-registry';

/** The columns of {@link auditLogToCsv}, in order; also the key order of {@link auditLogToJson}. */
export const AUDIT_CSV_COLUMNS = ['id', 'at', 'event', 'tenant', 'keyVersion', 'actor', 'details'] as const;

/** Formats {@link exportAuditLog} writes. */
export type AuditExportFormat = 'csv' | 'json';

/*
 * A cell starting with one of these is run as a formula by spreadsheet applications (CSV
 * injection): an actor or tenant id an attacker chose could otherwise open links or run commands
 * on the auditor's machine.
 */
const FORMULA_START = /^[=+\-@\t\r]/;

/**
 * The audit log as CSV (RFC 4180: CRLF line ends, fields with a comma, quote or line break in
 * double quotes, quotes doubled), with a header row `id,at,event,tenant,keyVersion,actor,details`.
 * Timestamps are ISO 8601 in UTC, `details` is JSON, a missing tenant or key version is an empty
 * field. A value that starts with `=`, `+`, `-`, `@`, a tab or a carriage return gets a leading
 * `'`, so that no spreadsheet opening the file runs it as a formula.
 *
 * @example
 * ```ts
 * const entries = await new KeyRegistry(dataSource, encryption).auditLog({ tenant: 'ws-42' });
 * writeFileSync('audit.csv', auditLogToCsv(entries));
 * ```
 */
export function auditLogToCsv(entries: readonly AuditEntry[]): string {
  const lines = [AUDIT_CSV_COLUMNS.join(',')];
  for (const entry of entries) {
    lines.push(
      [
        String(entry.id),
        entry.at.toISOString(),
        entry.event,
        entry.tenant ?? '',
        entry.keyVersion === null ? '' : String(entry.keyVersion),
        entry.actor,
        JSON.stringify(entry.details ?? {}),
      ]
        .map(csvField)
        .join(','),
    );
  }
  return `${lines.join('\r\n')}\r\n`;
}

/**
 * The audit log as one JSON array, oldest first as given: each entry with the keys of
 * {@link AUDIT_CSV_COLUMNS} in that order and `at` as an ISO 8601 timestamp.
 */
export function auditLogToJson(entries: readonly AuditEntry[]): string {
  return JSON.stringify(
    entries.map((e) => ({
      id: e.id,
      at: e.at.toISOString(),
      event: e.event,
      tenant: e.tenant,
      keyVersion: e.keyVersion,
      actor: e.actor,
      details: e.details ?? {},
    })),
    null,
    2,
  );
}

/** The audit log as CSV ({@link auditLogToCsv}) or JSON ({@link auditLogToJson}). */
export function exportAuditLog(entries: readonly AuditEntry[], format: AuditExportFormat): string {
  if (format === 'csv') return auditLogToCsv(entries);
  if (format === 'json') return auditLogToJson(entries);
  throw new ConfigError(`audit log export format "${String(format)}" is not one of csv, json`);
}

function csvField(value: string): string {
  const text = FORMULA_START.test(value) ? `'${value}` : value;
  return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}
