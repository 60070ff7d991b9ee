/* Attention over many queries at once (prefill, scoring, training): MLA's naive path, forward and
 * backward (the backward at the end of this file).
 *
 * PyTorch's CPU flash kernel needs equal query and value widths, so MLA's values (V = 32 or 128
 * against a query of N + R = 96 or 192) were zero-padded to the query's width, a third or half of
 * its products spent on zeros; the shared k^R was copied to every head, and the causal half of a
 * short prompt's scores was computed and then masked. Here each head's keys and values are packed
 * once per call, in the layout the register tiles read, at their own widths; the queries go in
 * blocks of QB, against blocks of KB keys that any of them may see, with an online softmax
 * (flash attention) so the work space does not grow with T.
 *
 * Both products are outer-product register tiles (MR queries x NC columns, no horizontal sums):
 * scores = Q K^T against K packed transposed, o += P V against V packed by rows. float32 tiles
 * multiply-add float32; bfloat16 ones (AVX512-BF16) multiply bfloat16 pairs into float32 sums
 * (VDPBF16PS), K and V packed as pairs along the summed dimension and p rounded to bfloat16 before
 * its product, as PyTorch's bfloat16 attention rounds it. The softmax is float32 throughout. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "attention.h"
#include "decode.h"
#include "simd.h"

#define QB 64         /* queries per block */
#define KB 128        /* keys per block */
#define NC (2 * VW)   /* columns per register tile */
#if VW == 16
#define MR 8          /* queries per register tile: MR x 2 vectors of sums, 2 of the other operand */
#else
#define MR 6
#endif

typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint8_t vb __attribute__((vector_size(VW)));

static inline int64_t up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* A bfloat16 number that converts to float like float32 does (for the packing templates). */
struct Bf16 {
    uint16_t bits;
    explicit operator float() const { return bf16_to_f32(bits); }
};

static inline float elem(const void *p, int64_t i, int type) {
    return type == F32 ? ((const float *)p)[i] : bf16_to_f32(((const uint16_t *)p)[i]);
}

/* ------------------------------------------------------------------ register tiles
 * C[i * ldc + c] (+)= sum_k A[i * lda + k] B[k * ldb + c] for i < M and c < NC. */
template <int M>
static void tile_f32(const float *A, int64_t lda, const float *B, int64_t ldb, int K, float *C, int64_t ldc, int add) {
    vf c[M][2];
#pragma GCC unroll 8
    for (int i = 0; i < M; i++) {
        c[i][0] = add ? ldv(C + i * ldc) : (vf){};
        c[i][1] = add ? ldv(C + i * ldc + VW) : (vf){};
    }
    for (int k = 0; k < K; k++) {
        const vf b0 = ldv(B + k * ldb), b1 = ldv(B + k * ldb + VW);
#pragma GCC unroll 8
        for (int i = 0; i < M; i++) {
            const float a = A[i * lda + k];
            c[i][0] += a * b0;
            c[i][1] += a * b1;
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < M; i++) { stv(C + i * ldc, c[i][0]); stv(C + i * ldc + VW, c[i][1]); }
}

#define TILES(NAME, ...)                                                       \
    switch (m) {                                                               \
        case 8: NAME<8>(__VA_ARGS__); break;                                \
        case 7: NAME<7>(__VA_ARGS__); break;                                \
        case 6: NAME<6>(__VA_ARGS__); break;                                   \
        case 5: NAME<5>(__VA_ARGS__); break;                                   \
        case 4: NAME<4>(__VA_ARGS__); break;                                   \
        case 3: NAME<3>(__VA_ARGS__); break;                                   \
        case 2: NAME<2>(__VA_ARGS__); break;                                   \
        default: NAME<1>(__VA_ARGS__); break;                                  \
    }

/* C [M, cols] (+)= A [M, K] B [K, cols], cols a multiple of NC: B's column blocks outside, so a
 * block of K x NC stays in L1 while every row of A passes it. */
static void mm_f32(const float *A, int64_t lda, int M, const float *B, int64_t ldb, int K, int cols,
                   float *C, int64_t ldc, int add) {
    for (int c = 0; c < cols; c += NC)
        for (int i = 0; i < M; i += MR) {
            const int m = M - i < MR ? M - i : MR;
            TILES(tile_f32, A + i * lda, lda, B + c, ldb, K, C + i * ldc + c, ldc, add)
        }
}

#if KV_DPBF16
/* The bfloat16 form: B holds pairs along k ([K / 2][cols][2]: ldb bfloat16s from one pair-row to
 * the next), each pair of A's row broadcast as one 32-bit lane. K2 pairs. */
template <int M>
static void tile_bf16(const uint16_t *A, int64_t lda, const uint16_t *B, int64_t ldb, int K2, float *C, int64_t ldc,
                      int add) {
    __m512 c[M][2];
#pragma GCC unroll 8
    for (int i = 0; i < M; i++) {
        c[i][0] = add ? _mm512_loadu_ps(C + i * ldc) : _mm512_setzero_ps();
        c[i][1] = add ? _mm512_loadu_ps(C + i * ldc + 16) : _mm512_setzero_ps();
    }
    for (int k = 0; k < K2; k++) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + k * ldb), b1 = (__m512bh)_mm512_loadu_si512(B + k * ldb + 32);
#pragma GCC unroll 8
        for (int i = 0; i < M; i++) {
            int32_t pair;
            memcpy(&pair, A + i * lda + 2 * k, 4);
            const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
            c[i][0] = _mm512_dpbf16_ps(c[i][0], a, b0);
            c[i][1] = _mm512_dpbf16_ps(c[i][1], a, b1);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < M; i++) { _mm512_storeu_ps(C + i * ldc, c[i][0]); _mm512_storeu_ps(C + i * ldc + 16, c[i][1]); }
}

