"""`dsv2 demo` / `make demo`: the main job on its embedded default.

For now: build the `tiny` preset, print its accounting, and check a forward pass.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the main job on its embedded default (tiny preset)",
                       description="Build the tiny DeepSeek-V2 preset and print its accounting.")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from .config import ModelConfig
    from .model import DeepseekV2
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny")
    model = DeepseekV2(cfg).eval()
    print("dsv2 demo: the `tiny` DeepSeek-V2 preset")
    print(model.summary(torch.float32))
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        logits = model(ids)
    print(f"forward: input {list(ids.shape)} -> logits {list(logits.shape)}")
    return 0
