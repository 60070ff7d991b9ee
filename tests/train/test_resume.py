"""Exact resume: N steps straight == N/2 + resume + N/2 == through two resumes, bit for bit."""

import json

import torch

from dsv2.train.checkpoint import LocalCheckpointer
from dsv2.train.config import load_config
from dsv2.train.loop import Trainer


def _run(tiny_overrides, data_dir, out, steps, stop_at=None, resume=None):
    """Train to `stop_at` (a run planned for `steps`), saving at the end."""
    extra = {"save_every": stop_at} if stop_at else {}
    cfg = load_config("tiny", tiny_overrides(data_dir, out, steps, export=False, **extra))
    tr = Trainer(cfg, print_fn=lambda *_: None)
    if stop_at:  # stop early: a schedule planned for `steps`, cut after `stop_at`
        tr.resume(resume)
        for step in range(tr.state.step, stop_at):
            tr.train_step(step)
            tr.state.step, tr.state.tokens = step + 1, tr.state.tokens + tr.schedule.seqs[step] * cfg.data.seq_len
        tr.save()
    else:
        tr.fit(resume=resume)
    return tr


def test_resume_is_bit_identical(data_dir, tmp_path, tiny_overrides):
    N = 6
    straight = _run(tiny_overrides, data_dir, tmp_path / "a", N)
    _run(tiny_overrides, data_dir, tmp_path / "b", N, stop_at=N // 2)
    resumed = _run(tiny_overrides, data_dir, tmp_path / "b", N, resume="auto")
    _run(tiny_overrides, data_dir, tmp_path / "c", N, stop_at=2)
    _run(tiny_overrides, data_dir, tmp_path / "c", N, stop_at=4, resume="auto")
    twice = _run(tiny_overrides, data_dir, tmp_path / "c", N, resume="auto")
    ref = straight.model.state_dict()
    for other in (resumed, twice):
        assert other.state.step == N
        sd = other.model.state_dict()
        assert all(torch.equal(ref[k], sd[k]) for k in ref), "parameters differ after resume"
        assert other.train_data.state_dict() == straight.train_data.state_dict()
    # resuming a finished run trains nothing and still reports a val loss
    done = _run(tiny_overrides, data_dir, tmp_path / "c", N, resume="auto")
    assert done.state.step == N and done.last_val is not None
    assert all(torch.equal(ref[k], done.model.state_dict()[k]) for k in ref)
    a = straight.optimizer.state_dict()["state"]
    b = twice.optimizer.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    # the metrics file of a resumed run reads as one run: one record per step, in order
    steps = [r["step"] for r in map(json.loads, (tmp_path / "c" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == N


def test_checkpoints_are_atomic_and_keep_last_k(tmp_path):
    ck = LocalCheckpointer(tmp_path, keep_last=2)

    class S:
        def __init__(self, v):
            self.v = v

        def state_dict(self):
            return {"v": torch.tensor(self.v)}

        def load_state_dict(self, sd):
            self.v = int(sd["v"])

    for step in (1, 2, 3):
        ck.save(step, {"s": S(step)})
    assert sorted(d.name for d in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]
    # a leftover temporary directory (a crash mid-write) is never taken for a checkpoint
    (tmp_path / ".tmp_step_00000009_1").mkdir()
    assert ck.latest().name == "step_00000003"
    s = S(0)
    ck.load(ck.latest(), {"s": s})
    assert s.v == 3


def test_resume_after_a_corrupt_metrics_line(data_dir, tmp_path, tiny_overrides, capsys):
    """Two writers once tore a line (a NUL byte): the resume reports it by number and goes on."""
    _run(tiny_overrides, data_dir, tmp_path, 4, stop_at=2)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"kind": "train", "step": 1, "loss_nats": 6.0}\n\x00{"kind": "tra\n'
                       '{"kind": "train", "step": 2, "loss_nats": 5.9}\n')
    capsys.readouterr()
    done = _run(tiny_overrides, data_dir, tmp_path, 4, resume="auto")
    assert done.state.step == 4
    err = [ln for ln in capsys.readouterr().err.splitlines() if "metrics.jsonl" in ln]
    assert len(err) == 1 and "line 2 is not a JSON record" in err[0]
    records = [json.loads(ln) for ln in metrics.read_text().splitlines()]   # every line parses again
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert not list(tmp_path.glob(".metrics.jsonl.*"))                      # the rewrite left no temp file


def test_export_reads_a_one_process_checkpoint(data_dir, tmp_path, tiny_overrides, capsys):
    """`dsv2 export` takes a single-process run's checkpoints/ folder (step_*/state.pt): the export
    holds exactly the trained weights, as the run's own export does."""
    import torch

    from dsv2 import load_pretrained
    from dsv2.cli import main
    out = tmp_path / "run"
    assert main(["pretrain", "--config", "tiny", *tiny_overrides(data_dir, out, 3, save_every=3)]) == 0
    assert main(["export", str(out / "checkpoints"), str(tmp_path / "hf")]) == 0
    assert "from" in capsys.readouterr().out
    ours, theirs = load_pretrained(tmp_path / "hf"), load_pretrained(out / "hf")
    for (n, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), n
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
