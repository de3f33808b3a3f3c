/*
 * AES-256-GCM for typeorm-envelope through the OpenSSL that Node itself is linked with.
 *
 * One handle per data key holds two EVP_CIPHER_CTX (encrypt, decrypt) whose key schedule is set once;
 * each value only re-initialises the IV; sealMany/openMany process the values of one result set or one
 * write under one key in a single call. Plain N-API (node_api.h), no node-addon-api. Key bytes are
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

/* Reads a Uint32Array. */
bool GetUint32s(napi_env env, napi_value value, const uint32_t** data, size_t* length) {
  bool is_typed = false;
  if (napi_is_typedarray(env, value, &is_typed) != napi_ok || !is_typed) return false;
  napi_typedarray_type type;
  void* raw = nullptr;
  if (napi_get_typedarray_info(env, value, &type, length, &raw, nullptr, nullptr) != napi_ok ||
      type != napi_uint32_array) {
    return false;
  }
  static const uint32_t none[1] = {0};
  *data = raw != nullptr ? static_cast<const uint32_t*>(raw) : none;
  return true;
}

/*
 * The arguments of sealMany/openMany, checked in full before any byte is processed:
 * (handle, key32, input, ends: Uint32Array(n), ivs: Uint8Array(12n) | null, aads, aadEnds: Uint32Array(m),
 *  aadOf: Uint32Array(n), out, result: Uint8Array(n)).
 * Value i of `input` is [ends[i-1], ends[i]) (ends[-1] = 0); its associated data is aads
 * [aadEnds[j-1], aadEnds[j]) with j = aadOf[i], so one column's shared associated data is passed once.
 */
struct Batch {
  GcmKey* k;
  Bytes input, ivs, aads, out, result;
  const uint32_t* ends;
  const uint32_t* aad_ends;
  const uint32_t* aad_of;
  size_t n, m;
  /* sealMany only: bytes left free before each value's output (for the caller's header). */
  uint32_t lead;
};

bool ParseBatch(napi_env env, napi_callback_info info, bool sealing, Batch* b) {
  size_t argc = 11;
  napi_value argv[11];
  if (napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr) != napi_ok) return false;
  if (argc < (sealing ? 11u : 10u)) {
    ThrowType(env, sealing ? "expected (handle, key, input, ends, ivs, aads, aadEnds, aadOf, out, result, lead)"
                           : "expected (handle, key, input, ends, ivs, aads, aadEnds, aadOf, out, result)");
    return false;
  }
  b->lead = 0;
  if (sealing && (napi_get_value_uint32(env, argv[10], &b->lead) != napi_ok || b->lead > 64)) {
    ThrowType(env, "lead must be an integer from 0 to 64");
    return false;
  }
  b->k = GetHandle(env, argv[0], false);
  if (b->k == nullptr) return false;
  Bytes key;
  if (!GetBytes(env, argv[1], &key) || key.length != kKeyBytes) {
    ThrowType(env, "key must be a Uint8Array of 32 bytes");
    return false;
  }
  size_t aad_of_length = 0;
  if (!GetBytes(env, argv[2], &b->input) || !GetUint32s(env, argv[3], &b->ends, &b->n) ||
      !GetBytes(env, argv[5], &b->aads) || !GetUint32s(env, argv[6], &b->aad_ends, &b->m) ||
      !GetUint32s(env, argv[7], &b->aad_of, &aad_of_length) || !GetBytes(env, argv[8], &b->out) ||
      !GetBytes(env, argv[9], &b->result)) {
    ThrowType(env, "batch arguments have the wrong types");
    return false;
  }
  if (sealing) {
    if (!GetBytes(env, argv[4], &b->ivs) || b->ivs.length != b->n * kIvBytes) {
      ThrowType(env, "ivs must be a Uint8Array of 12 bytes per value");
      return false;
    }
  } else {
    b->ivs.data = nullptr;
    b->ivs.length = 0;
  }
  if (aad_of_length != b->n || b->result.length != b->n || b->input.length > 0x7fffffff ||
      b->aads.length > 0x7fffffff || b->n > 0x7fffffff / (kIvBytes + kTagBytes)) {
    ThrowType(env, "batch arguments have inconsistent lengths");
    return false;
  }
  /* Every range is checked here, so the loops below never read or write out of bounds. */
  const size_t per_value = sealing ? 0 : kIvBytes + kTagBytes;
  size_t start = 0;
  for (size_t i = 0; i < b->n; i++) {
    if (b->ends[i] < start || b->ends[i] - start < per_value || b->ends[i] > b->input.length ||
        b->aad_of[i] >= b->m) {
      ThrowType(env, "batch value ranges are invalid");
      return false;
    }
    start = b->ends[i];
  }
  if (start != b->input.length) {
    ThrowType(env, "batch value ranges do not cover the input");
    return false;
  }
  size_t aad_start = 0;
  for (size_t j = 0; j < b->m; j++) {
    if (b->aad_ends[j] < aad_start || b->aad_ends[j] > b->aads.length) {
      ThrowType(env, "batch associated-data ranges are invalid");
      return false;
    }
    aad_start = b->aad_ends[j];
  }
  const size_t out_length =
      sealing ? b->input.length + b->n * (kTagBytes + b->lead) : b->input.length - b->n * per_value;
  if (b->out.length != out_length) {
    ThrowType(env, "out must be a Uint8Array of the output's length");
    return false;
  }
  if (Overlaps(b->out, b->input) || Overlaps(b->out, b->aads) || Overlaps(b->out, b->ivs) ||
      Overlaps(b->result, b->out) || Overlaps(b->result, b->input) || Overlaps(b->result, b->aads) ||
      Overlaps(b->result, b->ivs)) {
    ThrowType(env, "out and result must not overlap an input");
    return false;
  }
  if (CRYPTO_memcmp(key.data, b->k->key, kKeyBytes) != 0 && !SetKey(b->k, key.data)) {
    ThrowError(env, "OpenSSL could not set up AES-256-GCM");
    return false;
  }
  return true;
}

