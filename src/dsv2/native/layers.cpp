// RMSNorm, RoPE and the MoE combine as PyTorch operators (torch.ops.dsv2.*), forward and backward,
// for prefill and training (native/layers.py). PyTorch runs each as several small passes (RMSNorm: a
// widening copy, the square, the mean, the scale, the rounding back, the weight; the combine: an
// index_copy_ and a batched matmul of K rows); here each is one pass over its rows, split over the
// threads, in float32 whatever the inputs' dtype, the roundings placed where the model's code has them.
//
//   rms_norm(x [rows, D], weight [D], eps) -> (y [rows, D], rstd [rows] float32)
//       y = weight * round_x(x rstd), rstd = 1 / sqrt(mean(x^2) + eps): normalised in float32, rounded
//       to x's dtype, scaled in y's, the promotion of x's and weight's (model/norm.py)
//   rms_norm_backward(dy, x, weight, rstd) -> (dx [rows, D] in x's dtype, dweight [D] float32)
//   rope(x [B, T, H, R], cos [B, T, R/2], sin [B, T, R/2], inverse) -> [B, T, H, R] in x's dtype
//       each interleaved pair (x[2i], x[2i+1]) of every head rotated by its position's (cos_i, sin_i);
//       inverse rotates by minus the angle: the forward's matrix transposed, so also its backward
//   moe_combine(y [M, D], order [M], weight [N, K]) -> out [N, D] in y's dtype
//       out[n] = sum_k weight[n, k] y[m] over the rows m with order[m] = n K + k; a copy missing from
//       order (a token dropped in training) adds nothing. The weights stay float32 (as transformers'
//       DeepSeek-V2 combines), where the PyTorch path rounded them to y's dtype first.
//   moe_combine_backward(dout [N, D], y, order, weight) -> (dy [M, D] in y's dtype, dweight [N, K] float32)
//
// Every input's last dimension must be contiguous; the other strides may be anything (the model hands
// over split views), outputs are contiguous.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <omp.h>
#include <torch/library.h>

#include <math.h>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

// Below this many elements a call runs on one thread: waking the pool costs more than it saves
// (a decode step's single rows).
constexpr int64_t PARALLEL = 1 << 15;

int threads_for(int64_t elements) { return elements >= PARALLEL ? at::get_num_threads() : 1; }

// float32 as float, bfloat16 as its bits (uint16_t).
inline vf load(const float *p) { return ldv(p); }
inline vf load(const uint16_t *p) { return ldv_bf16(p); }
inline void store(float *p, vf v) { stv(p, v); }
inline void store(uint16_t *p, vf v) { stv_bf16(p, v); }
inline float get(const float *p) { return *p; }
inline float get(const uint16_t *p) { return bf16_to_f32(*p); }
inline void put(float *p, float x) { *p = x; }
inline void put(uint16_t *p, float x) { *p = f32_to_bf16(x); }
// x as a T holds it.
template <typename T> inline vf as(vf x) { if constexpr (std::is_same_v<T, uint16_t>) return round_bf16(x); else return x; }
template <typename T> inline float as(float x) {
    if constexpr (std::is_same_v<T, uint16_t>) return bf16_to_f32(f32_to_bf16(x)); else return x;
}

// f(T *) with T the element type of a float32 or bfloat16 tensor (the pointer is a null tag).
template <typename F>
void with_type(at::ScalarType t, F f) {
    if (t == at::kFloat) f((float *)nullptr);
    else f((uint16_t *)nullptr);
}
template <typename P> using elem_t = std::remove_pointer_t<P>;

void check_float(const at::Tensor &t, const char *op, const char *name, int dims, const char *shape) {
    TORCH_CHECK_VALUE(t.dim() == dims && t.device().is_cpu()
                          && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16)
                          && (t.stride(dims - 1) == 1 || t.size(dims - 1) <= 1),
                      op, ": ", name, " must be a float32 or bfloat16 CPU tensor ", shape,
                      " with a contiguous last dimension, got ", t.scalar_type(), " ", t.sizes(), " on ", t.device(),
                      ".");
}

