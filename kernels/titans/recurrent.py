"""Titans neural memory, one token at a time for decoding (arXiv 2501.00663).

The state (:class:`MemoryState`) holds the weights the current mini-batch reads (``read``), the running
``M_t`` and ``S_t`` and how many tokens of the mini-batch were written (``offset``). A token reads
``M_read(q_t)``, then writes ``u_t = -theta_t grad ||M_read(k_t) - v_t||^2``, ``S_t = eta_t S_{t-1} + u_t``,
``M_t = (1 - alpha_t) M_{t-1} + S_t`` (the gradient soft-clamped first with ``max_grad_norm``); when the
mini-batch is full, ``read <- M_t``. Because every gradient of a mini-batch is taken at ``read``, the running
sums need no pending tokens: after any split of a sequence (prefill of any length, then steps) the state
equals that of one parallel pass, as long as the mini-batches stay aligned to the sequence start (carried
by ``offset``).
"""

from __future__ import annotations

import torch

from .chunk import memory_grad_sums
from .naive import MemoryState, memory_mlp

__all__ = ["neural_memory_step", "neural_memory_recurrent"]


def neural_memory_step(q, k, v, lr, momentum, decay, state: MemoryState, batch_size: int, activation: str,
                       residual: bool, max_grad_norm: float | None = None) -> tuple[torch.Tensor, MemoryState]:
    """One token: ``q, k [B, Dk]``, ``v [B, Dv]``, gates ``[B]`` (float32) -> ``y [B, Dv]`` and the new state."""
    read, weights, mom, offset = state
    y = memory_mlp(read, q[:, None], activation, residual)[:, 0]
    (grads,) = memory_grad_sums(read, k[:, None], v[:, None], -lr[None, :, None], activation, residual,
                                 max_grad_norm)
    mom = tuple(momentum[:, None, None] * s + g for s, g in zip(mom, grads))
    weights = tuple((1 - decay[:, None, None]) * w + s for w, s in zip(weights, mom))
    offset += 1
    if offset == batch_size:
        read, offset = weights, 0
    return y, MemoryState(read, weights, mom, offset)


def neural_memory_recurrent(q, k, v, lr, momentum, decay, state: MemoryState, batch_size: int, activation: str,
                            residual: bool, max_grad_norm: float | None = None) -> tuple[torch.Tensor, MemoryState]:
    """:func:`neural_memory_step` over ``[B, T, D]`` inputs, same contract as the other forms."""
    outs = []
    for t in range(q.shape[1]):
        y, state = neural_memory_step(q[:, t], k[:, t], v[:, t], lr[:, t], momentum[:, t], decay[:, t], state,
                                      batch_size, activation, residual, max_grad_norm)
        outs.append(y)
    y = torch.stack(outs, 1) if outs else q.new_zeros(q.shape[0], 0, state.weights[-1].shape[1])
    return y, state
