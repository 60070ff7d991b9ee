// The fused decode step as PyTorch operators (torch.ops.dsv2.*): the model's tensors are checked
// here (shape, dtype, layout against the config numbers) and described to the kernels of
// decode.cpp, so a mismatch is a readable ValueError naming the tensor, never a wild read.
//
//   decode_step(weights, ints, floats, tokens, positions, kv_len, cache, ..., work, slots=None)
//       -> logits [B, vocab]; token b decodes in cache slot slots[b] (default b)
//   work_floats(weights, ints, floats, batch) -> floats of `work` a step of `batch` tokens needs
//   layout() -> the names of the weight slots (model-wide, then per layer) and of the numbers
//   quantize_rows_int8(w) -> (int8 rows, bf16 scales), as quant/int8.py's quantize_rows
//   int8_mm(x, q, scale) -> x [M, K] times int8 rows q [N, K] with the step's integer products
//   attention(q_nope, q_pe, k_nope, k_pe, v, mask, scale) -> MLA's naive attention, forward
//       (attention.cpp): [B, T, H, V]; attention_lse also returns each row's log-sum-exp [B, T, H],
//       which attention_backward takes (with dout and delta) -> the five inputs' gradients
//
// `weights` is one flat list: the model-wide slots, then each layer's; a matrix slot is followed
// by its int8 row scales (None for float weights). Python builds the list from layout(), so the
// order is written once, here.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "attention.h"
#include "decode.h"

