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

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .ffn import SwiGLU


@dataclass
class Routing:
    """The gate's decision for N tokens."""
    scores_NE: torch.Tensor   # softmax affinities s_{i,t}, float32
    idx_NK: torch.Tensor      # chosen experts
    weight_NK: torch.Tensor   # gate values g (after norm_topk_prob / routed_scaling_factor), float32


def expert_groups(n_experts: int, n_groups: int, device=None) -> torch.Tensor:
    """group_E: the group (device) of each routed expert. The one map between experts and groups:
    contiguous, equal-sized groups, so expert e is in group e // (N_r / D). The gate limits
    routing by it, the training rules count by it, and expert parallelism places experts by it
    (rank r holds one group's experts, a Shard(0) of the stacked weights)."""
    if n_groups <= 0 or n_experts % n_groups:
        raise ValueError(f"{n_experts} routed experts cannot be split evenly into {n_groups} groups: "
                         "choose a number of groups (devices) dividing n_routed_experts.")
    return torch.arange(n_experts, device=device) // (n_experts // n_groups)


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One routed expert on rows x: W2 (silu(W1 x) * W3 x), with w13 = [W1 ; W3] stacked; in x's
    dtype (the weights are cast to it where they differ)."""
    gate, up = F.linear(x, w13.to(x.dtype)).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2.to(x.dtype))


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
        group_E = expert_groups(self.n_experts, self.n_group, scores_NE.device)
        group_scores = scores_NE.new_full((N, self.n_group), float("-inf")).scatter_reduce_(
            1, group_E.expand(N, -1), scores_NE, "amax")
        top_groups = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        mask_NG = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        return mask_NG[:, group_E]

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

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on rows x, in x's dtype (the weights are cast to it where they differ)."""
        return swiglu(x, self.gate_up_proj[e], self.down_proj[e])

    def forward(self, x_MD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x_MD holds token copies sorted by expert; counts[e] rows belong to expert e.

        Under expert parallelism the weights are DTensors sharded on the expert axis, and x_MD
        holds the rows of this rank's experts: the local shards compute them (`to_local` is
        differentiable, so gradients land in the DTensors)."""
        w13, w2 = self.gate_up_proj, self.down_proj
        sharded = _is_dtensor(w13)
        if sharded:
            w13, w2 = w13.to_local(), w2.to_local()
        out = self._run(x_MD, w13, w2, counts)
        if sharded and x_MD.shape[0] == 0:
            # No rows reached this rank's experts. Keep the output attached to the input and the
            # weights anyway (a zero term), so this rank's backward runs the same nodes, and the
            # experts' gradient reduce-scatter fires at the same point, as on every other rank.
            out = out + 0.0 * (x_MD.sum() + w13.sum() + w2.sum())
        return out


    def _run(self, x_MD: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The experts over their sorted rows (native/experts.py overrides it on CPU)."""
        if torch.is_autocast_enabled(x_MD.device.type):  # a Function is not autocast: cast as F.linear would
            dt = torch.get_autocast_dtype(x_MD.device.type)
            x_MD, w13, w2 = x_MD.to(dt), w13.to(dt), w2.to(dt)
        return _SwiGLUExperts.apply(x_MD, w13, w2, tuple(counts))


def _is_dtensor(t: torch.Tensor) -> bool:
    # A DTensor exists only once its module is imported: importing it here would add ~0.4 s to
    # every start of a program that never shards anything.
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


class ExpertLoop(nn.Module):
    """Base of experts stored in another form (quantized stacks, dsv2.quant): they define
    `expert(e, x)`, and run one by one over the sorted rows."""

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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
    Weights in another dtype than x (bfloat16 weights, float32 activations at inference) are
    cast expert by expert.
    """

    @staticmethod
    def forward(ctx, x_MD, w13_E, w2_E, counts):
        I = w2_E.shape[-1]
        x_MD = x_MD.contiguous()
        h_M2I = x_MD.new_empty(x_MD.shape[0], 2 * I)
        y_MD = x_MD.new_empty(x_MD.shape)
        rows = expert_rows(counts)
        dt = x_MD.dtype
        for e, r in rows:
            torch.mm(x_MD[r], w13_E[e].to(dt).t(), out=h_M2I[r])
        a_MI = F.silu(h_M2I[:, :I]) * h_M2I[:, I:]
        for e, r in rows:
            torch.mm(a_MI[r], w2_E[e].to(dt).t(), out=y_MD[r])
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

    def drop(self, policy, route: Routing, shape: torch.Size) -> torch.Tensor:
        """A token-dropping policy's keep mask [N, K]; its domain is this process's tokens."""
        return policy(route, shape)

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


class MoEHooks:
    """What training adds to a MoE forward, handed in explicitly (`model(..., moe_hooks=...)`):
    `keep` gives the token-dropping mask [N, K] for a layer's routing (None keeps every copy),
    and `record` receives each layer's routing and mask, for the balance losses. The trainer's
    `train.moe_hooks.MoERules` implements both; inference passes none."""

    def keep(self, moe: "MoE", route: Routing, shape: torch.Size) -> torch.Tensor | None:
        return None

    def record(self, moe: "MoE", route: Routing, keep: torch.Tensor | None) -> None:
        pass


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.gate = Gate(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * n_shared) if n_shared else None
        self.dispatcher = LocalDispatcher()

    def forward(self, x_BTD: torch.Tensor, hooks: MoEHooks | None = None) -> torch.Tensor:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        route = self.gate(x_ND)
        keep = None
        if hooks is not None:
            keep = hooks.keep(self, route, x_BTD.shape) if self.training else None
            hooks.record(self, route, keep)
        x_MD, counts, state = self.dispatcher.dispatch(x_ND, route.idx_NK, self.n_experts, keep)
        y_MD = self.experts(x_MD, counts)
        out = self.dispatcher.combine(y_MD, state, route.weight_NK, x_ND.shape[0])
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_ND)
        return out.view_as(x_BTD)

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
