"""Flex backend: compiled ``torch.nn.attention.flex_attention`` driven by the same layout.

Forward-only on CPU (FlexAttention has no CPU backward, and compiled CPU FlexAttention cannot return
the log-sum-exp); forward and backward on CUDA. The first call for a new shape compiles (about 15-20 s
on a 2-core CPU).
"""

from __future__ import annotations

import functools

import torch

from .block_sparse import broadcast_heads
from .layout import BlockSparseLayout
from .reference import nonfinite_rows, token_block_mask

__all__ = ["attend"]


@functools.cache
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    token_mask: torch.Tensor | None,
    *,
    causal: bool,
    scale: float,
    need_lse: bool,
    window: int = 0,
    sink: int = 0,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block-sparse attention through FlexAttention (``layout`` with ``Hl`` in ``{1, Hkv, Hq}``)."""
    if not torch.is_grad_enabled():  # FlexAttention refuses CPU leaves that require grad, even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    layout, token_mask = broadcast_heads(layout, token_mask, q, k)
    hq, hu = q.shape[1], layout.num_heads
    if hu != hq:  # a GQA group shares its row list: FlexAttention wants one per query head
        layout = BlockSparseLayout(
            layout.kv_num_blocks.repeat_interleave(hq // hu, dim=1),
            layout.kv_indices.repeat_interleave(hq // hu, dim=1),
            layout.block_m,
            layout.block_n,
            layout.q_len,
            layout.kv_len,
        )
        if token_mask is not None:
            token_mask = token_mask.repeat_interleave(hq // hu, dim=1)
    offset, bn = layout.kv_len - layout.q_len, layout.block_n
    chose = token_block_mask(layout, token_mask).contiguous() if token_mask is not None else None  # [B, H, Sq, NKB]

    def mask_mod(b, h, q_idx, kv_idx):
        keep = chose[b, h, q_idx, kv_idx // bn] if chose is not None else kv_idx >= 0
        if causal:
            keep = keep & (kv_idx <= q_idx + offset)
        if window:
            keep = keep & ((kv_idx > q_idx + offset - window) | (kv_idx < sink))
        if key_mask is not None:
            keep = keep & key_mask[b, kv_idx]
        return keep

    ruled = chose is not None or causal or window or key_mask is not None
    block_mask = layout.to_flex_block_mask(mask_mod if ruled else None)
    bad, score_mod, group = nonfinite_rows(k, v), None, hq // k.shape[1]
    if bad is not None:  # zero keys holding NaN / Inf; their logit is NaN where visible (the mask hides the rest)
        k, v = k.masked_fill(bad[..., None], 0.0), v.masked_fill(bad[..., None], 0.0)

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(bad[b, h // group, kv_idx], float("nan"), score)

    result = _compiled()(
        q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=hq != k.shape[1],
        return_lse=need_lse,
    )
    return result if need_lse else (result, None)
