"""Expert parallelism: experts sharded over the EP ranks, tokens moved with all_to_all_single.

Applied from outside the model: `apply_expert_parallel` swaps each MoE layer's dispatcher
for an `EPDispatcher` and turns the stacked expert weights into DTensors sharded on the expert
axis over the "ep" mesh dimension (the experts' forward computes on their local shards,
`to_local()`). The dispatcher also runs the trainer's token-dropping policy over the EP
group's tokens, so that its capacity is the capacity of the ranks that receive them.

One MoE layer, seen from one rank (R = EP ranks, E experts, El = E / R on each rank):

    route -> sort kept copies by global expert              (LocalDispatcher.dispatch)
          -> all_to_all_single of the per-expert counts     (each rank learns what it receives)
          -> all_to_all_single of the token rows            (uneven splits, zero allowed)
          -> regroup received rows by local expert          (source-major -> expert-major)
          -> grouped experts on the local El experts
          -> the inverse: regroup, all_to_all_single back, weight and scatter-add

Every rank calls both collectives in every MoE layer even when it sends or receives no
rows, so empty experts and empty ranks never desynchronise the group. The token rows go
through the autograd-aware functional all_to_all, so the backward pass is the mirrored
exchange. A copy is sent only if it is kept: dropped copies cost no communication.

Shape legend: N local tokens, K experts per token, D hidden, E global experts,
El experts on this rank, R EP ranks, S rows sent, V rows received.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from ..model.moe import DispatchState, GroupedExperts, LocalDispatcher, MoE, Routing


# torch >= 2.10 names it all_gather_single; older releases only have all_gather_into_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class EPState:
    local: DispatchState          # the sender-side sort (which token each sent row came from)
    expert_major_V: torch.Tensor  # permutation: received (source, expert) order -> (expert, source) order
    send_R: list[int]             # rows sent to each EP rank
    recv_R: list[int]             # rows received from each EP rank


class EPDispatcher:
    """The MoE dispatcher for one EP group: permute, exchange, (experts), exchange back, combine."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.ranks = dist.get_world_size(group)
        self.local = LocalDispatcher()
        self._domain: EPDropDomain | None = None

    def drop(self, policy, route: Routing, shape: torch.Size) -> torch.Tensor:
        """A token-dropping policy's keep mask [N, K], over the EP group's tokens (EPDropDomain):
        capacity belongs to the receiving rank, which receives from the whole group."""
        if self._domain is None or self._domain.policy is not policy:
            self._domain = EPDropDomain(policy, self.group)
        return self._domain(route, shape)

    def dispatch(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, n_experts: int,
                 keep_NK: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int], EPState]:
        R, El = self.ranks, n_experts // self.ranks
        x_SD, counts_E, local_state = self.local.dispatch(x_ND, idx_NK, n_experts, keep_NK)
        # Experts on rank r are [r*El, (r+1)*El), so rows sorted by global expert are already
        # grouped by destination rank; first tell every rank how many rows of each expert come.
        send_E = torch.tensor(counts_E, dtype=torch.int64, device=x_ND.device)
        recv_RE = torch.empty_like(send_E)
        dist.all_to_all_single(recv_RE, send_E, group=self.group)
        recv_RE = recv_RE.view(R, El)
        send_R = send_E.view(R, El).sum(1).tolist()
        recv_R = recv_RE.sum(1).tolist()
        x_VD = all_to_all_single_autograd(x_SD.contiguous(), recv_R, send_R, self.group)
        # Received rows come source-major ((r, e) blocks in r order); experts want them expert-major.
        seg_V = torch.repeat_interleave(torch.arange(R * El, device=x_ND.device), recv_RE.flatten())
        expert_major_V = ((seg_V % El) * R + seg_V // El).argsort(stable=True)
        counts_El = recv_RE.sum(0).tolist()
        return x_VD[expert_major_V], counts_El, EPState(local_state, expert_major_V, send_R, recv_R)

    def combine(self, y_VD: torch.Tensor, state: EPState, weight_NK: torch.Tensor, n_tokens: int) -> torch.Tensor:
        y_source_major = torch.empty_like(y_VD).index_copy(0, state.expert_major_V, y_VD)
        y_SD = all_to_all_single_autograd(y_source_major, state.send_R, state.recv_R, self.group)
        return self.local.combine(y_SD, state.local, weight_NK, n_tokens)


def shard_experts(experts: GroupedExperts, ep_mesh: DeviceMesh) -> None:
    """Make every stacked expert weight a DTensor, Shard(0) (the expert axis) over `ep_mesh`: rank r
    holds group r's experts in `model.moe.expert_groups`' map."""
    n_experts = experts.gate_up_proj.shape[0]
    if n_experts % ep_mesh.size():
        raise ValueError(f"EP size {ep_mesh.size()} must divide the number of routed experts ({n_experts}).")
    # Every rank built the same full tensor (or a meta one), so each keeps its own slice: no
    # communication, and it works on the meta device before materialisation.
    rank, size = ep_mesh.get_local_rank(), ep_mesh.size()
    for name, p in list(experts.named_parameters(recurse=False)):
        local = p.data.chunk(size, dim=0)[rank].clone()
        dt = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=p.shape, stride=p.stride())
        experts.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))


