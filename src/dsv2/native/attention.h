/* Attention over many queries at once, as MLA's naive path computes it in prefill and scoring:
 * per head, q = [q^C ; q^R] and k = [k^C ; k^R], where the one k^R row of a position is shared by
 * every head. Entry point of attention.cpp, filled from tensors by op.cpp.
 *
 * Shapes: B rows, T queries per row, S keys per row, H heads, N nope dim, R rope dim, V value dim.
 * Every tensor's last dimension is contiguous; the strides of the others are given in elements.
 * Without a mask the attention is causal with the queries as the last T of the S positions (query
 * t sees keys j <= t + S - T, the prompt's chunk after its cached prefix). */
#pragma once
#include <stdint.h>

struct Attn {
    int32_t B, T, S, H, N, R, V;
    int32_t type;                       /* F32 or BF16 (decode.h): q, k, v and out alike */
    const void *qn, *qr;                /* [B, T, H, N], [B, T, H, R] */
    const void *kn, *kr, *v;            /* [B, S, H, N], [B, S, R], [B, S, H, V] */
    int64_t qn_s[3], qr_s[3], kn_s[3], kr_s[2], v_s[3];
    const uint8_t *mask;                /* [B, T, S] booleans (true: may attend), or NULL: causal */
    int64_t mask_s[2];
    float scale;
    void *out;                          /* [B, T, H, V] */
    int64_t out_s[3];
    float *lse;                         /* [B, T, H] contiguous, or NULL: each row's log-sum-exp of its
                                           scaled scores, written by the forward for the backward */
};

/* The gradients of dsv2_attention, given dout, the forward's lse and delta [B, T, H] (the row sums
 * of dout * out), float32 contiguous both. Computed in float32 whatever the inputs' type and written
 * in it, contiguous: dq_nope [B, T, H, N], dq_pe [B, T, H, R], dk_nope [B, S, H, N], dk_pe per head
 * [B, S, H, R] (the caller sums the heads: k^R is shared), dv [B, S, H, V]. */
struct AttnGrad {
    const void *dout;   int64_t dout_s[3];
    const float *lse, *delta;
    void *dq_nope, *dq_pe, *dk_nope, *dk_pe, *dv;
};

/* Floats of work space dsv2_attention needs with `threads` threads. */
int64_t dsv2_attention_work_floats(const struct Attn *a, int threads);
/* out = softmax(q k^T scale, masked) v. A query that may attend to no key gets zeros. */
void dsv2_attention(const struct Attn *a, float *work, int threads);
int64_t dsv2_attention_backward_work_floats(const struct Attn *a, int threads);
void dsv2_attention_backward(const struct Attn *a, const struct AttnGrad *g, float *work, int threads);
