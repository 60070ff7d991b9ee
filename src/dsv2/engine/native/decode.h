/* The fused decode step's model description and entry points, shared by the kernels (decode.cpp)
 * and the PyTorch operator that fills them from tensors (op.cpp), so the layout is checked by
 * the compiler rather than copied by hand.
 *
 * Shapes: B tokens (one per cache slot), D hidden, H heads, N nope dim, R rope dim, V value
 * dim, C kv_lora_rank, QR q_lora_rank (0: no query compression), E routed experts, K per token.
 */
#pragma once
#include <stdint.h>

enum { F32 = 0, BF16 = 1, I8 = 2 };

struct Mat {
    const void *w;        /* [rows, cols], row stride `stride` elements */
    const float *scale;   /* I8: one scale per row; else NULL */
    int64_t stride;
    int32_t type, rows, cols;
};

struct Layer {
    const float *in_norm, *post_norm, *q_a_norm, *kv_a_norm;
    Mat q_a, q_b;         /* q_a.w == NULL: q_b is the uncompressed q_proj */
    Mat kv_a, kv_b, o;    /* kv_b: [H * (N + V), C] */
    Mat w_ukt;            /* W^UK transposed: [H * C, N] */
    int32_t moe;
    Mat gate, up, down;   /* the dense SwiGLU, or the shared experts of a MoE layer (gate.w NULL: none) */
    const float *router;  /* [E, D] */
    Mat gu, dn;           /* all experts' rows: [E * 2I, D] and [E * D, I], expert e's rows are a block */
};

struct Model {
    int32_t n_layers, D, H, N, R, V, C, QR, I_moe, E, K, n_group, topk_group, group_limited, norm_topk, vocab;
    float eps, scale, routed_scaling, rope_amp;
    const float *inv_freq;   /* [R / 2] */
    Mat embed, head;
    const float *final_norm;
    const Layer *layers;
    int32_t cache_type;      /* F32 or BF16 */
    int32_t max_cols;        /* widest matrix row */
    int32_t I_max;           /* widest dense / shared / expert hidden size */
};

/* Floats of work space a step of B tokens attending to at most S positions needs. */
int64_t dsv2_work_floats(const Model *m, int B, int S, int threads);

/* One decode step. tokens/pos: [B], ids already checked to lie in the vocabulary (token b goes
 * to cache slot b at position pos[b] and attends to positions [0, min(pos[b] + 1, S))).
 * cache[l]: layer l's [slots, max_len, C + R] buffer, slot_stride elements between slots.
 * logits: [B, vocab]. work: dsv2_work_floats(m, B, S, threads) floats. */
void dsv2_decode(const Model *m, int B, const int64_t *tokens, const int64_t *pos, int S,
                 void *const *cache, int64_t slot_stride, float *logits, float *work, int threads);
