/**
 * Printing shared by the examples: what the application sees next to what the database stores.
 */
import type { Customer } from '../quickstart/customer';

/** Where the examples write their output (console.log, or a collector in the tests). */
export type Log = (line: string) => void;

const SHOWN_BYTES = 8;

/** Short hex of a bytea value: the first bytes, an ellipsis and the length. */
export function shortHex(value: unknown): string {
  if (!Buffer.isBuffer(value)) return String(value);
  const head = value.subarray(0, SHOWN_BYTES).toString('hex');
  return `${head}${value.length > SHOWN_BYTES ? '…' : ''} (${value.length} B)`;
}

/** The rows as aligned, indented lines; the first row is the header. */
export function table(rows: string[][]): string[] {
  const widths = rows[0]?.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length))) ?? [];
  return rows.map((r) => `  ${r.map((cell, i) => cell.padEnd(widths[i] ?? 0)).join('  ')}`.trimEnd());
}

/** Logs the customers as the application loaded them. */
export function printApplicationView(log: Log, customers: Customer[]): void {
  log('What the application sees (repository.find()):');
  for (const line of table([
    ['id', 'email', 'address', 'plan'],
    ...customers.map((c) => [String(c.id), c.email, JSON.stringify(c.address), c.plan]),
  ]))
    log(line);
}

/** Logs `heading`, then raw rows of the `customer` table with bytea values as short hex. */
export function printStoredRows(log: Log, heading: string, rows: Array<Record<string, unknown>>): void {
  log(heading);
  for (const line of table([
    ['id', 'email_ciphertext', 'email_iv', 'email_wrapped_key', 'key_version', 'plan'],
    ...rows.map((r) => [
      String(r.id),
      shortHex(r.email_ciphertext),
      shortHex(r.email_iv),
      shortHex(r.email_wrapped_key),
      String(r.email_key_version),
      String(r.plan),
    ]),
  ]))
    log(line);
}

/** Logs and returns whether any stored byte sequence contains a plaintext email or city of `people`. */
export function printPlaintextCheck(
  log: Log,
  rows: Array<Record<string, unknown>>,
  people: ReadonlyArray<Pick<Customer, 'email' | 'address'>>,
): boolean {
  const stored = Buffer.concat(
    rows.flatMap((r) => Object.values(r).map((v) => (Buffer.isBuffer(v) ? v : Buffer.from(String(v))))),
  );
  const secrets = people.flatMap((p) => [p.email, ...(p.address ? [p.address.city] : [])]);
  const plaintextInDatabase = secrets.some((s) => stored.includes(Buffer.from(s)));
  log(`  plaintext email or city anywhere in the stored rows: ${plaintextInDatabase ? 'YES' : 'no'}`);
  return plaintextInDatabase;
}