namespace {

using Weights = c10::List<std::optional<at::Tensor>>;

#define GLOBAL_SLOTS(X) X(inv_freq) X(embed) X(embed_scale) X(head) X(head_scale) X(final_norm)
#define LAYER_SLOTS(X)                                                                         \
    X(in_norm) X(post_norm) X(q_a_norm) X(kv_a_norm) X(q_a) X(q_a_scale) X(q_b) X(q_b_scale)   \
    X(kv_a) X(kv_a_scale) X(kv_b) X(kv_b_scale) X(o) X(o_scale) X(w_ukt) X(w_ukt_scale)        \
    X(gate) X(gate_scale) X(up) X(up_scale) X(down) X(down_scale) X(router)                    \
    X(gu) X(gu_scale) X(dn) X(dn_scale)
#define INTS(X) X(n_layers) X(D) X(H) X(N) X(R) X(V) X(C) X(QR) X(I_moe) X(E) X(K) \
    X(n_group) X(topk_group) X(group_limited) X(norm_topk) X(vocab) X(fp8_bn) X(fp8_bk)
#define FLOATS(X) X(eps) X(scale) X(routed_scaling) X(rope_amp)

#define ENUM(n) n,
enum Global { GLOBAL_SLOTS(ENUM) N_GLOBAL };
enum Slot { LAYER_SLOTS(ENUM) N_SLOT };
enum Int { INTS(ENUM) N_INT };
enum Float { FLOATS(ENUM) N_FLOAT };
#undef ENUM
#define NAME(n) #n,
const std::vector<std::string> GLOBAL_NAMES = {GLOBAL_SLOTS(NAME)}, SLOT_NAMES = {LAYER_SLOTS(NAME)},
                               INT_NAMES = {INTS(NAME)}, FLOAT_NAMES = {FLOATS(NAME)};
#undef NAME

// The tensor in slot i of the flat list (undefined for None) and its name for messages.
struct Slots {
    const Weights &list;
    int64_t base;    // first index of this group (0: model-wide; else a layer's)
    int layer;       // -1: model-wide
    const std::vector<std::string> &names;
    at::Tensor at(int i) const {
        std::optional<at::Tensor> t = list.get(base + i);
        return t.has_value() ? *t : at::Tensor();
    }
    std::string name(int i) const {   // built only for messages
        return layer < 0 ? names[i] : "layers." + std::to_string(layer) + "." + names[i];
    }
};

int32_t type_of(const at::Tensor &t, const Slots &s, int i) {
    switch (t.scalar_type()) {
        case at::kFloat: return F32;
        case at::kBFloat16: return BF16;
        case at::kChar: return I8;
        case at::kFloat8_e4m3fn: return FP8;
        default: TORCH_CHECK_VALUE(false, "decode_step: ", s.name(i), " is ", t.scalar_type(),
                                   "; the fused step reads float32, bfloat16, int8 or float8_e4m3fn weights.");
    }
}

// Slot i as a [rows, cols] matrix (rows < 0: any), slot i + 1 its int8 row scales or float8 block
// scales. A float8 stack of `experts` matrices keeps each expert's blocks after the previous one's;
// with `split`, each matrix is two stacked ones (gate over up, the first `split` rows), blocked apart.
Mat matrix(const Slots &s, int i, int64_t rows, int64_t cols, const Model &md, int64_t experts = 1, int32_t split = 0) {
    at::Tensor w = s.at(i), sc = s.at(i + 1);
    TORCH_CHECK_VALUE(w.defined(), "decode_step: ", s.name(i), " is missing.");
    TORCH_CHECK_VALUE(w.device().is_cpu(), "decode_step: ", s.name(i), " is on ", w.device(), "; the fused step runs on CPU.");
    TORCH_CHECK_VALUE(w.dim() == 2 && (rows < 0 || w.size(0) == rows) && w.size(1) == cols, "decode_step: ", s.name(i),
                      " has shape ", w.sizes(), " but the config needs [", rows < 0 ? "any" : std::to_string(rows),
                      ", ", cols, "].");
    TORCH_CHECK_VALUE(w.stride(1) == 1 && w.stride(0) >= cols, "decode_step: ", s.name(i),
                      " must have contiguous rows (call .contiguous() on it).");
    Mat m{w.data_ptr(), nullptr, w.stride(0), type_of(w, s, i), (int32_t)w.size(0), (int32_t)cols, 0, 0, 0, 0};
    if (m.type == FP8) {
        TORCH_CHECK_VALUE(md.fp8_bn > 0 && md.fp8_bk > 0, "decode_step: ", s.name(i),
                          " is float8 but the config gives no block size (fp8_bn, fp8_bk).");
        m.bn = md.fp8_bn; m.bk = md.fp8_bk; m.nbk = (int32_t)((cols + m.bk - 1) / m.bk);
        const int64_t per = w.size(0) / experts;
        m.split = split;
        const int64_t blocks = split ? (split + m.bn - 1) / m.bn + (per - split + m.bn - 1) / m.bn : (per + m.bn - 1) / m.bn;
        TORCH_CHECK_VALUE(sc.defined() && sc.scalar_type() == at::kFloat && sc.is_contiguous() && sc.device().is_cpu()
                              && sc.numel() == experts * blocks * m.nbk,
                          "decode_step: float8 ", s.name(i), " needs ", experts * blocks * m.nbk,
                          " contiguous float32 block scales in ", s.name(i + 1), ".");
        m.scale = sc.const_data_ptr<float>();
    } else if (m.type == I8) {
        TORCH_CHECK_VALUE(sc.defined() && sc.scalar_type() == at::kFloat && sc.is_contiguous() && sc.device().is_cpu()
                              && sc.numel() == w.size(0),
                          "decode_step: int8 ", s.name(i), " needs ", w.size(0), " contiguous float32 row scales in ",
                          s.name(i + 1), ".");
        m.scale = sc.const_data_ptr<float>();
    } else {
        TORCH_CHECK_VALUE(!sc.defined(), "decode_step: ", s.name(i), " is ", w.scalar_type(), ", so ", s.name(i + 1),
                          " must be None (scales go with int8 and float8 weights only).");
    }
    return m;
}

// Slot i as n contiguous float32 numbers (a norm's weight, the router, inv_freq).
const float *floats(const Slots &s, int i, int64_t n) {
    at::Tensor t = s.at(i);
    TORCH_CHECK_VALUE(t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous()
                          && t.numel() == n,
                      "decode_step: ", s.name(i), " must be ", n, " contiguous float32 numbers on CPU, not ",
                      t.defined() ? c10::str(t.scalar_type(), " of shape ", t.sizes()) : std::string("missing"), ".");
    return t.const_data_ptr<float>();
}

// The model described from the flat weight list and the config numbers (weights' shapes checked).
struct Description {
    Model m{};
    std::vector<Layer> layers;
};

Description describe(const Weights &weights, at::IntArrayRef ints, at::ArrayRef<double> fl) {
    TORCH_CHECK_VALUE(ints.size() == N_INT && fl.size() == N_FLOAT, "decode_step: expected ", N_INT,
                      " config integers and ", N_FLOAT, " config floats (see torch.ops.dsv2.layout()), got ",
                      ints.size(), " and ", fl.size(), ".");
    Description d;
    Model &m = d.m;
#define SET(n) m.n = (int32_t)ints[n];
    INTS(SET)
#undef SET
#define SET(n) m.n = (float)fl[n];
    FLOATS(SET)
#undef SET
    TORCH_CHECK_VALUE(m.n_layers > 0 && m.D > 0 && m.H > 0 && m.C > 0 && m.R > 0 && m.R % 2 == 0 && m.vocab > 0,
                      "decode_step: the config needs positive sizes and an even rope dimension.");
    TORCH_CHECK_VALUE((int64_t)weights.size() == N_GLOBAL + (int64_t)m.n_layers * N_SLOT, "decode_step: ",
                      weights.size(), " weight slots for ", m.n_layers, " layers; expected ",
                      N_GLOBAL + (int64_t)m.n_layers * N_SLOT, " (see torch.ops.dsv2.layout()).");
    const int D = m.D, QK = m.N + m.R, CR = m.C + m.R;
    Slots g{weights, 0, -1, GLOBAL_NAMES};
    m.inv_freq = floats(g, inv_freq, m.R / 2);
    m.embed = matrix(g, embed, m.vocab, D, m);
    m.head = matrix(g, head, m.vocab, D, m);
    m.final_norm = floats(g, final_norm, D);
    // Per-thread scratch holds 4 widened rows of the widest matrix the step reads (cache rows too).
    int32_t max_cols = std::max(D, CR), I_max = std::max(1, m.I_moe);
    d.layers.resize(m.n_layers);
    for (int l = 0; l < m.n_layers; l++) {
        Layer &L = d.layers[l];
        L = Layer{};
        Slots s{weights, N_GLOBAL + (int64_t)l * N_SLOT, l, SLOT_NAMES};
        L.in_norm = floats(s, in_norm, D);
        L.post_norm = floats(s, post_norm, D);
        L.kv_a_norm = floats(s, kv_a_norm, m.C);
        if (s.at(q_a).defined()) {
            TORCH_CHECK_VALUE(m.QR > 0, "decode_step: ", s.name(q_a), " is given but the config's QR is 0.");
            L.q_a = matrix(s, q_a, m.QR, D, m);
            L.q_a_norm = floats(s, q_a_norm, m.QR);
        }
        L.q_b = matrix(s, q_b, (int64_t)m.H * QK, L.q_a.w ? m.QR : D, m);
        L.kv_a = matrix(s, kv_a, CR, D, m);
        L.kv_b = matrix(s, kv_b, (int64_t)m.H * (m.N + m.V), m.C, m);
        TORCH_CHECK_VALUE(L.kv_b.type != FP8, "decode_step: ", s.name(kv_b), " is float8; absorbed decoding reads it "
                          "per head, so keep it in the model's dtype (dequantize it when loading).");
        L.o = matrix(s, o, D, (int64_t)m.H * m.V, m);
        L.w_ukt = matrix(s, w_ukt, (int64_t)m.H * m.C, m.N, m);
        if (s.at(gate).defined()) {
            L.gate = matrix(s, gate, -1, D, m);
            L.up = matrix(s, up, L.gate.rows, D, m);
            L.down = matrix(s, down, D, L.gate.rows, m);
            I_max = std::max(I_max, L.gate.rows);
        }
        if (s.at(router).defined()) {
            TORCH_CHECK_VALUE(m.E > 0 && m.I_moe > 0 && 0 < m.K && m.K <= m.E && m.n_group > 0 && m.E % m.n_group == 0
                                  && 0 < m.topk_group && m.topk_group <= m.n_group,
                              "decode_step: ", s.name(router), " is given but the config's routing numbers (E ", m.E,
                              ", K ", m.K, ", groups ", m.n_group, " keeping ", m.topk_group, ") do not fit.");
            L.moe = 1;
            L.router = floats(s, router, (int64_t)m.E * D);
            L.gu = matrix(s, gu, (int64_t)m.E * 2 * m.I_moe, D, m, m.E, m.I_moe);
            L.dn = matrix(s, dn, (int64_t)m.E * D, m.I_moe, m, m.E);
        }
        for (const Mat *w : {&L.q_a, &L.q_b, &L.kv_a, &L.kv_b, &L.o, &L.w_ukt, &L.gate, &L.up, &L.down, &L.gu, &L.dn})
            max_cols = std::max(max_cols, w->cols);
    }
    m.max_cols = max_cols;
    m.I_max = I_max;
    m.layers = d.layers.data();
    return d;
}

int64_t work_floats(const Weights &weights, at::IntArrayRef ints, at::ArrayRef<double> fl, int64_t batch) {
    Description d = describe(weights, ints, fl);
    return dsv2_work_floats(&d.m, (int)batch, at::get_num_threads());
}

// Bytes of one cached position in each KV_ format (engine/cache.py writes the same layouts).
int64_t kv_row_bytes(int64_t format, int64_t C, int64_t R) {
    if (format == KV_FP8) return C + R;
    if (format == KV_I8) return (C + R + 3) / 4 * 4 + 4;
    return C / 2 + C / 16 + 2 * R;   // KV_MIX
}

at::Tensor decode_step(const Weights &weights, at::IntArrayRef ints, at::ArrayRef<double> fl, const at::Tensor &tokens_in,
                       const at::Tensor &positions_in, int64_t kv_len, at::TensorList cache, int64_t cache_format,
                       const std::optional<at::Tensor> &cache_scale, const at::Tensor &work,
                       const std::optional<at::Tensor> &slots_in) {
    Description d = describe(weights, ints, fl);
    Model &m = d.m;
    TORCH_CHECK_VALUE(!tokens_in.is_floating_point() && !positions_in.is_floating_point(),
                      "decode_step: tokens and positions must be integer tensors.");
    const at::Tensor tokens = tokens_in.reshape(-1).to(at::kLong).contiguous();
    const at::Tensor positions = positions_in.reshape(-1).to(at::kLong).contiguous();
    const int64_t B = positions.numel();
    TORCH_CHECK_VALUE(tokens.numel() == B, tokens.numel(), " tokens for ", B,
                      " positions: give one token per decoding slot.");
    TORCH_CHECK_VALUE((int64_t)cache.size() == m.n_layers, "this cache does not fit the model: it needs ", m.n_layers,
                      " contiguous CPU layers of [slots, max_len, ", m.C + m.R, "], not ", cache.size(), ".");
    const at::Tensor &c0 = cache[0];
    TORCH_CHECK_VALUE(cache_format == F32 || cache_format == BF16 || (cache_format >= KV_FP8 && cache_format <= KV_MIX),
                      "decode_step: unknown cache format ", cache_format, ".");
    const bool packed = cache_format >= KV_FP8;
    const int64_t row = packed ? kv_row_bytes(cache_format, m.C, m.R) : m.C + m.R;
    const at::ScalarType ctype = packed ? at::kByte : cache_format == F32 ? at::kFloat : at::kBFloat16;
    TORCH_CHECK_VALUE(cache_format != KV_MIX || m.C % 32 == 0, "decode_step: the 4-bit cache needs kv_lora_rank "
                      "to be a multiple of 32, not ", m.C, ".");
    for (const at::Tensor &c : cache)
        TORCH_CHECK_VALUE(c.dim() == 3 && c.size(2) == row && c.sizes() == c0.sizes() && c.is_contiguous()
                              && c.device().is_cpu() && c.scalar_type() == ctype,
                          "this cache does not fit the model: it needs ", m.n_layers, " contiguous CPU ", ctype,
                          " layers of [slots, max_len, ", row, "], not one of ", c.sizes(), " ", c.scalar_type(), ".");
    m.cache_scale = nullptr;
    if (cache_format == KV_FP8) {
        TORCH_CHECK_VALUE(cache_scale.has_value() && cache_scale->scalar_type() == at::kFloat && cache_scale->is_contiguous()
                              && cache_scale->numel() == m.n_layers && cache_scale->device().is_cpu(),
                          "decode_step: an fp8 cache needs ", m.n_layers, " float32 layer scales.");
        m.cache_scale = cache_scale->const_data_ptr<float>();
    }
    const int64_t slots = c0.size(0), max_len = c0.size(1);
    const int64_t *pos = positions.const_data_ptr<int64_t>(), *tok = tokens.const_data_ptr<int64_t>();
    bool fits = 0 < B && B <= slots && 0 < kv_len && kv_len <= max_len;
    for (int64_t b = 0; b < B && fits; b++) fits = 0 <= pos[b] && pos[b] < max_len;
    at::Tensor slot_ids;
    const int64_t *slot = nullptr;
    if (slots_in.has_value()) {   // each token's own slot: distinct slots in the cache
        TORCH_CHECK_VALUE(!slots_in->is_floating_point() && slots_in->numel() == B,
                          "decode_step: slots must be ", B, " integer slot indices, one per token.");
        slot_ids = slots_in->reshape(-1).to(at::kLong).contiguous();
        slot = slot_ids.const_data_ptr<int64_t>();
        std::vector<bool> seen(slots, false);
        bool ok = true;
        for (int64_t b = 0; b < B && ok; b++) {
            ok = 0 <= slot[b] && slot[b] < slots && !seen[slot[b]];
            if (ok) seen[slot[b]] = true;
        }
        TORCH_CHECK_VALUE(ok, "decode_step: slots ", at::IntArrayRef(slot, B), " must be distinct slots of a cache of ",
                          slots, ".");
    }
    TORCH_CHECK_VALUE(fits, "decode positions ", at::IntArrayRef(pos, B), " / length ", kv_len,
                      " do not fit a cache of ", slots, " slots x ", max_len, " positions.");
    for (int64_t b = 0; b < B; b++)
        TORCH_CHECK_VALUE(0 <= tok[b] && tok[b] < m.vocab, "token ids must be in [0, ", m.vocab, "), got ",
                          at::IntArrayRef(tok, B), ".");
    m.cache_type = (int32_t)cache_format;
    m.cache_row = (int32_t)row;
    const int threads = at::get_num_threads();
    const int64_t need = dsv2_work_floats(&m, (int)B, threads);
    TORCH_CHECK_VALUE(work.scalar_type() == at::kFloat && work.is_contiguous() && work.device().is_cpu()
                          && work.numel() >= need,
                      "decode_step: the work space must be a contiguous float32 CPU tensor of at least ", need,
                      " elements (torch.ops.dsv2.work_floats says how many).");
    std::vector<void *> layers;
    for (const at::Tensor &c : cache) layers.push_back(c.data_ptr());
    at::Tensor logits = at::empty({B, (int64_t)m.vocab}, tokens.options().dtype(at::kFloat));
    dsv2_decode(&m, (int)B, tok, pos, slot, (int)kv_len, layers.data(), c0.stride(0), logits.mutable_data_ptr<float>(),
                work.mutable_data_ptr<float>(), threads);
    return logits;
}

// int8 rows as quant/int8.py's quantize_rows rounds them, fused: per row s = bf16(max|w| / 127) and
// q = clamp(round_half_even(w / s), -127, 127), the division in float32. One read for the max and
// one for the codes, where the PyTorch ops make seven passes: loading V2-Lite rounds 15.7B weights.
template <typename T>
void quantize_rows_impl(const T *w, int8_t *q, c10::BFloat16 *scale, int64_t rows, int64_t cols) {
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; r++) {
            const T *x = w + r * cols;
            float amax = 0.f;
            for (int64_t k = 0; k < cols; k++) amax = std::max(amax, std::abs((float)x[k]));
            const c10::BFloat16 s = c10::BFloat16(std::max(amax / 127.f, 1e-12f));
            const float sf = (float)s;
            int8_t *out = q + r * cols;
            for (int64_t k = 0; k < cols; k++)
                out[k] = (int8_t)std::min(127.f, std::max(-127.f, std::nearbyint((float)x[k] / sf)));
            scale[r] = s;
        }
    });
}

