"""MLA's naive attention (prefill, scoring), every way this machine has, same run: dsv2's operator
(`torch.ops.dsv2.attention`, what the engine runs on CPU) beside PyTorch's SDPA as dsv2 called it
before (k^R copied per head, v zero-padded to the query width so the flash kernel takes it) and
as transformers' DeepseekV2 calls it (v at its own width: SDPA's unfused path).

    .venv/bin/python bench/prefill_attention.py                     # small's heads, then V2-Lite's
    .venv/bin/python bench/prefill_attention.py --shapes 1x512x512x16x128x64x128 --dtypes bfloat16

A shape is B x T x S x H x N x R x V: B rows of T queries over S keys (the queries the last T:
causal after S - T cached positions), H heads, N + R query width, V value width. Reported: ms per
call (best of --repeat), GFLOP/s of the causal products actually needed, and each way's largest
error against a float64 computation, as a share of the output's largest magnitude.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from dsv2.bench.common import best_time, cpu_name
from dsv2.model.mask import causal_mask

SHAPES = ("1x512x512x8x32x64x32,1x2048x2048x8x32x64x32,1x64x2048x8x32x64x32,"   # small: prompt, long prompt, chunk
          "1x512x512x16x128x64x128,1x2048x2048x16x128x64x128")                    # V2-Lite's heads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=SHAPES, help="comma list of BxTxSxHxNxRxV")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from dsv2.native.attention import native_attention
    if not native_attention():
        raise SystemExit("dsv2's native operators are not available here (they need a C++ compiler and ninja).")
    print(f"CPU: {cpu_name()}, {args.threads} threads")
    print(f"{'dtype':>8} {'shape (BxTxSxHxNxRxV)':>26} | {'dsv2 attention':>24} | {'SDPA, v padded (flash)':>24} | "
          f"{'SDPA as transformers':>24} | speed-up")
    for shape in args.shapes.split(","):
        B, T, S, H, N, R, V = map(int, shape.split("x"))
        flop = 2 * B * H * (T * S - T * (T - 1) / 2) * (N + R + V)
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, T, H, N + R, generator=g)
        kv = torch.randn(B, S, H, N + V, generator=g)
        k_pe = torch.randn(B, S, R, generator=g)
        mask = None if T == S else causal_mask(torch.arange(S - T, S)[None].expand(B, T), S)
        scale = 1 / math.sqrt(N + R)
        want = None
        for dtype in args.dtypes.split(","):
            dt = getattr(torch, dtype)
            qd, kvd, kpd = q.to(dt), kv.to(dt), k_pe.to(dt)
            q_nope, q_pe = qd.split([N, R], -1)
            k_nope, v = kvd.split([N, V], -1)

            def sdpa(pad: bool):
                k = torch.cat([k_nope, kpd[:, :, None].expand(B, S, H, R)], -1)
                vv = F.pad(v, (0, N + R - V)) if pad else v
                o = F.scaled_dot_product_attention(qd.transpose(1, 2), k.transpose(1, 2), vv.transpose(1, 2),
                                                   attn_mask=None if mask is None else mask[:, None],
                                                   is_causal=mask is None, scale=scale)
                return o.transpose(1, 2)[..., :V]
            ways = {"dsv2": lambda: torch.ops.dsv2.attention(q_nope, q_pe, k_nope, kpd, v, mask, scale),
                    "padded": lambda: sdpa(True), "unpadded": lambda: sdpa(False)}
            if want is None:   # float64 from the float32 inputs
                qq, kk = q.double(), torch.cat([kv[..., :N], k_pe[:, :, None].expand(B, S, H, R)], -1).double()
                s = torch.einsum("bthd,bshd->bhts", qq, kk) * scale
                m = mask if mask is not None else causal_mask(torch.arange(T)[None].expand(B, T), S)
                want = torch.einsum("bhts,bshd->bthd", s.masked_fill(~m[:, None], float("-inf")).softmax(-1),
                                    kv[..., N:].double())
            cells, times = [], {}
            for name, fn in ways.items():
                fn()   # warm-up
                times[name] = best_time(fn, args.repeat)[0] * 1e3
                err = (fn().double() - want).abs().max().item() / want.abs().max().item()
                cells.append(f"{times[name]:7.2f} ms {flop / times[name] / 1e6:4.0f} GF {err:7.1e}")
            best_peer = min(times["padded"], times["unpadded"])
            print(f"{dtype:>8} {shape:>26} | " + " | ".join(f"{c:>24}" for c in cells)
                  + f" | {best_peer / times['dsv2']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
