"""Titans neural memory, parallel form (arXiv 2501.00663 §3.2 "parallelizing the long-term memory training").

Inside a mini-batch every gradient is taken at the weights ``G`` the mini-batch started from, so all of
them come at once in closed form: for the MLP ``z_l = W_l a_{l-1}``, ``a_l = act(z_l)``, the per-token
gradient of ``||M(k) - v||^2`` w.r.t. ``W_l`` is the outer product ``delta_l a_{l-1}^T`` (``delta_L = 2 (M(k) - v)``,
``delta_l = (W_{l+1}^T delta_{l+1}) * act'(z_l)``). The momentum / decay recurrence over the mini-batch
is linear, so its end values are weighted sums of those gradients:

    S_n = E_n S_0 + sum_i P[n, i] u_i
    M_n = A M_0 + (sum_t c_t E_t) S_0 + sum_i (sum_t c_t P[t, i]) u_i

with ``P[t, i] = prod_{i<j<=t} eta_j``, ``E_t = prod_{j<=t} eta_j``, ``c_t = prod_{j>t} (1 - alpha_j)``,
``A = prod_j (1 - alpha_j)``; each weighted sum of outer products is one batched matmul, and the
products are cumulative products of masked matrices (no division, so gates of exactly 0 are safe).
Mini-batches run in sequence (each starts from the previous one's end). Differentiable by autograd.
The optional soft clamp of each per-token gradient (``max_grad_norm``) needs no materialised gradient: the
Frobenius norm of ``delta_l a_{l-1}^T`` is ``||delta_l|| ||a_{l-1}||``, and the factor joins the coefficients.
Matches :mod:`.naive` (the per-token gradients of lucidrains/titans-pytorch ``NeuralMemory``, taken at
the weights of the call start, here refreshed every ``batch_size`` tokens).
"""

from __future__ import annotations

import math

import torch

from .naive import MemoryState, Weights, memory_mlp, soft_clamp_scale

__all__ = ["memory_grad_sums", "neural_memory_chunk"]


def _act_and_slope(z: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(z * math.sqrt(0.5)))
        return z * cdf, cdf + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    s = torch.sigmoid(z)
    return z * s, s * (1 + z * (1 - s))


def memory_grad_sums(weights: Weights, k: torch.Tensor, v: torch.Tensor, coefs: torch.Tensor, activation: str,
                     residual: bool, max_grad_norm: float | None = None) -> list[Weights]:
    """Weighted sums of per-token gradients of ``||M_W(k_i) - v_i||^2`` at ``weights``.

    Args:
        weights: ``W_l [B, out_l, in_l]``.
        k, v: ``[B, n, Dk]``, ``[B, n, Dv]``.
        coefs: ``[C, B, n]``, ``C`` sets of per-token coefficients.
        max_grad_norm: soft-clamp each per-token gradient of each ``W_l`` first (:func:`.naive.soft_clamp_scale`).

    Returns:
        ``C`` tuples like ``weights``: ``sum_i coefs[c, :, i] * grad_i``.
    """
    acts, slopes = [k], []
    h = k
    for i, w in enumerate(weights):
        z = h @ w.transpose(-1, -2)
        if i < len(weights) - 1:
            h, slope = _act_and_slope(z, activation)
            acts.append(h)
            slopes.append(slope)
        else:
            h = z
    delta = 2 * ((h + k if residual else h) - v)  # [B, n, Dv]
    sums: list[list[torch.Tensor]] = [[] for _ in range(coefs.shape[0])]
    for layer in range(len(weights) - 1, -1, -1):
        scaled = delta
        if max_grad_norm is not None:  # ||delta a^T||_F = ||delta|| ||a||
            norm = delta.norm(dim=-1) * acts[layer].norm(dim=-1)
            scaled = delta * soft_clamp_scale(norm, max_grad_norm)[..., None]
        for c in range(coefs.shape[0]):
            sums[c].append((scaled * coefs[c, :, :, None]).transpose(-1, -2) @ acts[layer])
        if layer:
            delta = (delta @ weights[layer]) * slopes[layer - 1]
    return [tuple(reversed(s)) for s in sums]


def _scan_coefficients(eta: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one mini-batch of ``n`` tokens, ``eta, keep = 1 - alpha [B, n]``: the coefficients of
    ``[S_0, u_1..u_n]`` in ``M_n`` and in ``S_n`` (each ``[B, n + 1]``) and ``A [B]``."""
    n = eta.shape[1]
    rows = torch.arange(n + 1, device=eta.device)[:, None]  # row r: S_0 (r = 0) or u_r (token r - 1)
    cols = torch.arange(n, device=eta.device)[None, :]
    factors = torch.where(cols >= rows, eta[:, None, :], torch.ones_like(eta)[:, None, :])
    prods = torch.cumprod(factors, -1)  # [B, n+1, n]: prod of eta_j over rows <= j <= t (1 where empty)
    prods = prods * (cols >= rows - 1)  # the token r-1 contributes from t = r-1 on
    tail = torch.cat([keep.flip(-1).cumprod(-1).flip(-1)[:, 1:], torch.ones_like(keep[:, :1])], 1)  # c_t
    coef_m = (prods * tail[:, None, :]).sum(-1)
    coef_s = prods[..., -1]
    return coef_m, coef_s, keep.prod(-1)


def _combine(decay: torch.Tensor, base: Weights, scale_s: torch.Tensor, mom: Weights, sums: Weights) -> Weights:
    return tuple(decay[:, None, None] * b + scale_s[:, None, None] * s + g for b, s, g in zip(base, mom, sums))


def neural_memory_chunk(q, k, v, lr, momentum, decay, state: MemoryState, batch_size: int, activation: str,
                        residual: bool, max_grad_norm: float | None = None) -> tuple[torch.Tensor, MemoryState]:
    """Parallel form, same contract as :func:`.naive.neural_memory_naive` (float32 inputs)."""
    read, weights, mom, offset = state
    outs = []
    a, t_len = 0, q.shape[1]
    while a < t_len:
        e = min(a + batch_size - offset, t_len)
        outs.append(memory_mlp(read, q[:, a:e], activation, residual))
        coef_m, coef_s, keep_all = _scan_coefficients(momentum[:, a:e], 1 - decay[:, a:e])
        theta = -lr[:, a:e]
        sums_m, sums_s = memory_grad_sums(read, k[:, a:e], v[:, a:e],
                                          torch.stack([coef_m[:, 1:] * theta, coef_s[:, 1:] * theta]), activation, residual,
                                          max_grad_norm)
        weights = _combine(keep_all, weights, coef_m[:, 0], mom, sums_m)
        mom = tuple(coef_s[:, 0, None, None] * s + g for s, g in zip(mom, sums_s))
        offset += e - a
        if offset == batch_size:
            read, offset = weights, 0
        a = e
    y = torch.cat(outs, 1) if outs else q.new_zeros(q.shape[0], 0, weights[-1].shape[1])
    return y, MemoryState(read, weights, mom, offset)
