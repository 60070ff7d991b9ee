/* dsv2's fused CPU decode step: one call runs every layer of a DeepSeek-V2 for B new tokens.
 *
 * Decoding a few tokens on a CPU is bound by per-op overhead and by the bytes of weights
 * read, not by arithmetic. Here a step is one call and one OpenMP parallel region (~15 phases
 * a layer, split across the threads and separated by a spinning barrier), and weights are read
 * once per step straight from the model's own tensors (float32, bfloat16, int8 rows with one
 * float scale each, or block-scaled FP8). Activations stay float32, except in a bfloat16
 * model where the CPU multiplies bfloat16 pairs (AVX512-BF16): there the attention's query and
 * probabilities and a batch's matmul inputs are rounded to bfloat16, as PyTorch's bfloat16
 * kernels round them (batch-1 weight reads keep float32 inputs); and int8 rows, which multiply
 * their inputs rounded to int16 (integer multiply-adds, see "int8 rows x int16 inputs"). The
 * math is the absorbed MLA path of model/attention.py and the MoE of model/moe.py;
 * tests/engine/test_native.py holds the two equal. Plain C-style C++ with no PyTorch headers (quick to compile): op.cpp checks the
 * tensors and fills the description in decode.h. Built with -O3 -march=native -fopenmp and
 * linked to the OpenMP runtime torch already loaded, so both share one thread pool.
 */
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>

#include <atomic>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "decode.h"
#include "simd.h"

static const int ELEM_SIZE[] = {4, 2, 1, 1, 1, 1, 1};   /* bytes, by type */

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef int8_t v8b __attribute__((vector_size(8)));

static inline v8f ld(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v8f v) { memcpy(p, &v, sizeof v); }
static inline v8f ld_bf16(const uint16_t *p) {
    v8h h; memcpy(&h, p, sizeof h);
    v8u u = __builtin_convertvector(h, v8u) << 16;
    return (v8f)u;
}
static inline v8f ld_i8(const int8_t *p) {
#ifdef __AVX2__   /* GCC scalarises the generic widening below */
    return (v8f)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    v8b b; memcpy(&b, p, sizeof b);
    return __builtin_convertvector(__builtin_convertvector(b, v8i), v8f);
#endif
}
static inline float e4m3_to_f32(uint8_t b) {
    float f;
    if ((b & 0x78) == 0) f = (float)(b & 7) * (1.0f / 512);
    else { uint32_t u = ((uint32_t)(b & 0x7f) << 20) + (120u << 23); memcpy(&f, &u, 4); }
    return b & 0x80 ? -f : f;
}
/* float8 e4m3 (1 sign, 4 exponent bits biased by 7, 3 mantissa bits) -> float32, exactly as torch
 * widens it. The code shifted left by 7 is a float16 of the same sign, exponent and mantissa
 * whose exponent bias is 15 instead of 7, so 256 times the float16 is the e4m3 value: subnormal
 * codes become float16 subnormals, which the hardware conversion widens exactly, and no float32
 * denormal is ever formed (flush-to-zero modes and slow denormal paths cannot touch it). On an
 * int8-sign-extended code, the shift sets bit 14 for negative codes; the mask clears it. */
#define E4M3_RAW (1.0f / 256)   /* ld_e4m3_raw gives values times this: callers fold 256 into their scales */
static inline v8f ld_e4m3_raw(const uint8_t *p) {
#if defined(__AVX2__) && defined(__F16C__)
    __m128i b = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)p));
    return (v8f)_mm256_cvtph_ps(_mm_and_si128(_mm_slli_epi16(b, 7), _mm_set1_epi16((short)0xBF80)));
#else
    v8f v;
    for (int i = 0; i < 8; i++) v[i] = e4m3_to_f32(p[i]) * E4M3_RAW;
    return v;
#endif
}

/* 8 4-bit codes (the low or the high nibbles of 8 bytes) -> floats, less the offset of 8. */
static inline v8f ld_nib(const uint8_t *p, int hi) {
#ifdef __AVX2__
    __m256i u = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    u = hi ? _mm256_srli_epi32(u, 4) : _mm256_and_si256(u, _mm256_set1_epi32(15));
    return (v8f)_mm256_cvtepi32_ps(_mm256_sub_epi32(u, _mm256_set1_epi32(8)));
#else
    v8f v;
    for (int i = 0; i < 8; i++) v[i] = (float)((hi ? p[i] >> 4 : p[i] & 15) - 8);
    return v;
#endif
}
/* float32 -> e4m3, round to nearest even, saturating at +-448 (torch rounds the same way and
 * engine/cache.py clamps before converting). */
static inline uint8_t f32_to_e4m3(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    float a = fabsf(f);
    if (!(a < 448.0f)) return sign | 0x7e;                        /* 448 (and NaN, never produced) */
    if (a < 0.015625f) {                                          /* below 2^-6: subnormal steps of 2^-9 */
        int q = (int)nearbyintf(a * 512.0f);                      /* 8 rounds up to the smallest normal */
        return sign | (uint8_t)q;
    }
    uint32_t v; memcpy(&v, &a, 4);
    v += 0x7ffffu + ((v >> 20) & 1);                              /* round the mantissa to 3 bits */
    int e = (int)(v >> 23) - 127 + 7;
    if (e > 15 || (e == 15 && ((v >> 20) & 7) == 7)) return sign | 0x7e;
    return sign | (uint8_t)((e << 3) | ((v >> 20) & 7));
}
static inline float hsum(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* ------------------------------------------------------------------ dot products */
/* dot_f32 / dot_bf16 / dot_i8: x . w over n elements, w widened to float32 as it is read. A
 * batch-1 step reads its weights through these. With AVX-512, bfloat16 and int8 rows are widened
 * 16 at a time (8 at a time took as many instructions as the memory took to deliver the rows:
 * batch-1 bfloat16 decode ran ~10% faster this way); float32 rows stay 8-wide, which measured
 * faster on a Zen 4. */
#define DOT8(NAME, T, LOAD, WIDEN)                                                     \
static float NAME(const float *x, const T *w, int n) {                                 \
    v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                        \
    int k = 0;                                                                         \
    for (; k + 32 <= n; k += 32) {                                                     \
        a0 += ld(x + k) * LOAD(w + k);           a1 += ld(x + k + 8) * LOAD(w + k + 8);   \
        a2 += ld(x + k + 16) * LOAD(w + k + 16); a3 += ld(x + k + 24) * LOAD(w + k + 24); \
    }                                                                                  \
    for (; k + 8 <= n; k += 8) a0 += ld(x + k) * LOAD(w + k);                          \
    float s = hsum((a0 + a1) + (a2 + a3));                                             \
    for (; k < n; k++) s += x[k] * WIDEN(w[k]);                                        \
    return s;                                                                          \
}
#ifdef __AVX512F__
#define LD16_BF16(p) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define LD16_I8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define DOT(NAME, T, LOAD, LOAD16, WIDEN)                                                           \
static float NAME(const float *x, const T *w, int n) {                                              \
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                     \
    int k = 0;                                                                                      \
    for (; k + 64 <= n; k += 64) {                                                                  \
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), LOAD16(w + k), a0);                            \
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), LOAD16(w + k + 16), a1);                  \
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), LOAD16(w + k + 32), a2);                  \
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), LOAD16(w + k + 48), a3);                  \
    }                                                                                               \
    for (; k + 16 <= n; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), LOAD16(w + k), a0);  \
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));    \
    for (; k < n; k++) s += x[k] * WIDEN(w[k]);                                                     \
    return s;                                                                                       \
}
#else
#define DOT(NAME, T, LOAD, LOAD16, WIDEN) DOT8(NAME, T, LOAD, WIDEN)
#endif
#define AS_FLOAT(v) ((float)(v))
DOT8(dot_f32, float, ld, AS_FLOAT)
DOT(dot_bf16, uint16_t, ld_bf16, LD16_BF16, bf16_to_f32)
DOT(dot_i8, int8_t, ld_i8, LD16_I8, AS_FLOAT)

/* Row r of an FP8 matrix against x: each column block's products summed in vector registers,
 * then scaled (x 256, see E4M3_RAW) into the running total; one horizontal sum at the end. */
static float dot_fp8_row(const float *x, const uint8_t *w, const float *sc, int n, int bk) {
    v8f tot = {0};
    float tail = 0;
    for (int k0 = 0, kb = 0; k0 < n; k0 += bk, kb++) {
        const int k1 = k0 + bk < n ? k0 + bk : n;
        v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        int k = k0;
#if defined(__AVX2__) && defined(__F16C__)
        const __m256i mask = _mm256_set1_epi16((short)0xBF80);
        for (; k + 32 <= k1; k += 32) {   /* 16 codes widened per load */
            __m256i h0 = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k))), 7), mask);
            __m256i h1 = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k + 16))), 7), mask);
            a0 += ld(x + k) * (v8f)_mm256_cvtph_ps(_mm256_castsi256_si128(h0));
            a1 += ld(x + k + 8) * (v8f)_mm256_cvtph_ps(_mm256_extracti128_si256(h0, 1));
            a2 += ld(x + k + 16) * (v8f)_mm256_cvtph_ps(_mm256_castsi256_si128(h1));
            a3 += ld(x + k + 24) * (v8f)_mm256_cvtph_ps(_mm256_extracti128_si256(h1, 1));
        }
#endif
        for (; k + 8 <= k1; k += 8) a0 += ld(x + k) * ld_e4m3_raw(w + k);
        const float s = sc[kb] * 256.0f;
        tot += ((a0 + a1) + (a2 + a3)) * s;
        for (; k < k1; k++) tail += x[k] * e4m3_to_f32(w[k]) * sc[kb];
    }
    return hsum(tot) + tail;
}

