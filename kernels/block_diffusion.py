"""Attention masks of block-diffusion language models, as dense masks and as block-sparse layouts.

BD3-LM (Arriola et al., arXiv 2503.09573) as used by Fast-dLLM v2 (arXiv 2509.26328) and Efficient-DLM
(arXiv 2512.14067): a sequence is cut into blocks of ``block`` tokens; inference is causal across blocks
and bidirectional inside one (:func:`block_causal_mask`). Training runs on ``[x_t ; x_0]`` (the noisy copy,
then the clean one, both at positions ``0 .. T-1``) with the BD3 mask (:func:`bd3_mask`), where ``b(i)`` is
the block of position ``i mod T``:

- noisy -> noisy iff same block (bidirectional inside the block);
- noisy -> clean iff ``b(k) < b(q)`` (the clean blocks before its own, never its own clean block);
- clean -> clean iff ``b(k) <= b(q)`` (block-causal);
- clean -> noisy never.

Both rules are unions of whole blocks, so with kernel blocks that divide ``block`` (and ``T`` a multiple of
``block``; queries starting on a block boundary for the inference mask) they are exact
:class:`~vzoo.kernels.BlockSparseLayout` s: no token mask is needed.
"""

from __future__ import annotations

import functools

import torch

from .block_sparse import block_sparse_attention, resolve_scale
from .layout import BlockSparseLayout, check_cached_qkv, check_int, repeat_kv
from .flash_pieces import Fold, Piece, available, flash_pieces_attention

__all__ = [
    "additive_mask", "bd3_attention", "bd3_layout", "bd3_mask", "block_causal_attention", "block_causal_layout", "block_causal_mask",
    "block_spans_mask", "kernel_block",
]


def block_causal_mask(q_len: int, kv_len: int, block: int, device: torch.device | str | None = None) -> torch.Tensor:
    """bool ``[q_len, kv_len]`` (True = visible): query ``i`` at absolute position ``p = kv_len - q_len + i`` sees
    key ``j`` iff ``j // block <= p // block``."""
    check_int("block", block, 1)
    check_int("q_len", q_len, 0)
    check_int("kv_len", kv_len, q_len)
    p = torch.arange(kv_len - q_len, kv_len, device=device)
    return torch.arange(kv_len, device=device)[None, :] // block <= p[:, None] // block


def bd3_mask(tokens: int, block: int, device: torch.device | str | None = None) -> torch.Tensor:
    """bool ``[2T, 2T]`` BD3 training mask over ``[x_t ; x_0]`` of ``tokens = T`` positions each (rules in the
    module docstring); ``T`` need not be a multiple of ``block``."""
    check_int("tokens", tokens, 1)
    check_int("block", block, 1)
    b = torch.arange(tokens, device=device).repeat(2) // block
    noisy = torch.arange(2 * tokens, device=device) < tokens
    q_noisy, k_noisy = noisy[:, None], noisy[None, :]
    bq, bk = b[:, None], b[None, :]
    return (q_noisy & k_noisy & (bq == bk)) | (q_noisy & ~k_noisy & (bk < bq)) | (~q_noisy & ~k_noisy & (bk <= bq))


