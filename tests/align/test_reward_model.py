"""Reward models: Bradley-Terry training learns held-out preferences, the transformers format both
ways, bad files named, and use as a GRPO reward."""

from __future__ import annotations

import json
import random

import pytest
import torch

from dsv2.align.reward_model import RMTrainer, RewardModelError, load_reward_model, load_rm_config
from dsv2.align.rewards import Rewards
from dsv2.cli import main

GOOD = ["thank you", "谢谢", "glad to help 🙂", "here it is", "happy to", "sure"]
BAD = ["go away", "no", "whatever", "not my problem", "ugh", "later maybe"]


def pairs(n, seed):
    r = random.Random(seed)
    return [{"prompt": f"Request {r.randint(0, 999)}", "chosen": f"{r.choice(GOOD)}, {r.choice(GOOD)}",
             "rejected": f"{r.choice(BAD)}, {r.choice(BAD)}"} for _ in range(n)]


@pytest.fixture(scope="module")
def rm_run(sft_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    (d / "train.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs(200, 0)))
    (d / "val.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs(40, 1)))
    args = [f"init_from={sft_base}", f"data.train={d / 'train.jsonl'}", f"data.val={d / 'val.jsonl'}",
            f"out_dir={d / 'out'}", "steps=30", "threads=1", "log_every=5", "eval_every=15", "optim.lr=3e-3"]
    tr = RMTrainer(load_rm_config("demo", args), print_fn=lambda *_: None)
    result = tr.fit()
    return d, tr, result


def test_bradley_terry_training_learns_held_out_preferences(rm_run):
    _, tr, result = rm_run
    assert tr.baseline == 0.0                       # a zero head scores every pair equal: no pair ranked right
    assert result["val_pairwise_accuracy"] >= 0.9


def test_the_export_is_transformers_sequence_classification(rm_run):
    from transformers import DeepseekV2ForSequenceClassification

    from dsv2 import Tokenizer
    d, _, _ = rm_run
    hf = d / "out" / "hf"
    ours = load_reward_model(hf, dtype=torch.float32)
    theirs = DeepseekV2ForSequenceClassification.from_pretrained(hf).eval()
    tok = Tokenizer(hf)
    for text in ("User: hi\n\nAssistant: 谢谢", "User: hi\n\nAssistant: go away"):
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            assert torch.allclose(ours(ids, torch.tensor([ids.shape[1] - 1])), theirs(ids).logits[:, 0], atol=1e-4)


def test_a_reward_model_is_a_grpo_reward(rm_run):
    d, _, _ = rm_run
    rewards = Rewards({f"rm:{d / 'out' / 'hf'}": 1.0})
    prompts = ["User: Request 5\n\nAssistant:"] * 2
    total, per = rewards(prompts, [" thank you, sure", " go away, ugh"], {})
    assert len(total) == 2 and total[0] > total[1]


def test_bad_reward_model_files_are_named(rm_run, sft_base, tmp_path):
    d, _, _ = rm_run
    with pytest.raises(RewardModelError, match="is not a reward model"):
        load_reward_model(sft_base)
    other = tmp_path / "other"
    other.mkdir()
    for f in (d / "out" / "hf").iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(cfg | {"hidden_size": cfg["hidden_size"] * 2}))
    with pytest.raises(ValueError, match="belongs to another model|config expects"):
        load_reward_model(other)


def test_rm_train_verb_and_bad_pairs(sft_base, tmp_path, capsys):
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"prompt": "x", "chosen": "a"}\n')
    assert main(["rm", "train", f"init_from={sft_base}", f"data.train={f}", f"out_dir={tmp_path / 'o'}"]) == 2
    assert "holds no usable preference pair; line 1" in capsys.readouterr().err


def test_stage_two_raises_the_reward_model_score_and_reports_the_stage_one_metric(rm_run, sft_base, tmp_path):
    """GRPO with the reward model as its reward (the paper's second stage) raises that reward on
    held-out prompts; exact match (a stage-1 metric) is logged beside it at every evaluation."""
    from dsv2.align.grpo_trainer import GRPOTrainer, load_grpo_config
    d, _, _ = rm_run
    rm = f"rm:{d / 'out' / 'hf'}"
    rows = [{"prompt": f"Request {i}", "answer": "thank you"} for i in range(40)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[32:]))
    cfg = load_grpo_config("demo", [f"init_from={sft_base}", f"data.train={tmp_path / 'train.jsonl'}",
                                    f"data.val={tmp_path / 'val.jsonl'}", f"out_dir={tmp_path / 'out'}", "steps=20",
                                    "grpo.group_size=4", "batch.final=16", "grpo.max_new_tokens=4",
                                    "batch.micro_batch=16", "threads=1", "eval_every=20", "optim.lr=1e-3",
                                    "export=false", f"grpo.rewards={{'{rm}': 1.0}}", f"grpo.eval_reward={rm}",
                                    "grpo.eval_also=[exact_match]"])
    tr = GRPOTrainer(cfg, print_fn=lambda *_: None)
    result = tr.fit()
    assert result["val_score"] > tr.baseline + 0.5
    val = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val/exact_match"] for r in val if r["kind"] == "val"] == [tr.val_scores["exact_match"]]
