"""A tokenizer + token shards built once per session from a slice of the stdlib (vocab 512)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    from dsv2.data.bpe import train_tokenizer
    from dsv2.data.shards import prepare_shards
    root = tmp_path_factory.mktemp("pretrain_data")
    train_tokenizer(None, root / "tok", vocab_size=512, max_mb=0.4, verbose=False)
    prepare_shards(None, root / "tok", root / "data", val_fraction=0.05, max_mb=0.4, verbose=False)
    return root / "data"


@pytest.fixture
def tiny_overrides():
    return _tiny_overrides


def _tiny_overrides(data_dir, out_dir, steps: int, **extra) -> list[str]:
    """A few-second config: the tiny preset shrunk, every MoE rule on, fp32 for bit-exactness."""
    base = {
        "data.dir": data_dir, "out_dir": out_dir, "steps": steps, "precision": "fp32", "threads": 1,
        "model.vocab_size": 512, "model.hidden_size": 64, "model.num_hidden_layers": 3,
        "model.q_lora_rank": 32, "model.kv_lora_rank": 32, "model.intermediate_size": 128,
        "model.moe_intermediate_size": 32, "model.num_attention_heads": 2,
        "data.seq_len": 32, "data.val_batches": 2, "batch.micro_batch": 4, "batch.start": 4, "batch.final": 8,
        "batch.ramp_tokens": 512, "optim.warmup_steps": 2, "optim.lr": 3e-3,
        "log_every": 1, "eval_every": 1000, "save_every": 1000, "moe.load_every": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
