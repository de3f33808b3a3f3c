/*
 * AES-256-GCM for typeorm-envelope through the OpenSSL that Node itself is linked with.
 *
 * One handle per data key holds two EVP_CIPHER_CTX (encrypt, decrypt) whose key schedule is set once;
 * each value only re-initialises the IV. Plain N-API (node_api.h), no node-addon-api. Key bytes are
 * never printed; the copy kept for the stale-key check is OPENSSL_cleanse'd when the handle is freed.
 */
#ifndef NAPI_VERSION
#define NAPI_VERSION 8
#endif
#include <node_api.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/opensslv.h>
#include <stdlib.h>
#include <string.h>

namespace {

constexpr size_t kKeyBytes = 32;
constexpr size_t kIvBytes = 12;
constexpr size_t kTagBytes = 16;

/* Marks externals made by createKey, so that no other external is taken for a key handle. */
const napi_type_tag kHandleTag = {0x7f1d3c2ab9e64d05ULL, 0x93c0a1e84b2f6d17ULL};

struct GcmKey {
  EVP_CIPHER_CTX* enc;
  EVP_CIPHER_CTX* dec;
  /* The key bytes the contexts were set with: lets seal/open detect a key Buffer whose bytes changed. */
  unsigned char key[kKeyBytes];
};

void FreeContexts(GcmKey* k) {
  if (k->enc != nullptr) EVP_CIPHER_CTX_free(k->enc);
  if (k->dec != nullptr) EVP_CIPHER_CTX_free(k->dec);
  k->enc = nullptr;
  k->dec = nullptr;
  OPENSSL_cleanse(k->key, sizeof k->key);
}

void FinalizeKey(napi_env /*env*/, void* data, void* /*hint*/) {
  GcmKey* k = static_cast<GcmKey*>(data);
  FreeContexts(k);
  free(k);
}

/* Sets (or replaces) the key of both contexts. Returns false on an OpenSSL failure. */
bool SetKey(GcmKey* k, const unsigned char* key) {
  if (EVP_EncryptInit_ex(k->enc, EVP_aes_256_gcm(), nullptr, nullptr, nullptr) != 1 ||
      EVP_CIPHER_CTX_ctrl(k->enc, EVP_CTRL_GCM_SET_IVLEN, static_cast<int>(kIvBytes), nullptr) != 1 ||
      EVP_EncryptInit_ex(k->enc, nullptr, nullptr, key, nullptr) != 1 ||
      EVP_DecryptInit_ex(k->dec, EVP_aes_256_gcm(), nullptr, nullptr, nullptr) != 1 ||
      EVP_CIPHER_CTX_ctrl(k->dec, EVP_CTRL_GCM_SET_IVLEN, static_cast<int>(kIvBytes), nullptr) != 1 ||
      EVP_DecryptInit_ex(k->dec, nullptr, nullptr, key, nullptr) != 1) {
    return false;
  }
  memcpy(k->key, key, kKeyBytes);
  return true;
}

struct Bytes {
  unsigned char* data;
  size_t length;
};

napi_value ThrowType(napi_env env, const char* message) {
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", message);
  return nullptr;
}

napi_value ThrowError(napi_env env, const char* message) {
  napi_throw_error(env, "ERR_CRYPTO_OPERATION_FAILED", message);
  return nullptr;
}

/* Reads a Uint8Array (Buffer included). Empty arrays may have no data pointer; `data` is then "". */
bool GetBytes(napi_env env, napi_value value, Bytes* out) {
  bool is_typed = false;
  if (napi_is_typedarray(env, value, &is_typed) != napi_ok || !is_typed) return false;
  napi_typedarray_type type;
  size_t length = 0;
  void* data = nullptr;
  if (napi_get_typedarray_info(env, value, &type, &length, &data, nullptr, nullptr) != napi_ok ||
      type != napi_uint8_array) {
    return false;
  }
  static unsigned char empty[1] = {0};
  out->data = data != nullptr ? static_cast<unsigned char*>(data) : empty;
  out->length = length;
  return true;
}

/* Reads the handle argument; nullptr (with a pending TypeError) if it is not a live handle. */
GcmKey* GetHandle(napi_env env, napi_value value, bool allow_destroyed) {
  napi_valuetype type;
  bool tagged = false;
  void* data = nullptr;
  if (napi_typeof(env, value, &type) != napi_ok || type != napi_external ||
      napi_check_object_type_tag(env, value, &kHandleTag, &tagged) != napi_ok || !tagged ||
      napi_get_value_external(env, value, &data) != napi_ok || data == nullptr) {
    ThrowType(env, "expected a key handle from createKey()");
    return nullptr;
  }
  GcmKey* k = static_cast<GcmKey*>(data);
  if (!allow_destroyed && k->enc == nullptr) {
    ThrowType(env, "key handle was destroyed");
    return nullptr;
  }
  return k;
}

/* createKey(key: Uint8Array(32)) -> external handle */
napi_value CreateKey(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  if (napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr) != napi_ok) return nullptr;
  Bytes key;
  if (argc < 1 || !GetBytes(env, argv[0], &key)) return ThrowType(env, "key must be a Uint8Array");
  if (key.length != kKeyBytes) return ThrowType(env, "key must be 32 bytes");