def block_spans_mask(tokens: int, spans: list[tuple[int, int]] | torch.Tensor,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """bool ``[T, T]`` of LaDiR's latent blocks (arXiv 2510.04573): causal everywhere, plus full attention inside
    each span ``[start, end)`` (a latent block from its ``<bot>`` to its ``<eot>``), so a position sees the later
    positions of its own span and nothing after it. Spans must not overlap."""
    check_int("tokens", tokens, 1)
    spans = torch.as_tensor(spans, dtype=torch.long, device=device).reshape(-1, 2)
    if spans.numel() and (bool((spans[:, 0] < 0).any()) or bool((spans[:, 1] > tokens).any())
                          or bool((spans[:, 1] <= spans[:, 0]).any())):
        raise ValueError(f"spans {spans.tolist()} must be non-empty [start, end) ranges inside 0..{tokens}")
    pos = torch.arange(tokens, device=device)
    inside = (pos[None, :] >= spans[:, :1]) & (pos[None, :] < spans[:, 1:])  # [S, T]
    if bool((inside.sum(0) > 1).any()):
        raise ValueError(f"spans {spans.tolist()} overlap")
    ids = torch.arange(1, spans.shape[0] + 1, device=pos.device)
    span_of = torch.where(inside.any(0), (inside * ids[:, None]).sum(0), -1 - pos)  # outside every span: an id of its own
    return (pos[None, :] <= pos[:, None]) | (span_of[:, None] == span_of[None, :])


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A bool mask ``[..., q, kv]`` as the additive float mask ``[B or 1, 1, q, kv]`` transformers' eager and SDPA
    attention take (0 keeps, ``finfo(dtype).min`` hides)."""
    if mask.dtype != torch.bool or mask.dim() not in (2, 3, 4):
        raise ValueError(f"mask must be bool [q, kv], [B, q, kv] or [B, 1, q, kv], got {mask.dtype} {tuple(mask.shape)}")
    while mask.dim() < 4:
        mask = mask.unsqueeze(0) if mask.dim() == 2 else mask.unsqueeze(1)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def kernel_block(block: int, largest: int = 128) -> int:
    """The largest divisor of ``block`` that is at most ``largest``: the kernel block of the layouts."""
    check_int("block", block, 1)
    return max(d for d in range(1, min(block, largest) + 1) if block % d == 0)


def bd3_layout(tokens: int, block: int, kernel: int | None = None, device: torch.device | str | None = None) -> BlockSparseLayout:
    """:func:`bd3_mask` as a layout over the ``2T`` tokens, kernel blocks of ``kernel`` (default
    :func:`kernel_block`) tokens; ``tokens`` must be a multiple of ``block``."""
    check_int("tokens", tokens, 1)
    kernel = kernel_block(block) if kernel is None else kernel
    if block % kernel or tokens % block:
        raise ValueError(f"bd3_layout needs tokens={tokens} a multiple of block={block}, and block a multiple of the "
                         f"kernel block {kernel}")
    blocks = bd3_mask(tokens // kernel, block // kernel, device)  # one entry per kernel block
    return BlockSparseLayout.from_block_mask(blocks[None, None], kernel, kernel, 2 * tokens, 2 * tokens)


def block_causal_layout(q_len: int, kv_len: int, block: int, kernel: int | None = None,
                        device: torch.device | str | None = None) -> BlockSparseLayout:
    """:func:`block_causal_mask` as a layout (kernel blocks of ``kernel`` tokens, default :func:`kernel_block`);
    the first query's position ``kv_len - q_len`` must be a multiple of the kernel block."""
    check_int("q_len", q_len, 1)
    check_int("kv_len", kv_len, q_len)
    kernel = kernel_block(block) if kernel is None else kernel
    start = kv_len - q_len
    if block % kernel or start % kernel:
        raise ValueError(f"block_causal_layout needs block={block} a multiple of the kernel block {kernel} and the first "
                         f"query position {start} on a kernel block boundary")
    nqb, nkb = -(-q_len // kernel), -(-kv_len // kernel)
    qb = (torch.arange(nqb, device=device) * kernel + start) // block  # diffusion block of each query kernel block
    kb = torch.arange(nkb, device=device) * kernel // block
    return BlockSparseLayout.from_block_mask((kb[None, :] <= qb[:, None])[None, None], kernel, kernel, q_len, kv_len)


@functools.lru_cache(maxsize=64)  # one per (chunk, cache) shape: every layer and decoding step reuses it
def _causal_layout(q_len: int, kv_len: int, block: int, device: torch.device) -> BlockSparseLayout:
    return block_causal_layout(q_len, kv_len, block, device=device)


@functools.lru_cache(maxsize=64)
def _bd3_layout(tokens: int, block: int, device: torch.device) -> BlockSparseLayout:
    return bd3_layout(tokens, block, device=device)


def _causal_plan(q_len: int, kv_len: int, block: int) -> tuple[tuple[Piece, ...], tuple[Fold, ...]]:
    """:func:`block_causal_mask` as flash pieces: the chunk's own keys (causal) and the keys before it (all),
    then each query's later keys in its own block as folds (a last partial block on its own)."""
    start, full, rest = kv_len - q_len, q_len // block, q_len % block
    pieces = (Piece(0, q_len, start, kv_len, True),) + ((Piece(0, q_len, 0, start, False),) if start else ())
    folds = ((Fold(0, full, block, ((start, block, True),)),) if full else ()) + (
        (Fold(full * block, 1, rest, ((start + full * block, rest, True),)),) if rest else ())
    return pieces, folds


def _bd3_plan(tokens: int, block: int) -> tuple[tuple[Piece, ...], tuple[Fold, ...]]:
    """:func:`bd3_mask` over ``2 * tokens`` as flash pieces: clean queries block-causal over the clean half;
    noisy query ``i >= block`` causal over clean keys ``0 .. i - block`` (shifted by one block), plus, as folds, the
    rest of the previous clean block (the keys later than its own offset) and its whole own noisy block."""
    t, n = tokens, tokens // block
    pieces = (Piece(t, 2 * t, t, 2 * t, True),) + ((Piece(block, t, t, 2 * t - block, True),) if n > 1 else ())
    folds = (Fold(t, n, block, ((t, block, True),)), Fold(0, 1, block, ((0, block, False),))) + (
        (Fold(block, n - 1, block, ((t, block, True), (block, block, False))),) if n > 1 else ())
    return pieces, folds


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, *, scale: float | None = None,
                           key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention under :func:`block_causal_mask`: ``q [B, H, Tq, D]`` the last ``Tq`` positions of ``k, v
    [B, Hkv, Tk, D]`` (GQA), the first query on a block boundary. ``key_mask`` bool ``[B, Tk]`` hides padding.

    On the CPU in float32 without ``key_mask`` it runs as fused flash pieces
    (:mod:`vzoo.kernels.flash_pieces`: the chunk's keys causal, the keys before it, then the later keys of each
    query's own block), forward and backward; everything else runs :func:`block_causal_layout` on
    :func:`vzoo.kernels.block_sparse_attention`. Both are exact."""
    check_cached_qkv(q, k, v)
    check_int("block", block, 1)
    tq, tk = q.shape[2], k.shape[2]
    if (tk - tq) % block:
        raise ValueError(f"block_causal_attention: the first query (position {tk - tq}) must start a block of {block}")
    scale = resolve_scale(scale, q.shape[-1])
    if key_mask is not None or tq == 0 or not available(q, k, v):
        return block_sparse_attention(q, k, v, _causal_layout(tq, tk, block, q.device), scale=scale, key_mask=key_mask)
    return flash_pieces_attention(q, repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1]), *_causal_plan(tq, tk, block),
                                  block, scale)


def bd3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, *,
                  scale: float | None = None) -> torch.Tensor:
    """Attention under :func:`bd3_mask` over ``[x_t ; x_0]``: ``q [B, H, 2T, D]``, ``k, v [B, Hkv, 2T, D]`` (GQA),
    ``T`` a multiple of ``block``. Fused flash pieces on the CPU in float32 (forward and backward), else
    :func:`bd3_layout` on :func:`vzoo.kernels.block_sparse_attention`; both exact."""
    check_cached_qkv(q, k, v)
    check_int("block", block, 1)
    if q.shape[2] != k.shape[2] or q.shape[2] % (2 * block):
        raise ValueError(f"bd3_attention needs 2T queries over the same 2T keys, T a multiple of block={block}; got "
                         f"{q.shape[2]} queries over {k.shape[2]} keys")
    tokens, scale = q.shape[2] // 2, resolve_scale(scale, q.shape[-1])
    if not available(q, k, v):
        return block_sparse_attention(q, k, v, _bd3_layout(tokens, block, q.device), scale=scale)
    return flash_pieces_attention(q, repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1]), *_bd3_plan(tokens, block),
                                  block, scale)
