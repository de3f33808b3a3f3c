/**
 * typeorm-envelope: transparent per-column envelope encryption for TypeORM.
 * @packageDocumentation
 */

export {
  AUDIT_LOG_TABLE,
  KEY_VERSIONS_TABLE,
  TypeormEnvelopeKeyRegistry1764300000000,
} from '../migrations/1764300000000-TypeormEnvelopeKeyRegistry';
export type { ValueBinding } from './crypto/associated-data';
export type { ValueType } from './crypto/codec';
export {
  type AttachOptions,
  EnvelopeEncryption,
  type EnvelopeEncryptionOptions,
  type KeyValidation,
  type RegistryCheck,
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
export {
  AwsKmsKeyProvider,
  type AwsKmsKeyProviderOptions,
  type KmsClient,
  type KmsClientConfig,
  type KmsMiddleware,
  type KmsMiddlewareOptions,
} from './keys/aws-kms-key-provider';
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
export { type BackfillOptions, type BackfillResult, backfillEncryptedColumns } from './rotation/backfill';
export {
  type AuditEntry,
  type AuditEvent,
  currentActor,
  KeyRegistry,
  type KeyState,
  type KeyVersionRecord,
} from './rotation/key-registry';
export { type ReencryptOptions, type ReencryptResult, reencryptColumns } from './rotation/reencrypt';
export type { RegistryWatchOptions } from './rotation/registry-watcher';
export {
  type PropertyRewrapResult,
  type RewrapOptions,
  type RewrapProgress,
  type RewrapResult,
  rewrapDataKeys,
} from './rotation/rewrap';
export type { EntitySelector, RotationTarget } from './rotation/rotation-target';
export { encryptionStatus, type PropertyStatus } from './rotation/status';
export {
  type VerifyFailure,
  type VerifyOptions,
  type VerifyResult,
  verifyEncryptedColumns,
} from './rotation/verify';
export { Encrypted, type EncryptedOptions, type SidecarColumnNames } from './typeorm/encrypted-decorator';
export { maskEntity } from './typeorm/mask-entity';