/* FP8: the scales of row r's column blocks. */
static inline const float *fp8_scales(const Mat *W, int64_t r) {
    int64_t blk;
    if (W->split && r >= W->split) blk = (W->split + W->bn - 1) / W->bn + (r - W->split) / W->bn;
    else blk = (W->bn & (W->bn - 1)) == 0 ? r >> __builtin_ctz(W->bn) : r / W->bn;   /* 128: a shift, not a division */
    return W->scale + blk * W->nbk;
}

/* Columns [c0, c0 + n) of cached row r (KV_MIX: within c^KV, c0 and n multiples of 8). */
static void kv_cols(const Mat *W, int64_t r, int c0, int n, float *out) {
    if (W->type == F32) { memcpy(out, (const float *)W->w + r * W->stride + c0, n * sizeof(float)); return; }
    int c = 0;
    if (W->type == BF16) {
        const uint16_t *p = (const uint16_t *)W->w + r * W->stride + c0;
        for (; c + 8 <= n; c += 8) st(out + c, ld_bf16(p + c));
        for (; c < n; c++) out[c] = bf16_to_f32(p[c]);
        return;
    }
    const uint8_t *p = (const uint8_t *)W->w + r * W->stride;
    if (W->type == KV_FP8) {
        float s = W->scale[0];
        v8f sv = {s, s, s, s, s, s, s, s};
        v8f sr = sv * 256.0f;
        for (; c + 8 <= n; c += 8) st(out + c, ld_e4m3_raw(p + c0 + c) * sr);
        for (; c < n; c++) out[c] = e4m3_to_f32(p[c0 + c]) * s;
    } else if (W->type == KV_I8) {
        float s; memcpy(&s, p + (W->cols + 3) / 4 * 4, 4);
        v8f sv = {s, s, s, s, s, s, s, s};
        for (; c + 8 <= n; c += 8) st(out + c, ld_i8((const int8_t *)p + c0 + c) * sv);
        for (; c < n; c++) out[c] = (float)(int8_t)p[c0 + c] * s;
    } else {
        const uint8_t *sc = p + W->split / 2;
        for (; c < n; c += 8) {   /* column k: group k / 32, byte 16 (k / 32) + k % 16, high nibble if k % 32 >= 16 */
            int k = c0 + c, g = k / 32;
            float s = bf16_to_f32((uint16_t)(sc[2 * g] | sc[2 * g + 1] << 8));
            v8f sv = {s, s, s, s, s, s, s, s};
            st(out + c, ld_nib(p + g * 16 + k % 16, (k % 32) >= 16) * sv);
        }
    }
}


/* Cached row r of a KV_ type widened to float32 in out (cols values: c^KV then k^R). */
static void kv_row(const Mat *W, int64_t r, float *out) {
    if (W->type != KV_MIX) { kv_cols(W, r, 0, W->cols, out); return; }
    const int C = W->split;
    kv_cols(W, r, 0, C, out);
    const uint16_t *pe = (const uint16_t *)((const uint8_t *)W->w + r * W->stride + C / 2 + C / 16);   /* k^R, bf16 */
    int k = 0;
    for (; k + 8 <= W->cols - C; k += 8) st(out + C + k, ld_bf16(pe + k));
    for (; k < W->cols - C; k++) out[C + k] = bf16_to_f32(pe[k]);
}

/* The new position's row (float32 x: c^KV then k^R) written in the cache's format; engine/cache.py
 * encodes prefilled rows the same way. */
static void kv_store(int type, void *dst, const float *x, int C, int R, float layer_scale) {
    const int n = C + R;
    if (type == F32) { memcpy(dst, x, n * sizeof(float)); return; }
    if (type == BF16) { for (int k = 0; k < n; k++) ((uint16_t *)dst)[k] = f32_to_bf16(x[k]); return; }
    uint8_t *p = (uint8_t *)dst;
    if (type == KV_FP8) {
        for (int k = 0; k < n; k++) p[k] = f32_to_e4m3(x[k] / layer_scale);
    } else if (type == KV_I8) {
        float amax = 0;
        for (int k = 0; k < n; k++) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
        float s = amax > 0 ? amax / 127.0f : 1.0f;
        for (int k = 0; k < n; k++) p[k] = (uint8_t)(int8_t)nearbyintf(x[k] / s);
        memcpy(p + (n + 3) / 4 * 4, &s, 4);
    } else {
        uint8_t *sc = p + C / 2, *pe = sc + C / 16;
        for (int g = 0; g < C / 32; g++) {
            float amax = 0;
            for (int k = g * 32; k < g * 32 + 32; k++) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
            uint16_t sb = f32_to_bf16(amax > 0 ? amax / 7.0f : 1.0f);
            float s = bf16_to_f32(sb);
            sc[2 * g] = (uint8_t)(sb & 0xff); sc[2 * g + 1] = (uint8_t)(sb >> 8);
            for (int i = 0; i < 16; i++) {
                int lo = (int)nearbyintf(x[g * 32 + i] / s), hi = (int)nearbyintf(x[g * 32 + 16 + i] / s);
                lo = lo < -7 ? -7 : lo > 7 ? 7 : lo;
                hi = hi < -7 ? -7 : hi > 7 ? 7 : hi;
                p[g * 16 + i] = (uint8_t)((lo + 8) | (hi + 8) << 4);
            }
        }
        for (int k = 0; k < R; k++) {
            uint16_t h = f32_to_bf16(x[C + k]);
            pe[2 * k] = (uint8_t)(h & 0xff); pe[2 * k + 1] = (uint8_t)(h >> 8);
        }
    }
}

/* Row r of W widened to float32 in buf (or a pointer into W itself when it is float32). */
static const float *row_f32(const Mat *W, int64_t r, float *buf) {
    int n = W->cols;
    if (W->type == F32) return (const float *)W->w + r * W->stride;
    if (W->type == BF16) {
        const uint16_t *p = (const uint16_t *)W->w + r * W->stride;
        int k = 0;
        for (; k + 8 <= n; k += 8) st(buf + k, ld_bf16(p + k));
        for (; k < n; k++) buf[k] = bf16_to_f32(p[k]);
    } else if (W->type == FP8) {
        const uint8_t *p = (const uint8_t *)W->w + r * W->stride;
        const float *sc = fp8_scales(W, r);
        for (int k0 = 0, kb = 0; k0 < n; k0 += W->bk, kb++) {
            int k1 = k0 + W->bk < n ? k0 + W->bk : n, k = k0;
            v8f sv = {sc[kb], sc[kb], sc[kb], sc[kb], sc[kb], sc[kb], sc[kb], sc[kb]};
            v8f sr = sv * 256.0f;
            for (; k + 8 <= k1; k += 8) st(buf + k, ld_e4m3_raw(p + k) * sr);
            for (; k < k1; k++) buf[k] = e4m3_to_f32(p[k]) * sc[kb];
        }
    } else if (W->type >= KV_FP8) {
        kv_row(W, r, buf);
    } else {
        const int8_t *p = (const int8_t *)W->w + r * W->stride;
        float s = W->scale[r];
        v8f sv = {s, s, s, s, s, s, s, s};
        int k = 0;
        for (; k + 8 <= n; k += 8) st(buf + k, ld_i8(p + k) * sv);
        for (; k < n; k++) buf[k] = (float)p[k] * s;
    }
    return buf;
}

static inline float dot_row(const Mat *W, int64_t r, const float *x) {
    if (W->type == F32) return dot_f32(x, (const float *)W->w + r * W->stride, W->cols);
    if (W->type == BF16) return dot_bf16(x, (const uint16_t *)W->w + r * W->stride, W->cols);
    if (W->type == I8) return W->scale[r] * dot_i8(x, (const int8_t *)W->w + r * W->stride, W->cols);
    return dot_fp8_row(x, (const uint8_t *)W->w + r * W->stride, fp8_scales(W, r), W->cols, W->bk);
}

#define CH 64      /* cached positions per attention block */
#ifndef PF_ROWS
#define PF_ROWS 4
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1
#endif
/* And of one thread's attention scratch: scores, bfloat16 pairs of p, the bfloat16 query, and
 * a block of rows widened to float32. */
#define ATTN_BUF(m) \
    ((int64_t)CH * (m)->H * 2 + (int64_t)((m)->H + CH) * ((m)->C + (m)->R) + 64)

/* ------------------------------------------------------------------ register tiles */
#ifdef __AVX512F__
/* The sums of 16 vectors a[4 i + jj] written to y[i * ldy + jj] (a 4 x 4 tile of dot products): a
 * transpose-and-add tree of 45 shuffles and adds instead of 16 horizontal sums. */
