"""DeepSeekMoE: shared experts plus fine-grained routed experts, stored stacked.

    h' = u + sum_{N_s shared} FFN^(s)(u) + sum_i g_i FFN_i^(r)(u),   g_i = s_i if i in TopK(s, K_r)
    s  = softmax(u^T e)                                            (the gate, kept in float32)

Routing methods (`topk_method`):
- greedy: plain top-K_r over all N_r experts.
- group_limited_greedy (device-limited routing): experts are split into D = n_group
  groups; pick the M = topk_group groups with the highest max affinity, then top-K_r
  among their experts only. A token then reaches at most M devices.

The routed computation is route -> permute (sort token copies by expert) -> grouped
matmuls on contiguous per-expert slices -> unpermute and weight. The permutation lives in
a `Dispatcher`, so expert parallelism replaces it with one that does an all-to-all between
permute and experts, and token dropping is a `keep` mask given to it: neither needs this
file rewritten. `reference_forward` is the plain loop over experts with masks over all
tokens, kept only to test the fast path against.

Shape legend: N tokens (B*T flattened), D hidden, E routed experts, K experts per token,
I expert hidden, M routed token copies after permutation (<= N*K).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .ffn import SwiGLU
from .precision import widen


# Up to this many routed token copies (N x K) take MoE._forward_padded at inference; beyond,
# padding waste outgrows the saving in calls and the sorted per-expert path is used.
PADDED_MAX_COPIES = 512
# ... and only while the padded rows (E x the busiest expert's count) are at most this many
# times the real copies: with many experts and few tokens (DeepSeek-V2's 160 experts at a small
# decode batch) padding would read every expert's weights for the few that were chosen.
PADDED_MAX_WASTE = 3


@dataclass
class Routing:
    """The gate's decision for N tokens."""
    scores_NE: torch.Tensor   # softmax affinities s_{i,t}, float32
    idx_NK: torch.Tensor      # chosen experts
    weight_NK: torch.Tensor   # gate values g (after norm_topk_prob / routed_scaling_factor), float32


