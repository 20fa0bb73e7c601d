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
import torch.nn.functional as F

from .block_sparse import block_sparse_attention, resolve_scale
from .layout import BlockSparseLayout, check_cached_qkv, check_int
from .merge import merge_attention_states

__all__ = [
    "additive_mask", "bd3_layout", "bd3_mask", "block_causal_attention", "block_causal_layout", "block_causal_mask",
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


def _flash_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's fused CPU flash kernel with its log-sum-exp (``k`` must hold at least one key: an empty key set
    crashes that kernel)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _later_in_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, scale: float):
    """Each query of ``q [B, H, T, D]`` (positions ``0 .. T-1`` of ``k, v``, blocks from 0) over the keys after it in
    its own block: ``(out, lse)``, ``lse = -inf`` for a block's last query."""
    b, h, t, d = q.shape
    nb = -(-t // block)
    pad = nb * block - t
    qb, kb, vb = (F.pad(x, (0, 0, 0, pad)).view(b, h, nb, block, x.shape[-1]) for x in (q, k, v))
    s = qb @ kb.transpose(-1, -2) * scale
    i = torch.arange(block, device=q.device)
    exists = torch.arange(nb * block, device=q.device).view(nb, 1, block) < t
    s = s.masked_fill(~((i[None, :] > i[:, None]) & exists), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.exp(s - torch.where(lse.isinf(), 0.0, lse)[..., None]) @ vb
    return out.view(b, h, nb * block, -1)[:, :, :t], lse.view(b, h, nb * block)[:, :, :t]


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, *, scale: float | None = None,
                           key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention under :func:`block_causal_mask`: ``q [B, H, Tq, D]`` the last ``Tq`` positions of ``k, v
    [B, Hkv, Tk, D]`` (GQA), the first query on a block boundary. ``key_mask`` bool ``[B, Tk]`` hides padding.

    An inference call on the CPU (nothing requires grad, float32, no ``key_mask``) runs as PyTorch's fused flash
    kernel: the keys before the chunk (no mask) and the chunk's own keys (causal), each with its log-sum-exp,
    merged with the later keys of each query's own block (a dense ``block x block`` part). Everything else runs
    :func:`block_causal_layout` on :func:`vzoo.kernels.block_sparse_attention`. Both are exact."""
    check_cached_qkv(q, k, v)
    check_int("block", block, 1)
    tq, tk = q.shape[2], k.shape[2]
    start = tk - tq
    if start % block:
        raise ValueError(f"block_causal_attention: the first query (position {start}) must start a block of {block}")
    scale = resolve_scale(scale, q.shape[-1])
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    fused = (q.device.type == "cpu" and q.dtype == torch.float32 and key_mask is None and not grad and tq > 0
             and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"))
    if not fused:
        return block_sparse_attention(q, k, v, _causal_layout(tq, tk, block, q.device), scale=scale, key_mask=key_mask)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    own_k, own_v = k[:, :, start:], v[:, :, start:]
    parts = [_flash_lse(q, own_k, own_v, True, scale), _later_in_block(q, own_k, own_v, block, scale)]
    if start:
        parts.append(_flash_lse(q, k[:, :, :start], v[:, :, :start], False, scale))
    return merge_attention_states([o for o, _ in parts], [lse for _, lse in parts])[0]