static inline void store_sums_4x4(const __m512 *a, float *y, int64_t ldy) {
    __m512 p[8], q[4], r[2];
    for (int k = 0; k < 8; k++)
        p[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
    for (int k = 0; k < 4; k++)
        q[k] = _mm512_add_ps(_mm512_shuffle_ps(p[2 * k], p[2 * k + 1], 0x44),
                             _mm512_shuffle_ps(p[2 * k], p[2 * k + 1], 0xEE));
    for (int k = 0; k < 2; k++)
        r[k] = _mm512_add_ps(_mm512_shuffle_f32x4(q[2 * k], q[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(q[2 * k], q[2 * k + 1], 0xEE));
    const __m512 d = _mm512_add_ps(_mm512_shuffle_f32x4(r[0], r[1], 0x88), _mm512_shuffle_f32x4(r[0], r[1], 0xDD));
    _mm_storeu_ps(y, _mm512_castps512_ps128(d));
    _mm_storeu_ps(y + ldy, _mm512_extractf32x4_ps(d, 1));
    _mm_storeu_ps(y + 2 * ldy, _mm512_extractf32x4_ps(d, 2));
    _mm_storeu_ps(y + 3 * ldy, _mm512_extractf32x4_ps(d, 3));
}
#endif

/* y[h * ldy + j] = q_h . row_j over K for H inputs q (stride ldq) and n rows (stride ldr): register
 * tiles of 4 inputs x 4 rows, the remainders one dot product at a time. The attention's scores
 * (inputs: heads, rows: cached positions) and the batched matmuls (inputs: tokens, rows: weight
 * rows) both run here. */
static void dot_tiles_f32(const float *q, int64_t ldq, int H, const float *rows, int64_t ldr, int n, int K,
                          float *y, int64_t ldy) {
    const int KV = K / VW * VW, H4 = H / 4 * 4;
    const int64_t pf = PF_ROWS * ldr;   /* prefetch distance: the rows that come next */
    (void)pf;   /* (no prefetch without AVX2) */
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        for (int h = 0; h < H4; h += 4) {
            const float *q0 = q + h * ldq, *q1 = q0 + ldq, *q2 = q1 + ldq, *q3 = q2 + ldq;
#ifdef __AVX512F__
            if (KV == K) {
                const float *r0 = rows + j * ldr, *r1 = r0 + ldr, *r2 = r1 + ldr, *r3 = r2 + ldr;
                __m512 a[16];
                for (int i = 0; i < 16; i++) a[i] = _mm512_setzero_ps();
                for (int k = 0; k < K; k += 16) {
                    const __m512 x0 = _mm512_loadu_ps(r0 + k), x1 = _mm512_loadu_ps(r1 + k);
                    const __m512 x2 = _mm512_loadu_ps(r2 + k), x3 = _mm512_loadu_ps(r3 + k);
                    if (h == 0) {   /* the same rows of the next block, on their way from memory */
                        _mm_prefetch((const char *)(r0 + pf + k), PF_HINT);
                        _mm_prefetch((const char *)(r1 + pf + k), PF_HINT);
                        _mm_prefetch((const char *)(r2 + pf + k), PF_HINT);
                        _mm_prefetch((const char *)(r3 + pf + k), PF_HINT);
                    }
                    const float *qs[4] = {q0, q1, q2, q3};
#pragma GCC unroll 4
                    for (int i = 0; i < 4; i++) {
                        const __m512 y = _mm512_loadu_ps(qs[i] + k);
                        a[4 * i] = _mm512_fmadd_ps(y, x0, a[4 * i]);
                        a[4 * i + 1] = _mm512_fmadd_ps(y, x1, a[4 * i + 1]);
                        a[4 * i + 2] = _mm512_fmadd_ps(y, x2, a[4 * i + 2]);
                        a[4 * i + 3] = _mm512_fmadd_ps(y, x3, a[4 * i + 3]);
                    }
                }
                store_sums_4x4(a, y + h * ldy + j, ldy);
                continue;
            }
#endif
            /* 8-wide (no AVX-512): 16 registers hold a tile of 4 heads x 2 rows and its operands, so
             * the 4 x 4 tile runs as two of those. */
            for (int half = 0; half < 4; half += 2) {
                const float *ra = rows + (j + half) * ldr, *rb = ra + ldr;
                vf a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
                for (int k = 0; k < KV; k += VW) {
                    const vf x0 = ldv(ra + k), x1 = ldv(rb + k);
#ifdef __AVX2__   /* (immintrin.h) */
                    if (h == 0 && k % 16 == 0) {   /* a cache line of each row's successor, 4 rows on */
                        _mm_prefetch((const char *)(ra + pf + k), PF_HINT);
                        _mm_prefetch((const char *)(rb + pf + k), PF_HINT);
                    }
#endif
                    vf t = ldv(q0 + k); a00 += t * x0; a01 += t * x1;
                    t = ldv(q1 + k); a10 += t * x0; a11 += t * x1;
                    t = ldv(q2 + k); a20 += t * x0; a21 += t * x1;
                    t = ldv(q3 + k); a30 += t * x0; a31 += t * x1;
                }
                const vf a[4][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
                for (int i = 0; i < 4; i++)
                    for (int jj = 0; jj < 2; jj++) {
                        float s = hsumv(a[i][jj]);
                        for (int k = KV; k < K; k++) s += q[(h + i) * ldq + k] * rows[(j + half + jj) * ldr + k];
                        y[(h + i) * ldy + j + half + jj] = s;
                    }
            }
        }
        for (int h = H4; h < H; h++) {   /* the last 1-3 inputs: one input x 4 rows */
            const float *qh = q + h * ldq, *r0 = rows + j * ldr, *r1 = r0 + ldr, *r2 = r1 + ldr, *r3 = r2 + ldr;
            vf a0 = {}, a1 = {}, a2 = {}, a3 = {};
            for (int k = 0; k < KV; k += VW) {
                const vf t = ldv(qh + k);
                a0 += t * ldv(r0 + k); a1 += t * ldv(r1 + k); a2 += t * ldv(r2 + k); a3 += t * ldv(r3 + k);
            }
            float s0 = hsumv(a0), s1 = hsumv(a1), s2 = hsumv(a2), s3 = hsumv(a3);
            for (int k = KV; k < K; k++) { s0 += qh[k] * r0[k]; s1 += qh[k] * r1[k]; s2 += qh[k] * r2[k]; s3 += qh[k] * r3[k]; }
            y[h * ldy + j] = s0; y[h * ldy + j + 1] = s1; y[h * ldy + j + 2] = s2; y[h * ldy + j + 3] = s3;
        }
    }
    for (; j < n; j++)
        for (int h = 0; h < H; h++) y[h * ldy + j] = dot_f32(q + h * ldq, rows + j * ldr, K);
}

#if KV_DPBF16
/* The bfloat16 form: VDPBF16PS multiplies pairs of bfloat16s and adds both products to a float32
 * lane. q: [H][K] bfloat16; tiles of 4 inputs x 4 rows (a ragged last row tile repeats its first
 * row, ragged inputs are tiles of one). */
template <int NH>
static void dot_tile_bf16(const uint16_t *q, int K, const uint16_t *const *r, int64_t pf, __m512 *acc) {
    __m512 a[NH][4];
#pragma GCC unroll 4
    for (int i = 0; i < NH; i++) for (int jj = 0; jj < 4; jj++) a[i][jj] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 32) {
        const __mmask32 in = K - k >= 32 ? ~0u : (1u << (K - k)) - 1;   /* a ragged last step loads zeros past K */
        const __m512bh x0 = (__m512bh)_mm512_maskz_loadu_epi16(in, r[0] + k);
        const __m512bh x1 = (__m512bh)_mm512_maskz_loadu_epi16(in, r[1] + k);
        const __m512bh x2 = (__m512bh)_mm512_maskz_loadu_epi16(in, r[2] + k);
        const __m512bh x3 = (__m512bh)_mm512_maskz_loadu_epi16(in, r[3] + k);
        if (pf) {   /* the same rows a few rows on, on their way from memory */
            for (int jj = 0; jj < 4; jj++) _mm_prefetch((const char *)(r[jj] + pf + k), PF_HINT);
        }
#pragma GCC unroll 4
        for (int i = 0; i < NH; i++) {
            __m512bh y = (__m512bh)_mm512_maskz_loadu_epi16(in, q + i * K + k);
            a[i][0] = _mm512_dpbf16_ps(a[i][0], y, x0); a[i][1] = _mm512_dpbf16_ps(a[i][1], y, x1);
            a[i][2] = _mm512_dpbf16_ps(a[i][2], y, x2); a[i][3] = _mm512_dpbf16_ps(a[i][3], y, x3);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < NH; i++) for (int jj = 0; jj < 4; jj++) acc[i * 4 + jj] = a[i][jj];
}

static void dot_tiles_bf16(const uint16_t *q, int H, const uint16_t *rows, int64_t ldr, int n, int K,
                           float *y, int64_t ldy) {
    __m512 acc[16];
    for (int j = 0; j < n; j += 4) {
        const int nr = n - j < 4 ? n - j : 4;
        const uint16_t *r[4];
        for (int jj = 0; jj < 4; jj++) r[jj] = rows + (j + (jj < nr ? jj : 0)) * ldr;
        for (int h = 0; h < H;) {
            const int nh = H - h >= 4 ? 4 : 1;
            if (nh == 4) dot_tile_bf16<4>(q + h * K, K, r, h == 0 ? PF_ROWS * ldr : 0, acc);
            else dot_tile_bf16<1>(q + h * K, K, r, h == 0 ? PF_ROWS * ldr : 0, acc);
            if (nh == 4 && nr == 4) { store_sums_4x4(acc, y + h * ldy + j, ldy); h += 4; continue; }
            for (int i = 0; i < nh; i++)
                for (int jj = 0; jj < nr; jj++) y[(h + i) * ldy + j + jj] = _mm512_reduce_add_ps(acc[i * 4 + jj]);
            h += nh;
        }
    }
}

/* n floats -> bfloat16 (round to nearest even), 32 at a time. */
static void to_bf16(const float *x, uint16_t *out, int n) {
    int k = 0;
    for (; k + 32 <= n; k += 32)
        _mm512_storeu_si512(out + k, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(x + k)));
    for (; k < n; k++) out[k] = f32_to_bf16(x[k]);
}
#endif

/* ------------------------------------------------------------------ int8 rows x int16 inputs
 * An int8 matrix multiplies its inputs rounded to int16, each input row with its own scale
 * (x ~ s q, |q| <= 32767: an error of at most 1/65534 of the row's largest magnitude, far below
 * bfloat16's rounding, which PyTorch's int8 kernel applies to its inputs). Integer pairs then
 * do the arithmetic: VPDPWSSD (AVX512-VNNI; VPMADDWD plus an add without it, or on AVX2) adds
 * two int8 x int16 products to each int32 lane, so a row of 32 (16 on AVX2) weights costs one
 * widening and one multiply-add per input, where widening to float32 took three instructions
 * per 16 weights and left batch-1 decode short of the memory's speed. Lane sums are exact; the
 * bound on |q| below keeps every lane inside int32 whatever the weights, and lanes are summed
 * in float32. The same rounding on every CPU: the bound assumes 16-wide steps. */
/* An int16 copy of M input rows of K (each padded to k_pad(K) with zeros) and then their M scales:
 * its size in floats. */
static inline int k_pad(int K) { return (K + 31) / 32 * 32; }
static inline int64_t i16_floats(int M, int K) { return (int64_t)M * (k_pad(K) / 2 + 1); }

#if defined(__AVX512BW__) || (defined(__AVX2__) && !defined(__AVX512F__))
#define I16_DOT 1
#ifdef __AVX512BW__
#define IW 32   /* int16 per vector */
typedef __m512i vi;
static inline vi vi_zero(void) { return _mm512_setzero_si512(); }
static inline vi ld_q(const int16_t *p) { return _mm512_loadu_si512(p); }
static inline vi ld_w(const int8_t *p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p)); }
static inline vi ld_w_tail(const int8_t *p, int n) {   /* n < IW weights, zeros after */
    return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8((1u << n) - 1, p));
}
static inline vi dpw(vi acc, vi a, vi b) {
#ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}
static inline vf vi_float(vi a) { return (vf)_mm512_cvtepi32_ps(a); }
#else
#define IW 16
typedef __m256i vi;
static inline vi vi_zero(void) { return _mm256_setzero_si256(); }
static inline vi ld_q(const int16_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vi ld_w(const int8_t *p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)); }
static inline vi ld_w_tail(const int8_t *p, int n) {
    int8_t t[16] = {0};
    memcpy(t, p, n);
    return ld_w(t);
}
static inline vi dpw(vi acc, vi a, vi b) {
#ifdef __AVXVNNI__
    return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}
