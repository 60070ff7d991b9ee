"""Packing: best-fit-decreasing bins, the over-long rule, exact resume, and a packed batch computing
what its examples compute alone (loss, gradients, logits)."""

from __future__ import annotations

import random

import pytest
import torch

from dsv2.config import ModelConfig
from dsv2.data.packing import PackedLoader, best_fit_decreasing, pack
from dsv2.model import DeepseekV2
from dsv2.model.loss import IGNORE_INDEX

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, q_lora_rank=16, kv_lora_rank=16,
            intermediate_size=64, moe_intermediate_size=16, num_attention_heads=2, max_position_embeddings=128)


def examples(n, seed=0, lo=3, hi=20, vocab=97):
    r = random.Random(seed)
    out = []
    for _ in range(n):
        L = r.randint(lo, hi)
        ids = [r.randrange(vocab) for _ in range(L)]
        k = r.randint(1, L - 1)                       # the "answer" starts at k
        labels = [IGNORE_INDEX] * k + ids[k:]
        out.append((ids, labels[1:] + [IGNORE_INDEX]))
    return out


def test_best_fit_decreasing():
    assert best_fit_decreasing([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    lengths = [random.Random(1).randint(1, 64) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= 1.25 * sum(lengths) / 64 + 1      # close to the lower bound


def test_rows_segments_and_targets():
    ex = examples(40)
    p = pack(ex, 32)
    assert p.examples == 40 and p.rows < 40
    for r in range(p.rows):
        seg = p.segment_ids[r]
        n = int((seg >= 0).sum())
        assert (seg[:n] >= 0).all() and (seg[n:] == -1).all()                     # padding only at the end
        assert (p.targets[r][seg == -1] == IGNORE_INDEX).all()
        last = [j for j in range(n) if j == n - 1 or seg[j + 1] != seg[j]]        # each example's last token
        assert (p.targets[r][last] == IGNORE_INDEX).all()                           # predicts nothing
    got = sorted(tuple(p.input_ids[r][p.segment_ids[r] == s]) for r in range(p.rows)
                 for s in set(p.segment_ids[r].tolist()) - {-1})
    assert got == sorted(tuple(ids) for ids, _ in ex)


def test_overlong_examples_truncated_or_dropped_and_counted():
    ex = [([1] * 10, [2] * 9 + [IGNORE_INDEX]), ([3] * 50, [IGNORE_INDEX] * 45 + [4] * 4 + [IGNORE_INDEX]),
          ([5] * 40, [6] * 39 + [IGNORE_INDEX])]
    t = pack(ex, 32, "truncate")
    assert t.truncated == 2 and t.dropped == [1]             # cut before its answer: nothing to learn
    row = [r for r in range(t.rows) if t.input_ids[r, 0] == 5][0]
    assert t.targets[row, 31] == IGNORE_INDEX and (t.targets[row, :31] == 6).all()
    d = pack(ex, 32, "drop")
    assert d.truncated == 0 and d.dropped == [1, 2] and d.examples == 1
    with pytest.raises(ValueError, match="overlong='cut': use 'truncate'"):
        pack(ex, 32, "cut")


def test_unpacked_rows_hold_one_example_each():
    p = pack(examples(10), 32, packing=False)
    assert p.rows == 10 and (p.segment_ids.max(1) == 0).all()


def test_loader_resumes_exactly_and_trims_padding_columns():
    p = pack(examples(60), 32)
    a = PackedLoader(p, seed=3)
    for _ in range(5):
        a.next_batch(4)
    b = PackedLoader(p, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(30):                                      # across epoch boundaries too
        (x, ix), (y, iy) = a.next_batch(4), b.next_batch(4)
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(ix, iy)
    short = PackedLoader(pack(examples(4, hi=6), 32, packing=False)).batch([0, 1])
    assert short.input_ids.shape[1] <= 6 and (short.segment_ids >= 0).any(0).all()
    with pytest.raises(ValueError, match=f"rows={p.rows} but this run has rows=1"):
        PackedLoader(pack(examples(1), 32), seed=3).load_state_dict(a.state_dict())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepseekV2(ModelConfig.from_preset("tiny", **TINY)).float().train()


def test_packed_loss_and_gradients_equal_the_examples_alone(model):
    ex = examples(12, seed=2)
    p = pack(ex, 48)
    assert p.rows < len(ex)
    batch = PackedLoader(p).batch(list(range(p.rows)))
    model.zero_grad()
    loss = model(batch.input_ids, targets=batch.targets, segment_ids=batch.segment_ids) / batch.n_targets
    loss.backward()
    packed_grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    model.zero_grad()
    n = sum(sum(t != IGNORE_INDEX for t in tgt) for _, tgt in ex)
    ref = sum(model(torch.tensor([ids]), targets=torch.tensor([tgt])) for ids, tgt in ex) / n
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    for name, g in packed_grads.items():
        assert torch.allclose(g, model.get_parameter(name).grad, atol=1e-5, rtol=1e-4), name


def test_changing_one_example_leaves_the_others_logits_alone(model):
    ex = examples(6, seed=5)
    p = pack(ex, 64)
    row = max(range(p.rows), key=lambda r: p.segment_ids[r].max())
    assert p.segment_ids[row].max() >= 2
    ids, seg = torch.from_numpy(p.input_ids[row:row + 1]), torch.from_numpy(p.segment_ids[row:row + 1])
    with torch.no_grad():
        before = model(ids, segment_ids=seg)
        changed = ids.clone()
        changed[seg == 1] = (changed[seg == 1] + 1) % TINY["vocab_size"]
        after = model(changed, segment_ids=seg)
    other = (seg != 1) & (seg >= 0)
    assert torch.equal(before[other], after[other])
    assert not torch.allclose(before[seg == 1], after[seg == 1])
