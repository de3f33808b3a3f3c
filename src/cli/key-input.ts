import { closeSync, fstatSync, openSync, readFileSync } from 'node:fs';
import { ConfigError } from '../errors';

/** Why a key is never taken as a command-line argument; shown when someone tries. */
export const KEY_ON_COMMAND_LINE =
  'a customer-provided key is never taken on the command line: arguments stay in shell history and ' +
  'are visible to every user of the machine in the process list. Put the key in a file only you can ' +
  'read (chmod 600) and pass --customer-key-file <path>, or pipe it in with --customer-key-file -';

const KEY_BYTES = 32;
const BASE64_KEY = /^[A-Za-z0-9+/]{43}=?$/;

/** A customer-provided key read from a file or stdin, and what the operator should be told. */
export interface KeyInput {
  /** Base64 of the 32 key bytes, as the `customer-key` descriptor takes it. */
  key: string;
  warnings: string[];
}

/**
 * Reads a customer-provided key from `path` (`-`: stdin): base64 of 32 bytes (`openssl rand
 * -base64 32`) or the 32 raw bytes (`openssl rand 32`). The bytes read are zeroed once encoded.
 * Errors name the file, never its content.
 */
export function readCustomerKey(path: string): KeyInput {
  const warnings: string[] = [];
  const from = path === '-' ? 'stdin' : path;
  let content: Buffer;
  if (path === '-') {
    if (process.stdin.isTTY) process.stderr.write('paste the key (base64), then press Ctrl-D\n');
    content = readAll(0);
  } else {
    let fd: number;
    try {
      fd = openSync(path, 'r');
    } catch (error) {
      /* The key itself given where its path belongs: never echo it back. */
      if (BASE64_KEY.test(path.trim())) {
        throw new ConfigError(
          `--customer-key-file takes the path of a file, and what was given looks like a key (treat that key as exposed): ${KEY_ON_COMMAND_LINE}`,
        );
      }
      throw new ConfigError(`cannot read the key file ${path} (${(error as NodeJS.ErrnoException).code})`);
    }
    try {
      const stat = fstatSync(fd);
      if (!stat.isFile()) throw new ConfigError(`the key file ${path} is not a regular file`);
      /* A key others can read is a key others may have: the operator should know. */
      if (process.platform !== 'win32' && (stat.mode & 0o077) !== 0) {
        warnings.push(
          `${path} is readable by other users (mode ${(stat.mode & 0o777).toString(8)}); keep customer keys in files only you can read (chmod 600)`,
        );
      }
      content = readAll(fd);
    } finally {
      closeSync(fd);
    }
  }
  try {
    return { key: keyText(content, from), warnings };
  } finally {
    content.fill(0);
  }
}

function keyText(content: Buffer, from: string): string {
  if (content.length === KEY_BYTES) return content.toString('base64');
  const text = content.toString('utf8').trim();
  if (text === '')
    throw new ConfigError(from === 'stdin' ? 'no key on stdin' : `the key file ${from} is empty`);
  const decoded = Buffer.from(text, 'base64');
  const length = decoded.length;
  decoded.fill(0);
  if (!BASE64_KEY.test(text) || length !== KEY_BYTES) {
    throw new ConfigError(
      `the key in ${from} is neither base64 of 32 bytes nor 32 raw bytes: make one with \`openssl rand -base64 32\``,
    );
  }
  return text;
}

function readAll(fd: number): Buffer {
  try {
    return readFileSync(fd);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    /* stdin closed or never opened reads as empty. */
    if (fd === 0 && (code === 'EOF' || code === 'EAGAIN' || code === 'ENXIO')) return Buffer.alloc(0);
    throw error;
  }
}