static void mm_bf16(const uint16_t *A, int64_t lda, int M, const uint16_t *B, int64_t ldb, int K2, int cols,
                    float *C, int64_t ldc, int add) {
    for (int c = 0; c < cols; c += NC)
        for (int i = 0; i < M; i += MR) {
            const int m = M - i < MR ? M - i : MR;
            TILES(tile_bf16, A + i * lda, lda, B + 2 * c, ldb, K2, C + i * ldc + c, ldc, add)
        }
}
#endif

/* ------------------------------------------------------------------ work space */
typedef struct {
    /* query width, padded to pairs and to NC; keys and value columns padded to NC; bfloat16 tiles */
    int QK, QKp, QKn, Sp, Vp, dp;
} Dims;

static Dims dims(const Attn *a) {
    Dims d;
    d.QK = a->N + a->R;
    d.QKp = (int)up(d.QK, 2);
    d.QKn = (int)up(d.QK, NC);
    d.Sp = (int)up(a->S, NC);
    d.Vp = (int)up(a->V, NC);
#if KV_DPBF16
    d.dp = a->type == BF16;
#else
    d.dp = 0;
#endif
    return d;
}

/* Per thread: K packed [QKp, Sp], V packed [Sp, Vp], the query block [QB, QKp], scores [QB, KB],
 * p in bfloat16 [QB, KB], sums [QB, Vp], row max, row sum and each row's key window. */
static int64_t thread_floats(const Attn *a) {
    const Dims d = dims(a);
    return (int64_t)d.QKp * d.Sp + (int64_t)d.Sp * d.Vp + QB * (int64_t)(d.QKp + KB + KB / 2 + d.Vp + 4) + 64;
}

int64_t dsv2_attention_work_floats(const Attn *a, int threads) { return thread_floats(a) * threads; }

/* ------------------------------------------------------------------ packing
 * Head h of row b: keys transposed (float32: K[k][j]; bfloat16: K[k / 2][j][k % 2]) and values by
 * rows (float32: V[j][v]; bfloat16: V[j / 2][v][j % 2]), zeros past S and V so the tiles may read
 * whole blocks of NC. Keys go 16 at a time, so each store fills one cache line: one key at a time
 * stored a column of lines Sp apart, which thrashed L1 at power-of-two lengths. */
#define PK 16
/* Keys [N + R, S] of head h into out: transposed (K[k][j]), or as pairs along k (K[k / 2][j][k % 2])
 * for the bfloat16 tiles. Src -> Dst: float -> float, Bf16 -> float (widened), uint16_t -> uint16_t. */
