/**
 * typeorm-envelope: transparent per-column envelope encryption for TypeORM.
 * @packageDocumentation
 */
export type { ValueBinding } from './crypto/associated-data';
export type { ValueType } from './crypto/codec';
export {
  type AttachOptions,
  EnvelopeEncryption,
  type EnvelopeEncryptionOptions,
  type KeyValidation,
} from './envelope-encryption';
export {
  ConfigError,
  EnvelopeError,
  type ErrorContext,
  IntegrityError,
  KeyAccessDeniedError,
  KeyProviderError,
  UnknownKeyVersionError,
  UnsupportedOperationError,
  ValueTypeError,
} from './errors';
export type { SealedValue } from './field-encryptor';
export { AwsKmsKeyProvider, type AwsKmsKeyProviderOptions } from './keys/aws-kms-key-provider';
export type { DataKeyCacheOptions } from './keys/data-key-cache';
export {
  type EncryptionContext,
  type GeneratedDataKey,
  type KeyDescription,
  KeyProvider,
} from './keys/key-provider';
export type { KeyringEntry } from './keys/keyring';
export { LocalKeyProvider, type LocalKeyProviderOptions } from './keys/local-key-provider';
export { type Mask, maskValue } from './masking';
export { Encrypted, type EncryptedOptions, type SidecarColumnNames } from './typeorm/encrypted-decorator';
export { maskEntity } from './typeorm/mask-entity';