static inline vf vi_float(vi a) { return (vf)_mm256_cvtepi32_ps(a); }
#endif

/* The largest |q| for rows of K: a lane adds 2 ceil(K / 16) products of |w| <= 127 (int8 rows
 * are symmetric) and must stay within int32. 32767 up to K = 8,256. */
static inline int q_max(int K) {
    int64_t m = 2147483647LL / (127LL * 2 * ((K + 15) / 16));
    return m < 32767 ? (int)m : 32767;
}

/* Rows of x [M, K] (stride ldx) -> q [M, k_pad(K)] int16, zeros past K, and their scales s. */
static void quantize_i16(const float *x, int64_t ldx, int M, int K, int16_t *q, float *s) {
    const int KP = k_pad(K), qm = q_max(K);
    for (int m = 0; m < M; m++) {
        const float *xm = x + m * ldx;
        int16_t *qm_row = q + (int64_t)m * KP;
        vf mx = {};   /* the largest magnitude; a NaN, once seen, stays (a > NaN is false) */
        int k = 0;
        for (; k + VW <= K; k += VW) {
            vf a = ldv(xm + k);
            a = a < 0 ? -a : a;
            mx = (a > mx) | (a != a) ? a : mx;
        }
        float amax = 0;
        for (int i = 0; i < VW; i++) amax = mx[i] > amax || mx[i] != mx[i] ? mx[i] : amax;
        for (; k < K; k++) amax = fabsf(xm[k]) > amax || xm[k] != xm[k] ? fabsf(xm[k]) : amax;
        if (!(amax <= 3.4e38f)) {   /* inf or NaN: the products become inf or NaN, as float32 ones would */
            memset(qm_row, 0, KP * sizeof(int16_t));
            qm_row[0] = 1;
            s[m] = amax;
            continue;
        }
        s[m] = amax / qm;
        const float inv = amax > 0 ? qm / amax : 0;
        k = 0;
#ifdef __AVX512F__
        for (; k + 16 <= K; k += 16)
            _mm256_storeu_si256((__m256i *)(qm_row + k),
                                _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xm + k), _mm512_set1_ps(inv)))));
#else
        for (; k + 16 <= K; k += 16) {
            __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xm + k), _mm256_set1_ps(inv)));
            __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xm + k + 8), _mm256_set1_ps(inv)));
            _mm256_storeu_si256((__m256i *)(qm_row + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
        }
#endif
        for (; k < K; k++) qm_row[k] = (int16_t)nearbyintf(xm[k] * inv);
        for (; k < KP; k++) qm_row[k] = 0;
    }
}

/* q . w over K int8 weights (q padded to a multiple of 32). */
static float dot_i8_i16(const int16_t *q, const int8_t *w, int K) {
    vi a0 = vi_zero(), a1 = a0, a2 = a0, a3 = a0;
    int k = 0;
    for (; k + 4 * IW <= K; k += 4 * IW) {
        a0 = dpw(a0, ld_q(q + k), ld_w(w + k));
        a1 = dpw(a1, ld_q(q + k + IW), ld_w(w + k + IW));
        a2 = dpw(a2, ld_q(q + k + 2 * IW), ld_w(w + k + 2 * IW));
        a3 = dpw(a3, ld_q(q + k + 3 * IW), ld_w(w + k + 3 * IW));
    }
    for (; k + IW <= K; k += IW) a0 = dpw(a0, ld_q(q + k), ld_w(w + k));
    if (k < K) a1 = dpw(a1, ld_q(q + k), ld_w_tail(w + k, K - k));
    return hsumv((vi_float(a0) + vi_float(a1)) + (vi_float(a2) + vi_float(a3)));
}

