import { randomBytes } from 'node:crypto';
import { LocalKeyProvider } from '../../src';
import type { EncryptionContext, GeneratedDataKey } from '../../src/keys/key-provider';

/** A real `LocalKeyProvider` that counts the calls made to it. */
export class CountingKeyProvider extends LocalKeyProvider {
  calls = { generate: 0, wrap: 0, unwrap: 0 };

  constructor(key = randomBytes(32).toString('base64')) {
    super({ key });
  }

  protected override _generateDataKey(context: EncryptionContext): Promise<GeneratedDataKey> {
    this.calls.generate += 1;
    return super._generateDataKey(context);
  }

  protected override _wrapDataKey(plaintextKey: Buffer, context: EncryptionContext): Promise<Buffer> {
    this.calls.wrap += 1;
    return super._wrapDataKey(plaintextKey, context);
  }

  protected override _unwrapDataKey(wrappedKey: Buffer, context: EncryptionContext): Promise<Buffer> {
    this.calls.unwrap += 1;
    return super._unwrapDataKey(wrappedKey, context);
  }

  reset(): void {
    this.calls = { generate: 0, wrap: 0, unwrap: 0 };
  }
}