class Gate(nn.Module):
    """The router: expert centroids e_i, softmax affinities, (device-limited) top-K."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.method = cfg.topk_method
        self.n_group = cfg.n_group or 1
        self.topk_group = cfg.topk_group or 1
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))

    def group_mask(self, scores_NE: torch.Tensor) -> torch.Tensor:
        """[N, E] bool: experts inside the M groups with the highest max affinity."""
        N = scores_NE.shape[0]
        group_scores = scores_NE.view(N, self.n_group, -1).amax(dim=-1)
        top_groups = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        mask_NG = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        return mask_NG.repeat_interleave(self.n_experts // self.n_group, dim=1)

    def forward(self, x_ND: torch.Tensor) -> Routing:
        with torch.autocast(x_ND.device.type, enabled=False):  # bf16 autocast would round the affinities
            scores = F.linear(x_ND.float(), self.weight.float()).softmax(dim=-1)
        masked = scores
        if self.method == "group_limited_greedy":
            masked = scores.masked_fill(~self.group_mask(scores), 0.0)
        weight, idx = masked.topk(self.top_k, dim=-1, sorted=False)
        # As in the released DeepSeek-V2 modeling code: either renormalise the top-K weights
        # to sum to 1, or scale them by routed_scaling_factor (never both).
        if self.top_k > 1 and self.norm_topk_prob:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weight = weight * self.scaling
        return Routing(scores, idx, weight)


class GroupedExperts(nn.Module):
    """N_r SwiGLU experts stacked: gate_up_proj [E, 2I, D] (W1 ; W3), down_proj [E, D, I] (W2)."""

    stacked_bmm = True   # MoE._forward_padded may run all experts as one bmm over the stacked weights

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on rows x, in x's dtype (the weights are cast to it where they differ)."""
        gate, up = F.linear(x, self.gate_up_proj[e].to(x.dtype)).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e].to(x.dtype))

    def forward(self, x_MD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x_MD holds token copies sorted by expert; counts[e] rows belong to expert e."""
        w13, w2 = self.gate_up_proj, self.down_proj
        if widen(x_MD):  # bfloat16 on a CPU without bf16 arithmetic: each used expert in float32
            y_MD = torch.empty(x_MD.shape, dtype=torch.float32, device=x_MD.device)
            for e, r in expert_rows(counts):
                y_MD[r] = self.expert(e, x_MD[r].float())
            return y_MD.to(x_MD.dtype)
        if torch.is_autocast_enabled(x_MD.device.type):  # a Function is not autocast: cast as F.linear would
            dt = torch.get_autocast_dtype(x_MD.device.type)
            x_MD, w13, w2 = x_MD.to(dt), w13.to(dt), w2.to(dt)
        return _SwiGLUExperts.apply(x_MD, w13, w2, tuple(counts))


class ExpertLoop(GroupedExperts):
    """Experts stored in another form (quantized stacks, dsv2.quant), run one by one through
    `expert(e, x)`: the padded all-experts bmm would widen every expert per step."""

    stacked_bmm = False

    def forward(self, x_MD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        y_MD = torch.empty_like(x_MD)
        for e, rows in expert_rows(counts):
            y_MD[rows] = self.expert(e, x_MD[rows])
        return y_MD


class _SwiGLUExperts(torch.autograd.Function):
    """y = W2_e (silu(W1_e x) * W3_e x) over each expert's contiguous rows, with its own backward.

    Autograd over a per-expert loop would unbind the stacked weights (backward stacks E
    gradients), chunk each [.., 2I] output (backward concatenates) and concatenate the outputs
    (backward splits): about a third of a MoE layer's training step on CPU went to those copies.
    Here every per-expert matmul writes into one preallocated buffer, the elementwise SwiGLU
    runs once over all rows, and each weight gradient lands directly in its [E, ...] slot.
    Only x and the first matmul's output are kept for backward; the activation is recomputed.
    """

    @staticmethod
    def forward(ctx, x_MD, w13_E, w2_E, counts):
        I = w2_E.shape[-1]
        x_MD = x_MD.contiguous()
        h_M2I = x_MD.new_empty(x_MD.shape[0], 2 * I)
        y_MD = x_MD.new_empty(x_MD.shape)
        rows = expert_rows(counts)
        for e, r in rows:
            torch.mm(x_MD[r], w13_E[e].t(), out=h_M2I[r])
        a_MI = F.silu(h_M2I[:, :I]) * h_M2I[:, I:]
        for e, r in rows:
            torch.mm(a_MI[r], w2_E[e].t(), out=y_MD[r])
        ctx.save_for_backward(x_MD, w13_E, w2_E, h_M2I)
        ctx.rows = rows
        return y_MD

    @staticmethod
    def backward(ctx, dy_MD):
        x_MD, w13_E, w2_E, h_M2I = ctx.saved_tensors
        rows, I = ctx.rows, w2_E.shape[-1]
        dy_MD = dy_MD.contiguous()
        gate, up = h_M2I[:, :I], h_M2I[:, I:]
        silu = F.silu(gate)
        a_MI = silu * up
        g13 = torch.zeros_like(w13_E) if len(rows) < w13_E.shape[0] else torch.empty_like(w13_E)
        g2 = torch.zeros_like(w2_E) if len(rows) < w2_E.shape[0] else torch.empty_like(w2_E)
        da_MI = a_MI.new_empty(a_MI.shape)
        for e, r in rows:
            torch.mm(dy_MD[r], w2_E[e], out=da_MI[r])
            torch.mm(dy_MD[r].t(), a_MI[r], out=g2[e])
        dh_M2I = h_M2I.new_empty(h_M2I.shape)  # [d gate | d up]
        torch.ops.aten.silu_backward.grad_input(da_MI * up, gate, grad_input=dh_M2I[:, :I])
        torch.mul(da_MI, silu, out=dh_M2I[:, I:])
        dx_MD = x_MD.new_empty(x_MD.shape) if ctx.needs_input_grad[0] else None
        for e, r in rows:
            torch.mm(dh_M2I[r].t(), x_MD[r], out=g13[e])
            if dx_MD is not None:
                torch.mm(dh_M2I[r], w13_E[e], out=dx_MD[r])
        return dx_MD, g13, g2, None


def expert_rows(counts) -> list[tuple[int, slice]]:
    """(expert, its row slice) for every expert that received rows."""
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append((e, slice(start, start + n)))
        start += n
    return out


@dataclass
class DispatchState:
    order_M: torch.Tensor     # flat (token, k) slots in expert order, dropped ones excluded
    token_M: torch.Tensor     # token index of each sorted row


class LocalDispatcher:
    """Permutes token copies so each expert's rows are contiguous, and back (one process)."""

    def dispatch(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, n_experts: int,
                 keep_NK: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int], DispatchState]:
        flat = idx_NK.flatten()
        if keep_NK is not None:  # dropped copies get expert id E and sort to the end
            flat = torch.where(keep_NK.flatten(), flat, n_experts)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=n_experts + 1)[:n_experts].tolist()
        order = order[: sum(counts)]
        token = order // idx_NK.shape[1]
        return x_ND.index_select(0, token), counts, DispatchState(order, token)   # ~4x faster than x_ND[token] on CPU

    def combine(self, y_MD: torch.Tensor, state: DispatchState, weight_NK: torch.Tensor,
                n_tokens: int) -> torch.Tensor:
        if state.order_M.shape[0] == weight_NK.numel():
            # Nothing dropped: `order` is a permutation of the N*K copies, so put each row back
            # in (token, k) order and weight-sum over k as one bmm; on CPU this is several times
            # cheaper than index_add_ (which parallelises badly at decode sizes), and 1.45x
            # cheaper than weighting, then summing, as two passes (3000 tokens).
            K = weight_NK.shape[-1]
            y_NKD = torch.empty_like(y_MD).index_copy_(0, state.order_M, y_MD).view(n_tokens, K, y_MD.shape[-1])
            return torch.bmm(weight_NK.to(y_MD.dtype).view(n_tokens, 1, K), y_NKD)[:, 0]
        w = weight_NK.flatten()[state.order_M].to(y_MD.dtype)
        out = y_MD.new_zeros(n_tokens, y_MD.shape[-1])
        return out.index_add_(0, state.token_M, y_MD * w[:, None])


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.gate = Gate(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * n_shared) if n_shared else None
        self.dispatcher = LocalDispatcher()
        # Hooks set from outside the model (training): a token-dropping policy
        # (routing, batch shape) -> keep mask [N, K], and routing capture for balance losses.
        self.drop_policy: Callable[[Routing, torch.Size], torch.Tensor] | None = None
        self.record_routing = False
        self.last_routing: Routing | None = None
        self.last_keep: torch.Tensor | None = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        route = self.gate(x_ND)
        keep = self.drop_policy(route, x_BTD.shape) if (self.training and self.drop_policy) else None
        if self.record_routing:
            self.last_routing, self.last_keep = route, keep
        local = keep is None and isinstance(self.dispatcher, LocalDispatcher) and not torch.is_grad_enabled()
        out = None
        if local and x_ND.shape[0] == 1:
            out = self._forward_one_token(x_ND, route)
        elif local and self.experts.stacked_bmm and x_ND.shape[0] * self.gate.top_k <= PADDED_MAX_COPIES:
            out = self._forward_padded(x_ND, route)  # None where padding would waste too much
        if out is None:
            x_MD, counts, state = self.dispatcher.dispatch(x_ND, route.idx_NK, self.n_experts, keep)
            y_MD = self.experts(x_MD, counts)
            out = self.dispatcher.combine(y_MD, state, route.weight_NK, x_ND.shape[0])
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_ND)
        return out.view_as(x_BTD)

    def _forward_one_token(self, x_1D: torch.Tensor, route: Routing) -> torch.Tensor:
        """Decode at batch 1: run the K chosen experts directly on weight views (no permutation,
        no scatter); reading their ids on the host costs nothing on CPU."""
        out = None
        for e, w in zip(route.idx_NK[0].tolist(), route.weight_NK[0].tolist()):
            y = self.experts.expert(e, x_1D)
            out = y.mul_(w) if out is None else out.add_(y, alpha=w)
        return out

    def _forward_padded(self, x_ND: torch.Tensor, route: Routing) -> torch.Tensor | None:
        """Inference on a few tokens (batched decode): each expert's copies padded to the largest
        expert's count C, so all experts run as two bmm calls instead of 2 x E small matmuls,
        whose per-call cost dominates at a handful of rows each. None (use the sorted path) when
        the E x C padded rows exceed PADDED_MAX_WASTE x the real copies."""
        N, D = x_ND.shape
        flat_M = route.idx_NK.flatten()
        counts_E = torch.bincount(flat_M, minlength=self.n_experts)
        C = int(counts_E.max())
        if self.n_experts * C > PADDED_MAX_WASTE * flat_M.numel():
            return None
        order_M = flat_M.argsort(stable=True)
        expert_M = flat_M[order_M]
        row_M = torch.arange(order_M.shape[0], device=x_ND.device) - (counts_E.cumsum(0) - counts_E)[expert_M]
        dt = torch.float32 if widen(x_ND) else x_ND.dtype   # precision.py: bf16 on a CPU without bf16 arithmetic
        x_ECD = x_ND.new_zeros(self.n_experts, C, D, dtype=dt)
        x_ECD[expert_M, row_M] = x_ND[order_M // route.idx_NK.shape[1]].to(dt)
        gate, up = torch.bmm(x_ECD, self.experts.gate_up_proj.to(dt).transpose(1, 2)).chunk(2, dim=-1)
        y_ECD = torch.bmm(F.silu(gate) * up, self.experts.down_proj.to(dt).transpose(1, 2)).to(x_ND.dtype)
        y_MD = y_ECD[expert_M, row_M] * route.weight_NK.flatten()[order_M].to(x_ND.dtype)[:, None]
        out_MD = torch.empty_like(y_MD).index_copy_(0, order_M, y_MD)
        return out_MD.view(N, -1, D).sum(dim=1)

    def reference_forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The plain loop over every expert with a mask over every token (tests only)."""
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        route = self.gate(x_ND)
        out = torch.zeros_like(x_ND)
        for e in range(self.n_experts):
            hit_NK = route.idx_NK == e
            w_N = (route.weight_NK * hit_NK).sum(-1).to(x_ND.dtype)
            out = out + self.experts.expert(e, x_ND) * w_N[:, None]
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_ND)
        return out.view_as(x_BTD)
