/* The routed experts of a MoE layer over rows sorted by expert, forward and backward: prefill,
 * scoring and training.
 *
 * y = W2_e (silu(W1_e x) * W3_e x) for the rows [ends[e-1], ends[e]) of each expert e. One GEMM
 * per expert through all the cores was slow at these sizes: `small`'s 16 experts get ~128 rows
 * each from a 512-token prompt, and torch's bfloat16 matmul ran them at ~300 GFLOP/s against
 * ~430 for one GEMM of the same total size on this project's 2-core machines (each call split a
 * small product across the cores and repacked its weights). Here the experts are shared out
 * between the threads, each running its experts' products whole (at::mm_out inside a parallel
 * region runs on the calling thread: oneDNN for bfloat16, MKL for float32), and the SwiGLU between
 * them is applied by the same thread while the expert's rows are still in its cache. An expert with
 * more than a thread's share of the rows runs alone first, its products across all the threads.
 *
 * The elementwise parts round where PyTorch's bfloat16 ops round (each op's result), so a bfloat16
 * model computes what the per-expert loop of model/moe.py computes, up to the order of the sums.
 * Weights of the other float dtype than x (autocast's float32 weights for bfloat16 rows, or a
 * bfloat16 model prefilled in float32) are converted expert by expert by the thread that uses
 * them, and weight gradients are returned in the weights' dtype. experts_int8 runs int8 rows
 * (quant/int8.py) the same way, through decode.cpp's integer products.
 *
 * Shapes: x [M, D] (M rows sorted by expert), W13 [E, 2I, D] (W1 ; W3), W2 [E, D, I], ends [E]
 * (int64, cumulative row counts), h [M, 2I] (x W13_e^T: kept by the forward for the backward). */
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "decode.h"
#include "simd.h"

