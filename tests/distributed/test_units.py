"""Single-process checks of the distributed pieces (no process group needed)."""

from __future__ import annotations

import argparse

import pytest
import torch

from dsv2.config import ModelConfig
from dsv2.distributed import checkpoint as dcp_ckpt
from dsv2.distributed.expert_parallel import in_domains
from dsv2.distributed.grad_norm import clip_grad_norm_
from dsv2.launch import relaunch
from dsv2.distributed.launch import per_rank_config
from dsv2.distributed.memory import estimate
from dsv2.distributed.mesh import Layout, init_layout
from dsv2.model import DeepseekV2
from dsv2.model.moe import Routing


def _routing(n: int, e: int = 8, k: int = 2, seed: int = 0) -> Routing:
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, e, generator=g).softmax(-1)
    w, idx = scores.topk(k, dim=-1)
    return Routing(scores, idx, w)


def test_in_domains_applies_the_policy_per_run_of_sequences():
    calls = []

    def policy(route, shape):
        calls.append(tuple(shape))
        return route.weight_NK > route.weight_NK.median()   # depends on the whole domain
    r = _routing(4 * 5)
    keep = in_domains(policy, 2)(r, torch.Size((4, 5, 16)))
    assert calls == [(2, 5, 16), (2, 5, 16)]
    first = policy(Routing(r.scores_NE[:10], r.idx_NK[:10], r.weight_NK[:10]), torch.Size((2, 5, 16)))
    assert torch.equal(keep[:10], first)
    with pytest.raises(ValueError, match="drop domains of 3"):
        in_domains(policy, 3)(r, torch.Size((4, 5, 16)))


def test_clip_grad_norm_matches_torch_on_plain_tensors():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 4)
    for m in (a, b):
        m(x).pow(2).sum().backward()
    n1 = clip_grad_norm_(a.parameters(), 0.1)
    n2 = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.1)
    torch.testing.assert_close(n1, n2)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_memory_estimate_shrinks_with_more_ranks_and_ep():
    cfg = ModelConfig.from_preset("deepseek-v2")
    one = estimate(cfg, dp=1, ep=1, tokens_per_rank=4096)
    many = estimate(cfg, dp=4, ep=8, tokens_per_rank=4096)
    assert many["state"] == pytest.approx(one["state"] / 32)
    assert many["gathered"] < one["gathered"] / 4          # experts are gathered over DP only
    assert one["state"] / 2**30 == pytest.approx(235.7e9 * 16 / 2**30, rel=0.02)   # ~236B params x 16 bytes
    ac = estimate(cfg, dp=4, ep=8, tokens_per_rank=4096, checkpointing=True)
    assert ac["activations"] < many["activations"]


def test_one_process_layout_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    lay = init_layout(1)
    assert not lay.distributed and lay.world == 1
    with pytest.raises(ValueError, match="--ep 2 needs"):
        init_layout(2)


def test_global_batch_is_split_over_ranks_or_refused():
    from dsv2.train.config import load_config
    cfg = load_config("tiny", ["batch.micro_batch=2", "batch.start=16", "batch.final=32", "batch.ramp_tokens=4000"])
    lay = Layout(world=4, rank=0, dp=2, ep=2, device=torch.device("cpu"))
    per_rank_config(cfg, lay)
    assert (cfg.batch.start, cfg.batch.final, cfg.batch.ramp_tokens) == (4, 8, 1000)
    bad = load_config("tiny", ["batch.micro_batch=4", "batch.start=8", "batch.final=8"])
    with pytest.raises(ValueError, match="multiple of processes x batch.micro_batch"):
        per_rank_config(bad, lay)


def test_nproc_relaunch_drops_only_its_own_flag(monkeypatch):
    seen = {}
    monkeypatch.setattr("subprocess.call", lambda cmd: seen.setdefault("cmd", cmd) and 0)
    relaunch(argparse.Namespace(nproc=4), ["pretrain", "--nproc", "4", "--ep", "2", "steps=3"])
    assert seen["cmd"][1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "dsv2",
                               "pretrain", "--ep", "2", "steps=3"]


def test_data_position_is_stored_layout_free():
    saved = dcp_ckpt._to_global("data", {"epoch": 1, "cursor": 6, "dp_size": 4, "seed": 0})
    assert saved == {"epoch": 1, "position": 24, "seed": 0}
    assert dcp_ckpt._to_local("data", saved, {"dp_size": 2})["cursor"] == 12
    assert dcp_ckpt._to_local("data", saved, {"dp_size": 1})["cursor"] == 24
    with pytest.raises(ValueError, match="does not split over 5 ranks"):
        dcp_ckpt._to_local("data", saved, {"dp_size": 5})


def test_one_process_dcp_roundtrip_is_exact(tmp_path):
    cfg = ModelConfig.from_preset("tiny", num_hidden_layers=2, vocab_size=256)
    torch.manual_seed(0)
    a = DeepseekV2(cfg)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-3)
    a(torch.randint(0, 256, (2, 8))).sum().backward()
    opt_a.step()
    path = dcp_ckpt.save_model(tmp_path, a, opt_a, step=7)
    assert path.name == "step_00000007" and dcp_ckpt.DCPCheckpointer(tmp_path).latest() == path
    torch.manual_seed(1)
    b = DeepseekV2(cfg)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-3)
    dcp_ckpt.load_model(tmp_path, b, opt_b)
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    with pytest.raises(FileNotFoundError, match="no DCP checkpoint"):
        dcp_ckpt.DCPCheckpointer(tmp_path).load(tmp_path / "nothing", {"model": b})


def test_bad_layouts_are_refused_with_one_sentence(token_data, capsys):
    from dsv2.cli import main
    base = ["pretrain", "--config", "tiny", f"data.dir={token_data}", "steps=1"]
    assert main([*base, "--nproc", "4", "--ep", "3"]) == 2
    assert "--ep 3 must divide --nproc 4; choose an EP size among [1, 2, 4]" in capsys.readouterr().err
    assert main([*base, "--ep", "2"]) == 2
    assert "--ep 2 needs 2 or more processes" in capsys.readouterr().err
