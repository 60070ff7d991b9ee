"""int8 rows times float32 inputs, every way this machine has, same run: dsv2's operator
(`torch.ops.dsv2.int8_mm`: inputs rounded to int16 per row, integer multiply-adds) beside
torch's int8-weight kernel (`torch._weight_int8pack_mm`, bfloat16 inputs), the weights
widened to float32 and multiplied, and float32 / bfloat16 matmuls of weights widened ahead.

    .venv/bin/python bench/int8_matmul.py                         # 1,024 x 512 weights (small's FFN)
    .venv/bin/python bench/int8_matmul.py --rows 1,512 --shape 4096x1024

Reported per number of input rows: GFLOP/s (best of --repeat calls) and each way's largest error
against the float32 product with the same int8 weights, as a share of that product's largest
magnitude. One input row is decode; hundreds are a prompt's prefill.
"""

from __future__ import annotations

import argparse

import torch

from dsv2.bench.common import best_time, cpu_name
from dsv2.quant.int8 import integer_products, quantize_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,16,32,128,512,2048", help="input rows to measure")
    p.add_argument("--shape", default="1024x512", help="weights, output x input features")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not integer_products():
        raise SystemExit("dsv2's int8 operator is not available here (it needs a C++ compiler and AVX2).")
    N, K = map(int, args.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    q, s = quantize_rows(torch.randn(N, K, generator=g))
    w = q.float() * s.float()[:, None]
    sf, wb = s.float(), w.bfloat16()
    print(f"CPU: {cpu_name()}, {args.threads} threads; int8 weights {N} x {K}")
    ways = {
        "dsv2 int8_mm": lambda x: torch.ops.dsv2.int8_mm(x, q, sf),
        "torch int8 kernel": lambda x: torch._weight_int8pack_mm(x.bfloat16(), q, s).float(),
        "widen + float32": lambda x: x @ (q.float() * sf[:, None]).T,
        "float32, pre-widened": lambda x: x @ w.T,
        "bfloat16, pre-widened": lambda x: (x.bfloat16() @ wb.T).float(),
    }
    print(f"{'rows':>6} | " + " | ".join(f"{name:>22}" for name in ways) + "   (GFLOP/s, max error)")
    for M in map(int, args.rows.split(",")):
        x = torch.randn(M, K, generator=g)
        want = x @ w.T
        cells = []
        for name, fn in ways.items():
            if name == "torch int8 kernel" and K % 32:
                cells.append(f"{'(width not % 32)':>22}")
                continue
            err = (fn(x) - want).abs().max().item() / want.abs().max().item()
            fn(x), fn(x)   # warm-up, with the call above
            gflops = 2 * M * N * K / best_time(lambda: fn(x), args.repeat)[0] / 1e9
            cells.append(f"{gflops:>8.1f} ({err:9.1e})")
        print(f"{M:>6} | " + " | ".join(f"{c:>22}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