std::tuple<at::Tensor, at::Tensor> quantize_rows_int8(const at::Tensor &w) {
    TORCH_CHECK_VALUE(w.dim() >= 1 && w.device().is_cpu(), "quantize_rows_int8: a CPU tensor of rows, got ",
                      w.sizes(), " on ", w.device(), ".");
    const at::Tensor x = w.contiguous();
    const int64_t cols = x.size(-1), rows = cols ? x.numel() / cols : 0;
    at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
    std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
    at::Tensor scale = at::empty(lead, x.options().dtype(at::kBFloat16));
    auto *qp = q.mutable_data_ptr<int8_t>();
    auto *sp = scale.mutable_data_ptr<c10::BFloat16>();
    switch (x.scalar_type()) {
        case at::kFloat: quantize_rows_impl(x.const_data_ptr<float>(), qp, sp, rows, cols); break;
        case at::kBFloat16: quantize_rows_impl(x.const_data_ptr<c10::BFloat16>(), qp, sp, rows, cols); break;
        case at::kHalf: quantize_rows_impl(x.const_data_ptr<c10::Half>(), qp, sp, rows, cols); break;
        default: TORCH_CHECK_VALUE(false, "quantize_rows_int8: float32, bfloat16 or float16 weights, got ",
                                   x.scalar_type(), ".");
    }
    return {q, scale};
}