// ------------------------------------------------------------------ RMSNorm
template <typename X, typename W, typename Y>
void rms_norm_rows(const X *x, int64_t xs, const W *w, Y *y, float *rstd, int64_t rows, int64_t D, float eps) {
#pragma omp parallel for num_threads(threads_for(rows * D)) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const X *xr = x + r * xs;
        Y *yr = y + r * D;
        vf a0 = {}, a1 = {};
        int64_t d = 0;
        for (; d + 2 * VW <= D; d += 2 * VW) {
            const vf u = load(xr + d), v = load(xr + d + VW);
            a0 += u * u;
            a1 += v * v;
        }
        for (; d + VW <= D; d += VW) { const vf u = load(xr + d); a0 += u * u; }
        float ss = hsumv(a0 + a1);
        for (; d < D; d++) ss += get(xr + d) * get(xr + d);
        const float s = 1.0f / sqrtf(ss / (float)D + eps);
        rstd[r] = s;
        for (d = 0; d + VW <= D; d += VW) store(yr + d, load(w + d) * as<X>(load(xr + d) * s));
        for (; d < D; d++) put(yr + d, get(w + d) * as<X>(get(xr + d) * s));
    }
}

// dx = rstd (g - x^ mean(g x^)) with g = dy weight and x^ = x rstd (float32, unrounded: autograd through
// model/norm.py passes the rounding straight through); dweight = sum over rows of dy round_x(x^), each
// thread's rows into its own float32 row of `part`, summed at the end.
template <typename X, typename W, typename Y>
void rms_norm_grad_rows(const Y *dy, int64_t dys, const X *x, int64_t xs, const W *w, const float *rstd, X *dx,
                        float *dw, float *part, int nt, int64_t rows, int64_t D) {
#pragma omp parallel num_threads(nt)
    {
        float *acc = part + omp_get_thread_num() * D;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const X *xr = x + r * xs;
            const Y *gr = dy + r * dys;
            X *o = dx + r * D;
            const float s = rstd[r];
            vf dot = {};
            int64_t d = 0;
            for (; d + VW <= D; d += VW) {
                const vf g = load(gr + d), xh = load(xr + d) * s;
                dot += g * load(w + d) * xh;
                stv(acc + d, ldv(acc + d) + g * as<X>(xh));
            }
            float sum = hsumv(dot);
            for (; d < D; d++) {
                const float g = get(gr + d), xh = get(xr + d) * s;
                sum += g * get(w + d) * xh;
                acc[d] += g * as<X>(xh);
            }
            const float c = sum / (float)D;
            for (d = 0; d + VW <= D; d += VW)
                store(o + d, s * (load(gr + d) * load(w + d) - load(xr + d) * s * c));
            for (; d < D; d++) put(o + d, s * (get(gr + d) * get(w + d) - get(xr + d) * s * c));
        }
    }
    for (int64_t d = 0; d < D; d++) {
        float t = 0;
        for (int i = 0; i < nt; i++) t += part[i * D + d];
        dw[d] = t;
    }
}

at::ScalarType norm_out_type(const at::Tensor &x, const at::Tensor &w) {
    return x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
}