template <typename Src, typename Dst>
static void pack_keys(const Attn *a, const Dims *d, const Src *kn, const Src *kr, Dst *out, int pairs) {
    const int S = a->S, N = a->N, R = a->R, step = pairs ? 2 : 1;
    memset(out, 0, sizeof(Dst) * d->QKp * d->Sp);
    for (int j0 = 0; j0 < S; j0 += PK) {
        const int n = S - j0 < PK ? S - j0 : PK;
        for (int k = 0; k < N + R; k++) {
            const Src *src = k < N ? kn + j0 * a->kn_s[1] + k : kr + j0 * a->kr_s[1] + (k - N);
            const int64_t ld = k < N ? a->kn_s[1] : a->kr_s[1];
            Dst *dst = out + (pairs ? (int64_t)(k / 2) * 2 * d->Sp + k % 2 : (int64_t)k * d->Sp) + step * j0;
            for (int l = 0; l < n; l++) dst[step * l] = static_cast<Dst>(src[l * ld]);
        }
    }
}

static void pack(const Attn *a, const Dims *d, int b, int h, float *kf, float *vf_) {
    const int S = a->S, V = a->V;
    const int64_t kn0 = b * a->kn_s[0] + h * a->kn_s[2], kr0 = b * a->kr_s[0], v0 = b * a->v_s[0] + h * a->v_s[2];
    if (d->dp) {
        const uint16_t *kn = (const uint16_t *)a->kn + kn0, *kr = (const uint16_t *)a->kr + kr0;
        const uint16_t *v = (const uint16_t *)a->v + v0;
        uint16_t *vb = (uint16_t *)vf_;
        pack_keys(a, d, kn, kr, (uint16_t *)kf, 1);
        memset(vb, 0, sizeof(uint16_t) * d->Sp * d->Vp);
        for (int j = 0; j < S; j++) {
            const uint16_t *rv = v + j * a->v_s[1];
            uint16_t *o = vb + (int64_t)(j / 2) * 2 * d->Vp + j % 2;
            for (int c = 0; c < V; c++) o[2 * c] = rv[c];
        }
        return;
    }
    if (a->type == F32) pack_keys(a, d, (const float *)a->kn + kn0, (const float *)a->kr + kr0, kf, 0);
    else pack_keys(a, d, (const Bf16 *)a->kn + kn0, (const Bf16 *)a->kr + kr0, kf, 0);
    for (int j = 0; j < S; j++) {
        const int64_t rv = v0 + j * a->v_s[1];
        float *o = vf_ + (int64_t)j * d->Vp;
        if (a->type == F32) memcpy(o, (const float *)a->v + rv, sizeof(float) * V);
        else for (int c = 0; c < V; c++) o[c] = elem(a->v, rv + c, a->type);
        memset(o + V, 0, sizeof(float) * (d->Vp - V));
    }
    memset(vf_ + (int64_t)S * d->Vp, 0, sizeof(float) * (d->Sp - S) * d->Vp);
}

/* Queries [t0, t0 + M) of head h: [q^C ; q^R] rows of QKp (float32, or bfloat16 for the pair tiles). */
static void pack_queries(const Attn *a, const Dims *d, int b, int h, int t0, int M, float *q) {
    const int N = a->N, R = a->R, t = a->type;
    for (int i = 0; i < M; i++) {
        const int64_t rn = b * a->qn_s[0] + (t0 + i) * a->qn_s[1] + h * a->qn_s[2];
        const int64_t rr = b * a->qr_s[0] + (t0 + i) * a->qr_s[1] + h * a->qr_s[2];
        if (d->dp) {
            uint16_t *o = (uint16_t *)q + (int64_t)i * d->QKp;
            memcpy(o, (const uint16_t *)a->qn + rn, 2 * N);
            memcpy(o + N, (const uint16_t *)a->qr + rr, 2 * R);
            if (d->QKp > d->QK) o[d->QK] = 0;
        } else {
            float *o = q + (int64_t)i * d->QKp;
            for (int k = 0; k < N; k++) o[k] = elem(a->qn, rn + k, t);
            for (int k = 0; k < R; k++) o[N + k] = elem(a->qr, rr + k, t);
            if (d->QKp > d->QK) o[d->QK] = 0;
        }
    }
}

