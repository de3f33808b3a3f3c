import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Starts (or connects to) one PostgreSQL for the whole run; tests get it via inject('databaseUrl').
    globalSetup: ['test/support/global-setup.ts'],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    pool: 'forks',
    // Sized for a 2-core CI machine: test files run in parallel, each in its own schema.
    maxWorkers: 2,
  },
});