class EPDropDomain:
    """Runs a token-dropping policy on whole drop domains, which may span the ranks of an EP group.

    Capacity belongs to the receiving rank, and a rank receives from every rank of its EP
    group, so lowest-affinity-first dropping needs the routing of every sequence in the
    domain, not only this rank's. A drop domain is `domain_seqs` consecutive sequences of
    the global batch (default: the EP group's whole batch). When a domain fits inside this
    rank's batch the policy runs locally; otherwise the routing (N x E affinities, small next
    to the token rows) is all-gathered over the EP group, every rank evaluates the same
    policy, and each keeps its own rows. One process with the same domain size
    (`in_domains`) therefore drops exactly the same copies as any DP x EP layout.
    """

    def __init__(self, policy, group: dist.ProcessGroup, domain_seqs: int | None = None):
        self.policy, self.group, self.domain_seqs = policy, group, domain_seqs
        self.ranks, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        out = t.new_empty((self.ranks * t.shape[0],) + tuple(t.shape[1:]))
        _all_gather(out, t.detach().contiguous(), group=self.group)
        return out

    def __call__(self, route: Routing, shape: torch.Size) -> torch.Tensor:
        seqs = self.domain_seqs or shape[0] * self.ranks
        if shape[0] % seqs == 0:
            return in_domains(self.policy, seqs)(route, shape)
        if (shape[0] * self.ranks) % seqs or seqs % shape[0]:
            raise ValueError(f"a drop domain of {seqs} sequences must divide the EP group's batch "
                             f"({self.ranks} x {shape[0]}) or this rank's batch ({shape[0]}); change --drop-domain.")
        group_route = Routing(self._gather(route.scores_NE), self._gather(route.idx_NK), self._gather(route.weight_NK))
        group_shape = torch.Size((shape[0] * self.ranks,) + tuple(shape[1:]))
        # A policy may carry per-sequence state for the current micro-batch (the trainer's
        # DropPolicy.protect_B: sequences never dropped); it must cover the group's sequences too.
        local_state = getattr(self.policy, "protect_B", None)
        if isinstance(local_state, torch.Tensor) and local_state.shape[0] == shape[0]:
            self.policy.protect_B = self._gather(local_state.to(route.idx_NK.device, torch.int64)).to(local_state.dtype)
        try:
            keep = in_domains(self.policy, seqs)(group_route, group_shape)
        finally:
            if isinstance(local_state, torch.Tensor):
                self.policy.protect_B = local_state
        n = route.idx_NK.shape[0]
        return keep[self.rank * n:(self.rank + 1) * n]


def in_domains(policy, domain_seqs: int | None):
    """Apply `policy` separately to each run of `domain_seqs` consecutive sequences of the batch."""
    if policy is None or domain_seqs is None:
        return policy

    def chunked(route: Routing, shape: torch.Size) -> torch.Tensor:
        B = shape[0]
        if B % domain_seqs:
            raise ValueError(f"a batch of {B} sequences does not split into drop domains of {domain_seqs}; "
                             f"change --drop-domain.")
        if B == domain_seqs:
            return policy(route, shape)
        n = route.idx_NK.shape[0] * domain_seqs // B
        sub = torch.Size((domain_seqs,) + tuple(shape[1:]))
        return torch.cat([policy(Routing(route.scores_NE[i:i + n], route.idx_NK[i:i + n], route.weight_NK[i:i + n]),
                                 sub) for i in range(0, route.idx_NK.shape[0], n)])
    return chunked


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's routed experts over `ep_mesh` and route tokens with all_to_all."""
    group = ep_mesh.get_group()
    for moe in moe_layers(model):
        shard_experts(moe.experts, ep_mesh)
        moe.dispatcher = EPDispatcher(group)
