"""The language-model loss without the [tokens, vocab] logits: head and cross-entropy fused, by chunks.

    loss = sum_t [ logsumexp(W h_t) - (W h_t)_{y_t} ]          over targets y_t != IGNORE_INDEX

With DeepSeek-V2's 102,400-token vocabulary the logits of a 4,096-token micro-batch are
1.6 GB in float32, and cross-entropy keeps two more tensors that size (log-softmax and its
gradient). Here the rows go through in chunks: each chunk's logits give its loss and, at
once, d loss / d logits = softmax - onehot, which is folded straight into dL/dh and dL/dW
before the next chunk. What it holds instead: one chunk of logits, dL/dh [N, D], and dL/dW
as a float32 [V, D] (plus W cast to the autocast dtype), kept from forward to backward; at
DeepSeek-V2's sizes that is ~3 GB against ~5 GB of logits-sized tensors at 4,096 tokens, and
it does not grow with the tokens. The matmuls are the same three as head + cross-entropy
(W h, then dL/dh and dL/dW). The gradients are computed in the forward and scaled by the
incoming gradient in backward, so it runs this way only when a backward can follow (grad
mode on and a parameter or input that needs it); otherwise it only sums the loss.

Shape legend: N rows (tokens), D hidden, V vocabulary, C rows per chunk.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
# About this many logits per chunk (16 MiB of float32): few enough to stay small next to the
# model, many enough rows (>= 128) that the chunk's matmuls run at full speed.
CHUNK_LOGITS = 2**22


def check_targets(targets: torch.Tensor, input_ids: torch.Tensor, vocab: int) -> None:
    if targets.shape != input_ids.shape:
        raise ValueError(f"targets must have the inputs' shape {tuple(input_ids.shape)} (the token each position "
                         f"predicts), got {tuple(targets.shape)}.")
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab))
    msg = f"targets must be token ids in [0, {vocab}) or {IGNORE_INDEX} (ignored)"
    if targets.device.type != "cpu":  # checked on the device: no host sync per step
        torch._assert_async(~bad.any(), msg)
    elif bad.any():
        raise ValueError(f"{msg}, got {int(targets[bad][0])}.")


def chunk_rows(vocab: int) -> int:
    return max(128, CHUNK_LOGITS // vocab)


def lm_head_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, y_N: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy (float32 scalar) of logits h W^T against targets y (IGNORE_INDEX skipped)."""
    if torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad):
        return _HeadCrossEntropy.apply(h_ND, w_VD, y_N)
    total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
    for rows in _chunks(h_ND.shape[0], w_VD.shape[0]):
        logits = _logits(h_ND[rows], w_VD)
        total += _chunk_loss(logits, y_N[rows])
    return total


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, y_N):
        dt = torch.get_autocast_dtype(h_ND.device.type) if torch.is_autocast_enabled(h_ND.device.type) else h_ND.dtype
        with torch.autocast(h_ND.device.type, enabled=False):
            w_c = w_VD.to(dt)
            dh_ND = torch.empty_like(h_ND)
            dw_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device)
            total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
            for rows in _chunks(h_ND.shape[0], w_VD.shape[0]):
                h_c, y = h_ND[rows].to(dt), y_N[rows]
                logits = torch.mm(h_c, w_c.t()).float()
                lse = logits.logsumexp(-1, keepdim=True)
                total += _chunk_loss(logits, y, lse[:, 0])
                # softmax - onehot, zero on ignored rows: d(sum of losses) / d logits
                g = logits.sub_(lse).exp_()
                keep = y != IGNORE_INDEX
                g[torch.arange(len(y), device=y.device)[keep], y[keep]] -= 1.0
                g.mul_(keep[:, None])
                g = g.to(dt)
                dh_ND[rows] = torch.mm(g, w_c).to(dh_ND.dtype)
                if dt == torch.float32:
                    dw_VD.addmm_(g.t(), h_c)
                else:  # each chunk's product rounded once, the sum kept in float32
                    dw_VD.add_(torch.mm(g.t(), h_c))
        ctx.save_for_backward(dh_ND, dw_VD.to(w_VD.dtype))
        return total

    @staticmethod
    def backward(ctx, grad):
        dh_ND, dw_VD = ctx.saved_tensors
        return dh_ND * grad.to(dh_ND.dtype), dw_VD * grad.to(dw_VD.dtype), None


def _chunks(n: int, vocab: int):
    c = chunk_rows(vocab)
    return [slice(s, min(s + c, n)) for s in range(0, n, c)]


