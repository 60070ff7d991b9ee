/* Vector helpers shared by the native kernels (decode.cpp, attention.cpp, layers.cpp): GCC vector types as
 * wide as the CPU's float registers, bfloat16 conversions, and a vector e^x.
 *
 * VW floats per vector: 16 with AVX-512, else 8 (AVX2, or the compiler's generic code). Where the
 * CPU multiplies bfloat16 pairs (AVX512-BF16: VDPBF16PS), KV_DPBF16 is 1 and the kernels keep
 * bfloat16 operands as they are; elsewhere they widen them to float32. */
#pragma once
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {   /* round to nearest even, as torch does */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

#ifdef __AVX512F__
#define VW 16
#else
#define VW 8
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
static inline vf ldv(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void stv(float *p, vf v) { memcpy(p, &v, sizeof v); }
/* VW bfloat16 numbers widened to float32, and rounded back (to nearest even, NaN kept: f32_to_bf16). */
typedef uint16_t vh __attribute__((vector_size(VW * 2)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
#ifdef __AVX512F__   /* GCC lowers the generic forms below to twice the instructions */
static inline vf ldv_bf16(const uint16_t *p) {
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
}
static inline vu round_bf16_bits(vf x) {   /* the bfloat16 in the low half of each lane */
    const __m512i u = (__m512i)x, hi = _mm512_srli_epi32(u, 16);
    const __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), _mm512_and_si512(hi, _mm512_set1_epi32(1))), 16);
    return (vu)_mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask((__m512)x, (__m512)x, _CMP_UNORD_Q),
                                     _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
}
static inline void stv_bf16(uint16_t *p, vf x) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16((__m512i)round_bf16_bits(x)));
}
#else
static inline vf ldv_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}
static inline vu round_bf16_bits(vf x) {   /* the bfloat16 in the low half of each lane */
    const vu u = (vu)x, nan = (vu)((u & 0x7fffffffu) > 0x7f800000u);
    return (((u + 0x7fffu + ((u >> 16) & 1)) >> 16) & ~nan) | (((u >> 16) | 0x40) & nan);
}
static inline void stv_bf16(uint16_t *p, vf x) {
    const vh h = __builtin_convertvector(round_bf16_bits(x), vh);
    memcpy(p, &h, sizeof h);
}
#endif
static inline vf round_bf16(vf x) { return (vf)(round_bf16_bits(x) << 16); }   /* x as bfloat16 would hold it */
static inline float hsumv(vf v) {
#ifdef __AVX512F__
    return _mm512_reduce_add_ps((__m512)v);
#else
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
#endif
}
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define KV_DPBF16 1
#else
#define KV_DPBF16 0
#endif

/* e^x for x <= 0 (the scores less their running max): n = round(x log2 e), e^x = 2^n e^r with
 * |r| <= ln 2 / 2 and e^r from Cephes' degree-6 polynomial; within 2 ulp of expf down to -87, and 0
 * below it (-inf included: a masked score), where expf's results are subnormal (< 1.7e-38) or 0. */
static inline vf exp_neg(vf x) {
    typedef int32_t vi __attribute__((vector_size(VW * 4)));
    const vi under = x < -87.0f;
    x = under ? (vf){} - 87.0f : x;   /* keeps 2^n a normal number below */
    vi n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi);   /* x <= 0: truncation rounds */
    vf nf = __builtin_convertvector(n, vf);
    vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r
            + 1.6666665459e-1f) * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    return under ? (vf){} : (vf)((vi)y + ((n) << 23));
}
