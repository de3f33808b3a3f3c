import { type Command, InvalidArgumentError } from 'commander';
import type { DataSource } from 'typeorm';
import { INDEX_KEYS_TABLE } from '../../migrations/1764600000000-TypeormEnvelopeIndexKeys';
import type { EnvelopeEncryption } from '../envelope-encryption';
import { ConfigError } from '../errors';
import { fillBlindIndexes, type IndexJobResult, rotateIndexKey } from '../rotation/rotate-index-key';
import { searchableColumnsOf } from '../typeorm/blind-index-columns';
import { indexKeysTableExists } from '../typeorm/blind-index-store';
import { parsePositiveInteger } from './arguments';
import { failOn, table } from './output';
import { Progress } from './progress';
import type { GlobalOptions, Runner } from './tenants';

interface IndexJobFlags {
  tenant?: string;
  entity?: string[];
  batchSize: number;
}

/**
 * `typeorm-envelope index-keys …`: the blind-index jobs, wiring over {@link rotateIndexKey} and
 * {@link fillBlindIndexes} (they do the work).
 */
export function addIndexKeyCommands(program: Command, run: Runner): void {
  const indexKeys = program
    .command('index-keys')
    .description('blind indexes of searchable properties: rotate an index key, index rows that have none');

  indexKeys
    .command('rotate')
    .description(
      'rotate the index key of one scope and recompute its rows under the new one (both keys answer queries meanwhile); resumable, the old key erased at the end',
    )
    .option(
      '--tenant <id>',
      "this tenant's index key (default: the application keyring's own, for rows without a tenant)",
    )
    // No --entity: the key is the scope's, shared by all its entities; every row of it is recomputed.
    .option('--batch-size <rows>', 'rows per UPDATE', parsePositiveInteger, 500)
    .option(
      '--settle-time <ms>',
      'wait after each step (default: the index-key refresh interval, so every instance has read the step). Shorter only when no other instance of the application runs',
      parseMilliseconds,
    )
    .action((options: Omit<IndexJobFlags, 'entity'> & { settleTime?: number }) =>
      run(async ({ dataSource, encryption }, global) => {
        await requireSearchable(dataSource, encryption);
        const interval = encryption.indexKeys.refreshInterval;
        if (options.settleTime !== undefined && options.settleTime < interval) {
          process.stderr.write(
            `typeorm-envelope: warning: --settle-time ${options.settleTime} ms is shorter than the index-key refresh interval (${interval} ms): an instance that has not read a step yet can write under the old key after its rows were recomputed, or miss rows in lookups; use it only when no other instance runs\n`,
          );
        }
        const result = await withProgress(global, (onProgress) =>
          rotateIndexKey(dataSource, encryption, {
            ...jobOptions(options),
            ...(options.settleTime === undefined ? {} : { settleTime: options.settleTime }),
            onProgress,
          }),
        );
        failOnRowsLeft(result);
        return global.json ? result : rotateText(result);
      })(),
    );

  indexKeys
    .command('fill')
    .description(
      "compute the blind index of rows that have a value but no index (written before the property was searchable), under their tenant's active index key; resumable",
    )
    .option('--tenant <id>', "only this tenant's rows (default: every row)")
    .option('--entity <name...>', 'only these entities')
    .option('--batch-size <rows>', 'rows per UPDATE', parsePositiveInteger, 500)
    .action((options: IndexJobFlags) =>
      run(async ({ dataSource, encryption }, global) => {
        await requireSearchable(dataSource, encryption);
        const result = await withProgress(global, (onProgress) =>
          fillBlindIndexes(dataSource, encryption, { ...jobOptions(options), onProgress }),
        );
        failOnRowsLeft(result);
        return global.json ? result : fillText(result);
      })(),
    );
}

/** A number of milliseconds, 0 or more. */
function parseMilliseconds(text: string): number {
  const n = Number(text);
  if (text.trim() === '' || !Number.isSafeInteger(n) || n < 0)
    throw new InvalidArgumentError('expected a number of milliseconds, at least 0');
  return n;
}

function jobOptions(options: IndexJobFlags) {
  return {
    batchSize: options.batchSize,
    ...(options.tenant === undefined ? {} : { tenant: options.tenant }),
    ...(options.entity === undefined ? {} : { entities: options.entity }),
  };
}

