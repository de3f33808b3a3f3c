/**
 * typeorm-envelope: transparent per-column envelope encryption for TypeORM.
 * @packageDocumentation
 */

export {
  AUDIT_LOG_TABLE,
  KEY_VERSIONS_TABLE,
  TypeormEnvelopeKeyRegistry1764300000000,
} from '../migrations/1764300000000-TypeormEnvelopeKeyRegistry';
export {
  TENANT_KEY_VERSION_SEQUENCE,
  TENANT_KEYS_TABLE,
  TENANTS_TABLE,
  TypeormEnvelopeTenantKeys1764400000000,
} from '../migrations/1764400000000-TypeormEnvelopeTenantKeys';
export {
  DATA_KEYS_TABLE,
  DATA_KEYS_VERSION_INDEX,
  TypeormEnvelopeDataKeys1764500000000,
} from '../migrations/1764500000000-TypeormEnvelopeDataKeys';
export {
  INDEX_KEYS_TABLE,
  TypeormEnvelopeIndexKeys1764600000000,
} from '../migrations/1764600000000-TypeormEnvelopeIndexKeys';
export {
  JOB_RANGES_TABLE,
  TypeormEnvelopeJobRanges1764700000000,
} from '../migrations/1764700000000-TypeormEnvelopeJobRanges';
export type { ValueBinding } from './crypto/associated-data';
export type { BuiltInNormalizer, Normalizer } from './crypto/blind-index';
export type { ValueType } from './crypto/codec';
export { type AesBackend, type AesBackendInfo, aesBackend, aesBackendInfo } from './crypto/native-gcm';
export {
  type AttachOptions,
  EnvelopeEncryption,
  type EnvelopeEncryptionOptions,
  type KeyValidation,
  type RegistryCheck,
  type TenantKeysOptions,
} from './envelope-encryption';
export {
  ConfigError,
  EnvelopeError,
  type ErrorContext,
  IntegrityError,
  KeyAccessDeniedError,
  KeyProviderError,
  TenantOffboardedError,
  UniqueViolationError,
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
export {
  type AzureKeyVaultClientOptions,
  type AzureKeyVaultKeyMetadata,
  AzureKeyVaultKeyProvider,
  type AzureKeyVaultKeyProviderOptions,
  type AzureKeyVaultRetryOptions,
  type AzureTokenCredential,
} from './keys/azure-key-vault-key-provider';
export {
  type AzureKeyVaultKeyDescriptor,
  type AzureKeyVaultTenantOptions,
  azureKeyVaultKeyFactory,
} from './keys/azure-key-vault-tenant-key-factory';
export type { DataKeyCacheOptions } from './keys/data-key-cache';
export {
  type GcpAuthClient,
  GcpKmsCallError,
  type GcpKmsClient,
  type GcpKmsClientOptions,
  type GcpKmsKeyMetadata,
  GcpKmsKeyProvider,
  type GcpKmsKeyProviderOptions,
  type GcpKmsKeyVersionMetadata,
} from './keys/gcp-kms-key-provider';
export {
  type GcpKmsKeyDescriptor,
  type GcpKmsTenantOptions,
  gcpKmsKeyFactory,
} from './keys/gcp-kms-tenant-key-factory';
export {
  type EncryptionContext,
  type GeneratedDataKey,
  type KeyDescription,
  KeyProvider,
} from './keys/key-provider';
export type { KeyScope } from './keys/key-scope';
export { FIRST_TENANT_KEY_VERSION, type KeyringEntry } from './keys/keyring';
export { LocalKeyProvider, type LocalKeyProviderOptions } from './keys/local-key-provider';
export {
  type AwsKmsKeyDescriptor,
  type AwsKmsTenantOptions,
  awsKmsKeyFactory,
  type CustomerKeyDescriptor,
  customerKeyFactory,
  type TenantKeyDescriptor,
  type TenantKeyFactory,
  type TenantKeyFactoryContext,
} from './keys/tenant-key-factories';
export type { TenantKeyRecord, TenantKeyState, TenantRecord } from './keys/tenant-keyrings';
export type { VaultAppRoleAuth, VaultAuth, VaultClock } from './keys/vault-auth';
export type { VaultFetch } from './keys/vault-http';
export {
  type VaultTransitKeyInfo,
  VaultTransitKeyProvider,
  type VaultTransitKeyProviderOptions,
} from './keys/vault-transit-key-provider';
export {
  type VaultTransitKeyDescriptor,
  type VaultTransitTenantOptions,
  type VaultTransitTenantTarget,
  vaultTransitKeyFactory,
} from './keys/vault-transit-tenant-key-factory';
export { type Mask, maskValue } from './masking';
export {
  AUDIT_CSV_COLUMNS,
  type AuditExportFormat,
  auditLogToCsv,
  auditLogToJson,
  exportAuditLog,
} from './rotation/audit-export';
export { type BackfillOptions, type BackfillResult, backfillEncryptedColumns } from './rotation/backfill';
export {
  AUDIT_EVENTS,
  type AuditEntry,
  type AuditEvent,
  type AuditFilter,
  currentActor,
  KeyRegistry,
  type KeyState,
  type KeyVersionRecord,
} from './rotation/key-registry';
export {
  type MigrateLayoutOptions,
  type MigrateLayoutProgress,
  type MigrateLayoutResult,
  migrateLayout,
  type PropertyLayoutMigration,
} from './rotation/migrate-layout';
export type { WorkerOptions, WorkersReport } from './rotation/parallel-job';
export type { KeyRange, RangeProgress } from './rotation/range-leases';
export { type ReencryptOptions, type ReencryptResult, reencryptColumns } from './rotation/reencrypt';
export type { RegistryWatchOptions } from './rotation/registry-watcher';
export {
  type PropertyRewrapResult,
  type RewrapOptions,
  type RewrapProgress,
  type RewrapResult,
  rewrapDataKeys,
} from './rotation/rewrap';
export type { KeyRowFailure, KeyTableRewrapResult } from './rotation/rewrap-key-table';
export {
  fillBlindIndexes,
  type IndexJobProgress,
  type IndexJobResult,
  type IndexKeyJobOptions,
  type IndexKeysRewrap,
  type PropertyIndexResult,
  rewrapIndexKeys,
  rotateIndexKey,
} from './rotation/rotate-index-key';
export type { EntitySelector, RotationTarget } from './rotation/rotation-target';
export { encryptionStatus, type PropertyStatus } from './rotation/status';
export {
  type VerifyFailure,
  type VerifyOptions,
  type VerifyResult,
  verifyEncryptedColumns,
} from './rotation/verify';
export {
  type OffboardResult,
  TenantAdmin,
  type TenantJobOptions,
  type TenantKeyResult,
  type TenantKeySummary,
  type TenantStatus,
} from './tenants/tenant-admin';
export type { TenantJob, TenantJobState } from './tenants/tenant-registry';
export type { BlindIndexHelperOptions } from './typeorm/blind-index';
export type { SearchableOption, SearchableOptions } from './typeorm/blind-index-decorator';
export {
  Encrypted,
  type EncryptedDefaults,
  type EncryptedOptions,
  encryptedWith,
  type SidecarColumnNames,
  type StorageLayout,
} from './typeorm/encrypted-decorator';
export { EncryptionTenant } from './typeorm/encryption-tenant';
export { maskEntity } from './typeorm/mask-entity';