/* A tile of NH inputs x NR rows: acc[i * NR + jj] holds the lane sums of q_i . row_jj. */
template <int NH, int NR>
static void dot_tile_i16(const int16_t *q, int64_t ldq, int K, const int8_t *const *r, int64_t pf, vi *acc) {
    vi a[NH][NR];
#pragma GCC unroll 4
    for (int i = 0; i < NH; i++)
#pragma GCC unroll 4
        for (int jj = 0; jj < NR; jj++) a[i][jj] = vi_zero();
    for (int k = 0; k < K; k += IW) {
        vi x[NR];
        const int tail = K - k < IW;
#pragma GCC unroll 4
        for (int jj = 0; jj < NR; jj++) x[jj] = tail ? ld_w_tail(r[jj] + k, K - k) : ld_w(r[jj] + k);
        if (pf && k % 64 == 0) {   /* the same rows a few rows on, on their way from memory */
#pragma GCC unroll 4
            for (int jj = 0; jj < NR; jj++) _mm_prefetch((const char *)(r[jj] + pf + k), PF_HINT);
        }
#pragma GCC unroll 4
        for (int i = 0; i < NH; i++) {
            const vi y = ld_q(q + i * ldq + k);
#pragma GCC unroll 4
            for (int jj = 0; jj < NR; jj++) a[i][jj] = dpw(a[i][jj], y, x[jj]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < NH; i++)
#pragma GCC unroll 4
        for (int jj = 0; jj < NR; jj++) acc[i * NR + jj] = a[i][jj];
}

/* y[h * ldy + j] = sw[j] s[h] (q_h . row_j) for M int16 inputs and n int8 rows: tiles of 4 inputs x
 * 4 rows (x 2 rows on AVX2, whose 16 registers hold no more); a ragged last row tile repeats
 * its first row, ragged inputs are tiles of one. */
#ifdef __AVX512BW__
#define NR_I16 4
#else
#define NR_I16 2
#endif
static void dot_tiles_i16(const int16_t *q, const float *s, int M, const int8_t *rows, int64_t ldr, const float *sw,
                          int n, int K, float *y, int64_t ldy) {
    const int64_t ldq = k_pad(K);
    vi acc[4 * NR_I16];
    for (int j = 0; j < n; j += NR_I16) {
        const int nr = n - j < NR_I16 ? n - j : NR_I16;
        const int8_t *r[NR_I16];
        for (int jj = 0; jj < NR_I16; jj++) r[jj] = rows + (j + (jj < nr ? jj : 0)) * ldr;
        for (int h = 0; h < M;) {
            const int nh = M - h >= 4 ? 4 : 1;
            if (nh == 4) dot_tile_i16<4, NR_I16>(q + h * ldq, ldq, K, r, h == 0 ? PF_ROWS * ldr : 0, acc);
            else dot_tile_i16<1, NR_I16>(q + h * ldq, ldq, K, r, h == 0 ? PF_ROWS * ldr : 0, acc);
#ifdef __AVX512BW__
            if (nh == 4 && nr == 4) {
                __m512 f[16];
                for (int i = 0; i < 16; i++) f[i] = _mm512_cvtepi32_ps(acc[i]);
                store_sums_4x4(f, y + h * ldy + j, ldy);
                for (int i = 0; i < 4; i++)
                    for (int jj = 0; jj < 4; jj++) y[(h + i) * ldy + j + jj] *= sw[j + jj] * s[h + i];
                h += 4;
                continue;
            }
#endif
            for (int i = 0; i < nh; i++)
                for (int jj = 0; jj < nr; jj++)
                    y[(h + i) * ldy + j + jj] = sw[j + jj] * s[h + i] * hsumv(vi_float(acc[i * NR_I16 + jj]));
            h += nh;
        }
    }
}
#else
#define I16_DOT 0
#endif

#define BLOCK 16   /* weight rows per work item */
#define BUFW(m) (4 * (m)->max_cols + 64)   /* floats of scratch per thread */
/* and for M inputs rounded to bfloat16 */
#define XBUF(m, M) ((int64_t)(M) * (m)->max_cols / 2 + 64)
/* and for M inputs as int16 with their scales (i16_floats) */
#define QBUF(m, M) (i16_floats((M), (m)->max_cols) + 64)
/* ------------------------------------------------------------------ the team
 * One OpenMP parallel region per step: every thread runs the whole step, each loop below is
 * split across the team (SPLIT) and phases are separated by a spinning barrier. OpenMP's own
 * region starts and barriers sleep under OMP_WAIT_POLICY=PASSIVE (~10-50 us each, ~150 a step);
 * this barrier spins, then yields the core after a while so an oversubscribed machine still
 * makes progress. The team is whatever OpenMP starts (omp_get_num_threads): called from inside
 * another parallel region it is one thread and never waits. at::parallel_for would run no
 * faster (it is the same OpenMP region underneath) and does not promise that its chunks run
 * at once, which a barrier between phases needs. */
struct Barrier { std::atomic<int> count{0}, gen{0}; };
/* A thread's int16 copy of the inputs it last multiplied by int8 rows, and which inputs (src NULL:
 * none; every barrier forgets it, as the work buffers are rewritten between phases). */
typedef struct { const float *src; int64_t ld; int M, K; int16_t *q; float *s; } Quantized;
/* Such a copy for M rows of K laid out at base (i16_floats(M, K) floats), holding nothing yet. */
static inline Quantized i16_scratch(float *base, int M, int K) {
    Quantized qi = {0, 0, 0, 0, (int16_t *)base, base + (int64_t)M * (k_pad(K) / 2)};
    return qi;
}
typedef struct { int id, n; Barrier *bar; float *buf, *abuf; uint16_t *xb; Quantized *qi; } Team;

#if I16_DOT
/* The thread's int16 copy of inputs x [M, K] (ldx), made once per phase however many row blocks
 * it multiplies them by. */
static const Quantized *quantized(const float *x, int64_t ldx, int M, int K, const Team *t) {
    Quantized *qi = t->qi;
    if (qi->src != x || qi->ld != ldx || qi->M != M || qi->K != K) {
        quantize_i16(x, ldx, M, K, qi->q, qi->s);
        qi->src = x; qi->ld = ldx; qi->M = M; qi->K = K;
    }
    return qi;
}
#endif

/* y[m, n] = sum_k x[m, k] W[n, k] for rows n in [n0, n1). int8 rows multiply the inputs rounded to
 * int16 (above). Otherwise one or two inputs stream each weight row once (memory-bound); more go
 * through register tiles: float32 rows in place, bfloat16 rows (where the CPU multiplies bfloat16
 * pairs) against the inputs rounded to bfloat16 in xb, every other type widened to float32 four
 * rows at a time in buf. */
static void mm_rows(const Mat *W, const float *x, int64_t ldx, int M, float *y, int64_t ldy,
                    int n0, int n1, const Team *t) {
    const int K = W->cols;
#if I16_DOT
    if (W->type == I8) {
        const Quantized *qi = quantized(x, ldx, M, K, t);
        const int8_t *rows = (const int8_t *)W->w + n0 * W->stride;
        if (M <= 2) {
            for (int n = n0; n < n1; n++, rows += W->stride)
                for (int m = 0; m < M; m++)
                    y[m * ldy + n] = W->scale[n] * qi->s[m] * dot_i8_i16(qi->q + (int64_t)m * k_pad(K), rows, K);
        } else {
            dot_tiles_i16(qi->q, qi->s, M, rows, W->stride, W->scale + n0, n1 - n0, K, y + n0, ldy);
        }
        return;
    }
#endif
    if (M <= 2) {
        for (int n = n0; n < n1; n++)
            for (int m = 0; m < M; m++) y[m * ldy + n] = dot_row(W, n, x + m * ldx);
        return;
    }
    if (W->type == F32) {
        dot_tiles_f32(x, ldx, M, (const float *)W->w + n0 * W->stride, W->stride, n1 - n0, K, y + n0, ldy);
        return;
    }
#if KV_DPBF16
    if (W->type == BF16) {
        for (int m = 0; m < M; m++) to_bf16(x + m * ldx, t->xb + (int64_t)m * K, K);
        dot_tiles_bf16(t->xb, M, (const uint16_t *)W->w + n0 * W->stride, W->stride, n1 - n0, K, y + n0, ldy);
        return;
    }
#endif
    for (int n = n0; n < n1; n += 4) {
        const int nr = n1 - n < 4 ? n1 - n : 4;
        for (int j = 0; j < nr; j++) row_f32(W, n + j, t->buf + (int64_t)j * K);
        dot_tiles_f32(x, ldx, M, t->buf, K, nr, K, y + n, ldy);
    }
}

/* Each thread takes one contiguous share of [0, count): weight rows stream in order, as the
 * hardware prefetcher likes. */
#define SPLIT(i, count, team) \
    for (int i = (int)((int64_t)(count) * (team)->id / (team)->n), i##_end = (int)((int64_t)(count) * ((team)->id + 1) / (team)->n); \
         i < i##_end; i++)

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void sync_team(const Team *t) {
    t->qi->src = 0;   /* the next phase's inputs are new, wherever they lie */
    if (t->n == 1) return;
    Barrier *b = t->bar;
    int g = b->gen.load(std::memory_order_acquire);
    if (b->count.fetch_add(1, std::memory_order_acq_rel) == t->n - 1) {
        b->count.store(0, std::memory_order_relaxed);
        b->gen.fetch_add(1, std::memory_order_release);
        return;
    }
    for (int spins = 0; b->gen.load(std::memory_order_acquire) == g; spins++) {
        if (spins < 2000) cpu_relax();
        else sched_yield();
    }
}

/* y = x W^T for M rows of x, W's row blocks shared out across the team (no barrier). */
static void matmul(const Mat *W, const float *x, int64_t ldx, int M, float *y, int64_t ldy, const Team *t) {
    int nb = (W->rows + BLOCK - 1) / BLOCK;
    SPLIT(b, nb, t) {
        int n0 = b * BLOCK, n1 = n0 + BLOCK < W->rows ? n0 + BLOCK : W->rows;
        mm_rows(W, x, ldx, M, y, ldy, n0, n1, t);
    }
}

/* ------------------------------------------------------------------ small pieces */
static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    double ss = 0;
    for (int k = 0; k < n; k++) ss += (double)x[k] * x[k];
    float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int k = 0; k < n; k++) out[k] = w[k] * (x[k] * r);
}

static void rope(float *x, const float *cs, const float *sn, int R) {
    for (int i = 0; i < R / 2; i++) {
        float a = x[2 * i], b = x[2 * i + 1];
        x[2 * i] = a * cs[i] - b * sn[i];
        x[2 * i + 1] = a * sn[i] + b * cs[i];
    }
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* Top-k of s[0..n) by value (ties: lower index first) into idx; returns nothing. */
static void topk(const float *s, int n, int k, int *idx) {
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < n; e++) {
            int taken = 0;
            for (int i = 0; i < j; i++) taken |= idx[i] == e;
            if (!taken && (best < 0 || s[e] > s[best])) best = e;
        }
        idx[j] = best;
    }
}

/* Rows [r0, r0 + n) of W as a matrix of their own (a head's rows, an expert's rows). */
static Mat rows_of(const Mat *W, int64_t r0, int n) {
    Mat m = *W;
    m.w = (const char *)m.w + r0 * m.stride * ELEM_SIZE[m.type];
    if (m.type == I8) m.scale += r0;
    else if (m.type == FP8) m.scale = fp8_scales(W, r0);   /* op.cpp: FP8 heads start on block edges */
    m.rows = n;
    return m;
}

/* Expert e of a stack of E matrices of n rows each (FP8: each expert's blocks follow the last's). */
static Mat expert_of(const Mat *W, int e, int n) {
    if (W->type != FP8) return rows_of(W, (int64_t)e * n, n);
    Mat m = *W;
    int64_t blocks = W->split ? (W->split + W->bn - 1) / W->bn + (n - W->split + W->bn - 1) / W->bn
                              : (n + W->bn - 1) / W->bn;
    m.w = (const char *)m.w + (int64_t)e * n * m.stride;
    m.scale += (int64_t)e * blocks * m.nbk;
    m.rows = n;
    return m;
}

/* ------------------------------------------------------------------ work space */
typedef struct {
    float *x, *h, *qa, *q, *kva, *qf, *part, *olat, *o, *acc, *g, *u, *logit, *wk, *xg, *gu, *y, *bufs, *cs, *sn;
    int64_t buf_stride;   /* floats of each thread's scratch in bufs: BUFW, ATTN_BUF, XBUF, then QBUF */
    int64_t qbuf_at;      /* where QBUF starts in it */
    int32_t *idx, *order, *slot, *cnt, *item, *first;
    const int64_t *slots;   /* token b's cache slot (NULL: slot b) */
    int n_items[2];   /* expert work items of the two expert passes (set by thread 0) */
} Work;

static int64_t carve(const Model *m, int B, int threads, float *base, Work *w) {
    int64_t at = 0, copies = (int64_t)B * (m->K > 0 ? m->K : 1), E = m->E > 0 ? m->E : 1;
    int64_t blocks = ((m->I_moe * 2 > m->D ? m->I_moe * 2 : m->D) + BLOCK - 1) / BLOCK;
#define TAKE(field, n) do { w->field = base ? base + at : 0; at += ((int64_t)(n) + 15) / 16 * 16; } while (0)
#define TAKEI(field, n) do { w->field = base ? (int32_t *)(base + at) : 0; at += ((int64_t)(n) + 15) / 16 * 16; } while (0)
    TAKE(x, B * m->D); TAKE(h, B * m->D); TAKE(qa, B * (m->QR > 0 ? m->QR : 1));
    TAKE(q, (int64_t)B * m->H * (m->N + m->R)); TAKE(kva, B * (m->C + m->R));
    TAKE(qf, (int64_t)B * m->H * (m->C + m->R)); TAKE(part, (int64_t)B * threads * m->H * (m->C + 2));
    TAKE(olat, (int64_t)B * m->H * m->C); TAKE(o, (int64_t)B * m->H * m->V); TAKE(acc, B * m->D);
    TAKE(g, (int64_t)B * m->I_max); TAKE(u, (int64_t)B * m->I_max);
    TAKE(logit, B * E); TAKE(wk, copies); TAKE(xg, copies * m->D); TAKE(gu, copies * 2 * m->I_moe);
    w->qbuf_at = BUFW(m) + ATTN_BUF(m) + XBUF(m, copies);
    w->buf_stride = w->qbuf_at + QBUF(m, copies);
    TAKE(y, copies * m->D); TAKE(bufs, (int64_t)threads * w->buf_stride);
    TAKE(cs, B * m->R / 2 + 1); TAKE(sn, B * m->R / 2 + 1);
    TAKEI(idx, copies); TAKEI(order, copies); TAKEI(slot, copies); TAKEI(cnt, E + 1); TAKEI(item, 4 * E * blocks); TAKEI(first, B + 1);   /* (expert, block) pairs of both passes */
#undef TAKE
#undef TAKEI
    return at;
}

