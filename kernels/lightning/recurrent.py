"""Token-recurrent Lightning Attention: constant cost per token, for decoding and as a reference.

The recurrence of TransNormerLLM's inference path (``NormLinearAttention.inference``, Qin et al., arXiv
2307.14995) and of fla's ``fused_recurrent`` simple-GLA with a constant per-head decay:
``S_t = lambda S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``, ``lambda = exp(-s_h)``.
"""

from __future__ import annotations

import torch

from .common import accum_dtype, check_inputs, check_scale, decay_rates, repeat_kv

__all__ = ["lightning_attention_recurrent", "lightning_attention_step"]


def _step(q, k, v, state, lam, scale):
    """Checked, head-expanded, accumulation-dtype tensors: ``(o [B, H, Dv], new state [B, H, D, Dv])``."""
    kv = k[..., :, None] * v[..., None, :]
    state = kv if state is None else (state if lam is None else lam[:, None, None] * state) + kv
    return scale * torch.einsum("bhd,bhde->bhe", q, state), state


def lightning_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor | None = None,
    decay: torch.Tensor | float | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step.

    Args:
        q: ``[B, H, D]``; k: ``[B, Hkv, D]``; v: ``[B, Hkv, Dv]`` (``H`` a multiple of ``Hkv``).
        state: ``[B, H, D, Dv]`` (the state after the previous token) or ``None`` (zeros).
        decay: per-head rates ``[H]`` (``lambda = exp(-decay)``), a number for all heads, or ``None``.
        scale: multiplies ``q``.

    Returns:
        ``o [B, H, Dv]`` in ``q.dtype`` and the new state ``[B, H, D, Dv]`` (float32; float64 for
        float64 inputs).
    """
    check_inputs(q, k, v, state, step=True)
    scale = check_scale(scale)
    acc = accum_dtype(q.dtype)
    h = q.shape[1]
    lam = decay_rates(decay, h, q.device)
    lam = None if lam is None else torch.exp(-lam.to(acc))
    o, state = _step(q.to(acc), repeat_kv(k.to(acc), h), repeat_kv(v.to(acc), h),
                     None if state is None else state.to(acc), lam, scale)
    return o.to(q.dtype), state


def lightning_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor | float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    scale: float = 1.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Lightning Attention by the token loop (same arguments and results as ``lightning_attention``)."""
    check_inputs(q, k, v, initial_state)
    scale = check_scale(scale)
    acc = accum_dtype(q.dtype)
    h = q.shape[1]
    lam = decay_rates(decay, h, q.device)
    lam = None if lam is None else torch.exp(-lam.to(acc))
    qa, ka, va = q.to(acc), repeat_kv(k.to(acc), h), repeat_kv(v.to(acc), h)
    state = None if initial_state is None else initial_state.to(acc)
    outs = []
    for t in range(q.shape[2]):
        o, state = _step(qa[:, :, t], ka[:, :, t], va[:, :, t], state, lam, scale)
        outs.append(o)
    if state is None:  # T == 0
        state = q.new_zeros(q.shape[0], h, q.shape[-1], v.shape[-1], dtype=acc)
    out = torch.stack(outs, 2).to(q.dtype) if outs else q.new_zeros(*q.shape[:3], v.shape[-1])
    return (out, state) if output_final_state else out