void check_norm(const at::Tensor &x, const at::Tensor &w, const char *op) {
    check_float(x, op, "x", 2, "[rows, D]");
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == x.size(1) && w.device().is_cpu() && w.is_contiguous()
                          && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
                      op, ": weight must be a contiguous float32 or bfloat16 CPU vector [", x.size(1),
                      "] (x's width), got ", w.scalar_type(), " ", w.sizes(), ".");
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor &x, const at::Tensor &w, double eps) {
    check_norm(x, w, "rms_norm");
    const int64_t rows = x.size(0), D = x.size(1);
    at::Tensor y = at::empty({rows, D}, x.options().dtype(norm_out_type(x, w)));
    at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
    if (rows == 0 || D == 0) return {y, rstd.fill_(1.0f / sqrtf((float)eps))};
    with_type(x.scalar_type(), [&](auto xt) {
        using X = elem_t<decltype(xt)>;
        with_type(w.scalar_type(), [&](auto wt) {
            using W = elem_t<decltype(wt)>;
            using Y = std::conditional_t<std::is_same_v<X, uint16_t> && std::is_same_v<W, uint16_t>, uint16_t, float>;
            rms_norm_rows((const X *)x.const_data_ptr(), x.stride(0), (const W *)w.const_data_ptr(),
                          (Y *)y.mutable_data_ptr(), rstd.mutable_data_ptr<float>(), rows, D, (float)eps);
        });
    });
    return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor &dy, const at::Tensor &x, const at::Tensor &w,
                                                     const at::Tensor &rstd) {
    check_norm(x, w, "rms_norm_backward");
    const int64_t rows = x.size(0), D = x.size(1);
    check_float(dy, "rms_norm_backward", "dy", 2, "[rows, D]");
    TORCH_CHECK_VALUE(dy.sizes() == x.sizes() && dy.scalar_type() == norm_out_type(x, w),
                      "rms_norm_backward: dy must be ", norm_out_type(x, w), " ", x.sizes(), " like the forward's y, got ",
                      dy.scalar_type(), " ", dy.sizes(), ".");
    TORCH_CHECK_VALUE(rstd.dim() == 1 && rstd.size(0) == rows && rstd.scalar_type() == at::kFloat && rstd.is_contiguous(),
                      "rms_norm_backward: rstd must be the forward's contiguous float32 [", rows, "], got ",
                      rstd.scalar_type(), " ", rstd.sizes(), ".");
    at::Tensor dx = at::empty({rows, D}, x.options());
    at::Tensor dw = at::zeros({D}, x.options().dtype(at::kFloat));
    if (rows == 0 || D == 0) return {dx, dw};
    const int nt = threads_for(rows * D);
    // zeroed here, not by each thread: OpenMP may start fewer threads than asked (OMP_DYNAMIC,
    // OMP_THREAD_LIMIT, a call from inside another parallel region), and every row is summed
    at::Tensor part = at::zeros({nt, D}, x.options().dtype(at::kFloat));
    with_type(x.scalar_type(), [&](auto xt) {
        using X = elem_t<decltype(xt)>;
        with_type(w.scalar_type(), [&](auto wt) {
            using W = elem_t<decltype(wt)>;
            using Y = std::conditional_t<std::is_same_v<X, uint16_t> && std::is_same_v<W, uint16_t>, uint16_t, float>;
            rms_norm_grad_rows((const Y *)dy.const_data_ptr(), dy.stride(0), (const X *)x.const_data_ptr(), x.stride(0),
                               (const W *)w.const_data_ptr(), rstd.const_data_ptr<float>(), (X *)dx.mutable_data_ptr(),
                               dw.mutable_data_ptr<float>(), part.mutable_data_ptr<float>(), nt, rows, D);
        });
    });
    return {dx, dw};
}

// ------------------------------------------------------------------ RoPE
inline vf swap_pairs(vf v) {   // (x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...)
#if VW == 16
    return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
#else
    return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
#endif
}

// Per position: cc = (c0, c0, c1, c1, ...) and sn = (-s0, s0, -s1, s1, ...), so that a vector of pairs
// rotates as x cc + swap_pairs(x) sn; each head of the position reuses them.
template <typename T>
void rope_rows(const T *x, const int64_t *xs, const float *cos, const int64_t *cs, const float *sin,
               const int64_t *ss, T *out, int64_t B, int64_t Tn, int64_t H, int64_t R, bool inverse) {
    const float sign = inverse ? -1.0f : 1.0f;
#pragma omp parallel num_threads(threads_for(B * Tn * H * R))
    {
        std::vector<float> buf(2 * R);
        float *cc = buf.data(), *sn = cc + R;
#pragma omp for schedule(static)
        for (int64_t bt = 0; bt < B * Tn; bt++) {
            const int64_t b = bt / Tn, t = bt % Tn;
            const float *c = cos + b * cs[0] + t * cs[1], *s = sin + b * ss[0] + t * ss[1];
            for (int64_t i = 0; i < R / 2; i++) {
                cc[2 * i] = cc[2 * i + 1] = c[i];
                sn[2 * i] = -sign * s[i];
                sn[2 * i + 1] = sign * s[i];
            }
            for (int64_t h = 0; h < H; h++) {
                const T *xr = x + b * xs[0] + t * xs[1] + h * xs[2];
                T *o = out + (bt * H + h) * R;
                int64_t d = 0;
                for (; d + VW <= R; d += VW) {
                    const vf v = load(xr + d);
                    store(o + d, v * ldv(cc + d) + swap_pairs(v) * ldv(sn + d));
                }
                for (; d < R; d += 2) {
                    const float x0 = get(xr + d), x1 = get(xr + d + 1);
                    put(o + d, x0 * cc[d] + x1 * sn[d]);
                    put(o + d + 1, x1 * cc[d + 1] + x0 * sn[d + 1]);
                }
            }
        }
    }
}