int64_t dsv2_work_floats(const Model *m, int B, int threads) {
    Work w;
    return carve(m, B, threads, 0, &w);
}

/* ------------------------------------------------------------------ one layer */
/* The first len cached rows of the slot starting slot_off elements into the layer's buffer. */
static Mat cache_rows(const Model *m, const Layer *L, void *cache, int64_t slot_off, int len) {
    Mat rows = {(const char *)cache + slot_off * ELEM_SIZE[m->cache_type],
                m->cache_scale ? m->cache_scale + (L - m->layers) : 0, m->cache_row, m->cache_type, len, m->C + m->R,
                0, 0, 0, m->C};
    return rows;
}

/* Token b's cache slot. */
static inline int64_t slot_of(const Work *w, int b) { return w->slots ? w->slots[b] : b; }

/* Positions token b attends to: its own and those before it, at most S. */
static inline int attended(const int64_t *pos, int b, int S) { return pos[b] + 1 < S ? (int)pos[b] + 1 : S; }

/* ------------------------------------------------------------------ attention over the latent cache
 * One pass over the cache per step, split across the team by blocks of CH positions: every
 * block's rows are read once (from memory, then from L1/L2), scored against all heads of their
 * token, and added to those heads' running sums with an online softmax (flash decoding). A
 * thread's blocks of one token form one segment with its own partial (o_lat, max, sum); the
 * segments of a token are merged afterwards. Each block: scores as register tiles of 4 heads x 4
 * rows, then o_lat += p^T rows as tiles of up to 8 heads x 2 vectors of columns. A bfloat16 model's
 * bfloat16 cache on a CPU with AVX512-BF16 stays bfloat16 (VDPBF16PS: the query and p rounded to
 * bfloat16, sums in float32, as PyTorch's bfloat16 matmuls do); every other non-float32 row type
 * (a float32 model's bfloat16 cache included) is widened to float32 block by block. */

/* o[h * C + c] += sum_j p[h * CH + j] row_j[c] for NH heads and c < C: NH x 2 vectors of sums. */
template <int NH>
static void wsum_f32_heads(const float *p, const float *rows, int64_t ldr, int n, int C, float *o) {
    const int CB = C / (2 * VW) * (2 * VW);
    for (int c = 0; c < CB; c += 2 * VW) {
        vf a[NH][2] = {};
        for (int j = 0; j < n; j++) {
            const float *r = rows + j * ldr + c;
            vf r0 = ldv(r), r1 = ldv(r + VW);
#pragma GCC unroll 8
            for (int i = 0; i < NH; i++) { const float pj = p[i * CH + j]; a[i][0] += pj * r0; a[i][1] += pj * r1; }
        }
#pragma GCC unroll 8
        for (int i = 0; i < NH; i++) {
            float *oh = o + i * C + c;
            stv(oh, ldv(oh) + a[i][0]); stv(oh + VW, ldv(oh + VW) + a[i][1]);
        }
    }
    for (int c = CB; c < C; c++)
        for (int i = 0; i < NH; i++) {
            float s = 0;
            for (int j = 0; j < n; j++) s += p[i * CH + j] * rows[j * ldr + c];
            o[i * C + c] += s;
        }
}

static void wsum_f32(const float *p, int H, const float *rows, int64_t ldr, int n, int C, float *o) {
    int h = 0;
    for (; h + 8 <= H; h += 8) wsum_f32_heads<8>(p + h * CH, rows, ldr, n, C, o + h * C);
    for (; h + 4 <= H; h += 4) wsum_f32_heads<4>(p + h * CH, rows, ldr, n, C, o + h * C);
    for (; h < H; h++) wsum_f32_heads<1>(p + h * CH, rows, ldr, n, C, o + h * C);
}

#if KV_DPBF16
/* o (float32) += p^T rows for NH heads: rows 2i and 2i + 1 interleaved column by column (unpack),
 * each head's (p_2i, p_2i+1) pair broadcast; pp[h * CH / 2 + i] holds that pair as two bfloat16s.
 * The unpacks leave each 128-bit lane's columns 0-3 in one result and 4-7 in the other, put back
 * in order by one permute per 32 columns at the end. C a multiple of 32. */
template <int NH>
static void wsum_bf16_heads(const uint32_t *pp, const uint16_t *rows, int64_t ldr, int n, int C, float *o) {
    static const uint16_t zero[32] = {0};
    const __m512i lo_idx = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i hi_idx = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int c = 0; c < C; c += 32) {
        __m512 a[NH][2];
#pragma GCC unroll 8
        for (int i = 0; i < NH; i++) a[i][0] = a[i][1] = _mm512_setzero_ps();
        for (int j = 0; j < n; j += 2) {
            const __m512i r0 = _mm512_loadu_si512(rows + j * ldr + c);
            const __m512i r1 = _mm512_loadu_si512(j + 1 < n ? rows + (j + 1) * ldr + c : zero);
            const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(r0, r1), hi = (__m512bh)_mm512_unpackhi_epi16(r0, r1);
#pragma GCC unroll 8
            for (int i = 0; i < NH; i++) {
                const __m512bh pv = (__m512bh)_mm512_set1_epi32((int)pp[i * (CH / 2) + j / 2]);
                a[i][0] = _mm512_dpbf16_ps(a[i][0], lo, pv); a[i][1] = _mm512_dpbf16_ps(a[i][1], hi, pv);
            }
        }
#pragma GCC unroll 8
        for (int i = 0; i < NH; i++) {
            float *oh = o + i * C + c;
            _mm512_storeu_ps(oh, _mm512_add_ps(_mm512_loadu_ps(oh), _mm512_permutex2var_ps(a[i][0], lo_idx, a[i][1])));
            _mm512_storeu_ps(oh + 16, _mm512_add_ps(_mm512_loadu_ps(oh + 16),
                                                    _mm512_permutex2var_ps(a[i][0], hi_idx, a[i][1])));
        }
    }
}

static void wsum_bf16(const uint32_t *pp, int H, const uint16_t *rows, int64_t ldr, int n, int C, float *o) {
    int h = 0;
    for (; h + 8 <= H; h += 8) wsum_bf16_heads<8>(pp + h * (CH / 2), rows, ldr, n, C, o + h * C);
    for (; h + 4 <= H; h += 4) wsum_bf16_heads<4>(pp + h * (CH / 2), rows, ldr, n, C, o + h * C);
    for (; h < H; h++) wsum_bf16_heads<1>(pp + h * (CH / 2), rows, ldr, n, C, o + h * C);
}
#endif

/* One segment of token b: positions [s0, s1), blocks of CH, continuing the partial at part
 * (o_lat [H, C], then max [H], then sum [H]). */
static void attend_blocks(const Model *m, const Layer *L, void *cache, int64_t slot_off, const float *qf,
                          int s0, int s1, float *part, float *buf) {
    const int H = m->H, C = m->C, K = m->C + m->R;
    float *o = part, *mx = part + H * C, *sum = mx + H;
    float *sc = buf, *ppf = buf + CH * H, *qbf = ppf + CH * H / 2 + 16, *wide = qbf + H * K / 2 + 16;
    Mat rows = cache_rows(m, L, cache, slot_off, s1);
    const int type = m->cache_type;
#if KV_DPBF16
    const int dp = type == BF16 && L->kv_b.type == BF16 && C % 32 == 0;   /* bfloat16 weights: bfloat16 arithmetic */
    if (dp) to_bf16(qf, (uint16_t *)qbf, H * K);
#endif
    for (int b0 = s0; b0 < s1; b0 += CH) {
        const int n = s1 - b0 < CH ? s1 - b0 : CH;
#if KV_DPBF16
        if (dp) {
            dot_tiles_bf16((const uint16_t *)qbf, H, (const uint16_t *)rows.w + b0 * rows.stride, rows.stride, n, K,
                           sc, CH);
        } else
#endif
        {
            const float *r;
            int64_t ldr;
            if (type == F32) { r = (const float *)rows.w + b0 * rows.stride; ldr = rows.stride; }
            else {
                for (int j = 0; j < n; j++) row_f32(&rows, b0 + j, wide + (int64_t)j * K);
                r = wide; ldr = K;
            }
            dot_tiles_f32(qf, K, H, r, ldr, n, K, sc, CH);
        }
        for (int h = 0; h < H; h++) {   /* online softmax: what came before rescaled to the new max */
            float *p = sc + h * CH, bm = -INFINITY;
            int j = 0;
            vf vmax = {};
            vmax -= INFINITY;
            for (; j + VW <= n; j += VW) {
                const vf v = ldv(p + j) * m->scale;
                stv(p + j, v);
                vmax = v > vmax ? v : vmax;
            }
            for (int i = 0; i < VW; i++) bm = fmaxf(bm, vmax[i]);
            for (; j < n; j++) bm = fmaxf(bm, p[j] *= m->scale);
            const float nm = fmaxf(mx[h], bm), alpha = expf(mx[h] - nm);
            j = 0;
            vf acc = {};
            for (; j + VW <= n; j += VW) { vf e = exp_neg(ldv(p + j) - nm); stv(p + j, e); acc += e; }
            float s = hsumv(acc);
            for (; j < n; j++) s += (p[j] = expf(p[j] - nm));
            if (alpha != 1.0f) for (int c = 0; c < C; c++) o[h * C + c] *= alpha;
            sum[h] = sum[h] * alpha + s;
            mx[h] = nm;
        }
#if KV_DPBF16
        if (dp) {
            uint32_t *pp = (uint32_t *)ppf;   /* a head's p in bfloat16 is its (p_2i, p_2i+1) pairs */
            for (int h = 0; h < H; h++) {
                uint16_t *ph = (uint16_t *)(pp + h * (CH / 2));
                to_bf16(sc + h * CH, ph, n);
                if (n % 2) ph[n] = 0;
            }
            wsum_bf16(pp, H, (const uint16_t *)rows.w + b0 * rows.stride, rows.stride, n, C, o);
            continue;
        }
#endif
        if (type == F32) wsum_f32(sc, H, (const float *)rows.w + b0 * rows.stride, rows.stride, n, C, o);
        else wsum_f32(sc, H, wide, K, n, C, o);
    }
}