  GcmKey* k = static_cast<GcmKey*>(calloc(1, sizeof(GcmKey)));
  if (k == nullptr) return ThrowError(env, "out of memory");
  k->enc = EVP_CIPHER_CTX_new();
  k->dec = EVP_CIPHER_CTX_new();
  if (k->enc == nullptr || k->dec == nullptr || !SetKey(k, key.data)) {
    FreeContexts(k);
    free(k);
    return ThrowError(env, "OpenSSL could not set up AES-256-GCM");
  }
  napi_value handle;
  if (napi_create_external(env, k, FinalizeKey, nullptr, &handle) != napi_ok) {
    FreeContexts(k);
    free(k);
    return ThrowError(env, "could not create key handle");
  }
  napi_type_tag_object(env, handle, &kHandleTag);
  return handle;
}

/* destroyKey(handle): frees the contexts now; idempotent. The finalizer frees the rest. */
napi_value DestroyKey(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  if (napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr) != napi_ok) return nullptr;
  if (argc < 1) return ThrowType(env, "expected a key handle from createKey()");
  GcmKey* k = GetHandle(env, argv[0], true);
  if (k == nullptr) return nullptr;
  FreeContexts(k);
  return nullptr;
}

/* True when two non-empty byte ranges share memory. */
bool Overlaps(const Bytes& a, const Bytes& b) {
  return a.length > 0 && b.length > 0 && a.data < b.data + b.length && b.data < a.data + a.length;
}

/*
 * Shared argument parsing of seal/open: (handle, iv12, input, aad[, key32[, out]]).
 * With `key`, a handle whose key bytes differ from `key` is re-keyed first (never a stale schedule).
 * With `out`, the output is written there (it must have exactly the output's length) and returned.
 */
bool ParseArgs(napi_env env, napi_callback_info info, GcmKey** k, Bytes* iv, Bytes* input, Bytes* aad,
               size_t (*out_length)(size_t), Bytes* out, napi_value* out_value) {
  size_t argc = 6;
  napi_value argv[6];
  if (napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr) != napi_ok) return false;
  if (argc < 4) {
    ThrowType(env, "expected (handle, iv, data, aad)");
    return false;
  }
  *k = GetHandle(env, argv[0], false);
  if (*k == nullptr) return false;
  if (!GetBytes(env, argv[1], iv) || iv->length != kIvBytes) {
    ThrowType(env, "iv must be a Uint8Array of 12 bytes");
    return false;
  }
  if (!GetBytes(env, argv[2], input)) {
    ThrowType(env, "data must be a Uint8Array");
    return false;
  }
  if (!GetBytes(env, argv[3], aad)) {
    ThrowType(env, "aad must be a Uint8Array");
    return false;
  }
  if (input->length > 0x7fffffff - kTagBytes || aad->length > 0x7fffffff) {
    ThrowType(env, "data or aad too long");
    return false;
  }
  napi_valuetype type = napi_undefined;
  if (argc >= 5 && napi_typeof(env, argv[4], &type) == napi_ok && type != napi_undefined) {
    Bytes key;
    if (!GetBytes(env, argv[4], &key) || key.length != kKeyBytes) {
      ThrowType(env, "key must be a Uint8Array of 32 bytes");
      return false;
    }
    if (CRYPTO_memcmp(key.data, (*k)->key, kKeyBytes) != 0 && !SetKey(*k, key.data)) {
      ThrowError(env, "OpenSSL could not set up AES-256-GCM");
      return false;
    }
  }
  out->data = nullptr;
  out->length = 0;
  *out_value = nullptr;
  if (argc >= 6 && napi_typeof(env, argv[5], &type) == napi_ok && type != napi_undefined) {
    if (!GetBytes(env, argv[5], out) || out->length != out_length(input->length)) {
      ThrowType(env, "out must be a Uint8Array of the output's length");
      return false;
    }
    if (Overlaps(*out, *iv) || Overlaps(*out, *input) || Overlaps(*out, *aad)) {
      ThrowType(env, "out must not overlap an input");
      return false;
    }
    *out_value = argv[5];
  }
  return true;
}

size_t SealedLength(size_t plaintext_length) { return plaintext_length + kTagBytes; }
size_t OpenedLength(size_t sealed_length) { return sealed_length >= kTagBytes ? sealed_length - kTagBytes : 0; }

/*
 * The output: the caller's `out` when given (e.g. from Node's Buffer pool, much cheaper than a
 * Buffer of its own), else a new Buffer. `result` is the JS value to return.
 */
