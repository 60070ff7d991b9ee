"""The process layout: a 2-D DeviceMesh of data parallel x expert parallel, and launch helpers.

Every process is a data-parallel rank (it reads its own slice of the global batch). Expert
parallelism borrows EP of those ranks, as torchtitan does: the world of W processes is
viewed as a (dp, ep) mesh with W = dp * ep, row-major, so the EP group of a rank is EP
consecutive ranks. What is sharded over which dimension:

    mesh dim "dp" x "ep" flattened ("dp_all", W ranks)   FSDP2 for every non-expert parameter
    mesh dim "ep" (EP ranks)                             routed experts, Shard(0) on the expert axis
    mesh dim "dp" (W / EP ranks)                         FSDP2 again for the experts (what remains)

One EP rank is one "device" of the paper: it holds E / EP consecutive experts, so with
`n_group` = EP the device-limited routing bound M is the number of ranks a token reaches.

Run commands (the entry point is `dsv2 pretrain`, which calls `init_layout` first):

    torchrun --nproc-per-node 4 -m dsv2 pretrain --ep 2 ...                 # 1 machine, 4 processes
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 -m dsv2 pretrain --ep 8 ...          # on each of 2 machines
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class Layout:
    """Where this process sits. `mesh` is None when running as one plain process."""
    world: int
    rank: int
    dp: int
    ep: int
    device: torch.device
    mesh: DeviceMesh | None = None        # ("dp", "ep")
    flat: DeviceMesh | None = None        # "dp_all": the same ranks as one dimension

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def dp_all_mesh(self) -> DeviceMesh:
        """All W ranks as one data-parallel dimension (FSDP of the dense parameters)."""
        return self.flat

    @property
    def ep_group(self):
        return self.mesh["ep"].get_group()


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_layout(ep: int = 1, device: str | None = None) -> Layout:
    """Join the process group torchrun describes (env RANK/WORLD_SIZE/LOCAL_RANK) and build the mesh.

    Without torchrun's environment this returns a one-process layout and starts nothing, so
    the same code path runs `dsv2 pretrain` on a laptop.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if ep != 1:
            raise ValueError(f"--ep {ep} needs {ep} or more processes; launch with torchrun or `--nproc N`.")
        return Layout(world=1, rank=0, dp=1, ep=1, device=dev)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world % ep:
        raise ValueError(f"--ep {ep} must divide the number of processes ({world}); "
                         f"choose an EP size among {[d for d in range(1, world + 1) if world % d == 0]}.")
    if not dist.is_initialized():
        dist.init_process_group(backend_for(dev), device_id=dev if dev.type == "cuda" else None)
    mesh, flat = build_mesh(dev, world // ep, ep)
    return Layout(world=world, rank=rank, dp=world // ep, ep=ep, device=dev, mesh=mesh, flat=flat)


def build_mesh(device: torch.device, dp: int, ep: int) -> tuple[DeviceMesh, DeviceMesh]:
    """The (dp, ep) mesh and its flattened "dp_all" view (one DeviceMesh family, as FSDP2 wants)."""
    mesh = init_device_mesh(device.type, (dp, ep), mesh_dim_names=("dp", "ep"))
    return mesh, mesh["dp", "ep"]._flatten("dp_all")


def seed_rank(seed: int, rank: int, step: int = 0) -> None:
    """Per-rank random stream (dropout and anything else rank-local), after the weights are built.

    The weights are drawn with the same seed on every rank (identical before sharding);
    afterwards each rank draws differently. The stream depends only on (seed, rank, step), so a
    resumed run re-seeds it instead of restoring one rank's saved state onto all ranks.
    """
    torch.manual_seed(((seed * 1_000_003 + step) * 65_537 + rank + 1) % 2**63)


def log0(*args, layout: Layout | None = None, **kwargs) -> None:
    """print() on rank 0 only, so N processes do not print every line N times."""
    rank = layout.rank if layout is not None else (dist.get_rank() if dist.is_initialized() else 0)
    if rank == 0:
        print(*args, **kwargs, flush=True)
        sys.stdout.flush()


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_rank(code: int) -> None:
    """End a torchrun rank now, after its work and shutdown(): flush, then os._exit. At normal
    interpreter teardown a gloo worker thread can still be joinable, and its destructor aborts
    the process ("terminate called without an active exception", seen about once in 15 runs
    of the 4-rank dispatch test), which torchrun reports as a failed job."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
