import { InvalidArgumentError } from 'commander';

/** A positive safe integer (a key version, a batch size, a limit, days). */
export function parsePositiveInteger(text: string): number {
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < 1) throw new InvalidArgumentError('expected a positive integer');
  return n;
}

/** An ISO 8601 date or time (`2026-01-31`, `2026-01-31T12:00:00Z`); a date alone is midnight UTC. */
export function parseTime(text: string): Date {
  const time = /^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?$/.test(text)
    ? new Date(text)
    : new Date(Number.NaN);
  if (Number.isNaN(time.getTime())) {
    throw new InvalidArgumentError(
      'expected an ISO 8601 date or time, such as 2026-01-31 or 2026-01-31T12:00:00Z',
    );
  }
  return time;
}

/** One of `choices`. */
export function oneOf<T extends string>(choices: readonly T[], described: string): (text: string) => T {
  return (text) => {
    if (!(choices as readonly string[]).includes(text))
      throw new InvalidArgumentError(`expected ${described}`);
    return text as T;
  };
}
