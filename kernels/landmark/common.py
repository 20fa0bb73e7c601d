"""Shared pieces of the Landmark Attention op: input checks, the landmark mask, dtype and GQA helpers.

Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for Transformers",
arXiv 2305.16300; reference ``epfml/landmark-attention`` (``lm_benchmark/models/landmark.py``).
"""

from __future__ import annotations

import torch

from ..block_sparse import resolve_scale
from ..layout import check_int

__all__ = ["check_inputs", "compute_dtype", "landmark_mask"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def landmark_mask(tokens: int, block: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``bool [tokens]``, True at the landmark positions ``p % (block + 1) == block``."""
    check_int("tokens", tokens, 0)
    check_int("block", block, 1)
    return torch.arange(tokens, device=device) % (block + 1) == block


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(q, k, v, block: int, top_k: int | None, local_blocks: int, scale) -> float:
    """Validate the op's arguments; returns the softmax scale."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, T, D], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}; all must be on one device")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, tq, d = q.shape
    g, tk = k.shape[1], k.shape[2]
    if d == 0 or v.shape[-1] == 0:
        raise ValueError(f"head dims must be positive, got q D={d}, v Dv={v.shape[-1]}")
    if k.shape[0] != b or k.shape[3] != d or g == 0 or h % g:
        raise ValueError(f"k has shape {tuple(k.shape)}; expected [{b}, G, Tk, {d}] with the {h} query heads a "
                         "multiple of G")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v has shape {tuple(v.shape)}; expected [{b}, {g}, {tk}, Dv] like k")
    if tq > tk:
        raise ValueError(f"q has {tq} tokens, more than the {tk} keys (queries are the last Tq of the Tk positions)")
    check_int("block", block, 1)
    if top_k is not None:
        check_int("top_k", top_k, 1)
    check_int("local_blocks", local_blocks, 0)
    return resolve_scale(scale, d)