/* ------------------------------------------------------------------ one head, one query block */
/* Row i's window of keys [lo[i], hi[i]) (empty: lo >= hi); inside it, the mask (if any) decides.
 * -> [*first, *last): the keys some row of the block may see (empty: first >= last). */
static void windows(const Attn *a, int b, int t0, int M, int *lo, int *hi, int *first, int *last) {
    for (int i = 0; i < M; i++) {
        const int t = t0 + i;
        if (!a->mask) {
            lo[i] = 0;
            hi[i] = t + a->S - a->T + 1 < a->S ? t + a->S - a->T + 1 : a->S;
            continue;
        }
        const uint8_t *row = a->mask + b * a->mask_s[0] + t * a->mask_s[1];
        int first = 0, last = a->S - 1;   /* any non-zero byte is true, as in the blocks */
        while (first < a->S && !row[first]) first++;
        if (first == a->S) { lo[i] = hi[i] = 0; continue; }
        while (!row[last]) last--;
        lo[i] = first;
        hi[i] = last + 1;
    }
    *first = a->S, *last = 0;
    for (int i = 0; i < M; i++)
        if (lo[i] < hi[i]) { *first = lo[i] < *first ? lo[i] : *first; *last = hi[i] > *last ? hi[i] : *last; }
}

/* The part [*j0, *j1) of the window [lo, hi) inside the block of n keys from k0, relative to k0:
 * empty (j0 == j1) where the window starts past the block or ends before it. */
static inline void in_block(int lo, int hi, int k0, int n, int *j0, int *j1) {
    *j0 = lo - k0 <= 0 ? 0 : lo - k0 < n ? lo - k0 : n;
    *j1 = hi - k0 < n ? hi - k0 : n;
    if (*j1 < *j0) *j1 = *j0;
}

static void block(const Attn *a, const Dims *d, int b, int h, int t0, int M, const float *kp, const float *vp,
                  float *q, float *sc, uint16_t *pb, float *o, float *mx, float *sum, int *lo, int *hi) {
    const int QKp = d->QKp, Vp = d->Vp;
    pack_queries(a, d, b, h, t0, M, q);
    int first, last;
    windows(a, b, t0, M, lo, hi, &first, &last);
    memset(o, 0, sizeof(float) * M * Vp);
    for (int i = 0; i < M; i++) { mx[i] = -INFINITY; sum[i] = 0; }
    for (int k0 = first / NC * NC; k0 < last; k0 += KB) {
        const int n = last - k0 < KB ? last - k0 : KB, cols = (int)up(n, NC);
#if KV_DPBF16
        if (d->dp) mm_bf16((const uint16_t *)q, QKp, M, (const uint16_t *)kp + 2 * (int64_t)k0, 2 * (int64_t)d->Sp,
                           QKp / 2, cols, sc, KB, 0);
        else
#endif
            mm_f32(q, QKp, M, kp + k0, d->Sp, QKp, cols, sc, KB, 0);
        int any = 0;
        for (int i = 0; i < M; i++) {   /* online softmax: what came before rescaled to the new max */
            float *p = sc + i * KB;
            int j0, j1;
            in_block(lo[i], hi[i], k0, n, &j0, &j1);
            for (int j = 0; j < j0; j++) p[j] = -INFINITY;
            for (int j = j1; j < cols; j++) p[j] = -INFINITY;
            const uint8_t *mrow = a->mask ? a->mask + b * a->mask_s[0] + (t0 + i) * a->mask_s[1] + k0 : 0;
            vf vmax = (vf){} - INFINITY;
            int j = j0;
            if (!mrow)
                for (; j + VW <= j1; j += VW) { const vf s = ldv(p + j) * a->scale; stv(p + j, s); vmax = s > vmax ? s : vmax; }
            else
                for (; j + VW <= j1; j += VW) {   /* VW mask bytes as a lane mask */
                    vb m;
                    memcpy(&m, mrow + j, VW);
                    const vf s = __builtin_convertvector(m, vi) != 0 ? ldv(p + j) * a->scale : (vf){} - INFINITY;
                    stv(p + j, s);
                    vmax = s > vmax ? s : vmax;
                }
            float bm = -INFINITY;
            for (int l = 0; l < VW; l++) bm = fmaxf(bm, vmax[l]);
            for (; j < j1; j++) {
                p[j] = mrow && !mrow[j] ? -INFINITY : p[j] * a->scale;
                bm = fmaxf(bm, p[j]);
            }
            if (bm == -INFINITY) {   /* nothing this row may see in this block */
                memset(p, 0, sizeof(float) * cols);
                if (d->dp) memset(pb + i * KB, 0, 2 * cols);
                continue;
            }
            any = 1;
            const float nm = fmaxf(mx[i], bm), alpha = expf(mx[i] - nm);
            vf acc = {};
            for (j = 0; j < cols; j += VW) {
                const vf e = exp_neg(ldv(p + j) - nm);   /* 0 for a masked key's -inf */
                stv(p + j, e);
                acc += e;
            }
            if (alpha != 1.0f) for (int c = 0; c < Vp; c++) o[i * Vp + c] *= alpha;
            sum[i] = sum[i] * alpha + hsumv(acc);
            mx[i] = nm;
#if KV_DPBF16
            if (d->dp) {
                uint16_t *r = pb + i * KB;
                for (j = 0; j + 32 <= cols; j += 32)
                    _mm512_storeu_si512(r + j, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + j + 16), _mm512_loadu_ps(p + j)));
            }
#endif
        }
        if (!any) continue;
