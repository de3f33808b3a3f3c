#!/usr/bin/env node
import 'reflect-metadata';
import { EnvelopeError } from '../errors';
import { buildProgram } from './program';

buildProgram()
  .parseAsync(process.argv)
  .catch((error: unknown) => {
    /* Our errors carry context and no plaintext; print them without a stack. */
    const message = error instanceof EnvelopeError ? `${error.name}: ${error.message}` : String(error);
    process.stderr.write(`typeorm-envelope: ${message}\n`);
    process.exitCode = 1;
  });