/* o_lat for every token: its blocks shared out across the team (the token's segments), then merged. */
static void attend(const Model *m, const Layer *L, int B, const int64_t *pos, int S, void *cache, int64_t slot_stride,
                   Work *w, const Team *t) {
    const int H = m->H, C = m->C, K = m->C + m->R;
    const int64_t PART = (int64_t)H * C + 2 * H;
    const int32_t *first = w->first;   /* first[b]: token b's first block; first[B]: all blocks */
    const int n = first[B], i0 = (int)((int64_t)n * t->id / t->n), i1 = (int)((int64_t)n * (t->id + 1) / t->n);
    int b = 0;
    for (int i = i0; i < i1;) {
        while (first[b + 1] <= i) b++;
        const int len = attended(pos, b, S), end = first[b + 1] < i1 ? first[b + 1] : i1;
        float *part = w->part + ((int64_t)b * t->n + t->id) * PART;
        memset(part, 0, H * C * sizeof(float));
        for (int h = 0; h < H; h++) { part[H * C + h] = -INFINITY; part[H * C + H + h] = 0; }
        const int s0 = (i - first[b]) * CH, s1 = (end - first[b]) * CH < len ? (end - first[b]) * CH : len;
        attend_blocks(m, L, cache, slot_of(w, b) * slot_stride, w->qf + (int64_t)b * H * K, s0, s1, part, t->abuf);
        i = end;
    }
    sync_team(t);
    SPLIT(bh, B * H, t) {   /* merge the token's segments: each weighted by exp(its max - the max) */
        const int bb = bh / H, h = bh % H;
        float M = -INFINITY, tot = 0, *out = w->olat + (int64_t)bh * C;
        const float *parts = w->part + (int64_t)bb * t->n * PART;
#define TOUCHED(u) ((int64_t)n * (u) / t->n < first[bb + 1] && (int64_t)n * ((u) + 1) / t->n > first[bb])
        for (int u = 0; u < t->n; u++)
            if (TOUCHED(u)) M = fmaxf(M, parts[u * PART + H * C + h]);
        memset(out, 0, C * sizeof(float));
        for (int u = 0; u < t->n; u++) {
            if (!TOUCHED(u)) continue;
            const float *part = parts + u * PART, f = expf(part[H * C + h] - M);
            tot += f * part[H * C + H + h];
            for (int c = 0; c < C; c++) out[c] += f * part[h * C + c];
        }
#undef TOUCHED
        for (int c = 0; c < C; c++) out[c] /= tot;
    }
}

static void attention(const Model *m, const Layer *L, int B, const int64_t *pos, int S,
                      void *cache, int64_t slot_stride, Work *w, const Team *t) {
    const int D = m->D, H = m->H, N = m->N, R = m->R, V = m->V, C = m->C, CR = C + R, QK = N + R;
    /* w->h: x normed by L->in_norm (the phase before did it) */
    if (L->q_a.w) {
        matmul(&L->q_a, w->h, D, B, w->qa, m->QR, t);
        sync_team(t);
        SPLIT(b, B, t) rmsnorm(w->qa + b * m->QR, w->qa + b * m->QR, L->q_a_norm, m->QR, m->eps);
        sync_team(t);
        matmul(&L->q_b, w->qa, m->QR, B, w->q, H * QK, t);
    } else {
        matmul(&L->q_b, w->h, D, B, w->q, H * QK, t);
    }
    matmul(&L->kv_a, w->h, D, B, w->kva, CR, t);
    sync_team(t);
    SPLIT(b, B, t) {   /* the cache gets c^KV (normed) and k^R (rotated) */
        float *r = w->kva + b * CR;
        rmsnorm(r, r, L->kv_a_norm, C, m->eps);
        rope(r + C, w->cs + b * (R / 2), w->sn + b * (R / 2), R);
        int64_t off = (slot_of(w, b) * slot_stride + pos[b] * m->cache_row) * ELEM_SIZE[m->cache_type];
        kv_store(m->cache_type, (char *)cache + off, r, C, R, m->cache_scale ? m->cache_scale[L - m->layers] : 1.0f);
    }
    /* The absorbed query per (token, head): [q^C W^UK ; rotated q^R]. W^UK^T [H * C, N] is kept
     * transposed so that each head's product is a matmul of the B tokens' q^C against its rows. */
    const int QB = (C + BLOCK - 1) / BLOCK;
    SPLIT(it, H * QB, t) {
        int hd = it / QB, n0 = (it % QB) * BLOCK, n1 = n0 + BLOCK < C ? n0 + BLOCK : C;
        Mat wt = rows_of(&L->w_ukt, (int64_t)hd * C, C);
        mm_rows(&wt, w->q + (int64_t)hd * QK, (int64_t)H * QK, B, w->qf + (int64_t)hd * CR, (int64_t)H * CR,
                n0, n1, t);
    }
    SPLIT(bh, B * H, t) {
        float *qr = w->qf + (int64_t)bh * CR + C;
        memcpy(qr, w->q + (int64_t)bh * QK + N, R * sizeof(float));
        rope(qr, w->cs + (bh / H) * (R / 2), w->sn + (bh / H) * (R / 2), R);
    }
    if (t->id == 0) {   /* each token's blocks of cached positions, in order */
        w->first[0] = 0;
        for (int b = 0; b < B; b++) w->first[b + 1] = w->first[b] + (attended(pos, b, S) + CH - 1) / CH;
    }
    sync_team(t);
    attend(m, L, B, pos, S, cache, slot_stride, w, t);
    sync_team(t);
    /* W^UV after the weighted sum (per head, the B tokens' o_lat against its V rows), then W^O. */
    const int VB = (V + BLOCK - 1) / BLOCK;
    SPLIT(it, H * VB, t) {
        int hd = it / VB, n0 = (it % VB) * BLOCK, n1 = n0 + BLOCK < V ? n0 + BLOCK : V;
        Mat uv = rows_of(&L->kv_b, (int64_t)hd * (N + V) + N, V);
        mm_rows(&uv, w->olat + (int64_t)hd * C, (int64_t)H * C, B, w->o + (int64_t)hd * V, (int64_t)H * V,
                n0, n1, t);
    }
    sync_team(t);
    matmul(&L->o, w->o, H * V, B, w->acc, D, t);
    sync_team(t);
    SPLIT(b, B, t) {   /* residual, then the FFN's norm */
        for (int d = 0; d < D; d++) w->x[b * D + d] += w->acc[b * D + d];
        rmsnorm(w->h + b * D, w->x + b * D, L->post_norm, D, m->eps);
    }
    sync_team(t);
}

/* silu(x W_gate^T) * (x W_up^T) into w->g for the B rows of w->h: gate and up a block of rows at a
 * time, the product taken by the thread that computed the block (no phase of its own). */
static void gate_up(const Model *m, const Mat *gate, const Mat *up, int B, Work *w, const Team *t) {
    const int I = gate->rows, D = m->D;
    SPLIT(blk, (I + BLOCK - 1) / BLOCK, t) {
        const int n0 = blk * BLOCK, n1 = n0 + BLOCK < I ? n0 + BLOCK : I;
        mm_rows(gate, w->h, D, B, w->g, I, n0, n1, t);
        mm_rows(up, w->h, D, B, w->u, I, n0, n1, t);
        for (int b = 0; b < B; b++)
            for (int i = b * I + n0; i < b * I + n1; i++) w->g[i] = silu(w->g[i]) * w->u[i];
    }
}

/* A dense FFN, its residual, and the next norm (the next layer's input norm, or the final one). */
static void swiglu(const Model *m, const Layer *L, int B, const float *next_norm, Work *w, const Team *t) {
    const int I = L->gate.rows, D = m->D;
    gate_up(m, &L->gate, &L->up, B, w, t);
    sync_team(t);
    matmul(&L->down, w->g, I, B, w->acc, D, t);
    sync_team(t);
    SPLIT(b, B, t) {
        for (int d = 0; d < D; d++) w->x[b * D + d] += w->acc[b * D + d];
        rmsnorm(w->h + b * D, w->x + b * D, next_norm, D, m->eps);
    }
    sync_team(t);
}

/* The shared experts (if any) and the routed ones, their sum added to the residual, and the next
 * norm. Phases: the router's logits beside the shared experts' gate and up; top-K beside their
 * down; the tokens sorted by expert; the experts' gate and up; their down; the sum. */
