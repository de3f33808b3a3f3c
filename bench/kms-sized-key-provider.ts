import { randomBytes } from 'node:crypto';
import {
  type EncryptionContext,
  type GeneratedDataKey,
  type KeyDescription,
  KeyProvider,
  LocalKeyProvider,
} from './library';

/** The size of a data key wrapped by AWS KMS (`GenerateDataKey` with an encryption context), measured. */
export const KMS_WRAPPED_KEY_BYTES = 184;

/**
 * A local master key whose wrapped data keys are padded to the size AWS KMS returns, so the
 * benchmark can report the storage a KMS-backed table takes without a KMS. Storage only: its
 * speed is the local key's, not a KMS's.
 */
export class KmsSizedKeyProvider extends KeyProvider {
  readonly #local = new LocalKeyProvider({ key: randomBytes(32).toString('base64') });

  describe(): KeyDescription {
    return { kind: 'kms-sized-local', keyReference: this.#local.describe().keyReference };
  }

  protected async _generateDataKey(context: EncryptionContext): Promise<GeneratedDataKey> {
    const generated = await this.#local.generateDataKey(context);
    return { plaintextKey: generated.plaintextKey, wrappedKey: this.#pad(generated.wrappedKey) };
  }

  protected async _wrapDataKey(plaintextKey: Buffer, context: EncryptionContext): Promise<Buffer> {
    return this.#pad(await this.#local.wrapDataKey(plaintextKey, context));
  }

  protected _unwrapDataKey(wrappedKey: Buffer, context: EncryptionContext): Promise<Buffer> {
    const length = wrappedKey[0] as number;
    return this.#local.unwrapDataKey(wrappedKey.subarray(1, 1 + length), context);
  }

  /** `[length][local wrap][random padding]`, KMS_WRAPPED_KEY_BYTES in all. */
  #pad(wrapped: Buffer): Buffer {
    const padding = randomBytes(Math.max(0, KMS_WRAPPED_KEY_BYTES - 1 - wrapped.length));
    return Buffer.concat([Buffer.of(wrapped.length), wrapped, padding]);
  }
}
