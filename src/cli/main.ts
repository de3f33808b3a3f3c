#!/usr/bin/env node
import 'reflect-metadata';
import { CommanderError } from 'commander';
import { EnvelopeError } from '../errors';
import { buildProgram } from './program';

const program = buildProgram();
program.parseAsync(process.argv).catch((error: unknown) => {
  const json = program.opts().json === true;
  if (error instanceof CommanderError) {
    // Help and version exit 0; commander has already printed its usage message on stderr.
    process.exitCode = error.exitCode;
    if (json && error.exitCode !== 0) printJsonError({ name: 'UsageError', message: error.message });
    return;
  }
  /* Our errors carry context and no plaintext or key material; print them without a stack (a cause's
     stack or properties could carry what the message leaves out). */
  const message = error instanceof EnvelopeError ? `${error.name}: ${error.message}` : String(error);
  if (json) {
    printJsonError(
      error instanceof EnvelopeError
        ? { name: error.name, message: error.message, ...error.context }
        : {
            name: error instanceof Error ? error.name : 'Error',
            message: error instanceof Error ? error.message : String(error),
          },
    );
  }
  process.stderr.write(`typeorm-envelope: ${message}\n`);
  process.exitCode = 1;
});

/** With --json, stdout holds exactly one JSON document, a failure's too. */
function printJsonError(error: Record<string, unknown>): void {
  process.stdout.write(`${JSON.stringify({ error }, null, 2)}\n`);
}
