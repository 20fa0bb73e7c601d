"""Shared pieces of the Landmark Attention op: input checks and the landmark mask.

Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for Transformers",
arXiv 2305.16300; reference ``epfml/landmark-attention`` (``lm_benchmark/models/landmark.py``).
"""

from __future__ import annotations

import torch

from ..block_sparse import resolve_scale
from ..layout import check_cached_qkv, check_int

__all__ = ["check_inputs", "landmark_mask"]


def landmark_mask(tokens: int, block: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``bool [tokens]``, True at the landmark positions ``p % (block + 1) == block``."""
    check_int("tokens", tokens, 0)
    check_int("block", block, 1)
    return torch.arange(tokens, device=device) % (block + 1) == block


def check_inputs(q, k, v, block: int, top_k: int | None, local_blocks: int, scale) -> float:
    """Validate the op's arguments; returns the softmax scale."""
    check_cached_qkv(q, k, v)
    check_int("block", block, 1)
    if top_k is not None:
        check_int("top_k", top_k, 1)
    check_int("local_blocks", local_blocks, 0)
    return resolve_scale(scale, q.shape[-1])
