import { randomBytes } from 'node:crypto';
import { EnvelopeEncryption, LocalKeyProvider } from '../../src';

/**
 * The application's one EnvelopeEncryption, created once at start-up like the DataSource file a
 * TypeORM CLI reads. The master key comes from the environment (a secret store in production);
 * the example generates one per run when `MASTER_KEY` is unset.
 */
export const masterKey = new LocalKeyProvider({
  key: process.env.MASTER_KEY ?? randomBytes(32).toString('base64'),
});

export const encryption = new EnvelopeEncryption({
  keys: [{ version: 1, provider: masterKey }],
  activeVersion: 1,
});
