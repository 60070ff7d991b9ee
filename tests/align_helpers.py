"""Shared pieces of the SFT / GRPO tests: a small corpus and chats (Chinese and emoji included), and
the exact-resume check every trainer must pass. A module of its own so tests import it by a unique name."""

from __future__ import annotations

import torch

SFT_CORPUS = [
    "User: What is 3 plus 4?\n\nAssistant: 7",
    "Upper-case this: red fox runs. RED FOX RUNS.",
    "深度求索发布了混合专家语言模型，它既强大又经济。你好，世界！谢谢。",
    "Emoji travel well over UTF-8: 🙂 🚀 ✨. Numbers too: 0 1 2 3 4 5 6 7 8 9.",
    "You are a helpful assistant. Answer briefly.",
]

SFT_CHATS = [
    [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "7"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "你好"},
     {"role": "assistant", "content": "你好！🙂"}, {"role": "user", "content": "谢谢"},
     {"role": "assistant", "content": "不客气 ✨"}],
    [{"role": "user", "content": "Upper-case this: red fox runs"}, {"role": "assistant", "content": "RED FOX RUNS"}],
]


def check_exact_resume(make_trainer, tmp_path, steps: int = 4) -> None:
    """`steps` straight == half, a checkpoint, a fresh trainer resuming, the other half: bit for bit."""
    straight = make_trainer(tmp_path / "straight")
    straight.fit()
    half = make_trainer(tmp_path / "halves")
    for step in range(steps // 2):
        half.train_step(step)
    half.state.step = steps // 2
    half.save()
    resumed = make_trainer(tmp_path / "halves")
    resumed.fit(resume="auto")
    ref, got = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref), "parameters differ after resume"
    assert resumed.train_data.state_dict() == straight.train_data.state_dict()
