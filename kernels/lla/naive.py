"""Local Linear Attention, dense reference (Zuo et al., arXiv 2510.01450).

Matches ``flashlla/ops/naive.py::lla_forward_naive`` of github.com/Yifei-Zuo/FlashLLA (ridge scaled by
the weight sum, denominator ``delta + eps * sign(delta)``, optional block-diagonal ``Sigma``), extended to
``[B, H, T, D]`` tensors, GQA, bottom-right aligned queries and a key mask. Every query gets its own
``D x D`` matrix and a ``torch.linalg.solve``: Theta(n^2 D + n D^3) work and Theta(n^2 D) memory, for
tests and small inputs.

Per query ``i`` (at position ``p_i``) over the keys ``j`` it sees, with ``s`` the scale and ``lambda`` the ridge:
    w_ij = exp(s q_i.k_j - m_i),  omega_i = sum_j w_ij,  mu_i = sum_j w_ij (k_j - q_i),
    Sigma_i = sum_j w_ij (k_j - q_i)(k_j - q_i)^T + lambda omega_i I,  rho_i = Sigma_i^-1 mu_i,
    delta_i = omega_i - mu_i.rho_i,  S_ij = w_ij (1 - rho_i.(k_j - q_i)) / delta_i,  o_i = sum_j S_ij v_j,
the intercept of the kernel-weighted ridge regression of ``v`` on ``k - q_i``.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..block_sparse import resolve_scale
from ..layout import check_flag, check_int, check_tensor

__all__ = ["check_inputs", "lla_naive", "lla_weights", "visible"]


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ridge: float,
    scale: float | None,
    causal: bool,
    block_size: int | None,
    key_mask: torch.Tensor | None,
) -> tuple[float, float, int]:
    """Validate ``q [B, H, Tq, D]``, ``k [B, Hkv, Tk, D]``, ``v [B, Hkv, Tk, Dv]`` and the options; raise
    ``ValueError`` naming the argument. Returns ``(ridge, scale, block_size)`` resolved."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in [B, Hkv, Tk]")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch sizes differ: q has {q.shape[0]}, k has {k.shape[0]}")
    if q.shape[3] != k.shape[3] or q.shape[3] == 0:
        raise ValueError(f"q and k need the same head dim >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    check_flag("causal", causal)
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(
            f"causal with {q.shape[2]} queries over {k.shape[2]} keys: queries are the last Tq key positions, need Tq <= Tk"
        )
    if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge={ridge!r} must be a finite number >= 0")
    d = q.shape[3]
    scale = resolve_scale(scale, d)
    if block_size is None:
        block_size = d
    check_int("block_size", block_size, 1)
    if d % block_size:
        raise ValueError(f"block_size={block_size} must divide the head dim D={d}")
    if key_mask is not None:
        want = (k.shape[0], k.shape[2])
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool or tuple(key_mask.shape) != want:
            raise ValueError(
                f"key_mask must be a bool tensor [B, Tk] = [{k.shape[0]}, {k.shape[2]}], got "
                f"{tuple(key_mask.shape) if isinstance(key_mask, torch.Tensor) else type(key_mask).__name__}"
                f"{'' if not isinstance(key_mask, torch.Tensor) else ' ' + str(key_mask.dtype)}"
            )
        if key_mask.device != k.device:
            raise ValueError(f"key_mask is on {key_mask.device}, k on {k.device}")
    return float(ridge), scale, block_size


def visible(tq: int, tk: int, causal: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """bool ``[Tq, Tk]``: query ``i`` (position ``i + Tk - Tq``) sees key ``j`` when ``j <= i + Tk - Tq`` (or always)."""
    if not causal:
        return torch.ones(tq, tk, dtype=torch.bool, device=device)
    return torch.arange(tk, device=device)[None, :] <= torch.arange(tq, device=device)[:, None] + (tk - tq)


def _compute_dtype(x: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def lla_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    ridge: float = 10.0,
    scale: float | None = None,
    causal: bool = True,
    block_size: int | None = None,
    key_mask: torch.Tensor | None = None,
    delta_eps: float = 1e-12,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Effective weights ``S [B, H, Tq, Tk]`` (in the compute dtype: float64 for float64 inputs or
    ``dtype=torch.float64``, else float32) such that the output is ``S @ v``. Rows sum to 1 up to
    ``delta_eps``; entries can be negative. A query that sees no key gets a zero row."""
    ridge, scale, block_size = check_inputs(q, k, k, ridge, scale, causal, block_size, key_mask)
    return _weights(q, k, ridge, scale, causal, block_size, key_mask, delta_eps, dtype)


def _weights(
    q: torch.Tensor,
    k: torch.Tensor,
    ridge: float,
    scale: float,
    causal: bool,
    block_size: int,
    key_mask: torch.Tensor | None,
    delta_eps: float,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """:func:`lla_weights` of checked inputs (``scale`` and ``block_size`` resolved by :func:`check_inputs`)."""
    ct = _compute_dtype(q, dtype)
    b, h, tq, d = q.shape
    g = h // k.shape[1]
    qc = q.to(ct)
    kc = k.to(ct).repeat_interleave(g, 1)
    keep = visible(tq, k.shape[2], causal, q.device)[None, None]
    if key_mask is not None:  # hidden keys get zero weight and are zeroed, so NaN there cannot leak
        keep = keep & key_mask[:, None, None, :]
        kc = kc.masked_fill(~key_mask[:, None, :, None], 0)
    s = (qc @ kc.transpose(-1, -2)) * scale
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # a row without keys: all weights 0
    w = torch.exp(s - m)
    omega = w.sum(-1)  # [B, H, Tq]
    diff = kc[:, :, None, :, :] - qc[:, :, :, None, :]  # [B, H, Tq, Tk, D]
    mu = torch.einsum("bhij,bhijd->bhid", w, diff)
    sigma = torch.einsum("bhij,bhijd,bhije->bhide", w, diff, diff)
    blocks = torch.arange(d, device=q.device) // block_size
    sigma = sigma * (blocks[:, None] == blocks[None, :]).to(ct)  # independent diagonal sub-blocks
    eye = torch.eye(d, dtype=ct, device=q.device)
    sigma = sigma + (ridge * omega)[..., None, None] * eye
    empty = (omega == 0)[..., None, None]
    sigma = torch.where(empty, eye.expand_as(sigma), sigma)  # mu = 0 there, so rho = 0
    rho = torch.linalg.solve(sigma, mu.unsqueeze(-1)).squeeze(-1)
    delta = omega - (mu * rho).sum(-1)
    delta = delta + delta_eps * torch.where(delta >= 0, 1.0, -1.0).to(ct)
    return w * (1 - torch.einsum("bhijd,bhid->bhij", diff, rho)) / delta[..., None]


def lla_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ridge: float,
    scale: float,
    causal: bool,
    block_size: int,
    key_mask: torch.Tensor | None = None,
    delta_eps: float = 1e-12,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dense LLA of checked inputs (:func:`check_inputs`, which also resolves ``scale`` and ``block_size``):
    ``q [B, H, Tq, D]``, ``k [B, Hkv, Tk, D]``, ``v [B, Hkv, Tk, Dv]`` -> ``[B, H, Tq, Dv]`` in ``q.dtype``;
    differentiable (autograd through ``torch.linalg.solve``)."""
    s = _weights(q, k, ridge, scale, causal, block_size, key_mask, delta_eps, dtype)
    vc = v.to(s.dtype) if key_mask is None else v.to(s.dtype).masked_fill(~key_mask[:, None, :, None], 0)
    vc = vc.repeat_interleave(q.shape[1] // k.shape[1], 1)
    return (s @ vc).to(q.dtype)
