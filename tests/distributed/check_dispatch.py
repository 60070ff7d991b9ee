"""Worker for test_dispatch.py: the EP dispatcher under deliberately uneven routing.

    torchrun --standalone --nproc-per-node 4 tests/distributed/check_dispatch.py OUT_DIR

4 EP ranks, 8 experts (2 per rank). Each round gives every rank a routing designed to be
lopsided: rank 0 sends everything to rank 0's experts, rank 1 drops every copy (sends
nothing), rank 2 has no tokens at all, rank 3 routes at random; the roles rotate each
round, so every rank both receives nothing for some experts and receives from nobody.
Every rank's output and input gradient, and every expert's weight gradient, must equal a
single-process reference computed from all ranks' inputs (all-gathered).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from dsv2.distributed.expert_parallel import EPDispatcher, shard_experts
from dsv2.distributed.mesh import exit_rank, init_layout, shutdown
from dsv2.model.moe import GroupedExperts, LocalDispatcher

E, K, D, I = 8, 2, 16, 8


def routing(role: int, n: int, g: torch.Generator):
    """(idx_NK, keep_NK) for this round's role."""
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)]) if n else torch.zeros(0, K, dtype=torch.long)
    keep = torch.ones(n, K, dtype=torch.bool)
    if role == 0:
        idx = torch.stack([torch.tensor([0, 1])] * n)           # only rank 0's experts
    elif role == 1:
        keep[:] = False                                          # everything dropped: sends nothing
    return idx, keep


def main(out_dir: str) -> None:
    torch.set_default_dtype(torch.float64)
    layout = init_layout(ep=4)
    torch.manual_seed(0)
    full = GroupedExperts(E, D, I)
    torch.nn.init.normal_(full.gate_up_proj, std=0.3)
    torch.nn.init.normal_(full.down_proj, std=0.3)
    ep = GroupedExperts(E, D, I)
    ep.load_state_dict(full.state_dict())
    shard_experts(ep, layout.mesh["ep"])
    disp = EPDispatcher(layout.ep_group)
    g = torch.Generator().manual_seed(100 + layout.rank)
    for rnd in range(6):
        role = (layout.rank + rnd) % 4
        n = 0 if role == 2 else 5 + layout.rank
        idx, keep = routing(role, n, g)
        x = torch.randn(n, D, generator=g, requires_grad=True)
        w = torch.rand(n, K, generator=g)
        x_MD, counts, state = disp.dispatch(x, idx, E, keep)
        y = disp.combine(ep(x_MD, counts), state, w, n)
        (y * torch.arange(1.0, D + 1)).sum().backward()

        # reference: every rank's tokens on one process with all experts
        sizes = [None] * 4
        dist.all_gather_object(sizes, n)
        parts = [dist.all_gather_object(o := [None] * 4, t.detach()) or o for t in (x, idx, keep, w)]
        xs, idxs, keeps, ws = (torch.cat(p) for p in parts)
        xs.requires_grad_(True)
        full.zero_grad()
        ld = LocalDispatcher()
        r_MD, r_counts, r_state = ld.dispatch(xs, idxs, E, keeps)
        ry = ld.combine(full(r_MD, r_counts), r_state, ws, xs.shape[0])
        (ry * torch.arange(1.0, D + 1)).sum().backward()
        lo = sum(sizes[:layout.rank])
        torch.testing.assert_close(y, ry[lo:lo + n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad, xs.grad[lo:lo + n], rtol=1e-12, atol=1e-12)
        for name in ("gate_up_proj", "down_proj"):
            got = getattr(ep, name).grad.full_tensor()
            torch.testing.assert_close(got, getattr(full, name).grad, rtol=1e-12, atol=1e-12)
            getattr(ep, name).grad = None
        if layout.rank == 0:
            print(f"round {rnd}: rows per expert {r_counts}", flush=True)
    dist.barrier()
    if layout.rank == 0:
        open(f"{out_dir}/dispatch_ok", "w").write("ok\n")
    shutdown()
    exit_rank(0)


if __name__ == "__main__":
    main(sys.argv[1])
