"""Quadratic reference of Lightning Attention: the masked-decay left product, materialising ``T x T``.

Semantics of ``lightning_attn/ops/torch/linear_attention.py`` (OpenNLPLab/lightning-attention; Qin et
al., arXiv 2401.04658): ``o = (Q K^T * M) V`` with ``M[t, s] = lambda^(t - s)`` for ``s <= t`` (else 0),
``lambda = exp(-s_h)`` per head, no normalisation; plus the initial state, entering as the state before
token 0: ``o_t += lambda^(t + 1) q_t S_{-1}``.
"""

from __future__ import annotations

import torch

from .common import accum_dtype, repeat_kv

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
    acc = accum_dtype(q.dtype)
    h, t = q.shape[1], q.shape[2]
    q = q.to(acc) * scale
    k, v = repeat_kv(k.to(acc), h), repeat_kv(v.to(acc), h)
    pos = torch.arange(t, device=q.device, dtype=acc)
    diff = pos[:, None] - pos[None, :]  # t - s
    causal = diff >= 0
    rates = torch.zeros(h, device=q.device, dtype=acc) if s is None else s.to(acc)
    mask = torch.where(causal, torch.exp(-rates[:, None, None] * diff.clamp_min(0)), 0.0)  # [H, T, T]
    out = (q @ k.transpose(-1, -2) * mask) @ v
    tail = torch.exp(-rates[:, None] * (t - 1 - pos))  # lambda^(T-1-s): how much of token s the final state keeps
    final = (k * tail[..., None]).transpose(-1, -2) @ v
    if initial_state is not None:
        h0 = initial_state.to(acc)
        out = out + (q * torch.exp(-rates[:, None] * (pos + 1))[..., None]) @ h0
        final = final + torch.exp(-rates * t)[:, None, None] * h0
    return out, final
