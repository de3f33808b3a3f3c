/** Prints rows as an aligned text table. */
export function table(rows: Array<Record<string, unknown>>): string {
  if (rows.length === 0) return '(none)';
  const headers = [...new Set(rows.flatMap((r) => Object.keys(r)))];
  const cells = rows.map((r) => headers.map((h) => text(r[h])));
  const widths = headers.map((h, i) => Math.max(h.length, ...cells.map((c) => (c[i] ?? '').length)));
  const line = (values: string[]) =>
    values
      .map((v, i) => v.padEnd(widths[i] ?? 0))
      .join('  ')
      .trimEnd();
  return [line(headers), line(widths.map((w) => '-'.repeat(w))), ...cells.map(line)].join('\n');
}

function text(value: unknown): string {
  if (value === null || value === undefined) return '';
  if (value instanceof Date) return value.toISOString();
  if (typeof value === 'object') return JSON.stringify(value);
  return String(value);
}

/** Text printed as it is (an export already in its format), also with `--json`. */
export class RawOutput {
  constructor(readonly text: string) {}
}

/** A job that finished with failures still prints its result, then exits non-zero. */
export function failOn(error: unknown, failed: boolean): void {
  if (error) throw error;
  if (failed) process.exitCode = 1;
}