bool Output(napi_env env, const Bytes& given, napi_value given_value, size_t length, napi_value* result,
            unsigned char** data) {
  if (given_value != nullptr) {
    *result = given_value;
    *data = given.data;
    return true;
  }
  void* out_data = nullptr;
  if (napi_create_buffer(env, length, &out_data, result) != napi_ok) {
    ThrowError(env, "could not allocate output");
    return false;
  }
  *data = out_data != nullptr ? static_cast<unsigned char*>(out_data) : nullptr;
  return true;
}

/* seal(handle, iv12, plaintext, aad[, key[, out]]) -> Buffer(ciphertext || tag16), or `out` */
napi_value Seal(napi_env env, napi_callback_info info) {
  GcmKey* k;
  Bytes iv, pt, aad;
  Bytes given;
  napi_value given_value;
  if (!ParseArgs(env, info, &k, &iv, &pt, &aad, SealedLength, &given, &given_value)) return nullptr;

  napi_value result;
  unsigned char* out;
  if (!Output(env, given, given_value, pt.length + kTagBytes, &result, &out)) return nullptr;
  int len = 0;
  int fin = 0;
  if (EVP_EncryptInit_ex(k->enc, nullptr, nullptr, nullptr, iv.data) != 1 ||
      (aad.length > 0 && EVP_EncryptUpdate(k->enc, nullptr, &len, aad.data, static_cast<int>(aad.length)) != 1) ||
      (pt.length > 0 && EVP_EncryptUpdate(k->enc, out, &len, pt.data, static_cast<int>(pt.length)) != 1) ||
      EVP_EncryptFinal_ex(k->enc, out + (pt.length > 0 ? len : 0), &fin) != 1 ||
      static_cast<size_t>((pt.length > 0 ? len : 0) + fin) != pt.length ||
      EVP_CIPHER_CTX_ctrl(k->enc, EVP_CTRL_GCM_GET_TAG, static_cast<int>(kTagBytes), out + pt.length) != 1) {
    OPENSSL_cleanse(out, pt.length + kTagBytes);
    return ThrowError(env, "AES-256-GCM encryption failed");
  }
  return result;
}

/* open(handle, iv12, sealed, aad[, key[, out]]) -> Buffer(plaintext) or `out` | undefined on failure */
napi_value Open(napi_env env, napi_callback_info info) {
  GcmKey* k;
  Bytes iv, sealed, aad;
  Bytes given;
  napi_value given_value;
  if (!ParseArgs(env, info, &k, &iv, &sealed, &aad, OpenedLength, &given, &given_value)) return nullptr;
  napi_value undefined;
  napi_get_undefined(env, &undefined);
  if (sealed.length < kTagBytes) return undefined;

  const size_t ct_len = sealed.length - kTagBytes;
  unsigned char tag[kTagBytes];
  memcpy(tag, sealed.data + ct_len, kTagBytes);

  napi_value result;
  unsigned char* out;
  if (!Output(env, given, given_value, ct_len, &result, &out)) return nullptr;
  static unsigned char scratch[16];
  unsigned char* final_out = ct_len > 0 ? out : scratch;
  int len = 0;
  int fin = 0;
  if (EVP_DecryptInit_ex(k->dec, nullptr, nullptr, nullptr, iv.data) != 1 ||
      (aad.length > 0 && EVP_DecryptUpdate(k->dec, nullptr, &len, aad.data, static_cast<int>(aad.length)) != 1) ||
      (ct_len > 0 && EVP_DecryptUpdate(k->dec, out, &len, sealed.data, static_cast<int>(ct_len)) != 1) ||
      EVP_CIPHER_CTX_ctrl(k->dec, EVP_CTRL_GCM_SET_TAG, static_cast<int>(kTagBytes), tag) != 1 ||
      EVP_DecryptFinal_ex(k->dec, final_out + (ct_len > 0 ? len : 0), &fin) != 1) {
    /* Authentication failed (or OpenSSL did): no unauthenticated plaintext leaves this function. */
    if (ct_len > 0) OPENSSL_cleanse(out, ct_len);
    return undefined;
  }
  return result;
}

napi_value Init(napi_env env, napi_value exports) {
  /* Compiled against one OpenSSL major version, running against Node's: they must agree. */
  if ((OpenSSL_version_num() >> 28) != (OPENSSL_VERSION_NUMBER >> 28)) {
    napi_throw_error(env, nullptr, "typeorm-envelope native GCM: OpenSSL major version mismatch");
    return nullptr;
  }
  napi_property_descriptor props[] = {
      {"createKey", nullptr, CreateKey, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"destroyKey", nullptr, DestroyKey, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"seal", nullptr, Seal, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"open", nullptr, Open, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
  };
  if (napi_define_properties(env, exports, sizeof props / sizeof props[0], props) != napi_ok) return nullptr;
  napi_value version;
  if (napi_create_string_utf8(env, OpenSSL_version(OPENSSL_VERSION), NAPI_AUTO_LENGTH, &version) == napi_ok) {
    napi_set_named_property(env, exports, "openssl", version);
  }
  return exports;
}

}  // namespace

NAPI_MODULE_INIT() { return Init(env, exports); }
