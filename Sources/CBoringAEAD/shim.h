// BoringSSL's AEAD interface (include/openssl/aead.h) as swift-nio-ssl vendors it, with its CNIOBoringSSL_
// symbol prefix. swift-nio-ssl exports no C product, so the few declarations the link record layer
// (Sources/Relay/Records) calls are written out here; the definitions are in every binary that links
// NIOSSL. Should swift-nio-ssl rename them, the link fails at build time, never at run time.
#ifndef MESH_C_BORING_AEAD_H
#define MESH_C_BORING_AEAD_H
#include <stddef.h>
#include <stdint.h>

typedef struct evp_aead_st EVP_AEAD;
typedef struct evp_aead_ctx_st EVP_AEAD_CTX;

const EVP_AEAD *CNIOBoringSSL_EVP_aead_aes_128_gcm(void);
const EVP_AEAD *CNIOBoringSSL_EVP_aead_chacha20_poly1305(void);
EVP_AEAD_CTX *CNIOBoringSSL_EVP_AEAD_CTX_new(const EVP_AEAD *aead, const uint8_t *key, size_t key_len,
                                             size_t tag_len);
void CNIOBoringSSL_EVP_AEAD_CTX_free(EVP_AEAD_CTX *ctx);
int CNIOBoringSSL_EVP_AEAD_CTX_seal(const EVP_AEAD_CTX *ctx, uint8_t *out, size_t *out_len, size_t max_out_len,
                                    const uint8_t *nonce, size_t nonce_len, const uint8_t *in, size_t in_len,
                                    const uint8_t *ad, size_t ad_len);
int CNIOBoringSSL_EVP_AEAD_CTX_seal_scatter(const EVP_AEAD_CTX *ctx, uint8_t *out, uint8_t *out_tag,
                                            size_t *out_tag_len, size_t max_out_tag_len, const uint8_t *nonce,
                                            size_t nonce_len, const uint8_t *in, size_t in_len,
                                            const uint8_t *extra_in, size_t extra_in_len, const uint8_t *ad,
                                            size_t ad_len);
int CNIOBoringSSL_EVP_AEAD_CTX_open(const EVP_AEAD_CTX *ctx, uint8_t *out, size_t *out_len, size_t max_out_len,
                                    const uint8_t *nonce, size_t nonce_len, const uint8_t *in, size_t in_len,
                                    const uint8_t *ad, size_t ad_len);
#endif