#if KV_DPBF16
        if (d->dp) { mm_bf16(pb, KB, M, (const uint16_t *)vp + (int64_t)k0 * Vp, 2 * (int64_t)Vp, cols / 2, Vp, o, Vp, 1); continue; }
#endif
        mm_f32(sc, KB, M, vp + (int64_t)k0 * Vp, Vp, n, Vp, o, Vp, 1);
    }
    if (a->lse)   /* a row that saw nothing: +inf, so the backward's p = exp(s - lse) is 0 */
        for (int i = 0; i < M; i++)
            a->lse[((int64_t)b * a->T + t0 + i) * a->H + h] = sum[i] > 0 ? mx[i] + logf(sum[i]) : INFINITY;
    for (int i = 0; i < M; i++) {
        const float r = sum[i] > 0 ? 1.0f / sum[i] : 0.0f;
        const int64_t off = b * a->out_s[0] + (t0 + i) * a->out_s[1] + h * a->out_s[2];
        if (a->type == F32) for (int c = 0; c < a->V; c++) ((float *)a->out)[off + c] = o[i * Vp + c] * r;
        else for (int c = 0; c < a->V; c++) ((uint16_t *)a->out)[off + c] = f32_to_bf16(o[i * Vp + c] * r);
    }
}

void dsv2_attention(const Attn *a, float *work, int threads) {
    const Dims d = dims(a);
    const int64_t per = thread_floats(a);
    const int heads = a->B * a->H;
    #pragma omp parallel num_threads(threads)
    {
        float *base = work + omp_get_thread_num() * per;
        float *kp = base, *vp = kp + (int64_t)d.QKp * d.Sp, *q = vp + (int64_t)d.Sp * d.Vp, *sc = q + QB * d.QKp;
        uint16_t *pb = (uint16_t *)(sc + QB * KB);
        float *o = sc + QB * KB + QB * KB / 2, *mx = o + QB * d.Vp, *sum = mx + QB;
        int *lo = (int *)(sum + QB), *hi = lo + QB;
        #pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < heads; bh++) {
            const int b = bh / a->H, h = bh % a->H;
            pack(a, &d, b, h, kp, vp);
            for (int t0 = 0; t0 < a->T; t0 += QB)
                block(a, &d, b, h, t0, a->T - t0 < QB ? a->T - t0 : QB, kp, vp, q, sc, pb, o, mx, sum, lo, hi);
        }
    }
}

/* ------------------------------------------------------------------ backward
 * Per head, flash attention's backward in float32: p recomputed from the saved log-sum-exp,
 * dp = do v^T and ds = p (dp - delta), then per block of queries x keys
 *     dq += ds k,   dk^T += q^T ds,   dv^T += do^T p,
 * dk and dv kept transposed (keys along the rows) and summed over the head's query blocks in the
 * thread's own buffers. Every product is the forward's outer-product tile, so its second operand
 * is one with NC columns per row: k by rows and transposed, v transposed, p and ds as they are;
 * q and do are transposed once per query block. */