namespace {

/* ------------------------------------------------------------------ the SwiGLU, elementwise */
static inline vf load(const float *p) { return ldv(p); }
static inline vf load(const c10::BFloat16 *p) { return ldv_bf16((const uint16_t *)p); }
static inline void store(float *p, vf x) { stv(p, x); }
static inline void store(c10::BFloat16 *p, vf x) { stv_bf16((uint16_t *)p, x); }
/* x as the type T would hold it (a bfloat16 op's rounded result). */
template <typename T> static inline vf held(vf x) { return x; }
template <> inline vf held<c10::BFloat16>(vf x) { return round_bf16(x); }

static inline vf sigmoid(vf g) {   /* 1 / (1 + e^-g) from e^-|g| <= 1: no overflow either side */
    vf t = exp_neg(g < 0 ? g : -g), one = (vf){} + 1.0f;
    return g < 0 ? t / (one + t) : one / (one + t);
}

/* Runs f(j, n) over the columns [0, cols) in vectors of VW, n < VW for the last. */
template <typename F> static inline void columns(int64_t cols, F f) {
    int64_t j = 0;
    for (; j + VW <= cols; j += VW) f(j, VW);
    if (j < cols) f(j, (int)(cols - j));
}
template <typename T> static inline vf load_n(const T *p, int n) {
    if (n == VW) return load(p);
    T tmp[VW] = {};
    memcpy(tmp, p, n * sizeof(T));
    return load(tmp);
}
template <typename T> static inline void store_n(T *p, vf x, int n) {
    if (n == VW) return store(p, x);
    T tmp[VW];
    store(tmp, x);
    memcpy(p, tmp, n * sizeof(T));
}

/* a = silu(gate) * up for rows of h = [gate | up] (ld 2I) into a (ld I). */
template <typename T> static void swiglu_rows(const T *h, T *a, int64_t r0, int64_t r1, int64_t I) {
    for (int64_t r = r0; r < r1; r++) {
        const T *g = h + r * 2 * I, *u = g + I;
        T *out = a + r * I;
        columns(I, [&](int64_t j, int n) {
            vf x = load_n(g + j, n);
            vf s = held<T>(x * sigmoid(x));
            store_n(out + j, s * load_n(u + j, n), n);
        });
    }
}

/* The SwiGLU's backward for rows, given da (the gradient at a): dh = [d gate | d up] (ld 2I), and a
 * itself recomputed (the down projection's weight gradient needs it). As model/moe.py's backward:
 * d gate = silu'(gate) (da * up), d up = da * silu(gate), each product rounded. */
template <typename T>
static void swiglu_backward_rows(const T *h, const T *da, T *dh, T *a, int64_t r0, int64_t r1, int64_t I) {
    for (int64_t r = r0; r < r1; r++) {
        const T *g = h + r * 2 * I, *u = g + I, *d = da + r * I;
        T *dg = dh + r * 2 * I, *du = dg + I, *ar = a + r * I;
        columns(I, [&](int64_t j, int n) {
            vf x = load_n(g + j, n), up = load_n(u + j, n), dv = load_n(d + j, n);
            vf sg = sigmoid(x), s = held<T>(x * sg);
            store_n(ar + j, s * up, n);
            vf t = held<T>(dv * up);
            store_n(dg + j, t * (sg * (1.0f + x * (1.0f - sg))), n);
            store_n(du + j, dv * s, n);
        });
    }
}

/* ------------------------------------------------------------------ one expert's work */
struct Job {
    int64_t e, r0, r1;   /* expert, its rows */
};

/* Rows [r0, r1) of 2-D t. */
static inline at::Tensor rows_of(const at::Tensor &t, const Job &j) { return t.narrow(0, j.r0, j.r1 - j.r0); }

/* Expert e's weights in x's dtype: as they are, or (float32 weights under bfloat16 autocast) rounded
 * here, by the thread that uses them, in place of a cast of the whole stack before the call. */
static inline at::Tensor weight(const at::Tensor &w, int64_t e, at::ScalarType type) {
    return w.scalar_type() == type ? w[e] : w[e].to(type);
}

/* out (= g[e], in the weights' dtype) = a^T b, through a product in a's dtype where they differ. */
static inline void weight_grad(at::Tensor out, const at::Tensor &a, const at::Tensor &b) {
    if (out.scalar_type() == a.scalar_type()) {
        at::mm_out(out, a.t(), b);
    } else {
        out.copy_(at::mm(a.t(), b));
    }
}

template <typename T>
static void forward_one(const Job &j, const at::Tensor &x, const at::Tensor &w13, const at::Tensor &w2, at::Tensor &h,
                        at::Tensor &a, at::Tensor &y) {
    at::Tensor hj = rows_of(h, j), aj = rows_of(a, j), yj = rows_of(y, j);
    at::mm_out(hj, rows_of(x, j), weight(w13, j.e, x.scalar_type()).t());
    const int64_t I = w2.size(2);
    const T *hp = hj.const_data_ptr<T>();
    T *ap = aj.mutable_data_ptr<T>();
    // across the threads for an expert run alone; on the calling thread inside the shared loop
    at::parallel_for(0, j.r1 - j.r0, 16, [&](int64_t r0, int64_t r1) { swiglu_rows<T>(hp, ap, r0, r1, I); });
    at::mm_out(yj, aj, weight(w2, j.e, x.scalar_type()).t());
}

struct Grads {
    at::Tensor dx, g13, g2;
};

template <typename T>
static void backward_one(const Job &j, const at::Tensor &dy, const at::Tensor &x, const at::Tensor &w13,
                         const at::Tensor &w2, const at::Tensor &h, at::Tensor &da, at::Tensor &a, at::Tensor &dh,
                         Grads &g) {
    at::Tensor dyj = rows_of(dy, j), daj = rows_of(da, j), aj = rows_of(a, j), dhj = rows_of(dh, j);
    const int64_t I = w2.size(2);
    at::mm_out(daj, dyj, weight(w2, j.e, x.scalar_type()));
    const T *hp = rows_of(h, j).const_data_ptr<T>(), *dap = daj.const_data_ptr<T>();
    T *dhp = dhj.mutable_data_ptr<T>(), *ap = aj.mutable_data_ptr<T>();
    at::parallel_for(0, j.r1 - j.r0, 16, [&](int64_t r0, int64_t r1) {
        swiglu_backward_rows<T>(hp, dap, dhp, ap, r0, r1, I);
    });
    weight_grad(g.g2[j.e], dyj, aj);
    weight_grad(g.g13[j.e], dhj, rows_of(x, j));
    if (g.dx.defined()) {
        at::Tensor dxj = rows_of(g.dx, j);
        at::mm_out(dxj, dhj, weight(w13, j.e, x.scalar_type()));
    }
}

/* Every expert with rows, split into those run one at a time across all threads (more than a
 * thread's share of the rows, and enough rows to split) and the rest, largest first, to be shared
 * out between the threads. */
static void plan(const at::Tensor &ends, int64_t M, int threads, std::vector<Job> &alone, std::vector<Job> &shared) {
    const int64_t *end = ends.const_data_ptr<int64_t>();
    int64_t start = 0;
    for (int64_t e = 0; e < ends.numel(); e++) {
        const int64_t n = end[e] - start;
        if (n > 0) ((threads > 1 && n * threads > M && n >= 256) ? alone : shared).push_back({e, start, end[e]});
        start = end[e];
    }
    std::stable_sort(shared.begin(), shared.end(), [](const Job &a, const Job &b) { return a.r1 - a.r0 > b.r1 - b.r0; });
}

template <typename F> static void run(const std::vector<Job> &alone, const std::vector<Job> &shared, int threads, F f) {
    // The products below are plain kernels on plain buffers: no autograd, on any thread (grad
    // mode and the dispatcher's excluded keys are per thread, and the pool's threads have neither).
    at::AutoDispatchBelowADInplaceOrView below;
    for (const Job &j : alone) f(j);
    if (shared.empty()) return;
    if (threads <= 1 || shared.size() == 1) {
        for (const Job &j : shared) f(j);
        return;
    }
    std::exception_ptr error;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (size_t i = 0; i < shared.size(); i++) {
        try {
            at::AutoDispatchBelowADInplaceOrView below_here;
            f(shared[i]);
        } catch (...) {
#pragma omp critical
            error = std::current_exception();
        }
    }
    if (error) std::rethrow_exception(error);
}

/* ------------------------------------------------------------------ the operators */
// Shapes, layout and ends; the dtypes are each operator's own to check.
void check_shapes(const char *op, const at::Tensor &x, const at::Tensor &w13, const at::Tensor &w2,
                  const at::Tensor &ends) {
    TORCH_CHECK_VALUE(x.dim() == 2 && w13.dim() == 3 && w2.dim() == 3, op, ": want x [M, D], w13 [E, 2I, D], "
                      "w2 [E, D, I], got ", x.sizes(), ", ", w13.sizes(), ", ", w2.sizes(), ".");
    const int64_t E = w13.size(0), D = x.size(1), I = w2.size(2);
    TORCH_CHECK_VALUE(w13.sizes() == at::IntArrayRef({E, 2 * I, D}) && w2.sizes() == at::IntArrayRef({E, D, I}),
                      op, ": w13 must be [E, 2I, D] = [", E, ", ", 2 * I, ", ", D, "] and w2 [E, D, I] = [", E, ", ",
                      D, ", ", I, "], got ", w13.sizes(), " and ", w2.sizes(), ".");
    for (const at::Tensor *t : {&x, &w13, &w2})
        TORCH_CHECK_VALUE(t->device().is_cpu() && t->is_contiguous(), op, ": x, w13 and w2 must be contiguous CPU "
                          "tensors.");
    TORCH_CHECK_VALUE(ends.scalar_type() == at::kLong && ends.dim() == 1 && ends.numel() == E && ends.device().is_cpu()
                          && ends.is_contiguous(),
                      op, ": ends must be a contiguous CPU int64 tensor of the ", E, " experts' cumulative row "
                      "counts, got ", ends.scalar_type(), " ", ends.sizes(), ".");
    const int64_t *end = ends.const_data_ptr<int64_t>();
    for (int64_t e = 0, prev = 0; e < E; prev = end[e++])
        TORCH_CHECK_VALUE(end[e] >= prev && end[e] <= x.size(0), op, ": ends must rise from 0 to at most M = ",
                          x.size(0), ", got ", ends, ".");
}

void check(const at::Tensor &x, const at::Tensor &w13, const at::Tensor &w2, const at::Tensor &ends) {
    const auto type = x.scalar_type();
    TORCH_CHECK_VALUE(type == at::kFloat || type == at::kBFloat16,
                      "experts: x must be float32 or bfloat16, got ", type, ".");
    const auto wtype = w13.scalar_type();
    TORCH_CHECK_VALUE(w2.scalar_type() == wtype && (wtype == at::kFloat || wtype == at::kBFloat16),
                      "experts: w13 and w2 must be float32 or bfloat16 (either for either x: autocast's float32 "
                      "weights for bfloat16 x, or a bfloat16 model's prefill in float32), got ", w13.scalar_type(),
                      ", ", w2.scalar_type(), ".");
    check_shapes("experts", x, w13, w2, ends);
}

// Rows past the last expert's (the model sends none there) get zeros.
void zero_past_last(at::Tensor &t, const at::Tensor &ends) {
    const int64_t last = ends.numel() ? ends.const_data_ptr<int64_t>()[ends.numel() - 1] : 0;
    if (last < t.size(0)) t.narrow(0, last, t.size(0) - last).zero_();
}

// -> y [M, D], and h [M, 2I] when keep (the backward's input), else an empty tensor.
std::tuple<at::Tensor, at::Tensor> experts_forward(const at::Tensor &x, const at::Tensor &w13, const at::Tensor &w2,
                                                   const at::Tensor &ends, bool keep) {
    check(x, w13, w2, ends);
    const int64_t M = x.size(0), I = w2.size(2);
    at::Tensor h = at::empty({M, 2 * I}, x.options()), a = at::empty({M, I}, x.options());
    at::Tensor y = at::empty_like(x);
    zero_past_last(y, ends);
    if (keep) zero_past_last(h, ends);   // never read, but a returned tensor holds no stale memory
    const int threads = at::get_num_threads();
    std::vector<Job> alone, shared;
    plan(ends, M, threads, alone, shared);
    AT_DISPATCH_SWITCH(x.scalar_type(), "experts_forward",
        AT_DISPATCH_CASE(at::kFloat, [&] { run(alone, shared, threads, [&](const Job &j) {
            forward_one<float>(j, x, w13, w2, h, a, y); }); })
        AT_DISPATCH_CASE(at::kBFloat16, [&] { run(alone, shared, threads, [&](const Job &j) {
            forward_one<c10::BFloat16>(j, x, w13, w2, h, a, y); }); }));
    return {y, keep ? h : at::empty({0}, x.options())};
}

// -> dx [M, D] (empty unless need_dx), dW13 [E, 2I, D], dW2 [E, D, I]: zero for experts without rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor> experts_backward(const at::Tensor &dy, const at::Tensor &x,
                                                                const at::Tensor &w13, const at::Tensor &w2,
                                                                const at::Tensor &h, const at::Tensor &ends,
                                                                bool need_dx) {
    check(x, w13, w2, ends);
    const int64_t M = x.size(0), I = w2.size(2);
    TORCH_CHECK_VALUE(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.is_contiguous()
                          && dy.device().is_cpu(),
                      "experts_backward: dy must be contiguous ", x.scalar_type(), " ", x.sizes(), ", got ",
                      dy.scalar_type(), " ", dy.sizes(), ".");
    TORCH_CHECK_VALUE(h.sizes() == at::IntArrayRef({M, 2 * I}) && h.scalar_type() == x.scalar_type() && h.is_contiguous()
                          && h.device().is_cpu(),
                      "experts_backward: h must be the forward's kept [M, 2I] = [", M, ", ", 2 * I, "], got ",
                      h.sizes(), ".");
    Grads g;
    g.g13 = at::empty_like(w13);
    g.g2 = at::empty_like(w2);
    const int64_t *end = ends.const_data_ptr<int64_t>();
    for (int64_t e = 0, prev = 0; e < ends.numel(); prev = end[e++])
        if (end[e] == prev) {   // an expert without rows: no gradient
            g.g13[e].zero_();
            g.g2[e].zero_();
        }
    if (need_dx) {
        g.dx = at::empty_like(x);
        zero_past_last(g.dx, ends);
    }
    at::Tensor da = at::empty({M, I}, x.options()), a = at::empty({M, I}, x.options()), dh = at::empty({M, 2 * I}, x.options());
    const int threads = at::get_num_threads();
    std::vector<Job> alone, shared;
    plan(ends, M, threads, alone, shared);
    AT_DISPATCH_SWITCH(x.scalar_type(), "experts_backward",
        AT_DISPATCH_CASE(at::kFloat, [&] { run(alone, shared, threads, [&](const Job &j) {
            backward_one<float>(j, dy, x, w13, w2, h, da, a, dh, g); }); })
        AT_DISPATCH_CASE(at::kBFloat16, [&] { run(alone, shared, threads, [&](const Job &j) {
            backward_one<c10::BFloat16>(j, dy, x, w13, w2, h, da, a, dh, g); }); }));
    return {need_dx ? g.dx : at::empty({0}, x.options()), g.g13, g.g2};
}

