"""Pretraining with data.document_mask: documents sharing a window attend only within themselves."""

import torch

from dsv2.train.config import load_config
from dsv2.train.loop import Trainer


def test_document_mask_makes_each_document_its_own_sequence(data_dir, tmp_path, tiny_overrides):
    masked = Trainer(load_config("tiny", tiny_overrides(data_dir, tmp_path / "m", 2, **{"data.document_mask": "true"})),
                     print_fn=lambda *_: None)
    plain = Trainer(load_config("tiny", tiny_overrides(data_dir, tmp_path / "p", 2)), print_fn=lambda *_: None)
    bos, eos = masked.card["bos_id"], masked.card["eos_id"]
    a, b = [bos, 17, 18, 19, 20, eos], [bos, 30, 31, 32, 33, 34, 35]
    tokens = torch.tensor([a + b + [40]])              # a window: inputs a + b, targets shifted by one
    batch = masked.window_batch(tokens)
    assert batch.segment_ids.tolist() == [[1] * len(a) + [2] * len(b)]
    assert plain.window_batch(tokens).segment_ids is None
    model = masked.model.eval()
    with torch.no_grad():
        joint = model(batch.input_ids, segment_ids=batch.segment_ids)
        alone = model(torch.tensor([b]))
        across = model(batch.input_ids)
    # the second document sees neither the first nor positions past its own start
    assert torch.allclose(joint[0, len(a):], alone[0], atol=1e-5)
    assert not torch.allclose(across[0, len(a):], alone[0], atol=1e-3)
    # and a masked run trains (its micro-batches carry segment ids)
    out = masked.train_step(0)
    assert out["lm_loss"] > 0 and masked.next_micro_batch(4)[0].segment_ids is not None
