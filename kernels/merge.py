"""Exact log-sum-exp merge of partial attention results (MoBA's current/past branches, split-KV)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["merge_attention_states"]


def merge_attention_states(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over disjoint key sets into attention over their union.

    Args:
        outs: partial outputs ``[B, H, S, D]``, each normalised over its own keys.
        lses: their log-sum-exps ``[B, H, S]`` (natural log, ``-inf`` for rows that saw no key).

    Returns:
        ``(out [B, H, S, D]`` in the dtype of ``outs[0]``, ``lse [B, H, S]`` fp32``)``. Rows empty in
        every part stay zeros with ``lse = -inf``. Differentiable in outs and lses.
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"need the same positive number of outs and lses, got {len(outs)} and {len(lses)}")
    for i, (o, l) in enumerate(zip(outs, lses)):
        if o.shape != outs[0].shape or o.dim() != 4:
            raise ValueError(f"outs[{i}] has shape {tuple(o.shape)}; all must be [B, H, S, D] like outs[0]")
        if l.shape != o.shape[:3]:
            raise ValueError(f"lses[{i}] has shape {tuple(l.shape)}; expected {tuple(o.shape[:3])}")
    lse_all = torch.stack([l.float() for l in lses])  # [P, B, H, S]
    peak = lse_all.amax(dim=0)
    dead = peak == float("-inf")
    peak = torch.where(dead, 0.0, peak).detach()
    weights = torch.exp(lse_all - peak)  # [P, B, H, S]; 0 for parts that saw nothing
    total = weights.sum(dim=0)
    # Written with where() so that empty rows give -inf and no NaN gradients.
    lse = torch.where(dead, float("-inf"), peak + torch.log(torch.where(dead, 1.0, total)))
    weights = weights / torch.where(dead, 1.0, total)
    out = sum(w[..., None] * o.float() for w, o in zip(weights, outs))
    return out.to(outs[0].dtype), lse