// x [M, K] float32 times int8 rows q [N, K] and their float32 scales [N] -> [M, N] float32, with the
// decode step's integer products (x rounded to int16 per row): quant/int8.py's prefill path.
at::Tensor int8_mm(const at::Tensor &x, const at::Tensor &q, const at::Tensor &scale) {
    TORCH_CHECK_VALUE(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.stride(1) == 1,
                      "int8_mm: x must be a float32 CPU matrix with contiguous rows, got ", x.scalar_type(), " ",
                      x.sizes(), " on ", x.device(), ".");
    TORCH_CHECK_VALUE(q.dim() == 2 && q.scalar_type() == at::kChar && q.device().is_cpu() && q.stride(1) == 1
                          && q.size(1) == x.size(1),
                      "int8_mm: q must be int8 rows [N, ", x.size(1), "] with contiguous rows, got ", q.scalar_type(),
                      " ", q.sizes(), ".");
    TORCH_CHECK_VALUE(scale.dim() == 1 && scale.scalar_type() == at::kFloat && scale.is_contiguous()
                          && scale.size(0) == q.size(0),
                      "int8_mm: scale must be float32 [", q.size(0), "], got ", scale.scalar_type(), " ",
                      scale.sizes(), ".");
    const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
    at::Tensor y = at::empty({M, N}, x.options());
    if (M == 0 || N == 0) return y;
    at::Tensor work = at::empty({dsv2_int8_mm_work_floats((int)M, (int)K)}, x.options());
    const int rc = dsv2_int8_mm(x.const_data_ptr<float>(), x.stride(0), (int)M, q.const_data_ptr<int8_t>(), q.stride(0),
                                scale.const_data_ptr<float>(), (int)N, (int)K, y.mutable_data_ptr<float>(), N,
                                work.mutable_data_ptr<float>(), at::get_num_threads());
    TORCH_CHECK(rc == 0, "int8_mm: this build has no integer path (it needs AVX2).");
    return y;
}

