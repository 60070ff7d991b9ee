"""`dsv2 grpo` end to end on a tiny checkpoint: rollout log-probs, a 20-step smoke run with every
metric, exact resume, the reward functions, and bad input that names what is wrong."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dsv2.align.grpo_trainer import GRPOTrainer, load_grpo_config
from dsv2.align.rewards import RewardError, Rewards, code_tests, exact_match, final_answer, regex
from dsv2.align.rollout import completion_logprobs, pack_sequences, rollout
from dsv2.cli import main
from dsv2.engine.sampling import SamplingParams

from align_helpers import check_exact_resume


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    rows = [{"prompt": f"{a} + {b} =", "answer": str(a + b)} for a in range(6) for b in range(6)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    (d / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[30:]))
    return d


def overrides(base, files, out, **extra):
    kv = {"init_from": base, "data.train": files / "train.jsonl", "data.val": files / "val.jsonl", "out_dir": out,
          "steps": 20, "grpo.group_size": 4, "batch.final": 8, "grpo.max_new_tokens": 4,
          "grpo.beta": 0.04, "grpo.mu": 2, "batch.micro_batch": 4, "threads": 1, "log_every": 1, "eval_every": 10,
          "save_every": 100, "optim.lr": 1e-3, "optim.warmup_steps": 1} | extra
    return [f"{k}={v}" for k, v in kv.items()]


def test_rollout_logprobs_from_the_engine_equal_the_training_forward(sft_base):
    from dsv2 import Tokenizer, load_pretrained
    model = load_pretrained(sft_base, dtype=torch.float32).train()
    tok = Tokenizer(sft_base)
    prompts = [tok.encode("你好 3 + 4 ="), tok.encode("User: hi")]
    params = SamplingParams.make(max_new_tokens=8, temperature=1.0, logprobs=0, ignore_eos=True)
    ro = rollout(model, tok, prompts, 3, params, seed=1)
    assert model.training and len(ro.completion_ids) == 6 and all(len(c) == 8 for c in ro.completion_ids)
    assert len({tuple(c) for c in ro.completion_ids}) > 1              # each output its own seed
    x, y, mask, _ = pack_sequences(ro.prompt_ids, ro.completion_ids)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, x, y)
    ours = torch.stack([logp[b][mask[b]] for b in range(6)])
    assert torch.allclose(ours, torch.tensor(ro.logprobs), atol=1e-4)


def test_twenty_step_smoke_run_logs_every_metric(sft_base, prompt_files, tmp_path, capsys):
    assert main(["grpo", "--config", "demo", *overrides(sft_base, prompt_files, tmp_path)]) == 0
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 21))
    for key in ("reward", "reward_std", "reward/exact_match", "reward_std/exact_match", "frac_reward_zero_std", "kl", "clip_ratio", "entropy",
                "completion_len", "rollout_tokens_per_s", "update_tokens_per_s", "grad_norm"):
        assert all(math.isfinite(r[key]) for r in train), key
    assert any(r["kl"] > 0 for r in train[1:])                     # the policy moved away from the reference
    assert any(r["clip_ratio"] > 0 for r in train)                 # mu = 2: the second update can clip
    assert [r["step"] for r in records if r["kind"] == "val"] == [10, 20]
    assert (tmp_path / "hf" / "tokenizer_config.json").exists()
    from dsv2.train.plot import plot_run
    assert any(p.name == "reward.png" for p in plot_run(tmp_path))


def test_resume_is_exact(sft_base, prompt_files, tmp_path):
    check_exact_resume(lambda out: GRPOTrainer(
        load_grpo_config("demo", overrides(sft_base, prompt_files, out, steps=4, export=False, **{"data.val": "null"})),
        print_fn=lambda *_: None), tmp_path)


def test_builtin_rewards(tmp_path):
    assert final_answer("so 3 + 4 = 7") == "7" and final_answer("#### 1,024") == "1,024"
    assert final_answer("The answer is 12.") == "12" and final_answer("no digits") == "no digits"
    assert exact_match(None, [" 7", "8", "x"], answer=["7", "7", "7"]) == [1.0, 0.0, 0.0]
    assert regex(None, ["abc", "xyz"], pattern=["b", "b"]) == [1.0, 0.0]
    code = ["```python\ndef add(a, b):\n    return a + b\n```", "def add(a, b):\n    return a - b",
            "while True:\n    pass", "x = bytearray(2 * 1024**3)"]
    tests = ["assert add(2, 3) == 5"] * 4
    assert code_tests(None, code, tests=tests, timeout_s=2, memory_mb=256) == [1.0, 0.0, 0.0, 0.0]


def boom(prompts, completions, **_):
    raise RuntimeError("the judge is down")


def short(prompts, completions, **_):
    return [1.0]


def not_a_number(prompts, completions, **_):
    return [float("nan")] * len(completions)


@pytest.mark.parametrize("name, match", [
    ("test_grpo_trainer:boom", "reward 'test_grpo_trainer:boom' raised RuntimeError: the judge is down"),
    ("test_grpo_trainer:short", "returned 1 values for 8 completions"),
    ("test_grpo_trainer:not_a_number", "returned a non-finite value"),
])
def test_bad_rewards_are_named_and_no_checkpoint_is_lost(name, match, sft_base, prompt_files, tmp_path):
    good = GRPOTrainer(load_grpo_config("demo", overrides(sft_base, prompt_files, tmp_path, steps=3, save_every=1,
                                                          export=False, **{"data.val": "null"})),
                       print_fn=lambda *_: None)
    good.fit()
    bad = GRPOTrainer(load_grpo_config("demo", overrides(sft_base, prompt_files, tmp_path, steps=5, save_every=1,
                                                         export=False, **{"data.val": "null"})),
                      rewards=Rewards({name: 1.0}), print_fn=lambda *_: None)
    with pytest.raises(RewardError, match=match):
        bad.fit(resume="auto")
    assert bad.checkpointer.latest().name.endswith("3")             # the last good checkpoint is still there


def test_bad_settings_are_one_sentence(sft_base, prompt_files, tmp_path, capsys):
    assert main(["grpo", "--config", "demo", *overrides(sft_base, prompt_files, tmp_path, **{"batch.micro_batch": 3})]) == 2
    assert "multiples of batch.micro_batch (3)" in capsys.readouterr().err
    assert main(["grpo", "--config", "demo", *overrides(sft_base, prompt_files, tmp_path, **{"batch.final": 10})]) == 2
    assert "batch.final=10 outputs does not split into groups of grpo.group_size=4" in capsys.readouterr().err
    assert main(["grpo", "--config", "demo", *overrides(sft_base, prompt_files, tmp_path,
                                                        **{"grpo.rewards": "{nope: 1}"})]) == 2
    assert "unknown reward 'nope'" in capsys.readouterr().err
    from dsv2.align.grpo import group_advantages
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        group_advantages(torch.ones(6), 4)


def test_grpo_and_rm_presets_load():
    from dsv2.align.grpo_trainer import GRPO_PRESETS
    from dsv2.align.reward_model import RM_PRESETS, load_rm_config
    from dsv2.train.config import list_pretrain_presets
    names = list_pretrain_presets(GRPO_PRESETS)
    assert {"deepseek-v2", "deepseek-v2-preference", "demo"} <= set(names)
    for name in names:
        cfg = load_grpo_config(name)
        assert cfg.batch.final % cfg.grpo.group_size == 0 and cfg.prompts_per_step >= 1 and not cfg.moe.drop_tokens
    paper = load_grpo_config("deepseek-v2")
    assert (paper.grpo.group_size, paper.grpo.beta, paper.optim.lr) == (64, 0.04, 1e-6)
    stage2 = load_grpo_config("deepseek-v2-preference")
    assert any(k.startswith("rm:") for k in stage2.grpo.rewards) and stage2.grpo.eval_also == ["exact_match"]
    for name in list_pretrain_presets(RM_PRESETS):
        load_rm_config(name)


def test_logprobs_at_a_sampling_temperature_are_those_of_the_tempered_policy(sft_base):
    from dsv2 import Tokenizer, load_pretrained
    model = load_pretrained(sft_base, dtype=torch.float32)
    tok = Tokenizer(sft_base)
    x = torch.tensor([tok.encode("3 + 4 = 7")])
    with torch.no_grad():
        logits = model(x[:, :-1])
        got, _ = completion_logprobs(model, x[:, :-1], x[:, 1:], temperature=0.5)
    want = torch.log_softmax(logits / 0.5, -1).gather(-1, x[:, 1:, None])[..., 0]
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(Exception, match="'grpo.temperature' must be > 0"):
        load_grpo_config("demo", ["grpo.temperature=0"])


def lines_with_a_digit(prompts, completions, **_):
    """A process reward: 1 for each line (step) of a completion that holds a digit, else 0."""
    return [[float(any(ch.isdigit() for ch in line)) for line in c.split("\n")] for c in completions]


def test_process_supervision_gives_per_token_advantages(sft_base, prompt_files, tmp_path):
    from dsv2 import Tokenizer
    from dsv2.align.grpo_trainer import step_ends
    tok = Tokenizer(sft_base)
    ids = tok.encode("1 + 2\n= 3\nso 3", add_bos=False)
    ends = step_ends(tok, ids, 3)
    assert tok.decode(ids[: ends[0] + 1]).endswith("\n") and tok.decode(ids[: ends[1] + 1]).endswith("= 3\n")
    assert ends[2] == len(ids) - 1 and step_ends(tok, ids, 5)[3:] == [len(ids) - 1] * 2
    tr = GRPOTrainer(load_grpo_config("demo", overrides(sft_base, prompt_files, tmp_path, steps=3, export=False,
                                                        **{"data.val": "null",
                                                           "grpo.process_reward": "test_grpo_trainer:lines_with_a_digit"})),
                     print_fn=lambda *_: None)
    from dsv2.align.rollout import Rollouts
    texts = ["7\nno", "no\n7", "7\n7", "no\nno"]                # one group of G = 4
    comp = [tok.encode(t, add_bos=False) for t in texts]
    ro = Rollouts([[5, 6]] * 4, comp, texts, ["stop"] * 4, 0.0)
    _, _, mask, _ = pack_sequences(ro.prompt_ids, ro.completion_ids)
    adv = tr._process_advantages(["p"] * 4, ro, {}, mask)
    first = [adv[b][mask[b]][0].item() for b in range(4)]        # a token of the first line: both steps' sum
    last = [adv[b][mask[b]][-1].item() for b in range(4)]        # the last token: the last step only
    assert first[2] > first[0] > first[3] and first[0] == pytest.approx(first[1])
    assert last[0] < 0 < last[1] and last[2] > 0 > last[3]
    assert (adv[~mask] == 0).all()
    out = tr.train_step(0)
    assert math.isfinite(out["lm_loss"])
