import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

/** A positive integer from the environment (benchmark sizes), or `fallback`. */
export function intEnv(name: string, fallback: number): number {
  const value = Number(process.env[name] ?? fallback);
  if (!Number.isInteger(value) || value <= 0) throw new Error(`${name} must be a positive integer`);
  return value;
}

export function fmtInt(n: number): string {
  return Math.round(n).toLocaleString('en-US');
}

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2
    ? (sorted[mid] as number)
    : ((sorted[mid - 1] as number) + (sorted[mid] as number)) / 2;
}

export const round1 = (n: number) => Math.round(n * 10) / 10;
export const round2 = (n: number) => Math.round(n * 100) / 100;

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

/** A full garbage collection, run before each timed operation so no variant pays for another's garbage. */
export function collectGarbage(): void {
  gc();
}
