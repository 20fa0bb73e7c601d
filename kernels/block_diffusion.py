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

import torch

from .layout import BlockSparseLayout, check_int

__all__ = ["additive_mask", "bd3_layout", "bd3_mask", "block_causal_layout", "block_causal_mask", "kernel_block"]


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