at::Tensor rope(const at::Tensor &x, const at::Tensor &cos, const at::Tensor &sin, bool inverse) {
    check_float(x, "rope", "x", 4, "[B, T, H, R]");
    const int64_t B = x.size(0), Tn = x.size(1), H = x.size(2), R = x.size(3);
    TORCH_CHECK_VALUE(R % 2 == 0, "rope: x's last dimension holds pairs, so it must be even, got ", R, ".");
    for (const at::Tensor *t : {&cos, &sin})
        TORCH_CHECK_VALUE(t->dim() == 3 && t->sizes() == at::IntArrayRef({B, Tn, R / 2}) && t->device().is_cpu()
                              && t->scalar_type() == at::kFloat && (t->stride(2) == 1 || R / 2 <= 1),
                          "rope: cos and sin must be float32 CPU tensors [B, T, R/2] = [", B, ", ", Tn, ", ", R / 2,
                          "] with a contiguous last dimension, got ", t->scalar_type(), " ", t->sizes(), ".");
    at::Tensor out = at::empty({B, Tn, H, R}, x.options());
    if (out.numel() == 0) return out;
    const int64_t xs[3] = {x.stride(0), x.stride(1), x.stride(2)};
    const int64_t cs[2] = {cos.stride(0), cos.stride(1)}, ss[2] = {sin.stride(0), sin.stride(1)};
    with_type(x.scalar_type(), [&](auto xt) {
        using T = elem_t<decltype(xt)>;
        rope_rows((const T *)x.const_data_ptr(), xs, cos.const_data_ptr<float>(), cs, sin.const_data_ptr<float>(), ss,
                  (T *)out.mutable_data_ptr(), B, Tn, H, R, inverse);
    });
    return out;
}

// ------------------------------------------------------------------ MoE combine
// The inputs checked; -> each copy's row, -1 for a copy not in order (inv [N K]).
std::vector<int64_t> check_combine(const at::Tensor &y, const at::Tensor &order, const at::Tensor &w, const char *op) {
    check_float(y, op, "y", 2, "[M, D]");
    TORCH_CHECK_VALUE(w.dim() == 2 && w.device().is_cpu() && w.is_contiguous()
                          && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
                      op, ": weight must be a contiguous float32 or bfloat16 CPU tensor [N, K], got ", w.scalar_type(),
                      " ", w.sizes(), ".");
    const int64_t M = y.size(0), NK = w.numel();
    TORCH_CHECK_VALUE(order.dim() == 1 && order.size(0) == M && order.scalar_type() == at::kLong
                          && order.device().is_cpu() && order.is_contiguous(),
                      op, ": order must be a contiguous int64 CPU vector [M] = [", M, "] (one (token, k) slot per row of "
                      "y), got ", order.scalar_type(), " ", order.sizes(), ".");
    TORCH_CHECK_VALUE(M <= NK, op, ": ", M, " rows of y for ", w.size(0), " tokens x ", w.size(1),
                      " experts: at most one row per copy.");
    std::vector<int64_t> inv(NK, -1);
    const int64_t *o = order.const_data_ptr<int64_t>();
    for (int64_t m = 0; m < M; m++) {
        TORCH_CHECK_VALUE(0 <= o[m] && o[m] < NK && inv[o[m]] < 0, op, ": order[", m, "] = ", o[m],
                          o[m] < 0 || o[m] >= NK ? c10::str(" is outside [0, ", NK, ")")
                                                 : std::string(" repeats an earlier row's slot"),
                          ": order must name distinct (token, k) slots n K + k.");
        inv[o[m]] = m;
    }
    return inv;
}

template <typename T>
void combine_rows(const T *y, int64_t ys, const int64_t *inv, const float *w, T *out, int64_t N, int64_t K, int64_t D) {
#pragma omp parallel num_threads(threads_for(N * K * D))
    {
        std::vector<const T *> rows(K);
        std::vector<float> wk(K);
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            int64_t k = 0;
            for (int64_t j = 0; j < K; j++)
                if (inv[n * K + j] >= 0) { rows[k] = y + inv[n * K + j] * ys; wk[k++] = w[n * K + j]; }
            T *o = out + n * D;
            int64_t d = 0;
            for (; d + 2 * VW <= D; d += 2 * VW) {
                vf a0 = {}, a1 = {};
                for (int64_t j = 0; j < k; j++) { a0 += wk[j] * load(rows[j] + d); a1 += wk[j] * load(rows[j] + d + VW); }
                store(o + d, a0);
                store(o + d + VW, a1);
            }
            for (; d + VW <= D; d += VW) {
                vf a = {};
                for (int64_t j = 0; j < k; j++) a += wk[j] * load(rows[j] + d);
                store(o + d, a);
            }
            for (; d < D; d++) {
                float a = 0;
                for (int64_t j = 0; j < k; j++) a += wk[j] * get(rows[j] + d);
                put(o + d, a);
            }
        }
    }
}

