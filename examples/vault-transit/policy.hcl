# What the application's token (or AppRole) needs on the Transit key "app-data", and nothing more.
# `update` without `create`: an encrypt to a misspelt key name cannot create a new key.

# New data keys: Transit generates a 256-bit key and returns it with its wrapped form.
path "transit/datakey/plaintext/app-data" {
  capabilities = ["update"]
}

# Reading rows: unwrap their data keys.
path "transit/decrypt/app-data" {
  capabilities = ["update"]
}

# Moving existing data keys under this key (rotation from another key or provider).
path "transit/encrypt/app-data" {
  capabilities = ["update"]
}

# Re-wrapping under the latest key version after `vault write -f transit/keys/app-data/rotate`.
path "transit/rewrap/app-data" {
  capabilities = ["update"]
}

# Validation: the key's type, derived and exportable flags (metadata, never key material).
path "transit/keys/app-data" {
  capabilities = ["read"]
}
