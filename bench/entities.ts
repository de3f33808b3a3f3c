import 'reflect-metadata';
import { randomBytes } from 'node:crypto';
import { Column, Entity, Index, PrimaryGeneratedColumn } from 'typeorm';
import { EncryptionTransformer } from 'typeorm-encrypted';
import { Encrypted, EncryptionTenant } from './library';

/**
 * The same person in three tables: three ~20–30 character strings and one plain column, stored
 * as plaintext, with typeorm-envelope and with typeorm-encrypted.
 */
export interface PersonData {
  email: string;
  fullName: string;
  phone: string;
  country: string;
}

/** 1. Plaintext: the baseline. */
@Entity({ name: 'bench_plaintext' })
export class PlainPerson implements PersonData {
  @PrimaryGeneratedColumn() id!: number;
  @Column({ type: 'varchar' }) email!: string;
  @Column({ type: 'varchar' }) fullName!: string;
  @Column({ type: 'varchar' }) phone!: string;
  @Column({ type: 'varchar' }) country!: string;
}

/** 2. typeorm-envelope: four sidecar columns per property (ciphertext, iv, wrapped key, key version). */
@Entity({ name: 'bench_envelope' })
export class EnvelopePerson implements PersonData {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted() email!: string;
  @Encrypted() fullName!: string;
  @Encrypted() phone!: string;
  @Column({ type: 'varchar' }) country!: string;
}

/** 2c. typeorm-envelope, compact layout: one bytea per property, wrapped keys in the data-key table. */
@Entity({ name: 'bench_compact' })
export class CompactPerson implements PersonData {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ layout: 'compact' }) email!: string;
  @Encrypted({ layout: 'compact' }) fullName!: string;
  @Encrypted({ layout: 'compact' }) phone!: string;
  @Column({ type: 'varchar' }) country!: string;
}

/** The sidecar layout again, stored under a key provider whose wrapped keys are KMS-sized (storage only). */
@Entity({ name: 'bench_envelope_kms_sized' })
export class KmsSizedEnvelopePerson implements PersonData {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted() email!: string;
  @Encrypted() fullName!: string;
  @Encrypted() phone!: string;
  @Column({ type: 'varchar' }) country!: string;
}

/** The compact layout again, under the KMS-sized provider (storage only). */
@Entity({ name: 'bench_compact_kms_sized' })
export class KmsSizedCompactPerson implements PersonData {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ layout: 'compact' }) email!: string;
  @Encrypted({ layout: 'compact' }) fullName!: string;
  @Encrypted({ layout: 'compact' }) phone!: string;
  @Column({ type: 'varchar' }) country!: string;
}

/**
 * 2b. typeorm-envelope with tenants: the same three encrypted properties, sealed under the key of the
 * tenant named in `workspaceId` (its own key, or the application's key bound to the tenant).
 */
@Entity({ name: 'bench_tenant_envelope' })
export class TenantEnvelopePerson implements PersonData {
  @PrimaryGeneratedColumn() id!: number;
  @EncryptionTenant() @Column({ type: 'varchar' }) workspaceId!: string;
  @Encrypted() email!: string;
  @Encrypted() fullName!: string;
  @Encrypted() phone!: string;
  @Column({ type: 'varchar' }) country!: string;
}

/**
 * typeorm-encrypted's key: generated when this module loads, i.e. at run time (its transformer
 * takes the key when the decorators run). Hex of 32 random bytes, as its README shows.
 */
const TYPEORM_ENCRYPTED_KEY = randomBytes(32).toString('hex');

const encryptedColumn = () =>
  Column({
    type: 'varchar',
    nullable: false,
    transformer: new EncryptionTransformer({
      key: TYPEORM_ENCRYPTED_KEY,
      algorithm: 'aes-256-gcm',
      ivLength: 12,
      authTagLength: 16,
    }),
  });

/** 3. typeorm-encrypted 0.8.0: `EncryptionTransformer` (AES-256-GCM, base64 of iv + tag + ciphertext). */
@Entity({ name: 'bench_typeorm_encrypted' })
export class TypeormEncryptedPerson implements PersonData {
  @PrimaryGeneratedColumn() id!: number;
  @encryptedColumn() email!: string;
  @encryptedColumn() fullName!: string;
  @encryptedColumn() phone!: string;
  @Column({ type: 'varchar' }) country!: string;
}

/** The four sidecar columns of each encrypted property of {@link EnvelopePerson}, as TypeORM names them. */
export const SIDECAR_FLOOR_COLUMNS = (['email', 'fullName', 'phone'] as const).flatMap((p) => [
  { property: `${p}Ciphertext`, name: `${p}_ciphertext`, type: 'bytea' as const },
  { property: `${p}Iv`, name: `${p}_iv`, type: 'bytea' as const },
  { property: `${p}WrappedKey`, name: `${p}_wrapped_key`, type: 'bytea' as const },
  { property: `${p}KeyVersion`, name: `${p}_key_version`, type: 'int' as const },
]);

/**
 * 4. The sidecar layout's floor: {@link EnvelopePerson}'s table (twelve sidecar columns and the plain
 * one) written and read through TypeORM with no encryption at all, the columns holding random bytes
 * of the sizes the library stores. What the four-sidecar layout costs before any cryptography.
 */
@Entity({ name: 'bench_sidecar_floor' })
export class SidecarFloorPerson {
  @PrimaryGeneratedColumn() id!: number;
  @Column({ type: 'varchar' }) country!: string;
  [column: string]: unknown;
}
for (const column of SIDECAR_FLOOR_COLUMNS) {
  Column({ type: column.type, name: column.name })(SidecarFloorPerson.prototype, column.property);
}

/** Login by email: the plaintext baseline, with a B-tree index on the column. */
@Entity({ name: 'bench_login_plaintext' })
export class PlainLogin {
  @PrimaryGeneratedColumn() id!: number;
  @Index() @Column({ type: 'varchar' }) email!: string;
  @Column({ type: 'varchar' }) fullName!: string;
}

/** Login by email through a blind index (`searchable`, normalised as an email, unique). */
@Entity({ name: 'bench_login_searchable' })
export class SearchableLogin {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted({ searchable: { normalize: 'email' }, unique: true }) email!: string;
  @Encrypted() fullName!: string;
}

/** The same encrypted properties without the index: what the index adds to a write. */
@Entity({ name: 'bench_login_encrypted' })
export class EncryptedLogin {
  @PrimaryGeneratedColumn() id!: number;
  @Encrypted() email!: string;
  @Encrypted() fullName!: string;
}
