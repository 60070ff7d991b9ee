"""Continued pretraining from a checkpoint (`init_from`) with a context extension (--config extend-yarn)."""

from __future__ import annotations

import pytest
import torch

from dsv2.config import ConfigError
from dsv2.train.config import load_config
from dsv2.train.loop import Trainer


def _quiet(cfg):
    return Trainer(cfg, print_fn=lambda *_: None)


@pytest.fixture
def base(data_dir, tmp_path, tiny_overrides):
    out = tmp_path / "base"
    cfg = load_config("tiny", tiny_overrides(data_dir, out, 2, save_every=2))
    tr = _quiet(cfg)
    tr.fit()
    return out, tr


def _extend(data_dir, init_from, out, steps=4, **extra):
    over = {"init_from": init_from, "data.dir": data_dir, "out_dir": out, "steps": steps, "precision": "fp32",
            "threads": 1, "data.seq_len": 64, "data.val_batches": 1, "batch.micro_batch": 2, "batch.start": 2,
            "batch.final": 2, "export": False, "log_every": 1, "eval_every": 1000, "save_every": 1000}
    over.update(extra)
    return load_config("extend-yarn", [f"{k}={v}" for k, v in over.items()])


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids)


def test_init_from_loads_exactly_the_weights_and_changes_only_the_overrides(base, data_dir, tmp_path):
    from dsv2.checkpoint import load_pretrained
    from dsv2.model.rope import RotaryEmbedding
    out, _ = base
    ref = load_pretrained(out / "hf", dtype=torch.float32)
    tr = _quiet(_extend(data_dir, out / "hf", tmp_path / "x"))
    cfg, old = tr.model.config, ref.config
    assert cfg.rope_scaling["type"] == "yarn" and cfg.rope_scaling["factor"] == 4
    assert {k for k in vars(cfg) if getattr(cfg, k) != getattr(old, k)} == {"rope_scaling"}   # 1024 both
    theirs = dict(ref.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in tr.model.named_parameters())
    assert torch.equal(tr.model.rotary.inv_freq, RotaryEmbedding(cfg).inv_freq)
    assert not torch.equal(tr.model.rotary.inv_freq, ref.rotary.inv_freq)
    # without a rope override, the same logits as the checkpoint (through the same native
    # operators as the trainer's model)
    from dsv2.native.swap import use_native
    plain = _quiet(_extend(data_dir, out / "hf", tmp_path / "y", **{"model": "{}"}))
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(plain.model, ids), _logits(use_native(ref), ids))
    assert plain.state.step == 0 and tr.optimizer.state_dict()["state"] == {}


def test_init_from_a_training_checkpoint(base, data_dir, tmp_path):
    out, trained = base
    step = sorted((out / "checkpoints").glob("step_*"))[-1]
    tr = _quiet(_extend(data_dir, step, tmp_path / "x", **{"model": "{}"}))
    theirs = dict(trained.model.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in tr.model.named_parameters())


def test_extension_resumes_bit_identically(base, data_dir, tmp_path):
    out, _ = base
    straight = _quiet(_extend(data_dir, out / "hf", tmp_path / "a", steps=4))
    straight.fit()
    part = _quiet(_extend(data_dir, out / "hf", tmp_path / "b", steps=4, save_every=2))
    part.resume(None)
    for s in range(2):
        part.train_step(s)
        part.state.step, part.state.tokens = s + 1, part.state.tokens + part.schedule.seqs[s] * 64
    part.save()
    resumed = _quiet(_extend(data_dir, out / "hf", tmp_path / "b", steps=4))
    resumed.fit(resume="auto")
    ref = straight.model.state_dict()
    assert resumed.state.step == 4
    assert all(torch.equal(ref[k], v) for k, v in resumed.model.state_dict().items())


def test_init_from_refuses_what_cannot_fit(base, data_dir, tmp_path):
    out, _ = base
    with pytest.raises(ConfigError, match="change the weight"):
        _extend(data_dir, out / "hf", tmp_path / "x", **{"model.hidden_size": 128})
    with pytest.raises(ConfigError, match="drop model.preset"):
        _extend(data_dir, out / "hf", tmp_path / "x", **{"model.preset": "tiny"})
    with pytest.raises(ConfigError, match="neither a Hugging Face folder"):
        _extend(data_dir, tmp_path, tmp_path / "x")
    with pytest.raises(ConfigError, match="init_from=PATH to continue"):
        load_config("extend-yarn", [f"data.dir={data_dir}"])