/* The backward's dimensions: dims(), always float32 tiles. */
static Dims gdims(const Attn *a) {
    Dims d = dims(a);
    d.dp = 0;
    return d;
}

/* Per thread: k transposed [QK, Sp] and by rows [Sp, QKn], v transposed [V, Sp], dk^T [QK, Sp],
 * dv^T [V, Sp]; per query block q [QB, QKp], q^T [QK, QB], do [QB, V], do^T [V, QB], dq [QB, QKn],
 * p, dp and ds [QB, KB], the rows' windows. */
static int64_t grad_floats(const Attn *a) {
    const Dims d = gdims(a);
    return (int64_t)d.Sp * (2 * d.QK + d.QKn + 2 * a->V) + QB * (int64_t)(d.QKp + d.QK + 2 * a->V + d.QKn + 3 * KB + 2)
           + 64;
}

int64_t dsv2_attention_backward_work_floats(const Attn *a, int threads) { return grad_floats(a) * threads; }

static inline void put(void *dst, int64_t i, float x, int type) {
    if (type == F32) ((float *)dst)[i] = x;
    else ((uint16_t *)dst)[i] = f32_to_bf16(x);
}

/* dst [rows, cols] = src [cols, rows] transposed (leading dimensions lds, ldd). */
static void transpose(const float *src, int64_t lds, int rows, int cols, float *dst, int64_t ldd) {
    for (int i0 = 0; i0 < cols; i0 += PK)
        for (int r = 0; r < rows; r++)
            for (int i = i0; i < i0 + PK && i < cols; i++) dst[(int64_t)r * ldd + i] = src[(int64_t)i * lds + r];
}

/* p and ds of row i over cols keys from k0, [j0, j1) its window there: the scores in p, dp in dp. */
static void grad_row(const Attn *a, float *p, float *ds, const float *dp, int j0, int j1, int cols, const uint8_t *mrow,
                     float lse, float delta) {
    int j = 0;
    if (lse == INFINITY) j0 = j1 = 0;   /* a row that sees nothing at all */
    for (; j < j0; j++) p[j] = ds[j] = 0;
    for (; j + VW <= j1; j += VW) {
        vf e = exp_neg(ldv(p + j) * a->scale - lse);
        if (mrow) {
            vb m;
            memcpy(&m, mrow + j, VW);
            e = __builtin_convertvector(m, vi) != 0 ? e : (vf){};
        }
        stv(p + j, e);
        stv(ds + j, e * (ldv(dp + j) - delta));
    }
    for (; j < j1; j++) {
        p[j] = mrow && !mrow[j] ? 0.0f : expf(p[j] * a->scale - lse);
        ds[j] = p[j] * (dp[j] - delta);
    }
    for (; j < cols; j++) p[j] = ds[j] = 0;
}

