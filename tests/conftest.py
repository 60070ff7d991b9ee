"""Shared fixtures. The tiny transformers-built checkpoints come from hf_models.py."""

from __future__ import annotations

import os

import pytest
import torch

from hf_models import VARIANTS, make_hf_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(variant) -> directory written by transformers' save_pretrained (cached per session)."""
    cache = {}

    def build(variant: str = "v2", **overrides):
        key = (variant, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"hf_{variant}")
            make_hf_model(**(VARIANTS[variant] | overrides)).save_pretrained(path)
            cache[key] = path
        return cache[key]

    return build
