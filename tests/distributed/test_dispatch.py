"""The all_to_all expert dispatcher under uneven routing, on 4 gloo processes (issue 5).

Ranks that send nothing, ranks with no tokens, experts that receive nothing: outputs and
all gradients must equal one process computing the same tokens, and nothing may hang
(the run is killed and the test fails after its timeout).
"""

from __future__ import annotations

from .conftest import torchrun


def test_uneven_routing_matches_one_process(tmp_path):
    out = torchrun(4, ["tests/distributed/check_dispatch.py", str(tmp_path)], timeout=150)
    assert (tmp_path / "dispatch_ok").exists(), out[-3000:]
    assert "round 5" in out