/* int8 experts (quant/int8.py: int8 rows, one scale per row) on float32 rows, through the int8
 * layers' integer products (decode.cpp's dsv2_int8_mm, on the calling thread). */
struct Int8Experts {
    const float *x;
    const int8_t *q13, *q2;
    const float *s13, *s2;   // [E, 2I], [E, D]
    int64_t D, I;
};

static void int8_forward_one(const Job &j, const Int8Experts &w, float *h, float *a, float *y, int threads) {
    const int64_t D = w.D, I = w.I, rows = j.r1 - j.r0;
    std::vector<float> work(dsv2_int8_mm_work_floats((int)rows, (int)std::max(D, I)));
    float *hj = h + j.r0 * 2 * I, *aj = a + j.r0 * I;
    int rc = dsv2_int8_mm(w.x + j.r0 * D, D, (int)rows, w.q13 + j.e * 2 * I * D, D, w.s13 + j.e * 2 * I, (int)(2 * I),
                          (int)D, hj, 2 * I, work.data(), threads);
    TORCH_CHECK(rc == 0, "experts_int8: this build has no integer path (it needs AVX2).");
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) { swiglu_rows<float>(hj, aj, r0, r1, I); });
    dsv2_int8_mm(aj, I, (int)rows, w.q2 + j.e * D * I, I, w.s2 + j.e * D, (int)D, (int)I, y + j.r0 * D, D, work.data(),
                 threads);
}

