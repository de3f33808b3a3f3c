/**
 * The library under benchmark, the one module of the benchmark that names it.
 *
 * `npm run bench` (./main.ts) installs the packed package into a project of its own and replaces
 * this file there with `export * from 'typeorm-envelope';`, so that every section imports the
 * package by name, as installed. `npm run bench -- --from-checkout` runs the compiled checkout
 * instead, through this file as it stands: the source.
 */
export * from '../src';
