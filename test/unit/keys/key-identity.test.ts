import { describe, expect, it } from 'vitest';
import { keyIdentity } from '../../../src/keys/key-identity';

describe('keyIdentity', () => {
  it('gives every version of an Azure Key Vault key, and its version-less id, one identity', () => {
    const ids = [
      'https://acme.vault.azure.net/keys/acme-data/0123456789abcdef0123456789abcdef',
      'https://acme.vault.azure.net/keys/acme-data/fedcba9876543210fedcba9876543210',
      'https://acme.vault.azure.net/keys/acme-data',
      'https://acme.vault.azure.net/keys/acme-data/',
      'https://ACME.vault.azure.net/keys/Acme-Data/0123456789abcdef0123456789abcdef',
      'http://127.0.0.1:4000/keys/acme-data/1',
    ].map(keyIdentity);
    expect(new Set(ids.slice(0, 5)).size).toBe(1);
    expect(ids[5]).not.toBe(ids[0]);
    expect(keyIdentity('https://acme.vault.azure.net/keys/other/1')).not.toBe(ids[0]);
  });

  it('gives every version of a Cloud KMS crypto key, and the key itself, one identity', () => {
    const key = 'projects/p/locations/europe-west1/keyRings/ring/cryptoKeys/data';
    expect(keyIdentity(`${key}/cryptoKeyVersions/1`)).toBe(key);
    expect(keyIdentity(`${key}/cryptoKeyVersions/7`)).toBe(key);
    expect(keyIdentity(key)).toBe(key);
    expect(keyIdentity(`${key}2/cryptoKeyVersions/1`)).not.toBe(key);
  });

  it('keeps other references as they are', () => {
    for (const reference of [
      'arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab',
      'sha256:0f1e2d',
      'http://127.0.0.1:8200/v1/transit/keys/acme',
    ]) {
      expect(keyIdentity(reference)).toBe(reference);
    }
  });
});