// x [M, D] float32; q13 [E, 2I, D] and q2 [E, D, I] int8 with their row scales s13 [E, 2I] and
// s2 [E, D] (any float dtype) -> y [M, D] float32.
at::Tensor experts_int8(const at::Tensor &x, const at::Tensor &q13, const at::Tensor &s13, const at::Tensor &q2,
                        const at::Tensor &s2, const at::Tensor &ends) {
    TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && q13.scalar_type() == at::kChar && q2.scalar_type() == at::kChar,
                      "experts_int8: want float32 x and int8 q13 and q2, got ", x.scalar_type(), ", ",
                      q13.scalar_type(), ", ", q2.scalar_type(), ".");
    check_shapes("experts_int8", x, q13, q2, ends);
    const int64_t E = q13.size(0), M = x.size(0), D = x.size(1), I = q2.size(2);
    TORCH_CHECK_VALUE(s13.sizes() == at::IntArrayRef({E, 2 * I}) && s2.sizes() == at::IntArrayRef({E, D})
                          && s13.device().is_cpu() && s2.device().is_cpu(),
                      "experts_int8: the row scales must be CPU tensors s13 [E, 2I] = [", E, ", ", 2 * I,
                      "] and s2 [E, D] = [", E, ", ", D, "], got ", s13.sizes(), " and ", s2.sizes(), ".");
    const at::Tensor s13f = s13.to(at::kFloat).contiguous(), s2f = s2.to(at::kFloat).contiguous();
    at::Tensor h = at::empty({M, 2 * I}, x.options()), a = at::empty({M, I}, x.options()), y = at::empty_like(x);
    zero_past_last(y, ends);
    const Int8Experts w = {x.const_data_ptr<float>(), q13.const_data_ptr<int8_t>(), q2.const_data_ptr<int8_t>(),
                           s13f.const_data_ptr<float>(), s2f.const_data_ptr<float>(), D, I};
    const int threads = at::get_num_threads();
    std::vector<Job> alone, shared;
    plan(ends, M, threads, alone, shared);
    float *hp = h.mutable_data_ptr<float>(), *ap = a.mutable_data_ptr<float>(), *yp = y.mutable_data_ptr<float>();
    for (const Job &j : alone) int8_forward_one(j, w, hp, ap, yp, threads);
    if (shared.size() == 1) {   // one expert with rows (a short prompt): its products across the threads
        int8_forward_one(shared[0], w, hp, ap, yp, threads);
        return y;
    }
    run({}, shared, threads, [&](const Job &j) { int8_forward_one(j, w, hp, ap, yp, 1); });
    return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsv2, m) {
    m.def("experts_forward(Tensor x, Tensor w13, Tensor w2, Tensor ends, bool keep) -> (Tensor, Tensor)");
    m.def("experts_backward(Tensor dy, Tensor x, Tensor w13, Tensor w2, Tensor h, Tensor ends, bool need_dx) "
          "-> (Tensor, Tensor, Tensor)");
    m.def("experts_int8(Tensor x, Tensor q13, Tensor s13, Tensor q2, Tensor s2, Tensor ends) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv2, CPU, m) {
    m.impl("experts_forward", &experts_forward);
    m.impl("experts_backward", &experts_backward);
    m.impl("experts_int8", &experts_int8);
}
