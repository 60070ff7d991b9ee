"""Which cached positions each query may attend to: the one place attention masks are built.

A query at absolute position p sees cache slot j iff j <= p (causal). Rows of a batch carry
their own positions, so prompts of different lengths, chunked prefill and decode slots of
different lengths all use the same rule. For packed training rows (several documents in one
row), `segment_ids` additionally keeps each token inside its own document: the mask is then
block-diagonal, and no attention crosses documents. For scoring, `branch_mask` lets several
continuations of one prefix share a row: each sees the prefix and itself, not the others.
"""

from __future__ import annotations

import torch


def causal_mask(positions_BT: torch.Tensor, kv_len: int,
                segment_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, kv_len] bool, True where the query at positions_BT[b, t] may attend to slot j.

    With segment_ids_BT (packed rows, kv_len == T, no cache) a query also needs its key in the
    same segment; positions then restart at 0 in each segment, so the causal rule is taken on
    the row index, not on the position."""
    if segment_ids_BT is None:
        slots = torch.arange(kv_len, device=positions_BT.device)
        return slots[None, None, :] <= positions_BT[:, :, None]
    B, T = segment_ids_BT.shape
    if kv_len != T:
        raise ValueError(f"segment_ids need attention over the row itself (kv_len {kv_len} != {T} tokens).")
    idx = torch.arange(T, device=segment_ids_BT.device)
    same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return same & (idx[None, None, :] <= idx[None, :, None])


def packed_positions(segment_ids_BT: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at each new segment of a packed row: [B, T] int64."""
    B, T = segment_ids_BT.shape
    idx = torch.arange(T, device=segment_ids_BT.device).expand(B, T)
    start = torch.ones_like(segment_ids_BT, dtype=torch.bool)
    start[:, 1:] = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def branch_mask(branch_BT: torch.Tensor) -> torch.Tensor:
    """[B, T, T] bool for rows holding a shared prefix followed by branches that each continue it
    (a question's context, then its choices: engine/score.py). branch_BT: 0 on the prefix, k > 0
    on the tokens of branch k, -1 on padding. A token sees the prefix and its own branch up to
    itself, never another branch; padding sees the prefix and padding, so no row is empty."""
    T = branch_BT.shape[1]
    idx = torch.arange(T, device=branch_BT.device)
    key, query = branch_BT[:, None, :], branch_BT[:, :, None]
    return (idx[None, None, :] <= idx[None, :, None]) & ((key == 0) | (key == query))
