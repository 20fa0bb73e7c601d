"""Token-routed attention: every query token attends to its own list of key blocks (MoBA, VMoBA).

MoBA (arXiv 2502.13189, MoonshotAI/MoBA) and VMoBA (arXiv 2506.23858) route each query *token* to a
few key blocks. The op maps this onto the block-sparse kernels: query tiles of ``tile`` tokens get the
union of their tokens' blocks as their layout row, and a per-(token, slot) mask switches off the
blocks a token did not choose, so the result is exact (spec: kernels.md §6.3, path A + token mask).
"""

from __future__ import annotations

import torch

from .block_sparse import check_qkv, run_attention
from .layout import BlockSparseLayout, ids_to_mask

__all__ = ["token_routed_attention"]


def _routing_mask(block_idx: torch.Tensor, block_cnt: torch.Tensor | int | None, nkb: int) -> torch.Tensor:
    """Dense bool ``[B, Hl, Sq, NKB]``: which key blocks each token chose."""
    keep = block_idx >= 0
    if block_cnt is not None:
        cnt = torch.as_tensor(block_cnt, device=block_idx.device)
        keep = keep & (torch.arange(block_idx.shape[-1], device=block_idx.device) < cnt.long()[..., None])
    return ids_to_mask(block_idx, keep, nkb)


def token_routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor | int | None = None,
    *,
    block_n: int,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    tile: int = 64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query token over the key blocks it was routed to.

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Skv, D]``.
        block_idx: int ``[B|1, Hl, Sq, K]`` key-block ids (blocks of ``block_n`` keys) per token, any
            order; ``-1`` entries are ignored, duplicates count once. ``Hl`` in ``{1, Hkv, Hq}``.
        block_cnt: use only the first ``block_cnt`` entries per token (int or int ``[B|1, Hl, Sq]``);
            ``None`` uses all ``K``.
        causal: bottom-right aligned token causal mask (key ``j`` visible to query ``i`` iff
            ``j <= i + Skv - Sq``), applied inside the chosen blocks.
        tile: query tile (tokens) whose union of routed blocks forms one layout row.

    Returns:
        ``out [B, Hq, Sq, D]``; with ``return_lse`` also ``lse [B, Hq, Sq]`` fp32. A token routed to
        no visible key gets zeros and ``lse = -inf``.
    """
    check_qkv(q, k, v)
    if not isinstance(block_n, int) or block_n < 1:
        raise ValueError(f"block_n={block_n!r} must be a positive int")
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile={tile!r} must be a positive int")
    if not isinstance(block_idx, torch.Tensor) or block_idx.dim() != 4 or block_idx.is_floating_point():
        raise ValueError("block_idx must be an integer tensor [B, Hl, Sq, K]")
    b, hq, sq, _ = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    bi, hl, si, _ = block_idx.shape
    if bi not in (1, b) or hl not in (1, hkv, hq) or si != sq:
        raise ValueError(
            f"block_idx shape {tuple(block_idx.shape)} must be [B|1, Hl, Sq, K] with B={b}, Sq={sq}, "
            f"Hl in (1, {hkv}, {hq})"
        )
    if block_idx.device != q.device:
        raise ValueError(f"block_idx is on {block_idx.device} but q is on {q.device}")
    nkb = -(-skv // block_n)
    if bool((block_idx >= nkb).any()) or bool((block_idx < -1).any()):
        raise ValueError(f"block_idx entries must lie in [0, {nkb}) (or -1 for unused), Skv={skv}, block_n={block_n}")
    if isinstance(block_cnt, torch.Tensor) and block_cnt.shape not in (block_idx.shape[:3],):
        raise ValueError(f"block_cnt shape {tuple(block_cnt.shape)} must be {tuple(block_idx.shape[:3])}")

    chosen = _routing_mask(block_idx, block_cnt, nkb)  # [B, Hl, Sq, NKB]
    ntiles = -(-sq // tile)
    padded = torch.nn.functional.pad(chosen, (0, 0, 0, ntiles * tile - sq))
    union = padded.view(bi, hl, ntiles, tile, nkb).any(dim=3)
    layout = BlockSparseLayout.from_block_mask(union, tile, block_n, sq, skv)
    # token_mask[b, h, i, s]: token i chose the block in slot s of its tile's row
    rows = layout.kv_indices.long()[:, :, torch.arange(sq, device=q.device) // tile]  # [B, Hl, Sq, MAXK]
    token_mask = torch.gather(padded[:, :, :sq], -1, rows.clamp_min(0)) & (rows >= 0)

    def reference_mask() -> torch.Tensor:  # straight from block_idx, independent of the tiling
        kj = torch.arange(skv, device=q.device)
        allowed = chosen[..., kj // block_n]
        if causal:
            allowed = allowed & (kj <= torch.arange(sq, device=q.device)[:, None] + skv - sq)
        return allowed

    return run_attention(
        q,
        k,
        v,
        layout,
        token_mask,
        causal=causal,
        scale=scale,
        return_lse=return_lse,
        backend=backend,
        reference_mask=reference_mask,
    )
