"""A MoE layer's routed experts over rows sorted by expert, every way this machine has, same run:
dsv2's operators (`torch.ops.dsv2.experts_forward` / `experts_backward` / `experts_int8`, what
prefill and the trainer run on CPU) beside torch's grouped matmul (`torch._grouped_mm`, one call)
and the per-expert loop (model/moe.py's autograd Function: one matmul per expert, all threads each).

    .venv/bin/python bench/experts.py                      # small (512 and 1,024 tokens), V2-Lite (512)
    .venv/bin/python bench/experts.py --shapes 64x2048x1408x6x512 --dtypes bfloat16

A shape is E x D x I x K x N: E experts of hidden I over width D, each of N tokens routed to K of
them (uniformly at random: M = N K rows). Reported: ms per call (best of --repeat) and GFLOP/s, for
the forward and for forward + backward (the backward's input gradient included). bfloat16 +
autocast: float32 weights with bfloat16 rows, as the trainer's autocast step has them (the loop is
given weights cast first, and its gradients are cast back, as autocast does). int8: quant/int8.py's
rows with float32 activations, forward only, against the loop of int8 layers it replaced.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dsv2.bench.common import best_time, cpu_name
from dsv2.model.moe import _SwiGLUExperts

SHAPES = "16x512x256x4x512,16x512x256x4x1024,64x2048x1408x6x512"   # small's layers; V2-Lite's


def inputs(E, D, I, K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = N * K
    x = torch.randn(M, D, generator=g)
    w13 = torch.randn(E, 2 * I, D, generator=g) / D ** 0.5
    w2 = torch.randn(E, D, I, generator=g) / I ** 0.5
    counts = torch.randint(0, E, (M,), generator=g).bincount(minlength=E)
    return x, w13, w2, counts


def grouped(x, w13, w2, ends):
    offs = ends.to(torch.int32)
    gate, up = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    return torch._grouped_mm((F.silu(gate) * up).contiguous(), w2.transpose(1, 2), offs=offs)


def ways(x, w13, w2, counts, dtype: str) -> dict:
    """name -> (forward, forward + backward or None)."""
    ends = counts.cumsum(0)
    c = tuple(counts.tolist())
    if dtype == "int8":
        from dsv2.quant import int8
        q13, s13 = int8.quantize_rows(w13)
        q2, s2 = int8.quantize_rows(w2)
        rows = [(e, int(ends[e]) - n, int(ends[e])) for e, n in enumerate(c) if n]

        def loop():
            y = torch.empty_like(x)
            for e, a, b in rows:
                y[a:b] = int8.swiglu(x[a:b], q13[e], s13[e], q2[e], s2[e])
            return y
        return {"dsv2 experts_int8": (lambda: torch.ops.dsv2.experts_int8(x, q13, s13, q2, s2, ends), None),
                "loop of int8 layers": (loop, None)}
    autocast = dtype == "bfloat16+autocast"
    dt = torch.bfloat16 if dtype.startswith("bfloat16") else torch.float32
    xd = x.to(dt)
    wd = (w13, w2) if autocast else (w13.to(dt), w2.to(dt))
    dy = torch.randn_like(xd)
    leaves = [t.clone().requires_grad_() for t in (xd, *wd)]

    def ours_fb():
        y, h = torch.ops.dsv2.experts_forward(xd, *wd, ends, True)
        torch.ops.dsv2.experts_backward(dy, xd, *wd, h, ends, True)

    def loop_fb():
        xr, a, b = leaves
        if autocast:   # autocast's casts, and their gradients' casts back
            a, b = a.to(dt), b.to(dt)
        _SwiGLUExperts.apply(xr, a, b, c).backward(dy)

    out = {"dsv2 experts_forward/backward": (lambda: torch.ops.dsv2.experts_forward(xd, *wd, ends, False), ours_fb)}
    w_dt = [w.to(dt) for w in wd]
    if hasattr(torch, "_grouped_mm"):
        out["torch._grouped_mm"] = ((lambda: grouped(xd, *w_dt, ends)) if not autocast else
                                    (lambda: grouped(xd, *[w.to(dt) for w in wd], ends)), None)
    out["per-expert loop (model/moe.py)"] = ((lambda: _SwiGLUExperts.apply(xd, *w_dt, c)) if not autocast else
                                             (lambda: _SwiGLUExperts.apply(xd, *[w.to(dt) for w in wd], c)), loop_fb)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=SHAPES, help="comma list of ExDxIxKxN")
    p.add_argument("--dtypes", default="float32,bfloat16,bfloat16+autocast,int8")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from dsv2.native import available
    if not available(notice=False):
        raise SystemExit("dsv2's native operators are not available here (they need a C++ compiler and ninja).")
    print(f"CPU: {cpu_name()}, {args.threads} threads, torch {torch.__version__}")
    for shape in args.shapes.split(","):
        E, D, I, K, N = (int(v) for v in shape.split("x"))
        x, w13, w2, counts = inputs(E, D, I, K, N)
        flop = 2 * x.shape[0] * 3 * I * D
        print(f"\n{E} experts, D {D}, I {I}, {N} tokens x top-{K} = {x.shape[0]} rows "
              f"({flop / 1e9:.2f} GFLOP forward, x3 with the backward)")
        for dtype in args.dtypes.split(","):
            for name, (fwd, fb) in ways(x, w13, w2, counts, dtype).items():
                fwd()
                t_f = best_time(fwd, args.repeat)[0]
                line = f"  {dtype:18s} {name:32s} forward {t_f * 1e3:8.2f} ms {flop / t_f / 1e9:5.0f} GFLOP/s"
                if fb is not None:
                    fb()
                    t_b = best_time(fb, max(2, args.repeat // 2))[0]
                    line += f"   fwd+bwd {t_b * 1e3:8.2f} ms {3 * flop / t_b / 1e9:5.0f} GFLOP/s"
                print(line, flush=True)


if __name__ == "__main__":
    main()
