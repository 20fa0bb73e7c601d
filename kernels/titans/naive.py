"""Titans neural memory, reference form: an explicit loop over tokens (Behrouz, Zhong, Mirrokni, arXiv 2501.00663).

The memory is an MLP ``M_W(k) = W_L act(... act(W_1 k))`` (``+ k`` with ``residual``), one weight set per
batch row. Token ``t`` of a mini-batch writes with the per-token gradient taken at the weights ``G`` the
mini-batch started from, then runs the momentum / decay recurrence of the paper:

    u_t = -theta_t * grad_W ||M_G(k_t) - v_t||^2
    S_t = eta_t S_{t-1} + u_t
    M_t = (1 - alpha_t) M_{t-1} + S_t

and reads ``y_t = M_G(q_t)``: the memory as it was when the token's mini-batch began (with
``batch_size=1``: ``M_{t-1}``). When a mini-batch is complete ``G <- M_t``. With ``max_grad_norm = c`` each
per-token gradient of each weight matrix is first soft-clamped, ``g * c tanh(||g||_F / c) / ||g||_F``
(:func:`soft_clamp_scale`; lucidrains' ``max_grad_norm``), which the paper does not do. Gradients here come from
``torch.func.grad``; :mod:`.chunk` is the parallel form of the same computation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["MemoryState", "memory_mlp", "neural_memory_naive", "soft_clamp_scale"]

Weights = tuple[torch.Tensor, ...]

_ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu}


class MemoryState(NamedTuple):
    """The memory after some tokens; every tensor is float32 ``[B, out, in]`` like the weights.

    read: the weights the current mini-batch reads and takes gradients at (its start).
    weights: ``M_t`` after the last token seen (equal to ``read`` at a mini-batch boundary).
    momentum: ``S_t`` after the last token seen.
    offset: tokens of the current mini-batch already written (``0 <= offset < batch_size``).
    """

    read: Weights
    weights: Weights
    momentum: Weights
    offset: int


def memory_mlp(weights: Weights, x: torch.Tensor, activation: str = "gelu", residual: bool = False) -> torch.Tensor:
    """Apply the memory MLP: ``x [B, T, D_in]`` with weights ``W_l [B, out_l, in_l]`` -> ``[B, T, D_out]``."""
    act = _ACTIVATIONS[activation]
    h = x
    for i, w in enumerate(weights):
        h = h @ w.transpose(-1, -2)
        if i < len(weights) - 1:
            h = act(h)
    return h + x if residual else h


def soft_clamp_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor ``c tanh(n / c) / n`` that soft-clamps a gradient of norm ``n >= 0`` to a norm below ``c``
    (about 1 while ``n << c``; 1 at ``n = 0``, with finite derivatives there)."""
    n = norm.clamp_min(torch.finfo(norm.dtype).tiny)
    return torch.tanh(n / max_norm) * max_norm / n


def neural_memory_naive(q, k, v, lr, momentum, decay, state: MemoryState, batch_size: int, activation: str,
                        residual: bool, max_grad_norm: float | None = None) -> tuple[torch.Tensor, MemoryState]:
    """Token loop. ``q, k [B, T, Dk]``, ``v [B, T, Dv]``, gates ``[B, T]``, all float32.

    Returns ``y [B, T, Dv]`` (float32) and the state after the last token."""

    def loss(weights: Weights, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        # summed over the batch rows: each row's gradient is that of its own loss
        return (memory_mlp(weights, key, activation, residual) - value).pow(2).sum()

    grad = torch.func.grad(loss)
    read, weights, mom, offset = state
    outs = []
    for t in range(q.shape[1]):
        outs.append(memory_mlp(read, q[:, t : t + 1], activation, residual))
        g = grad(read, k[:, t : t + 1], v[:, t : t + 1])
        if max_grad_norm is not None:
            g = tuple(gi * soft_clamp_scale(gi.flatten(1).norm(dim=1), max_grad_norm)[:, None, None] for gi in g)
        theta, eta, keep = lr[:, t, None, None], momentum[:, t, None, None], 1 - decay[:, t, None, None]
        mom = tuple(eta * s - theta * gi for s, gi in zip(mom, g))
        weights = tuple(keep * w + s for w, s in zip(weights, mom))
        offset += 1
        if offset == batch_size:
            read, offset = weights, 0
    y = torch.cat(outs, 1) if outs else q.new_zeros(q.shape[0], 0, weights[-1].shape[1])
    return y, MemoryState(read, weights, mom, offset)
