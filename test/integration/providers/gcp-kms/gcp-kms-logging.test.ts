import { randomBytes } from 'node:crypto';
import { format } from 'node:util';
import { KeyManagementServiceClient } from '@google-cloud/kms';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GcpKmsKeyProvider } from '../../../../src';
import { type GcpKmsEmulator, startGcpKmsEmulator } from '../../../support/gcp-kms-emulator';

/**
 * `GOOGLE_SDK_NODE_LOGGING=kms` makes `@google-cloud/kms` log every request and answer in full.
 * Its own file: the variable is set before any client of this process exists.
 */
const CONTEXT = { 'typeorm-envelope:keyring': 'main' };
let emulator: GcpKmsEmulator;
let keyName: string;
let previous: string | undefined;

/** What the process prints (console, which the client's logger uses, and stderr / stdout) while `run` runs. */
async function captured(run: () => Promise<unknown>): Promise<string> {
  const chunks: string[] = [];
  const restores: Array<() => void> = [];
  for (const method of ['error', 'warn', 'log', 'info', 'debug'] as const) {
    const original = console[method];
    console[method] = (...args: unknown[]) => {
      chunks.push(format(...args));
    };
    restores.push(() => {
      console[method] = original;
    });
  }
  for (const stream of [process.stderr, process.stdout]) {
    const original = stream.write;
    stream.write = ((chunk: unknown) => {
      chunks.push(String(chunk));
      return true;
    }) as typeof stream.write;
    restores.push(() => {
      stream.write = original;
    });
  }
  try {
    await run();
  } finally {
    for (const restore of restores) restore();
  }
  return chunks.join('\n');
}

/** Every printable form of the key bytes, and the array form the client's JSON log uses. */
const forms = (key: Buffer) => [
  key.toString('base64'),
  key.toString('hex'),
  `"data":[${[...key].join(',')}]`,
];

beforeAll(async () => {
  previous = process.env.GOOGLE_SDK_NODE_LOGGING;
  process.env.GOOGLE_SDK_NODE_LOGGING = 'kms';
  emulator = await startGcpKmsEmulator();
  keyName = emulator.createKey().name;
});
afterAll(async () => {
  if (previous === undefined) delete process.env.GOOGLE_SDK_NODE_LOGGING;
  else process.env.GOOGLE_SDK_NODE_LOGGING = previous;
  await emulator?.close();
});

describe('with the client’s request logging switched on', () => {
  it('a client of its own logs the data key it encrypts (what the provider must prevent)', async () => {
    const client = new KeyManagementServiceClient({ fallback: 'rest', ...emulator.connection() });
    const key = randomBytes(32);
    const output = await captured(() => client.encrypt({ name: keyName, plaintext: key }));
    await client.close();
    expect(output).toContain('encrypt request');
    expect(forms(key).some((form) => output.includes(form))).toBe(true);
  });

  it('the provider’s client logs nothing: no data key, wrapped or unwrapped, reaches the output', async () => {
    const kms = new GcpKmsKeyProvider({ keyName, ...emulator.connection() });
    const key = randomBytes(32);
    let unwrapped: Buffer = Buffer.alloc(0);
    const output = await captured(async () => {
      const wrapped = await kms.wrapDataKey(key, CONTEXT);
      unwrapped = await kms.unwrapDataKey(wrapped, CONTEXT);
      await kms.validate(CONTEXT);
    });
    kms.destroy();
    expect(unwrapped.equals(key)).toBe(true);
    expect(output).not.toContain('encrypt request');
    expect(output).not.toContain('decrypt response');
    for (const form of forms(key)) expect(output).not.toContain(form);
  });
});
