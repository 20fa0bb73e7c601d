"""Token-routed attention: every query token attends to its own list of key blocks (MoBA, VMoBA).

MoBA (arXiv 2502.13189, MoonshotAI/MoBA) and VMoBA (arXiv 2506.23858) route each query *token* to a
few key blocks. The op maps this onto the block-sparse kernels: query tiles of ``tile`` tokens get the
union of their tokens' blocks as their layout row, and a per-(token, slot) mask switches off the
blocks a token did not choose, so the result is exact (spec: kernels.md §6.3, path A + token mask).

On the torch backend without a causal mask, large blocks are better served the other way round, as the
official VMoBA computes it: each key block attends densely to the queries that chose it (gathered),
and the partial results of each query are merged by log-sum-exp. Also exact; cost = selected pairs.
"""

from __future__ import annotations

import math

import torch

from .backends import resolve_backend
from .block_sparse import check_flag, check_int, check_key_mask, check_qkv, empty_attention, resolve_scale, run_attention
from .layout import BlockSparseLayout, check_ids, ids_to_mask
from .reference import dense_attention, visible_keys

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
    key_mask: torch.Tensor | None = None,
    window: int | None = None,
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
        key_mask: bool ``[B, Skv]``; keys marked False are hidden from every query (padding).
        window: token-level sliding window inside the chosen blocks: the query at position ``p``
            (bottom-right aligned) keeps keys ``j > p - window`` only (a model's sliding-window layers).

    Returns:
        ``out [B, Hq, Sq, D]``; with ``return_lse`` also ``lse [B, Hq, Sq]`` fp32. A token routed to
        no visible key gets zeros and ``lse = -inf``. Keys a token did not choose, or cannot see, may
        hold anything (NaN included) without reaching its output; ``q`` must be finite
        (checked on CPU only, as in :func:`block_sparse_attention`).
    """
    check_qkv(q, k, v)
    check_key_mask(key_mask, k)
    check_int("block_n", block_n, 1)
    check_int("tile", tile, 1)
    check_flag("causal", causal)
    check_flag("return_lse", return_lse)
    scale = resolve_scale(scale, q.shape[-1])
    if window is not None:
        check_int("window", window, 1)
    check_ids("block_idx [B, Hl, Sq, K]", block_idx, 4)
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
    if isinstance(block_cnt, torch.Tensor):
        check_ids("block_cnt", block_cnt, 3)
        if block_cnt.shape != block_idx.shape[:3]:
            raise ValueError(f"block_cnt shape {tuple(block_cnt.shape)} must be {tuple(block_idx.shape[:3])}")
    elif block_cnt is not None:
        check_int("block_cnt", block_cnt, 0)

    chosen = _routing_mask(block_idx, block_cnt, nkb)  # [B, Hl, Sq, NKB]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not causal and window is None and resolve_backend(backend, q.device, needs_grad=needs_grad, needs_lse=return_lse) == "torch":
        out, lse = _per_key_block(q, k, v, chosen, block_n, scale, key_mask)
        return (out, lse) if return_lse else out
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
        rule = visible_keys(sq, skv, causal, window or 0, 0, q.device)
        return allowed if rule is None else allowed & rule

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
        window=window or 0,
        key_mask=key_mask,
    )


def _dense_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention ``[n, D]`` x ``[m, D]`` with its log-sum-exp (fp32): PyTorch's fused CPU flash
    kernel when no gradient is needed (its LSE output has no gradient), explicit fp32 math otherwise."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.device.type == "cpu" and not needs_grad:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q[None, None], k[None, None], v[None, None], 0.0, False, scale=scale)
        return out[0, 0].float(), lse[0, 0]
    out, lse = dense_attention(q[None, None], k[None, None], v[None, None], torch.ones((), dtype=torch.bool, device=q.device), scale)
    return out[0, 0].float(), lse[0, 0]


def _per_key_block(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chosen: torch.Tensor, block_n: int, scale: float,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every (batch, head, key block): the queries that chose it attend to its keys (those
    ``key_mask [B, Skv]`` keeps); each query's partial results are merged by log-sum-exp. Plain
    differentiable torch ops; fp32 math."""
    b, hq, sq, d = q.shape
    group = hq // k.shape[1]
    chosen = chosen.expand(b, -1, -1, -1)
    if chosen.shape[1] != hq:
        chosen = chosen.repeat_interleave(hq // chosen.shape[1], 1)
    ids, outs, lses = [], [], []
    nkb = chosen.shape[-1]
    for bi in range(b):
        # the key positions of each block: all of them, or those the key mask keeps (None: none left)
        spans = [slice(j * block_n, (j + 1) * block_n) for j in range(nkb)]
        if key_mask is not None:
            kept = key_mask[bi].nonzero()[:, 0]
            per_block = kept.split(torch.bincount(kept // block_n, minlength=nkb).tolist())
            spans = [pos if pos.numel() else None for pos in per_block]
        for h in range(hq):
            keys, values = k[bi, h // group], v[bi, h // group]
            pairs = chosen[bi, h].T.nonzero()  # (block, query), grouped by block
            counts = torch.bincount(pairs[:, 0], minlength=nkb).tolist()
            for j, rows in zip((j for j, c in enumerate(counts) if c), pairs[:, 1].split([c for c in counts if c])):
                if spans[j] is None:
                    continue
                out, lse = _dense_lse(q[bi, h, rows], keys[spans[j]], values[spans[j]], scale)
                outs.append(out)
                lses.append(lse)
                ids.append(rows + (bi * hq + h) * sq)
    n = b * hq * sq
    if not ids:
        return empty_attention(q, k, v)
    ids, part_lse, part_out = torch.cat(ids), torch.cat(lses), torch.cat(outs)
    top = torch.full((n,), -math.inf, device=q.device).scatter_reduce(0, ids, part_lse.detach(), "amax")
    weight = torch.exp(part_lse - top[ids])
    total = q.new_zeros(n, dtype=torch.float32).index_add(0, ids, weight)
    out = q.new_zeros(n, d, dtype=torch.float32).index_add(0, ids, weight[:, None] * part_out)
    out = out / total.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    lse = top + total.log()
    return out.view(b, hq, sq, d).to(q.dtype), lse.view(b, hq, sq)
