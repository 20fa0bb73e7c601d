"""Quadratic reference of Lightning Attention: the masked-decay left product, materialising ``T x T``.

Semantics of ``lightning_attn/ops/torch/linear_attention.py`` (OpenNLPLab/lightning-attention; Qin et
al., arXiv 2401.04658): ``o = (Q K^T * M) V`` with ``M[t, s] = lambda^(t - s)`` for ``s <= t`` (else 0),
``lambda = exp(-s_h)`` per head, no normalisation; plus the initial state, entering as the state before
token 0: ``o_t += lambda^(t + 1) q_t S_{-1}``.
"""

from __future__ import annotations

import torch

from .common import final_state, prepare

__all__ = ["lightning_naive"]


def lightning_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked inputs ``q [B, H, T, D]``, ``k [B, Hkv, T, D]``, ``v [B, Hkv, T, Dv]``, rates ``s [H]`` or
    ``None``, ``initial_state [B, H, D, Dv]`` or ``None``. Returns ``o [B, H, T, Dv]`` (accumulation dtype)
    and the final state ``[B, H, D, Dv]``."""
    q, k, v, rates = prepare(q, k, v, s, scale)
    pos = torch.arange(q.shape[2], device=q.device, dtype=q.dtype)
    diff = pos[:, None] - pos[None, :]  # t - s
    mask = torch.where(diff >= 0, torch.exp(-rates[:, None, None] * diff.clamp_min(0)), 0.0)  # [H, T, T]
    out = (q @ k.transpose(-1, -2) * mask) @ v
    if initial_state is not None:
        out = out + (q * torch.exp(-rates[:, None] * (pos + 1))[..., None]) @ initial_state.to(q.dtype)
    return out, final_state(k, v, rates, initial_state)
