"""Reference backend: dense masked attention in fp32. The ground truth every other backend is tested against.

It materialises the full ``[B, H, Sq, Skv]`` score matrix; use it on small inputs only.

Keys and values a query cannot see never reach its output or gradients, whatever they hold: every
backend zeroes the key/value rows that hold NaN or Inf (:func:`nonfinite_rows`) and gives their logit
NaN where it is visible, so a query that sees such a key gets NaN (as SDPA would) and no other does
(a masked probability times a NaN value would otherwise be NaN).
"""

from __future__ import annotations

import torch

from .layout import BlockSparseLayout, ids_to_mask

__all__ = [
    "all_finite", "dense_attention", "layout_token_mask", "nonfinite_rows", "token_block_mask", "visible_at",
    "visible_keys",
]


def all_finite(*xs: torch.Tensor) -> bool:
    """Whether every entry is finite, in one host sync. An fp32 sum is finite iff no entry is NaN or Inf
    unless it overflows; only then are the entries checked one by one (``isfinite`` is tens of times slower on CPU)."""
    total = sum(x.sum(dtype=torch.float32) for x in xs)
    return bool(torch.isfinite(total)) or all(bool(torch.isfinite(x).all()) for x in xs)


def nonfinite_rows(k: torch.Tensor, v: torch.Tensor, sync: bool = True) -> torch.Tensor | None:
    """bool ``[B, Hkv, Skv]``: the keys whose key or value row holds NaN or Inf. With ``sync`` (one host
    sync) ``None`` when there is none, so the common, finite case costs two sums."""
    if sync and all_finite(k, v):
        return None
    return ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention where ``allowed [B|1, H|1, Sq, Skv]`` (bool) says which keys each query may see.

    ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Skv, D]`` (GQA when Hq is a multiple of Hkv). Returns
    ``out [B, Hq, Sq, D]`` in ``q.dtype`` and ``lse [B, Hq, Sq]`` fp32 (natural log). Rows with no
    allowed key give zeros and ``lse = -inf``. Differentiable.
    """
    group = q.shape[1] // k.shape[1]
    bad = nonfinite_rows(k, v, sync=False).repeat_interleave(group, dim=1)[:, :, None, :]  # [B, Hq, 1, Skv]
    kf = k.float().repeat_interleave(group, dim=1).masked_fill(bad.transpose(-1, -2), 0.0)
    vf = v.float().repeat_interleave(group, dim=1).masked_fill(bad.transpose(-1, -2), 0.0)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), kf) * scale
    scores = scores.masked_fill(bad, float("nan")).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    dead = torch.isinf(lse)[..., None]
    probs = torch.where(dead, 0.0, torch.exp(scores - torch.where(dead, 0.0, lse[..., None])))
    out = torch.einsum("bhqk,bhkd->bhqd", probs, vf)
    return out.to(q.dtype), lse


def token_block_mask(layout: BlockSparseLayout, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """bool ``[B, Hl, Sq, NKB]``: the key blocks each query token uses (its query block's row, less the
    slots its ``token_mask [B, Hl, Sq, MAXK]`` switches off)."""
    sq, bm = layout.q_len, layout.block_m
    b, h, nqb = layout.kv_num_blocks.shape
    if token_mask is None:  # every token of a query block shares its row
        per_row = layout.to_block_mask()  # [B, Hl, NQB, NKB]
        return per_row[:, :, :, None].expand(b, h, nqb, bm, -1).reshape(b, h, nqb * bm, -1)[:, :, :sq]
    row = torch.arange(sq, device=layout.device) // bm
    on = torch.arange(layout.max_blocks, device=layout.device) < layout.kv_num_blocks[:, :, row, None]
    return ids_to_mask(layout.kv_indices[:, :, row], on & token_mask, layout.num_kv_blocks)


def visible_keys(sq: int, skv: int, causal: bool, window: int = 0, sink: int = 0, device=None) -> torch.Tensor | None:
    """bool ``[Sq, Skv]``: the token rule on top of a layout, or ``None`` when it allows everything.

    Query ``i`` sits at position ``p = i + Skv - Sq`` (bottom-right aligned). ``causal`` hides keys
    ``j > p``; ``window > 0`` keeps only keys ``j > p - window`` plus the first ``sink`` keys."""
    if not causal and window <= 0:
        return None
    q_pos = torch.arange(sq, device=device) + (skv - sq)
    return visible_at(q_pos, torch.arange(skv, device=device), causal, window, sink)


def visible_at(q_pos: torch.Tensor, key_pos: torch.Tensor, causal: bool, window: int = 0, sink: int = 0) -> torch.Tensor:
    """bool ``[q, k]``: the :func:`visible_keys` rule for queries at positions ``q_pos [q]`` and keys at
    ``key_pos [k]`` (any positions, e.g. a sink followed by a window)."""
    p, j = q_pos[:, None], key_pos[None, :]
    allowed = j <= p if causal else torch.ones(p.shape[0], j.shape[1], dtype=torch.bool, device=p.device)
    if window > 0:
        allowed = allowed & ((j > p - window) | (j < sink))
    return allowed


def layout_token_mask(
    layout: BlockSparseLayout,
    token_mask: torch.Tensor | None = None,
    causal: bool = False,
    window: int = 0,
    sink: int = 0,
) -> torch.Tensor:
    """Token-level bool mask ``[B, Hl, Sq, Skv]`` that ``layout`` (and optional per-slot ``token_mask``
    ``[B, Hl, Sq, MAXK]``) selects, with the :func:`visible_keys` rule (causal, window, sink)."""
    sq, skv = layout.q_len, layout.kv_len
    per_token = token_block_mask(layout, token_mask)
    b, h, _, nkb = per_token.shape
    bn = layout.block_n
    allowed = per_token[..., None].expand(b, h, sq, nkb, bn).reshape(b, h, sq, nkb * bn)[..., :skv]
    rule = visible_keys(sq, skv, causal, window, sink, layout.device)
    return allowed if rule is None else allowed & rule
