"""Config presets, dotted overrides, loud errors; the paper's LR and batch schedules."""

import pytest

from dsv2.config import ConfigError
from dsv2.train.config import list_pretrain_presets, load_config
from dsv2.train.optim import build_optimizer, clip_grad_norm_, param_groups
from dsv2.train.schedule import Schedule


def test_presets_load_and_build_their_model_config():
    assert {"tiny", "small"} <= set(list_pretrain_presets())
    for name in list_pretrain_presets():
        if name == "extend-yarn":   # continues a trained model (tests/train/test_init_from.py): says so without one
            with pytest.raises(ConfigError, match="init_from=PATH"):
                load_config(name)
            continue
        cfg = load_config(name)
        assert cfg.model_config().num_hidden_layers > 0


def test_dotted_overrides_and_path_form(tmp_path):
    cfg = load_config("tiny", ["optim.lr=1e-3", "moe.drop_tokens=false", "model.num_hidden_layers=2",
                               "optim.decay_at=[0.8, 0.9]", "steps=7"])
    assert cfg.optim.lr == 1e-3 and cfg.moe.drop_tokens is False and cfg.steps == 7
    assert cfg.model_config().num_hidden_layers == 2 and cfg.optim.decay_at == [0.8, 0.9]
    p = tmp_path / "mine.yaml"
    p.write_text("model: {preset: tiny}\nsteps: 3\n")
    assert load_config(str(p)).steps == 3


@pytest.mark.parametrize("bad, match", [
    (["optim.lrr=1"], "unknown training config key 'optim.lrr'"),
    (["model.hiden_size=8"], "unknown config key 'hiden_size'"),
    (["steps"], "has no '='"),
    (["batch.start=5"], "multiples of batch.micro_batch"),
])
def test_bad_overrides_are_one_clear_sentence(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", bad)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="choose one of"):
        load_config("nope")


def test_lr_warmup_then_steps_at_token_fractions():
    cfg = load_config("tiny", ["steps=100", "optim.warmup_steps=10", "optim.lr=1.0", "batch.ramp_tokens=0"])
    s = Schedule(cfg)
    assert s.lr(0) == pytest.approx(0.1) and s.lr(9) == pytest.approx(1.0)
    assert s.lr(59) == pytest.approx(1.0) and s.lr(60) == pytest.approx(0.316)
    assert s.lr(90) == pytest.approx(0.316 ** 2)


def test_batch_ramp_in_whole_micro_batches():
    cfg = load_config("tiny", ["steps=50", "batch.micro_batch=4", "batch.start=4", "batch.final=16",
                               "batch.ramp_tokens=20000", "data.seq_len=100"])
    s = Schedule(cfg)
    assert s.seqs[0] == 4 and s.seqs[-1] == 16 and all(n % 4 == 0 for n in s.seqs)
    assert s.seqs == sorted(s.seqs) and s.total_tokens == sum(s.seqs) * 100


def test_weight_decay_on_matrices_only():
    import torch
    from dsv2.model import DeepseekV2
    cfg = load_config("tiny")
    model = DeepseekV2(cfg.model_config())
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    opt = build_optimizer(model, cfg.optim)
    assert opt.defaults["betas"] == (0.9, 0.95) and isinstance(opt, torch.optim.AdamW)



@pytest.mark.parametrize("norm", [1e-4, 1.0 - 5e-7, 10.0], ids=["under_the_limit", "within_its_epsilon", "over_it"])
def test_clip_grad_norm_is_torchs_bit_for_bit(norm):
    """The trainer's clip (which skips torch's multiply by 1 when nothing is clipped) returns the
    same norm and leaves the same gradients as torch.nn.utils.clip_grad_norm_: under the limit,
    just under it (torch's 1e-6 in max / (norm + 1e-6) still scales by 0.9999995), and over it."""
    import torch
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (4, 16, 8)]
    grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    total = sum(x.square().sum() for x in grads).sqrt()
    ours = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    theirs = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for a, b, x in zip(ours, theirs, grads):
        a.grad = (x * (norm / total)).float()
        b.grad = a.grad.clone()
    total = clip_grad_norm_(ours, 1.0)
    want = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert torch.equal(total, want)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
    if norm == 10.0:   # clipped: the norm after is the limit
        assert abs(torch.nn.utils.get_total_norm([a.grad for a in ours]).item() - 1.0) < 1e-5

def test_cosine_and_constant_schedules():
    cos = Schedule(load_config("tiny", ["steps=12", "optim.warmup_steps=1", "optim.schedule=cosine",
                                        "optim.lr=1.0", "optim.min_lr_factor=0.1"]))
    assert cos.lr(0) == 1.0 and cos.lr(1) == pytest.approx(1.0) and cos.lr(11) == pytest.approx(0.1)
    assert cos.lr(6) == pytest.approx(0.55)                      # halfway: the mean of lr and min lr
    assert all(cos.lr(i) >= cos.lr(i + 1) for i in range(1, 11))
    const = Schedule(load_config("tiny", ["steps=5", "optim.warmup_steps=2", "optim.schedule=constant", "optim.lr=2.0"]))
    assert [const.lr(i) for i in range(5)] == [1.0, 2.0, 2.0, 2.0, 2.0]
    with pytest.raises(ConfigError, match="'optim.schedule' is invalid: use step, cosine or constant"):
        load_config("tiny", ["optim.schedule=linear"])