// dy[m] = weight[n, k] dout[n] and dweight[n, k] = dout[n] . y[m], one pass over both rows.
template <typename T>
void combine_grad_rows(const T *dout, int64_t dos, const T *y, int64_t ys, const int64_t *order, const float *w, T *dy,
                       float *dw, int64_t M, int64_t K, int64_t D) {
#pragma omp parallel for num_threads(threads_for(M * D)) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const int64_t slot = order[m];
        const T *g = dout + slot / K * dos, *yr = y + m * ys;
        T *o = dy + m * D;
        const float wk = w[slot];
        vf dot = {};
        int64_t d = 0;
        for (; d + VW <= D; d += VW) {
            const vf v = load(g + d);
            store(o + d, wk * v);
            dot += v * load(yr + d);
        }
        float s = hsumv(dot);
        for (; d < D; d++) { put(o + d, wk * get(g + d)); s += get(g + d) * get(yr + d); }
        dw[slot] = s;
    }
}

at::Tensor moe_combine(const at::Tensor &y, const at::Tensor &order, const at::Tensor &w) {
    const std::vector<int64_t> inv = check_combine(y, order, w, "moe_combine");
    const int64_t N = w.size(0), K = w.size(1), D = y.size(1);
    at::Tensor out = at::empty({N, D}, y.options());
    if (out.numel() == 0) return out;
    const at::Tensor wf = w.to(at::kFloat);
    with_type(y.scalar_type(), [&](auto yt) {
        using T = elem_t<decltype(yt)>;
        combine_rows((const T *)y.const_data_ptr(), y.stride(0), inv.data(), wf.const_data_ptr<float>(),
                     (T *)out.mutable_data_ptr(), N, K, D);
    });
    return out;
}

std::tuple<at::Tensor, at::Tensor> moe_combine_backward(const at::Tensor &dout, const at::Tensor &y,
                                                        const at::Tensor &order, const at::Tensor &w) {
    check_combine(y, order, w, "moe_combine_backward");
    const int64_t M = y.size(0), D = y.size(1);
    check_float(dout, "moe_combine_backward", "dout", 2, "[N, D]");
    TORCH_CHECK_VALUE(dout.scalar_type() == y.scalar_type() && dout.sizes() == at::IntArrayRef({w.size(0), D}),
                      "moe_combine_backward: dout must be ", y.scalar_type(), " [", w.size(0), ", ", D,
                      "] like the forward's output, got ", dout.scalar_type(), " ", dout.sizes(), ".");
    at::Tensor dy = at::empty({M, D}, y.options());
    at::Tensor dw = at::zeros(w.sizes(), w.options().dtype(at::kFloat));
    if (M == 0) return {dy, dw};
    const at::Tensor wf = w.to(at::kFloat);
    with_type(y.scalar_type(), [&](auto yt) {
        using T = elem_t<decltype(yt)>;
        combine_grad_rows((const T *)dout.const_data_ptr(), dout.stride(0), (const T *)y.const_data_ptr(), y.stride(0),
                          order.const_data_ptr<int64_t>(), wf.const_data_ptr<float>(), (T *)dy.mutable_data_ptr(),
                          dw.mutable_data_ptr<float>(), M, w.size(1), D);
    });
    return {dy, dw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsv2, m) {
    m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
    m.def("rms_norm_backward(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
    m.def("rope(Tensor x, Tensor cos, Tensor sin, bool inverse=False) -> Tensor");
    m.def("moe_combine(Tensor y, Tensor order, Tensor weight) -> Tensor");
    m.def("moe_combine_backward(Tensor dout, Tensor y, Tensor order, Tensor weight) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dsv2, CPU, m) {
    m.impl("rms_norm", &rms_norm);
    m.impl("rms_norm_backward", &rms_norm_backward);
    m.impl("rope", &rope);
    m.impl("moe_combine", &moe_combine);
    m.impl("moe_combine_backward", &moe_combine_backward);
}
