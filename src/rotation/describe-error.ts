import { EnvelopeError } from '../errors';

/**
 * An error as one line for job results and the audit log: our errors by name and message (they
 * carry no plaintext); anything else by name only, since a driver's message may quote values.
 */
export function describeError(error: unknown): string {
  if (error instanceof EnvelopeError) return `${error.name}: ${error.detail}`;
  return error instanceof Error ? error.name : 'unknown error';
}