/** Runs a job with a progress bar per property (on a terminal, without --json). */
async function withProgress(
  global: GlobalOptions,
  job: (
    onProgress: (p: { entity: string; property: string; rowsDone: number }) => void,
  ) => Promise<IndexJobResult>,
): Promise<IndexJobResult> {
  const progress = new Progress(!global.json);
  try {
    return await job((p) => progress.update(`${p.entity}.${p.property}`, p.rowsDone, p.rowsDone));
  } finally {
    progress.stop();
  }
}

/**
 * Refuses, before any key is made, a project where the jobs have nothing to work on or nowhere to
 * keep their keys: no searchable property, or no index-key table.
 */
async function requireSearchable(dataSource: DataSource, encryption: EnvelopeEncryption): Promise<void> {
  if (!encryption.encryptedEntities(dataSource).some(({ metadata }) => searchableColumnsOf(metadata))) {
    throw new ConfigError(
      'no entity has searchable encrypted properties (declare one with @Encrypted({ searchable: … })): there is no blind index to work on',
    );
  }
  const runner = dataSource.createQueryRunner();
  try {
    if (!(await indexKeysTableExists(runner))) {
      throw new ConfigError(
        `searchable encrypted properties need the ${INDEX_KEYS_TABLE} table: add the TypeormEnvelopeIndexKeys1764600000000 migration to the DataSource's migrations and run it`,
      );
    }
  } finally {
    await runner.release();
  }
}

/** An error ends the command; rows left unindexed (failures, duplicates) print the result, then exit 1. */
function failOnRowsLeft(result: IndexJobResult): void {
  failOn(result.error, result.rowsLeft > 0 || result.properties.some((p) => p.failures.length > 0));
}

function scopeOf(result: IndexJobResult): string {
  return result.tenant === undefined ? '' : `tenant ${result.tenant}: `;
}

function rotateText(result: IndexJobResult): string {
  const scope = result.tenant === undefined ? 'application keyring: ' : scopeOf(result);
  const indexed = result.properties.reduce((n, p) => n + p.rowsIndexed, 0);
  const lines: string[] = [];
  if (result.fromVersion === null || result.fromVersion === undefined) {
    lines.push(`${scope}first index key created (version ${result.toVersion}); ${indexed} indexes computed`);
  } else {
    const done = result.rowsLeft === 0 ? 'rotated' : 'rotation not finished';
    lines.push(
      `${scope}index key ${done} from version ${result.fromVersion} to version ${result.toVersion}${result.resumed ? ' (a rotation under way, taken over)' : ''}; ${indexed} indexes recomputed`,
    );
    if (result.previousRetired) {
      lines.push(`version ${result.fromVersion} retired: its key is erased, every row is under the new one`);
    } else if (result.rowsLeft > 0) {
      lines.push(
        `${result.rowsLeft} rows are still under version ${result.fromVersion}, which is kept (queries still match it): resolve the rows listed below and run it again`,
      );
    }
  }
  lines.push(propertiesText(result));
  return lines.join('\n');
}

function fillText(result: IndexJobResult): string {
  const indexed = result.properties.reduce((n, p) => n + p.rowsIndexed, 0);
  const lines = [
    indexed === 0 && result.rowsLeft === 0
      ? `${scopeOf(result)}no row without a blind index: nothing to do`
      : `${scopeOf(result)}${indexed} blind indexes filled`,
  ];
  if (result.rowsLeft > 0)
    lines.push(`${result.rowsLeft} rows still have no index: resolve the rows listed below and run it again`);
  lines.push(propertiesText(result));
  return lines.join('\n');
}

/** The counts per property, then the rows left out by primary key (never their values). */
function propertiesText(result: IndexJobResult): string {
  const lines = [
    table(
      result.properties.map((p) => ({
        entity: p.entity,
        property: p.property,
        indexed: p.rowsIndexed,
        'rewritten meanwhile': p.rowsSkipped,
        duplicates: p.duplicates.length,
        failures: p.failures.length,
      })),
    ),
  ];
  const failures = result.properties.flatMap((p) =>
    p.failures.map((f) => ({
      entity: p.entity,
      property: p.property,
      primaryKey: f.primaryKey,
      error: f.error,
    })),
  );
  if (failures.length) lines.push('', 'rows whose value could not be read:', table(failures));
  const duplicates = result.properties.flatMap((p) =>
    p.duplicates.map((primaryKey) => ({ entity: p.entity, property: p.property, primaryKey })),
  );
  if (duplicates.length) {
    lines.push(
      '',
      'rows of a unique property whose value another row holds under the new key (left under the old one):',
      table(duplicates),
    );
  }
  return lines.join('\n');
}