// t as `dims` dimensions with a contiguous last one, its other strides into s.
void check_attn(const at::Tensor &t, const char *name, int dims, at::ScalarType type, const char *shape, int64_t *s) {
    TORCH_CHECK_VALUE(t.dim() == dims && t.device().is_cpu() && t.scalar_type() == type
                          && (t.stride(dims - 1) == 1 || t.size(dims - 1) <= 1),
                      "attention: ", name, " must be a ", type, " CPU tensor ", shape, " with a contiguous last "
                      "dimension, got ", t.scalar_type(), " ", t.sizes(), " on ", t.device(), ".");
    for (int i = 0; i < dims - 1; i++) s[i] = t.stride(i);
}

// The inputs checked and described (no output yet).
Attn describe_attn(const at::Tensor &q_nope, const at::Tensor &q_pe, const at::Tensor &k_nope, const at::Tensor &k_pe,
                   const at::Tensor &v, const std::optional<at::Tensor> &mask, double scale) {
    const at::ScalarType type = q_nope.scalar_type();
    TORCH_CHECK_VALUE(type == at::kFloat || type == at::kBFloat16,
                      "attention: the inputs must be float32 or bfloat16, got ", type, ".");
    Attn a = {};
    check_attn(q_nope, "q_nope", 4, type, "[B, T, H, N]", a.qn_s);
    const int64_t B = q_nope.size(0), T = q_nope.size(1), H = q_nope.size(2), N = q_nope.size(3);
    check_attn(q_pe, "q_pe", 4, type, "[B, T, H, R]", a.qr_s);
    const int64_t R = q_pe.size(3), S = k_pe.dim() == 3 ? k_pe.size(1) : -1, V = v.dim() == 4 ? v.size(3) : -1;
    check_attn(k_nope, "k_nope", 4, type, "[B, S, H, N]", a.kn_s);
    check_attn(k_pe, "k_pe", 3, type, "[B, S, R]", a.kr_s);
    check_attn(v, "v", 4, type, "[B, S, H, V]", a.v_s);
    TORCH_CHECK_VALUE(q_pe.sizes() == at::IntArrayRef({B, T, H, R}) && k_nope.sizes() == at::IntArrayRef({B, S, H, N})
                          && k_pe.sizes() == at::IntArrayRef({B, S, R}) && v.sizes() == at::IntArrayRef({B, S, H, V}),
                      "attention: shapes disagree: q_nope ", q_nope.sizes(), ", q_pe ", q_pe.sizes(), ", k_nope ",
                      k_nope.sizes(), ", k_pe ", k_pe.sizes(), ", v ", v.sizes(),
                      " (want [B, T, H, N], [B, T, H, R], [B, S, H, N], [B, S, R], [B, S, H, V]).");
    TORCH_CHECK_VALUE(V > 0 && N + R > 0, "attention: queries, keys and values need at least one column, got N + R = ",
                      N + R, " and V = ", V, ".");
    if (mask.has_value()) {
        check_attn(*mask, "mask", 3, at::kBool, "[B, T, S]", a.mask_s);
        TORCH_CHECK_VALUE(mask->sizes() == at::IntArrayRef({B, T, S}), "attention: mask must be [B, T, S] = [", B, ", ",
                          T, ", ", S, "], got ", mask->sizes(), ".");
        a.mask = (const uint8_t *)mask->const_data_ptr<bool>();
    } else {
        TORCH_CHECK_VALUE(T <= S, "attention: without a mask the ", T, " queries are the last of the ", S,
                          " keys, so there cannot be more queries than keys.");
    }
    a.B = (int32_t)B; a.T = (int32_t)T; a.S = (int32_t)S; a.H = (int32_t)H;
    a.N = (int32_t)N; a.R = (int32_t)R; a.V = (int32_t)V;
    a.type = type == at::kFloat ? F32 : BF16;
    a.qn = q_nope.const_data_ptr(); a.qr = q_pe.const_data_ptr();
    a.kn = k_nope.const_data_ptr(); a.kr = k_pe.const_data_ptr(); a.v = v.const_data_ptr();
    a.scale = (float)scale;
    return a;
}

