/* The fused decode step's model description and entry points, shared by the kernels (decode.cpp)
 * and the PyTorch operator that fills them from tensors (op.cpp), so the layout is checked by
 * the compiler rather than copied by hand.
 *
 * Shapes: B tokens (one per cache slot), D hidden, H heads, N nope dim, R rope dim, V value
 * dim, C kv_lora_rank, QR q_lora_rank (0: no query compression), E routed experts, K per token.
 */
#pragma once
#include <stdint.h>

/* Weight types: F32, BF16, I8 (int8 rows, one float scale each), FP8 (float8 e4m3 with one float
 * scale per bn x bk block). Cache row types (one byte per element or packed, see engine/cache.py):
 * KV_FP8 (e4m3, one scale for the layer), KV_I8 (int8, a float scale per row after the values),
 * KV_MIX (c^KV as 4-bit codes with a bfloat16 scale per 32, then k^R in bfloat16). */
enum { F32 = 0, BF16 = 1, I8 = 2, FP8 = 3, KV_FP8 = 4, KV_I8 = 5, KV_MIX = 6 };

struct Mat {
    const void *w;        /* [rows, cols], row stride `stride` elements (bytes for FP8 and the KV types) */
    const float *scale;   /* I8: one per row; FP8: [row blocks, nbk]; KV_FP8: the layer's one scale; else NULL */
    int64_t stride;
    int32_t type, rows, cols;
    /* FP8: blocks of bn rows x bk columns, nbk per row block. split: where a second matrix stacked
     * below the first starts (gate | up of an expert, each blocked on its own); 0: none.
     * KV_MIX: split is C, the 4-bit columns. */
    int32_t bn, bk, nbk, split;
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
    int32_t fp8_bn, fp8_bk;  /* the float8 weights' block size (0: none are float8) */
    float eps, scale, routed_scaling, rope_amp;
    const float *inv_freq;   /* [R / 2] */
    Mat embed, head;
    const float *final_norm;
    const Layer *layers;
    int32_t cache_type;      /* F32, BF16, KV_FP8, KV_I8 or KV_MIX */
    int32_t cache_row;       /* elements (bytes for the KV types) from one cached position to the next */
    const float *cache_scale;   /* KV_FP8: [n_layers] scales; else NULL */
    int32_t max_cols;        /* widest matrix row */
    int32_t I_max;           /* widest dense / shared / expert hidden size */
};

/* Floats of work space a step of B tokens needs (however many positions they attend to). */
int64_t dsv2_work_floats(const Model *m, int B, int threads);

/* y [M, N] (row stride ldy) = x [M, K] (float32, stride ldx) times the int8 rows w [N, K] (stride
 * ldw) and their scales, as the step multiplies them: x rounded to int16 per row, integer
 * products. work: dsv2_int8_mm_work_floats(M, K) floats. Returns 0, or -1 where this build
 * has no integer path (no AVX2). */
int64_t dsv2_int8_mm_work_floats(int M, int K);
int dsv2_int8_mm(const float *x, int64_t ldx, int M, const int8_t *w, int64_t ldw, const float *scale, int N, int K,
                 float *y, int64_t ldy, float *work, int threads);

/* One decode step. tokens/pos: [B], ids already checked to lie in the vocabulary (token b goes
 * to cache slot slots[b] (slots NULL: slot b; distinct, checked) at position pos[b] and attends to
 * positions [0, min(pos[b] + 1, S)) of it).
 * cache[l]: layer l's [slots, max_len, C + R] buffer, slot_stride elements between slots.
 * logits: [B, vocab]. work: dsv2_work_floats(m, B, threads) floats. */
void dsv2_decode(const Model *m, int B, const int64_t *tokens, const int64_t *pos, const int64_t *slots, int S,
                 void *const *cache, int64_t slot_stride, float *logits, float *work, int threads);