def _logits(h_CD: torch.Tensor, w_VD: torch.Tensor) -> torch.Tensor:
    return torch.mm(h_CD, w_VD.t().to(h_CD.dtype)).float()


def _chunk_loss(logits_CV: torch.Tensor, y_C: torch.Tensor, lse_C: torch.Tensor | None = None) -> torch.Tensor:
    keep = y_C != IGNORE_INDEX
    picked = logits_CV.gather(1, y_C.clamp_min(0)[:, None])[:, 0]
    lse_C = logits_CV.logsumexp(-1) if lse_C is None else lse_C
    return ((lse_C - picked) * keep).sum()


def lm_head_token_logprobs(h_ND: torch.Tensor, w_VD: torch.Tensor, y_N: torch.Tensor, temperature: float = 1.0,
                           with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probabilities log softmax(W h / T)[y] [N] (float32) by chunks, and the
    entropy of each row's distribution [N] (no grad) if asked; never the [N, V] logits at once.

    RL needs each sampled token's log-prob with its own gradient weight (the advantage), so
    unlike the summed loss above the backward cannot be folded into the forward: it keeps
    h, W and the log-normaliser, and recomputes each chunk's logits once more."""
    ent = _entropy(h_ND.detach(), w_VD.detach(), temperature) if with_entropy else None
    if torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad):
        return _HeadTokenLogprob.apply(h_ND, w_VD, y_N, temperature), ent
    return _token_logprobs(h_ND, w_VD, y_N, temperature)[0], ent


def _compute_dtype(h_ND: torch.Tensor) -> torch.dtype:
    t = h_ND.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else h_ND.dtype


@torch.no_grad()
def _chunk_logits(h_ND, w_c, rows, dt, temperature) -> torch.Tensor:
    return torch.mm(h_ND[rows].to(dt), w_c.t()).float() / temperature


@torch.no_grad()
def _entropy(h_ND, w_VD, temperature) -> torch.Tensor:
    dt = _compute_dtype(h_ND)
    out = torch.empty(h_ND.shape[0], dtype=torch.float32, device=h_ND.device)
    with torch.autocast(h_ND.device.type, enabled=False):
        w_c = w_VD.to(dt)
        for rows in _chunks(h_ND.shape[0], w_VD.shape[0]):
            logp = torch.log_softmax(_chunk_logits(h_ND, w_c, rows, dt, temperature), -1)
            out[rows] = -(logp.exp() * logp).sum(-1)
    return out


@torch.no_grad()
def _token_logprobs(h_ND, w_VD, y_N, temperature) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (log-prob of y [N], log-normaliser [N]), float32, chunk by chunk."""
    dt = _compute_dtype(h_ND)
    logp = torch.empty(h_ND.shape[0], dtype=torch.float32, device=h_ND.device)
    lse = torch.empty_like(logp)
    with torch.autocast(h_ND.device.type, enabled=False):
        w_c = w_VD.to(dt)
        for rows in _chunks(h_ND.shape[0], w_VD.shape[0]):
            logits = _chunk_logits(h_ND, w_c, rows, dt, temperature)
            lse[rows] = logits.logsumexp(-1)
            logp[rows] = logits.gather(1, y_N[rows, None])[:, 0] - lse[rows]
    return logp, lse


class _HeadTokenLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, y_N, temperature):
        logp, lse = _token_logprobs(h_ND, w_VD, y_N, temperature)
        ctx.save_for_backward(h_ND, w_VD, y_N, lse)
        ctx.temperature, ctx.dt = temperature, _compute_dtype(h_ND)
        return logp

    @staticmethod
    def backward(ctx, grad_N):
        h_ND, w_VD, y_N, lse = ctx.saved_tensors
        dt, T = ctx.dt, ctx.temperature
        with torch.autocast(h_ND.device.type, enabled=False):
            w_c = w_VD.to(dt)
            dh_ND = torch.empty_like(h_ND)
            dw_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device)
            for rows in _chunks(h_ND.shape[0], w_VD.shape[0]):
                h_c, y = h_ND[rows].to(dt), y_N[rows]
                # d logp / d logits = (onehot - softmax) / T, weighted by each row's incoming gradient
                g = (_chunk_logits(h_ND, w_c, rows, dt, T) - lse[rows, None]).exp_().neg_()
                g[torch.arange(len(y), device=g.device), y] += 1.0
                g = g.mul_((grad_N[rows] / T)[:, None]).to(dt)
                dh_ND[rows] = torch.mm(g, w_c).to(dh_ND.dtype)
                dw_VD.add_(torch.mm(g.t(), h_c).float())
        return dh_ND, dw_VD.to(w_VD.dtype), None, None