const unsigned char* AadOf(const Batch& b, size_t i, size_t* length) {
  const size_t j = b.aad_of[i];
  const size_t start = j == 0 ? 0 : b.aad_ends[j - 1];
  *length = b.aad_ends[j] - start;
  return b.aads.data + start;
}

/*
 * sealMany(handle, key, plaintexts, ends, ivs, aads, aadEnds, aadOf, out, result, lead) -> undefined.
 * Writes ciphertext || tag of value i at out[ends[i-1] + (16 + lead) i + lead, ends[i] + (16 + lead) (i + 1)),
 * leaving `lead` bytes before each for the caller to fill; result[i] = 1. The lead bytes are not written.
 * One call for the values of one write under one data key. Throws if OpenSSL fails (out cleansed).
 */
napi_value SealMany(napi_env env, napi_callback_info info) {
  Batch b;
  if (!ParseBatch(env, info, true, &b)) return nullptr;
  size_t start = 0;
  for (size_t i = 0; i < b.n; i++) {
    const size_t pt_len = b.ends[i] - start;
    unsigned char* out = b.out.data + start + i * (kTagBytes + b.lead) + b.lead;
    size_t aad_len;
    const unsigned char* aad = AadOf(b, i, &aad_len);
    int len = 0;
    int fin = 0;
    if (EVP_EncryptInit_ex(b.k->enc, nullptr, nullptr, nullptr, b.ivs.data + i * kIvBytes) != 1 ||
        (aad_len > 0 && EVP_EncryptUpdate(b.k->enc, nullptr, &len, aad, static_cast<int>(aad_len)) != 1) ||
        (pt_len > 0 &&
         EVP_EncryptUpdate(b.k->enc, out, &len, b.input.data + start, static_cast<int>(pt_len)) != 1) ||
        EVP_EncryptFinal_ex(b.k->enc, out + (pt_len > 0 ? len : 0), &fin) != 1 ||
        static_cast<size_t>((pt_len > 0 ? len : 0) + fin) != pt_len ||
        EVP_CIPHER_CTX_ctrl(b.k->enc, EVP_CTRL_GCM_GET_TAG, static_cast<int>(kTagBytes), out + pt_len) != 1) {
      OPENSSL_cleanse(b.out.data, b.out.length);
      memset(b.result.data, 0, b.result.length);
      return ThrowError(env, "AES-256-GCM encryption failed");
    }
    b.result.data[i] = 1;
    start = b.ends[i];
  }
  return nullptr;
}

/*
 * openMany(handle, key, sealed, ends, null, aads, aadEnds, aadOf, out, result) -> number opened.
 * Value i of `sealed` is iv(12) || ciphertext || tag(16); its plaintext goes to
 * out[ends[i-1] - 28 i, ends[i] - 28 (i + 1)). result[i] is 1 when it authenticated, else 0 and its
 * plaintext range is cleansed: no unauthenticated byte is left in `out`.
 */
napi_value OpenMany(napi_env env, napi_callback_info info) {
  Batch b;
  if (!ParseBatch(env, info, false, &b)) return nullptr;
  static unsigned char scratch[16];
  uint32_t opened = 0;
  size_t start = 0;
  for (size_t i = 0; i < b.n; i++) {
    const unsigned char* iv = b.input.data + start;
    const unsigned char* ct = iv + kIvBytes;
    const size_t ct_len = b.ends[i] - start - kIvBytes - kTagBytes;
    unsigned char tag[kTagBytes];
    memcpy(tag, ct + ct_len, kTagBytes);
    unsigned char* out = b.out.data + start - i * (kIvBytes + kTagBytes);
    unsigned char* final_out = ct_len > 0 ? out : scratch;
    size_t aad_len;
    const unsigned char* aad = AadOf(b, i, &aad_len);
    int len = 0;
    int fin = 0;
    const bool ok =
        EVP_DecryptInit_ex(b.k->dec, nullptr, nullptr, nullptr, iv) == 1 &&
        (aad_len == 0 || EVP_DecryptUpdate(b.k->dec, nullptr, &len, aad, static_cast<int>(aad_len)) == 1) &&
        (ct_len == 0 || EVP_DecryptUpdate(b.k->dec, out, &len, ct, static_cast<int>(ct_len)) == 1) &&
        EVP_CIPHER_CTX_ctrl(b.k->dec, EVP_CTRL_GCM_SET_TAG, static_cast<int>(kTagBytes), tag) == 1 &&
        EVP_DecryptFinal_ex(b.k->dec, final_out + (ct_len > 0 ? len : 0), &fin) == 1;
    if (ok) {
      b.result.data[i] = 1;
      opened++;
    } else {
      b.result.data[i] = 0;
      if (ct_len > 0) OPENSSL_cleanse(out, ct_len);
    }
    start = b.ends[i];
  }
  napi_value count;
  if (napi_create_uint32(env, opened, &count) != napi_ok) return nullptr;
  return count;
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
      {"sealMany", nullptr, SealMany, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
      {"openMany", nullptr, OpenMany, nullptr, nullptr, nullptr, napi_enumerable, nullptr},
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
