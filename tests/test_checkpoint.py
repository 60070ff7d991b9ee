"""Checkpoint loading and saving: sharding, layouts, dtypes, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv2
from dsv2.checkpoint import CheckpointError


def x(seed=0):
    return torch.randint(0, 160, (1, 20), generator=torch.Generator().manual_seed(seed))


def test_sharded_save_round_trips(hf_checkpoint, tmp_path):
    model = dsv2.load_pretrained(hf_checkpoint("v2"))
    dsv2.save_pretrained(model, tmp_path, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / f).exists() for f in files)
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in index["weight_map"]
    again = dsv2.load_pretrained(tmp_path)
    assert torch.equal(again(x()), model(x()))


def test_stacked_expert_layout_loads(hf_checkpoint, tmp_path):
    """transformers 5 may write experts stacked as mlp.experts.{gate_up_proj, down_proj}."""
    src = hf_checkpoint("v2")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    sd = load_file(src / "model.safetensors")
    for layer in (1, 2):
        p = f"model.layers.{layer}.mlp.experts"
        gate_up = [torch.cat([sd.pop(f"{p}.{e}.gate_proj.weight"), sd.pop(f"{p}.{e}.up_proj.weight")]) for e in range(8)]
        sd[f"{p}.gate_up_proj"] = torch.stack(gate_up)
        sd[f"{p}.down_proj"] = torch.stack([sd.pop(f"{p}.{e}.down_proj.weight") for e in range(8)])
    save_file(sd, tmp_path / "model.safetensors")
    assert torch.equal(dsv2.load_pretrained(tmp_path)(x()), dsv2.load_pretrained(src)(x()))


def test_dtype_argument(hf_checkpoint):
    model = dsv2.load_pretrained(hf_checkpoint("v2"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not model.training
    ref = dsv2.load_pretrained(hf_checkpoint("v2"))
    assert (model(x()) - ref(x())).abs().max() < 0.1 * ref(x()).abs().max()


def _corrupt(src, dst, edit):
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors")
    return dst


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
    path = _corrupt(hf_checkpoint("v2"), tmp_path / "m", lambda sd: sd.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight' is missing"):
        dsv2.load_pretrained(path)


def test_unexpected_tensor_is_named(hf_checkpoint, tmp_path):
    path = _corrupt(hf_checkpoint("v2"), tmp_path / "m", lambda sd: sd.update({"model.layers.0.foo.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.foo\.weight'"):
        dsv2.load_pretrained(path)


def test_misshaped_tensor_is_named(hf_checkpoint, tmp_path):
    path = _corrupt(hf_checkpoint("v2"), tmp_path / "m",
                    lambda sd: sd.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight'.*shape \[63\].*expects \[64\]"):
        dsv2.load_pretrained(path)


def test_missing_files_are_named(hf_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dsv2.load_pretrained(tmp_path / "nowhere")
    shutil.copytree(hf_checkpoint("v2"), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    save_file({"w": torch.zeros(2)}, tmp_path / "m" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json nor model.safetensors.*"
                                              "holds: adapter_model.safetensors, config.json"):
        dsv2.load_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-1.safetensors is listed .* but missing"):
        dsv2.load_pretrained(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        dsv2.load_pretrained(tmp_path / "empty")


def test_loading_builds_on_meta_and_fills_in_place(hf_checkpoint, monkeypatch):
    """No second full copy: every parameter is allocated once, then filled by copy_."""
    from dsv2 import checkpoint
    allocated = []
    real = torch.nn.Module.to_empty

    def spy(self, *a, **k):
        allocated.append(sum(p.numel() for p in self.parameters()))
        return real(self, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "to_empty", spy)
    model = checkpoint.load_pretrained(hf_checkpoint("v2"))
    assert allocated == [model.num_params()]


def test_a_stray_safetensors_beside_the_weights_is_not_loaded(hf_checkpoint, tmp_path):
    """transformers' rule: the index, else model.safetensors; an adapter file beside them is not a weight."""
    shutil.copytree(hf_checkpoint("v2"), tmp_path / "m")
    save_file({"base_model.model.lora_A.weight": torch.zeros(4, 2)}, tmp_path / "m" / "adapter_model.safetensors")
    assert torch.equal(dsv2.load_pretrained(tmp_path / "m")(x()), dsv2.load_pretrained(hf_checkpoint("v2"))(x()))
    dsv2.save_pretrained(dsv2.load_pretrained(tmp_path / "m"), tmp_path / "s", max_shard_bytes=60_000)
    save_file({"stray": torch.zeros(2)}, tmp_path / "s" / "reference.safetensors")
    assert torch.equal(dsv2.load_pretrained(tmp_path / "s")(x()), dsv2.load_pretrained(hf_checkpoint("v2"))(x()))


def test_a_crash_between_writing_and_swapping_leaves_the_old_weights(hf_checkpoint, tmp_path, monkeypatch):
    from dsv2 import checkpoint
    old = dsv2.load_pretrained(hf_checkpoint("v2"))
    dsv2.save_pretrained(old, tmp_path, max_shard_bytes=60_000)        # sharded, then overwritten unsharded
    before = sorted(p.name for p in tmp_path.iterdir())
    new = dsv2.load_pretrained(hf_checkpoint("v2"))
    with torch.no_grad():
        new.embed_tokens.weight.mul_(2)

    def crash(staged):
        assert all(Path(tmp).exists() for tmp, _ in staged)            # everything new was written first
        raise KeyboardInterrupt("killed between write and swap")
    monkeypatch.setattr(checkpoint, "_swap", crash)
    with pytest.raises(KeyboardInterrupt):
        dsv2.save_pretrained(new, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before       # no temporary file left behind
    assert torch.equal(dsv2.load_pretrained(tmp_path)(x()), old(x()))
    monkeypatch.undo()
    dsv2.save_pretrained(new, tmp_path)                               # then the real thing: swap, delete stale
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    assert torch.equal(dsv2.load_pretrained(tmp_path)(x()), new(x()))