// The forward -> out [B, T, H, V] in the inputs' dtype, and with_lse each row's log-sum-exp [B, T, H].
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor &q_nope, const at::Tensor &q_pe,
                                                     const at::Tensor &k_nope, const at::Tensor &k_pe,
                                                     const at::Tensor &v, const std::optional<at::Tensor> &mask,
                                                     double scale, bool with_lse) {
    Attn a = describe_attn(q_nope, q_pe, k_nope, k_pe, v, mask, scale);
    at::Tensor out = at::empty({a.B, a.T, a.H, a.V}, q_nope.options()), lse;
    if (with_lse) {
        lse = at::empty({a.B, a.T, a.H}, q_nope.options().dtype(at::kFloat));
        a.lse = lse.mutable_data_ptr<float>();
    }
    if (out.numel() == 0) return {out, lse};
    a.out = out.mutable_data_ptr();
    for (int i = 0; i < 3; i++) a.out_s[i] = out.stride(i);
    const int threads = at::get_num_threads();
    at::Tensor work = at::empty({dsv2_attention_work_floats(&a, threads)}, q_nope.options().dtype(at::kFloat));
    dsv2_attention(&a, work.mutable_data_ptr<float>(), threads);
    return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_lse(const at::Tensor &q_nope, const at::Tensor &q_pe,
                                                 const at::Tensor &k_nope, const at::Tensor &k_pe, const at::Tensor &v,
                                                 const std::optional<at::Tensor> &mask, double scale) {
    return attention_forward(q_nope, q_pe, k_nope, k_pe, v, mask, scale, true);
}

at::Tensor attention(const at::Tensor &q_nope, const at::Tensor &q_pe, const at::Tensor &k_nope, const at::Tensor &k_pe,
                     const at::Tensor &v, const std::optional<at::Tensor> &mask, double scale) {
    return std::get<0>(attention_forward(q_nope, q_pe, k_nope, k_pe, v, mask, scale, false));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_backward(const at::Tensor &dout, const at::Tensor &q_nope, const at::Tensor &q_pe, const at::Tensor &k_nope,
                   const at::Tensor &k_pe, const at::Tensor &v, const std::optional<at::Tensor> &mask,
                   const at::Tensor &lse, const at::Tensor &delta, double scale) {
    const Attn a = describe_attn(q_nope, q_pe, k_nope, k_pe, v, mask, scale);
    AttnGrad g = {};
    check_attn(dout, "dout", 4, q_nope.scalar_type(), "[B, T, H, V]", g.dout_s);
    TORCH_CHECK_VALUE(dout.sizes() == at::IntArrayRef({a.B, a.T, a.H, a.V}), "attention_backward: dout must be [",
                      a.B, ", ", a.T, ", ", a.H, ", ", a.V, "], got ", dout.sizes(), ".");
    for (const at::Tensor *t : {&lse, &delta})
        TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->is_contiguous()
                              && t->sizes() == at::IntArrayRef({a.B, a.T, a.H}),
                          "attention_backward: lse and delta must be contiguous float32 [B, T, H], got ",
                          t->scalar_type(), " ", t->sizes(), ".");
    const auto opt = q_nope.options();
    at::Tensor dqn = at::empty(q_nope.sizes(), opt), dqr = at::empty(q_pe.sizes(), opt);
    at::Tensor dkn = at::empty(k_nope.sizes(), opt), dkr = at::empty({a.B, a.S, a.H, a.R}, opt);
    at::Tensor dv = at::empty(v.sizes(), opt);
    if (a.B * a.H == 0 || a.S == 0) return {dqn.zero_(), dqr.zero_(), dkn.zero_(), dkr.zero_(), dv.zero_()};
    g.dout = dout.const_data_ptr();
    g.lse = lse.const_data_ptr<float>(); g.delta = delta.const_data_ptr<float>();
    g.dq_nope = dqn.mutable_data_ptr(); g.dq_pe = dqr.mutable_data_ptr(); g.dk_nope = dkn.mutable_data_ptr();
    g.dk_pe = dkr.mutable_data_ptr(); g.dv = dv.mutable_data_ptr();
    const int threads = at::get_num_threads();
    at::Tensor work = at::empty({dsv2_attention_backward_work_floats(&a, threads)}, opt.dtype(at::kFloat));
    dsv2_attention_backward(&a, &g, work.mutable_data_ptr<float>(), threads);
    return {dqn, dqr, dkn, dkr, dv};
}

std::tuple<std::vector<std::string>, std::vector<std::string>, std::vector<std::string>, std::vector<std::string>>
layout() {
    return {GLOBAL_NAMES, SLOT_NAMES, INT_NAMES, FLOAT_NAMES};
}

}  // namespace

