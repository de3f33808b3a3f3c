/**
 * The master key a stored key reference names, whatever version of it: two references with the
 * same identity are one customer's key, even when a rotation in the customer's own service gave
 * it a new version (an Azure Key Vault key id with another version, a Cloud KMS key version of
 * the same crypto key). References of other kinds (an AWS KMS key ARN, a fingerprint, a Vault
 * Transit key, whose versions live in the wrapped keys) are their own identity.
 */
export function keyIdentity(reference: string): string {
  /* Azure: https://<vault>/keys/<name>[/<version>]; vault and key names are case-insensitive. */
  const azure = /^(https?:\/\/[^/?#]+\/keys\/[^/?#]+)(?:\/[^/?#]*)?$/i.exec(reference);
  if (azure) return (azure[1] as string).toLowerCase();
  /* Cloud KMS: projects/…/cryptoKeys/<key>[/cryptoKeyVersions/<n>]. */
  const gcp =
    /^(projects\/[^/]+\/locations\/[^/]+\/keyRings\/[^/]+\/cryptoKeys\/[^/]+)(?:\/cryptoKeyVersions\/[^/]+)?$/.exec(
      reference,
    );
  if (gcp) return gcp[1] as string;
  return reference;
}
