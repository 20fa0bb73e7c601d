"""Local Linear Attention, one decoding step over a key/value cache (Zuo et al., arXiv 2510.01450).

LLA keeps no compressed state: the new query's local regression needs every cached key and value,
so the state is the cache itself (``[B, Hkv, T, D]``), appended by the caller. The step runs the
streamed three-pass algorithm of :mod:`.chunk` (FlashLLA, github.com/Yifei-Zuo/FlashLLA) for one
query: Theta(T D) memory and (2 + CG iterations) passes over the cache.
"""

from __future__ import annotations

import torch

from .chunk import check_stream_options, lla_chunk
from .naive import check_inputs

__all__ = ["local_linear_attention_step"]


def local_linear_attention_step(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    ridge: float = 10.0,
    scale: float | None = None,
    cg_max_iters: int = 32,
    cg_tol: float = 1e-6,
    block_size: int | None = None,
    chunk_size: int = 64,
    key_mask: torch.Tensor | None = None,
    delta_eps: float = 1e-12,
    precondition: bool = False,
) -> torch.Tensor:
    """The output of the newest token.

    Args:
        q: ``[B, H, D]``, the query of the token at the last cache position.
        k_cache: ``[B, Hkv, T, D]``, every key so far, the new token's included (``H`` a multiple of ``Hkv``).
        v_cache: ``[B, Hkv, T, Dv]``.
        key_mask: bool ``[B, T]``, False for keys that get zero weight (padding).
        Other arguments as in :func:`vzoo.kernels.lla.local_linear_attention`.

    Returns:
        ``[B, H, Dv]`` in ``q.dtype``; equal to the last row of the full causal op over the cache.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q must be a 3-D tensor [B, H, D], got {got}")
    if isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4 and k_cache.shape[2] == 0:
        raise ValueError("k_cache is empty: the cache must hold the new token's key")
    q = q.unsqueeze(2)
    ridge, scale, block_size = check_inputs(q, k_cache, v_cache, ridge, scale, True, block_size, key_mask)
    check_stream_options(cg_max_iters, cg_tol, chunk_size)
    out = lla_chunk(q, k_cache, v_cache, ridge, scale, True, cg_max_iters, cg_tol, block_size, chunk_size, key_mask,
                    delta_eps, precondition)
    return out.squeeze(2)
