# Optional native AES-256-GCM (gcm.cc), built by `npm run build:native` (scripts/build-native.mjs), which
# copies native/build/Release/typeorm_envelope_gcm.node to build/Release/. It links against nothing:
# OpenSSL's symbols come from the running Node binary, its headers from Node's (include/node/openssl).
#
# This file lives in native/, not at the package root, on purpose: a root binding.gyp makes npm run an
# implicit `node-gyp rebuild` install script on `npm install`/`npm ci`, which fails without a compiler.
{
  "targets": [
    {
      "target_name": "typeorm_envelope_gcm",
      "sources": ["gcm.cc"],
      "defines": ["NAPI_VERSION=8", "OPENSSL_API_COMPAT=30000", "OPENSSL_NO_DEPRECATED"],
      "cflags": ["-O2", "-Wall", "-Wextra"],
      "cflags_cc": ["-O2", "-Wall", "-Wextra"],
      "xcode_settings": {
        "OTHER_CFLAGS": ["-O2"],
        "MACOSX_DEPLOYMENT_TARGET": "10.15"
      }
    }
  ]
}
