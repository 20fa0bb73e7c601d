"""Titans neural long-term memory (Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time",
arXiv 2501.00663); semantics of the per-token surprise of lucidrains/titans-pytorch ``NeuralMemory``.

A fast-weight MLP memory written at test time with gradient descent plus momentum and weight decay:

    u_t = -theta_t * grad_W ||M_G(k_t) - v_t||^2       (G: the weights at the start of t's mini-batch)
    S_t = eta_t S_{t-1} + u_t                          (momentum: past surprise)
    M_t = (1 - alpha_t) M_{t-1} + S_t                  (forgetting, on the whole weights as in the paper)
    y_t = M_G(q_t)                                     (read: no update)

Stabiliser (not in the paper): ``max_grad_norm = c`` soft-clamps every per-token gradient of every weight
matrix, ``grad * c tanh(||grad||_F / c) / ||grad||_F``, before it enters ``u_t`` (lucidrains' ``max_grad_norm``;
its clamped norm ``c/2 (1 + tanh(2 n / c))`` maps ``n = 0`` to ``c/2``, ours is ~``n`` for small norms).
Without it the update can diverge: the MLP memory's gradient grows like the cube of its weights, so a large
``theta`` times a mini-batch of gradients summed at one point (plus momentum) makes the weights grow
super-exponentially over mini-batches; the clamp bounds ``||u_t|| < theta_t c``.

Conventions: token ``t`` reads the memory as it was when its mini-batch of ``batch_size`` tokens began
(``batch_size=1``: ``M_{t-1}``, the paper's MAC read ``M*_{t-1}(q_t)``; lucidrains likewise reads the weights
of the last completed chunk), so its output never depends on itself or later tokens. Mini-batches are
aligned to the sequence start. The loss is the paper's squared L2 norm (summed over features;
lucidrains averages them, i.e. its ``theta`` is ``D`` times smaller). The memory and all its arithmetic are
float32 whatever the input dtype; ``y`` comes back in ``q.dtype``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..backends import resolve_backend
from ..layout import check_tensor
from .chunk import neural_memory_chunk
from .naive import MemoryState, memory_mlp, neural_memory_naive
from .recurrent import neural_memory_recurrent, neural_memory_step

__all__ = ["MemoryState", "memory_mlp", "neural_memory", "neural_memory_step"]

def _check_weights(name: str, ws: object, batch: int, d_in: int, d_out: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    if not isinstance(ws, Sequence) or not ws or not all(isinstance(w, torch.Tensor) for w in ws):
        raise ValueError(f"{name} must be a non-empty tuple of tensors [B, out, in], got {type(ws).__name__}")
    prev = d_in
    for i, w in enumerate(ws):
        if w.dim() != 3 or w.shape[0] != batch or w.shape[2] != prev:
            raise ValueError(f"{name}[{i}] has shape {tuple(w.shape)}; expected [B={batch}, out, in={prev}]")
        if w.device != device:
            raise ValueError(f"{name}[{i}] is on {w.device}, the inputs on {device}")
        prev = w.shape[1]
    if prev != d_out:
        raise ValueError(f"the last of {name} gives {prev} features but v has {d_out}")
    return tuple(w.float() for w in ws)


def neural_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor,
    decay: torch.Tensor,
    weights: Sequence[torch.Tensor] | MemoryState,
    *,
    batch_size: int = 1,
    activation: str = "gelu",
    residual: bool = False,
    max_grad_norm: float | None = None,
    output_final_state: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, MemoryState | None]:
    """Read and write a Titans neural memory over a sequence.

    Args:
        q, k: ``[B, T, Dk]`` queries and keys (``B`` may fold heads).
        v: ``[B, T, Dv]`` values.
        lr: ``theta [B, T]``, momentum: ``eta [B, T]``, decay: ``alpha [B, T]`` (data-dependent gates).
        weights: the initial memory ``(W_1, ..., W_L)``, ``W_l [B, out_l, in_l]`` (``W_1 [B, h, Dk]``,
            ``W_L [B, Dv, h]``; one tensor: the linear memory ``M(k) = W k``), with zero momentum; or a
            :class:`MemoryState` from a previous call to continue from.
        batch_size: mini-batch size ``b``; gradients inside a mini-batch are taken at its start.
        activation: ``"gelu"`` or ``"silu"`` between the MLP's layers.
        residual: ``M(k) = k + MLP(k)`` (needs ``Dk == Dv``).
        max_grad_norm: soft-clamp each per-token gradient of each weight matrix to a Frobenius norm below this
            (``None``: no clamp, the paper's rule).
        output_final_state: also return the state after the last token.
        backend: vzoo's ``"torch"`` (parallel mini-batch scan, :mod:`.chunk`) or ``"reference"`` (token loop
            with autograd gradients, :mod:`.naive`); ``"recurrent"`` (token steps, the decoding path); ``None``
            (the :func:`vzoo.kernels.use_backend` override, else ``torch``).

    Returns:
        ``y [B, T, Dv]`` in ``q.dtype`` and the final :class:`MemoryState` (float32) or ``None``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dims=3, layout="[B, T, D]")
    if q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v {tuple(v.shape)} must match k {tuple(k.shape)} in B and T")
    b, t_len = q.shape[:2]
    for name, g in (("lr", lr), ("momentum", momentum), ("decay", decay)):
        if not isinstance(g, torch.Tensor) or g.shape != (b, t_len):
            shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(f"{name} must be a tensor [B, T] = [{b}, {t_len}], got {shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if activation not in ("gelu", "silu"):
        raise ValueError(f"activation must be 'gelu' or 'silu', got {activation!r}")
    if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                      or not 0 < max_grad_norm < math.inf):
        raise ValueError(f"max_grad_norm must be None or a finite number > 0, got {max_grad_norm!r}")
    if residual and k.shape[-1] != v.shape[-1]:
        raise ValueError(f"residual memory needs Dk == Dv, got {k.shape[-1]} and {v.shape[-1]}")
    if backend == "recurrent":
        run = neural_memory_recurrent
    else:
        name = resolve_backend(backend, q.device, needs_grad=False, needs_lse=False, supports=("reference", "torch"))
        run = neural_memory_naive if name == "reference" else neural_memory_chunk
    dk, dv = k.shape[-1], v.shape[-1]
    if isinstance(weights, MemoryState):
        read = _check_weights("state.read", weights.read, b, dk, dv, q.device)
        shapes = [w.shape for w in read]
        parts = [read]
        for field in ("weights", "momentum"):
            ws = _check_weights(f"state.{field}", getattr(weights, field), b, dk, dv, q.device)
            if [w.shape for w in ws] != shapes:
                raise ValueError(f"state.{field} shapes {[tuple(s) for s in (w.shape for w in ws)]} differ from state.read")
            parts.append(ws)
        if not isinstance(weights.offset, int) or not 0 <= weights.offset < batch_size:
            raise ValueError(f"state.offset must be an int in [0, batch_size={batch_size}), got {weights.offset!r}")
        state = MemoryState(*parts, weights.offset)
    else:
        ws = _check_weights("weights", weights, b, dk, dv, q.device)
        state = MemoryState(ws, ws, tuple(torch.zeros_like(w) for w in ws), 0)
    y, final = run(q.float(), k.float(), v.float(), lr.float(), momentum.float(), decay.float(), state, batch_size,
                   activation, residual, None if max_grad_norm is None else float(max_grad_norm))
    return y.to(q.dtype), (final if output_final_state else None)