static void grad_head(const Attn *a, const AttnGrad *g, const Dims *d, int b, int h, float *base) {
    const int S = a->S, N = a->N, R = a->R, V = a->V, QK = d->QK, QKp = d->QKp, QKn = d->QKn, Sp = d->Sp, t = a->type;
    float *kt = base, *kr = kt + (int64_t)QK * Sp, *vt = kr + (int64_t)Sp * QKn, *dkt = vt + (int64_t)V * Sp;
    float *dvt = dkt + (int64_t)QK * Sp, *q = dvt + (int64_t)V * Sp, *qt = q + QB * QKp, *dout = qt + QK * QB;
    float *dot = dout + QB * V, *dq = dot + V * QB, *p = dq + QB * QKn, *ds = p + QB * KB, *dp = ds + QB * KB;
    int *lo = (int *)(dp + QB * KB), *hi = lo + QB;
    const int64_t kn0 = b * a->kn_s[0] + h * a->kn_s[2], kr0 = b * a->kr_s[0], v0 = b * a->v_s[0] + h * a->v_s[2];
    memset(kr, 0, sizeof(float) * Sp * QKn);
    memset(vt, 0, sizeof(float) * V * Sp);
    for (int j = 0; j < S; j++) {
        float *row = kr + (int64_t)j * QKn;
        for (int k = 0; k < N; k++) row[k] = elem(a->kn, kn0 + j * a->kn_s[1] + k, t);
        for (int k = 0; k < R; k++) row[N + k] = elem(a->kr, kr0 + j * a->kr_s[1] + k, t);
        for (int c = 0; c < V; c++) vt[(int64_t)c * Sp + j] = elem(a->v, v0 + j * a->v_s[1] + c, t);
    }
    memset(kt, 0, sizeof(float) * QK * Sp);
    transpose(kr, QKn, QK, S, kt, Sp);
    memset(dkt, 0, sizeof(float) * QK * Sp);
    memset(dvt, 0, sizeof(float) * V * Sp);
    for (int t0 = 0; t0 < a->T; t0 += QB) {
        const int M = a->T - t0 < QB ? a->T - t0 : QB;
        pack_queries(a, d, b, h, t0, M, q);
        for (int i = 0; i < M; i++) {
            const int64_t ro = b * g->dout_s[0] + (t0 + i) * g->dout_s[1] + h * g->dout_s[2];
            for (int c = 0; c < V; c++) dout[i * V + c] = elem(g->dout, ro + c, t);
        }
        transpose(q, QKp, QK, M, qt, QB);
        transpose(dout, V, V, M, dot, QB);
        memset(dq, 0, sizeof(float) * QB * QKn);
        int first, last;
        windows(a, b, t0, M, lo, hi, &first, &last);
        const int64_t r0 = ((int64_t)b * a->T + t0) * a->H + h;
        for (int k0 = first / NC * NC; k0 < last; k0 += KB) {
            const int n = last - k0 < KB ? last - k0 : KB, cols = (int)up(n, NC);
            mm_f32(q, QKp, M, kt + k0, Sp, QK, cols, p, KB, 0);     /* scores */
            mm_f32(dout, V, M, vt + k0, Sp, V, cols, dp, KB, 0);    /* dp = do v^T */
            for (int i = 0; i < M; i++) {
                int j0, j1;
                in_block(lo[i], hi[i], k0, n, &j0, &j1);
                const uint8_t *mrow = a->mask ? a->mask + b * a->mask_s[0] + (t0 + i) * a->mask_s[1] + k0 : 0;
                grad_row(a, p + i * KB, ds + i * KB, dp + i * KB, j0, j1, cols, mrow, g->lse[r0 + (int64_t)i * a->H],
                         g->delta[r0 + (int64_t)i * a->H]);
            }
            mm_f32(dot, QB, V, p, KB, M, cols, dvt + k0, Sp, 1);                    /* dv^T += do^T p */
            mm_f32(qt, QB, QK, ds, KB, M, cols, dkt + k0, Sp, 1);                   /* dk^T += q^T ds */
            mm_f32(ds, KB, M, kr + (int64_t)k0 * QKn, QKn, n, QKn, dq, QKn, 1);     /* dq += ds k */
        }
        for (int i = 0; i < M; i++) {
            const int64_t o = r0 + (int64_t)i * a->H;
            for (int k = 0; k < N; k++) put(g->dq_nope, o * N + k, dq[i * QKn + k] * a->scale, t);
            for (int k = 0; k < R; k++) put(g->dq_pe, o * R + k, dq[i * QKn + N + k] * a->scale, t);
        }
    }
    for (int j = 0; j < S; j++) {
        const int64_t o = ((int64_t)b * S + j) * a->H + h;
        for (int k = 0; k < N; k++) put(g->dk_nope, o * N + k, dkt[(int64_t)k * Sp + j] * a->scale, t);
        for (int k = 0; k < R; k++) put(g->dk_pe, o * R + k, dkt[(int64_t)(N + k) * Sp + j] * a->scale, t);
        for (int c = 0; c < V; c++) put(g->dv, o * V + c, dvt[(int64_t)c * Sp + j], t);
    }
}

void dsv2_attention_backward(const Attn *a, const AttnGrad *g, float *work, int threads) {
    const Dims d = gdims(a);
    const int64_t per = grad_floats(a);
    const int heads = a->B * a->H;
    #pragma omp parallel num_threads(threads)
    {
        float *base = work + omp_get_thread_num() * per;
        #pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < heads; bh++) grad_head(a, g, &d, bh / a->H, bh % a->H, base);
    }
}
