/* Vector helpers shared by the native kernels (decode.cpp, attention.cpp): GCC vector types as
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
 * |r| <= ln 2 / 2 and e^r from Cephes' degree-6 polynomial; within 2 ulp of expf. */
static inline vf exp_neg(vf x) {
    typedef int32_t vi __attribute__((vector_size(VW * 4)));
    x = x < -87.0f ? (vf){} - 87.0f : x;
    vi n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi);   /* x <= 0: truncation rounds */
    vf nf = __builtin_convertvector(n, vf);
    vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r
            + 1.6666665459e-1f) * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    return (vf)((vi)y + ((n) << 23));
}