static void moe(const Model *m, const Layer *L, int B, const float *next_norm, Work *w, const Team *t) {
    const int D = m->D, E = m->E, K = m->K, I = m->I_moe, copies = B * K;
    if (L->gate.w) gate_up(m, &L->gate, &L->up, B, w, t);
    SPLIT(be, B * E, t)
        w->logit[be] = dot_f32(w->h + (be / E) * D, L->router + (int64_t)(be % E) * D, D);
    sync_team(t);
    if (L->gate.w) matmul(&L->down, w->g, L->gate.rows, B, w->acc, D, t);
    /* The gate: softmax affinities in float32, (group-limited) top-K. */
    SPLIT(b, B, t) {
        float *s = w->logit + b * E, mx = -INFINITY, sum = 0;
        for (int e = 0; e < E; e++) mx = s[e] > mx ? s[e] : mx;
        for (int e = 0; e < E; e++) sum += (s[e] = expf(s[e] - mx));
        for (int e = 0; e < E; e++) s[e] /= sum;
        float masked[E];
        memcpy(masked, s, sizeof masked);
        if (m->group_limited) {   /* keep the topk_group groups with the highest max affinity */
            int G = m->n_group, per = E / G, top[G];
            float gmax[G];
            for (int g = 0; g < G; g++) {
                gmax[g] = -INFINITY;
                for (int e = g * per; e < (g + 1) * per; e++) gmax[g] = s[e] > gmax[g] ? s[e] : gmax[g];
            }
            topk(gmax, G, m->topk_group, top);
            for (int g = 0; g < G; g++) {
                int keep = 0;
                for (int j = 0; j < m->topk_group; j++) keep |= top[j] == g;
                if (!keep) for (int e = g * per; e < (g + 1) * per; e++) masked[e] = 0.0f;
            }
        }
        int *idx = w->idx + b * K;
        topk(masked, E, K, idx);
        float tot = 0;
        for (int k = 0; k < K; k++) tot += (w->wk[b * K + k] = masked[idx[k]]);
        for (int k = 0; k < K; k++)
            w->wk[b * K + k] = (K > 1 && m->norm_topk) ? w->wk[b * K + k] / (tot + 1e-20f) : w->wk[b * K + k] * m->routed_scaling;
    }
    sync_team(t);
    /* Token copies sorted by expert (counting sort), so each chosen expert's weights are read once;
     * then the work items of the two passes: (expert, block of gate rows with the same block of up
     * rows), then (expert, block of down rows). A small batch's copies are gathered here too. */
    const int gather_alone = (int64_t)copies * D <= 65536;
    int *cnt = w->cnt;
    if (t->id == 0) {
        memset(cnt, 0, (E + 1) * sizeof(int));
        for (int c = 0; c < copies; c++) cnt[w->idx[c] + 1]++;
        for (int e = 0; e < E; e++) cnt[e + 1] += cnt[e];           /* cnt[e]: first row of expert e */
        int fill[E];
        memcpy(fill, cnt, E * sizeof(int));
        for (int c = 0; c < copies; c++) {
            int r = fill[w->idx[c]]++;
            w->order[r] = c;
            w->slot[c] = r;
        }
        int n = 0;
        for (int pass = 0; pass < 2; pass++) {
            int nb = ((pass ? D : I) + BLOCK - 1) / BLOCK;
            w->n_items[pass] = 0;
            for (int e = 0; e < E; e++)
                if (cnt[e + 1] > cnt[e])
                    for (int blk = 0; blk < nb; blk++) { w->item[2 * n] = e; w->item[2 * n + 1] = blk; n++; w->n_items[pass]++; }
        }
        if (gather_alone)
            for (int c = 0; c < copies; c++)
                memcpy(w->xg + (int64_t)w->slot[c] * D, w->h + (int64_t)(c / K) * D, D * sizeof(float));
    }
    sync_team(t);
    if (!gather_alone) {
        SPLIT(c, copies, t) memcpy(w->xg + (int64_t)w->slot[c] * D, w->h + (int64_t)(c / K) * D, D * sizeof(float));
        sync_team(t);
    }
    for (int pass = 0; pass < 2; pass++) {   /* 0: gate_up [2I, D], silu(gate) * up over the gate half; 1: down [D, I] */
        int rows = pass ? D : I, first = pass ? w->n_items[0] : 0;
        SPLIT(it, w->n_items[pass], t) {
            int e = w->item[2 * (first + it)], n0 = w->item[2 * (first + it) + 1] * BLOCK;
            int n1 = n0 + BLOCK < rows ? n0 + BLOCK : rows, r0 = cnt[e], M = cnt[e + 1] - cnt[e];
            if (pass == 0) {
                Mat W = expert_of(&L->gu, e, 2 * I);
                float *gu = w->gu + (int64_t)r0 * 2 * I;
                mm_rows(&W, w->xg + (int64_t)r0 * D, D, M, gu, 2 * I, n0, n1, t);
                mm_rows(&W, w->xg + (int64_t)r0 * D, D, M, gu, 2 * I, I + n0, I + n1, t);
                for (int r = 0; r < M; r++)
                    for (int i = r * 2 * I + n0; i < r * 2 * I + n1; i++) gu[i] = silu(gu[i]) * gu[I + i];
            } else {
                Mat W = expert_of(&L->dn, e, D);
                mm_rows(&W, w->gu + (int64_t)r0 * 2 * I, 2 * I, M, w->y + (int64_t)r0 * D, D, n0, n1, t);
            }
        }
        sync_team(t);
    }
    SPLIT(b, B, t) {
        float *x = w->x + (int64_t)b * D;
        if (L->gate.w) for (int d = 0; d < D; d++) x[d] += w->acc[b * D + d];   /* the shared experts */
        for (int k = 0; k < K; k++) {
            float wt = w->wk[b * K + k], *y = w->y + (int64_t)w->slot[b * K + k] * D;
            for (int d = 0; d < D; d++) x[d] += wt * y[d];
        }
        rmsnorm(w->h + b * D, x, next_norm, D, m->eps);
    }
    sync_team(t);
}

static void step(const Model *m, int B, const int64_t *tokens, const int64_t *pos, int S, void *const *cache,
                 int64_t slot_stride, float *logits, Work *w, const Team *t) {
    const int D = m->D, R2 = m->R / 2;
    SPLIT(b, B, t) {
        for (int i = 0; i < R2; i++) {
            float a = (float)pos[b] * m->inv_freq[i];
            w->cs[b * R2 + i] = cosf(a) * m->rope_amp;
            w->sn[b * R2 + i] = sinf(a) * m->rope_amp;
        }
        memcpy(w->x + (int64_t)b * D, row_f32(&m->embed, tokens[b], t->buf), D * sizeof(float));
        rmsnorm(w->h + (int64_t)b * D, w->x + (int64_t)b * D, m->layers[0].in_norm, D, m->eps);
    }
    sync_team(t);
    /* Each layer's last phase ends with the next norm, by the thread that finished the token. */
    for (int l = 0; l < m->n_layers; l++) {
        const Layer *L = m->layers + l;
        const float *next_norm = l + 1 < m->n_layers ? m->layers[l + 1].in_norm : m->final_norm;
        attention(m, L, B, pos, S, cache[l], slot_stride, w, t);
        if (L->moe) moe(m, L, B, next_norm, w, t);   /* with its shared experts, if any */
        else swiglu(m, L, B, next_norm, w, t);
    }
    matmul(&m->head, w->h, D, B, logits, m->vocab, t);
}

void dsv2_decode(const Model *m, int B, const int64_t *tokens, const int64_t *pos, const int64_t *slots, int S,
                 void *const *cache, int64_t slot_stride, float *logits, float *work, int threads) {
    Work w;
    carve(m, B, threads, work, &w);
    w.slots = slots;
    Barrier bar;
    #pragma omp parallel num_threads(threads)
    {
        Team t = {omp_get_thread_num(), omp_get_num_threads(), &bar, 0};
        t.buf = w.bufs + (int64_t)t.id * w.buf_stride;
        t.abuf = t.buf + BUFW(m);
        t.xb = (uint16_t *)(t.abuf + ATTN_BUF(m));
        Quantized qi = i16_scratch(t.buf + w.qbuf_at, B * (m->K > 0 ? m->K : 1), m->max_cols);   /* (carve's copies) */
        t.qi = &qi;
        step(m, B, tokens, pos, S, cache, slot_stride, logits, &w, &t);
    }
}

/* ------------------------------------------------------------------ int8 matmul (prefill)
 * The same integer products for many rows at once (a prompt through an int8 model): the inputs
 * rounded to int16 (rows split across the team), then blocks of weight rows across the team, each
 * block against the inputs MC rows at a time (their int16 copy stays in L2). */
#define MC 128
int64_t dsv2_int8_mm_work_floats(int M, int K) {
#if I16_DOT
    return i16_floats(M, K) + 64;
#else
    (void)M; (void)K;
    return 0;
#endif
}

int dsv2_int8_mm(const float *x, int64_t ldx, int M, const int8_t *w, int64_t ldw, const float *scale, int N, int K,
                 float *y, int64_t ldy, float *work, int threads) {
#if I16_DOT
    const Quantized qs = i16_scratch(work, M, K);
    int16_t *q = qs.q;
    float *s = qs.s;
    const int nb = (N + BLOCK - 1) / BLOCK;
    #pragma omp parallel num_threads(threads)
    {
        const Team t = {omp_get_thread_num(), omp_get_num_threads(), 0, 0, 0, 0, 0};
        SPLIT(m, M, &t) quantize_i16(x + m * ldx, ldx, 1, K, q + (int64_t)m * k_pad(K), s + m);
        #pragma omp barrier
        for (int m0 = 0; m0 < M; m0 += MC) {
            const int mc = M - m0 < MC ? M - m0 : MC;
            SPLIT(b, nb, &t) {
                const int n0 = b * BLOCK, n1 = n0 + BLOCK < N ? n0 + BLOCK : N;
                dot_tiles_i16(q + (int64_t)m0 * k_pad(K), s + m0, mc, w + n0 * ldw, ldw, scale + n0, n1 - n0, K,
                              y + m0 * ldy + n0, ldy);
            }
        }
    }
    return 0;
#else
    (void)x; (void)ldx; (void)M; (void)w; (void)ldw; (void)scale; (void)N; (void)K; (void)y; (void)ldy; (void)work;
    (void)threads;
    return -1;
#endif
}
