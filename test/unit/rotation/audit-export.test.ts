import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  AUDIT_CSV_COLUMNS,
  type AuditEntry,
  type AuditEvent,
  auditLogToCsv,
  auditLogToJson,
  exportAuditLog,
} from '../../../src';
import { parseCsv } from '../../support/csv';

/** What a spreadsheet must never see at the start of a cell: it would start a formula. */
const FORMULA_START = /^[=+\-@\t\r]/;
const defused = (text: string) => (FORMULA_START.test(text) ? `'${text}` : text);

const EVENTS: AuditEvent[] = [
  'key-created',
  'tenant-key-added',
  'tenant-key-activated',
  'tenant-offboarded',
  'tenant-job-failed',
];

/** Text that a CSV writer gets wrong: quotes, commas, line breaks, formula starts, non-ASCII. */
const awkwardText = fc.oneof(
  fc.string({ maxLength: 30 }),
  fc.string({ unit: 'grapheme', maxLength: 20 }),
  fc
    .array(
      fc.constantFrom('"', ',', '\r', '\n', '\r\n', '=', '+', '-', '@', '\t', "'", ' ', 'a', 'é', '😀'),
      {
        maxLength: 12,
      },
    )
    .map((parts) => parts.join('')),
);

const jsonValue = fc.jsonValue({ maxDepth: 2 });

const entry: fc.Arbitrary<AuditEntry> = fc.record({
  id: fc.integer({ min: 1, max: 2 ** 40 }),
  at: fc.date({
    min: new Date('1970-01-01T00:00:00.000Z'),
    max: new Date('9999-12-31T23:59:59.999Z'),
    noInvalidDate: true,
  }),
  event: fc.constantFrom(...EVENTS),
  keyVersion: fc.option(fc.integer({ min: 1, max: 2 ** 31 - 1 }), { nil: null }),
  tenant: fc.option(
    awkwardText.filter((t) => t !== ''),
    { nil: null },
  ),
  actor: awkwardText,
  details: fc.dictionary(awkwardText, fc.oneof(awkwardText, jsonValue), { maxKeys: 4 }) as fc.Arbitrary<
    Record<string, unknown>
  >,
});

const cellsOf = (e: AuditEntry) => [
  String(e.id),
  e.at.toISOString(),
  e.event,
  e.tenant ?? '',
  e.keyVersion === null ? '' : String(e.keyVersion),
  e.actor,
  JSON.stringify(e.details),
];

describe('audit log export', () => {
  it('CSV round-trips through an RFC 4180 reader: header, one record per entry, every field', () => {
    fc.assert(
      fc.property(fc.array(entry, { maxLength: 8 }), (entries) => {
        const csv = auditLogToCsv(entries);
        expect(csv.endsWith('\r\n')).toBe(true);
        const records = parseCsv(csv);
        expect(records[0]).toEqual([...AUDIT_CSV_COLUMNS]);
        expect(records[0]).toEqual(['id', 'at', 'event', 'tenant', 'keyVersion', 'actor', 'details']);
        expect(records).toHaveLength(entries.length + 1);
        entries.forEach((e, i) => {
          const record = records[i + 1] as string[];
          expect(record).toEqual(cellsOf(e).map(defused));
          // The details column is JSON a script can read back.
          expect(JSON.parse(record[6] as string)).toEqual(JSON.parse(JSON.stringify(e.details)));
          // Cells that start no formula come back exactly as they were.
          for (const [j, cell] of cellsOf(e).entries()) {
            if (!FORMULA_START.test(cell)) expect(record[j]).toBe(cell);
          }
        });
      }),
      { numRuns: 300 },
    );
  });

  it('no cell starts a spreadsheet formula', () => {
    fc.assert(
      fc.property(fc.array(entry, { minLength: 1, maxLength: 5 }), (entries) => {
        for (const record of parseCsv(auditLogToCsv(entries))) {
          for (const cell of record) expect(cell).not.toMatch(FORMULA_START);
        }
      }),
    );
  });

  it('defuses formula-looking values with a leading quote', () => {
    const csv = auditLogToCsv([
      {
        id: 7,
        at: new Date('2026-03-04T05:06:07.089Z'),
        event: 'tenant-key-added',
        keyVersion: 1_000_000,
        tenant: '=HYPERLINK("https://attacker.example","x")',
        actor: '+1-555',
        details: { keyReference: 'sha256:ab' },
      },
      {
        id: 8,
        at: new Date('2026-03-04T05:06:08.000Z'),
        event: 'key-created',
        keyVersion: null,
        tenant: null,
        actor: '@admin',
        details: {},
      },
      {
        id: 9,
        at: new Date('2026-03-04T05:06:09.000Z'),
        event: 'key-created',
        keyVersion: 2,
        tenant: 'ws, "quoted"\r\nline',
        actor: '-cmd',
        details: { note: '=1+1' },
      },
    ]);
    expect(csv).toBe(
      'id,at,event,tenant,keyVersion,actor,details\r\n' +
        `7,2026-03-04T05:06:07.089Z,tenant-key-added,"'=HYPERLINK(""https://attacker.example"",""x"")",1000000,'+1-555,"{""keyReference"":""sha256:ab""}"\r\n` +
        `8,2026-03-04T05:06:08.000Z,key-created,,,'@admin,{}\r\n` +
        `9,2026-03-04T05:06:09.000Z,key-created,"ws, ""quoted""\r\nline",2,'-cmd,"{""note"":""=1+1""}"\r\n`,
    );
  });

  it('an empty log is the header alone', () => {
    expect(auditLogToCsv([])).toBe('id,at,event,tenant,keyVersion,actor,details\r\n');
    expect(JSON.parse(auditLogToJson([]))).toEqual([]);
  });

  it('JSON is one array of entries with ISO timestamps, in the order given', () => {
    fc.assert(
      fc.property(fc.array(entry, { maxLength: 8 }), (entries) => {
        const parsed = JSON.parse(auditLogToJson(entries)) as Array<Record<string, unknown>>;
        expect(parsed).toEqual(
          entries.map((e) => ({
            id: e.id,
            at: e.at.toISOString(),
            event: e.event,
            tenant: e.tenant,
            keyVersion: e.keyVersion,
            actor: e.actor,
            details: JSON.parse(JSON.stringify(e.details)),
          })),
        );
        expect(parsed.every((e) => Object.keys(e).join(',') === AUDIT_CSV_COLUMNS.join(','))).toBe(true);
      }),
    );
  });

  it('exportAuditLog picks the format, and refuses others by name', () => {
    const entries: AuditEntry[] = [
      {
        id: 1,
        at: new Date('2026-01-01T00:00:00.000Z'),
        event: 'key-created',
        keyVersion: 1,
        tenant: null,
        actor: 'ops',
        details: {},
      },
    ];
    expect(exportAuditLog(entries, 'csv')).toBe(auditLogToCsv(entries));
    expect(exportAuditLog(entries, 'json')).toBe(auditLogToJson(entries));
    expect(() => exportAuditLog(entries, 'xml' as 'csv')).toThrow(/audit log export format "xml"/);
  });
});