TORCH_LIBRARY(dsv2, m) {
    m.def("decode_step(Tensor?[] weights, int[] ints, float[] floats, Tensor tokens, Tensor positions, int kv_len, "
          "Tensor(a!)[] cache, int cache_format, Tensor? cache_scale, Tensor(b!) work, Tensor? slots=None) -> Tensor");
    m.def("work_floats(Tensor?[] weights, int[] ints, float[] floats, int batch) -> int");
    m.def("layout() -> (str[], str[], str[], str[])", &layout);
    m.def("quantize_rows_int8(Tensor w) -> (Tensor, Tensor)");
    m.def("int8_mm(Tensor x, Tensor q, Tensor scale) -> Tensor");
    m.def("attention(Tensor q_nope, Tensor q_pe, Tensor k_nope, Tensor k_pe, Tensor v, Tensor? mask, float scale) "
          "-> Tensor");
    m.def("attention_lse(Tensor q_nope, Tensor q_pe, Tensor k_nope, Tensor k_pe, Tensor v, Tensor? mask, float scale) "
          "-> (Tensor, Tensor)");
    m.def("attention_backward(Tensor dout, Tensor q_nope, Tensor q_pe, Tensor k_nope, Tensor k_pe, Tensor v, "
          "Tensor? mask, Tensor lse, Tensor delta, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dsv2, CPU, m) {
    m.impl("decode_step", &decode_step);
    m.impl("quantize_rows_int8", &quantize_rows_int8);
    m.impl("int8_mm", &int8_mm);
    m.impl("attention", &attention);
    m.impl("attention_lse", &attention_lse);
    m.impl("attention_backward", &attention_backward);
}

TORCH_LIBRARY_IMPL(dsv2, CompositeExplicitAutograd, m) {
    m.impl("work_floats", &work_floats);
}
