"""Local Linear Attention (Zuo, Yin, Zeng, Li, Zhu, Wang; arXiv 2510.01450; ICLR 2026).

Each query fits, by kernel-weighted ridge regression over the keys it sees, a local affine model
``v ~ b + W (k - q_i)`` with weights ``w_ij = exp(s q_i.k_j)`` and penalty ``lambda omega_i |W|^2``
(``omega_i = sum_j w_ij``), and outputs the intercept ``b``. Large ``lambda`` gives softmax attention;
``s = 0`` gives a global ridge fit. Semantics of github.com/Yifei-Zuo/FlashLLA (``flashlla/ops``).

Backends (vzoo's names, :mod:`vzoo.kernels.backends`): ``"reference"`` (dense closed form,
``torch.linalg.solve`` per query, :mod:`.naive`) and ``"torch"`` (streamed three passes with conjugate
gradients, Theta(n D) forward memory, :mod:`.chunk`; the default). There is no Triton backend.
"""

from __future__ import annotations

import torch

from ..backends import resolve_backend
from .chunk import check_stream_options, lla_chunk
from .naive import check_inputs, lla_naive, lla_weights
from .recurrent import local_linear_attention_step

__all__ = ["local_linear_attention", "local_linear_attention_step", "lla_weights"]


def local_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ridge: float = 10.0,
    scale: float | None = None,
    causal: bool = True,
    cg_max_iters: int = 32,
    cg_tol: float = 1e-6,
    block_size: int | None = None,
    chunk_size: int = 64,
    backend: str | None = None,
    *,
    key_mask: torch.Tensor | None = None,
    delta_eps: float = 1e-12,
    precondition: bool = False,
) -> torch.Tensor:
    """Local Linear Attention.

    Args:
        q: ``[B, H, Tq, D]``; with ``causal`` query ``i`` sits at key position ``Tk - Tq + i`` (bottom-right
            aligned: one query over a cache is a decoding step).
        k: ``[B, Hkv, Tk, D]``, ``H`` a multiple of ``Hkv`` (GQA).
        v: ``[B, Hkv, Tk, Dv]``.
        ridge: ``lambda >= 0``; the penalty on the slope is ``lambda * omega_i`` (scaled by the weight sum).
            ``lambda = 0`` needs at least ``D + 1`` visible keys in general position per query.
        scale: ``s`` in ``exp(s q.k)``, default ``1/sqrt(D)``.
        causal: queries see keys at positions up to their own.
        cg_max_iters, cg_tol: conjugate gradients (``torch``) stop per query when the residual norm is at
            most ``cg_tol`` times ``|mu_i|``, or after ``cg_max_iters`` iterations.
        block_size: split ``D`` into independent diagonal sub-blocks of ``Sigma`` of this size (FlashLLA's
            ``lla_block_size``); must divide ``D``; ``None`` = one block.
        chunk_size: keys per tile of the streamed passes (``torch``).
        backend: ``"reference" | "torch"`` or ``None`` (the :func:`vzoo.kernels.use_backend` override,
            else ``torch``).
        key_mask: bool ``[B, Tk]``; keys marked False get zero weight (padding). A query that sees no key
            outputs zeros.
        delta_eps: added to ``|delta_i|`` (the reference's ``delta + eps * sign(delta)``).
        precondition: Jacobi-precondition CG with ``diag(Sigma_i)`` (FlashLLA's option, off there too). Same
            solution; measured slower here: ``Sigma_i`` is ``lambda omega_i I`` plus a few dominant key
            directions, which plain CG resolves in few steps and a diagonal rescaling spreads out.

    Returns:
        ``[B, H, Tq, Dv]`` in ``q.dtype`` (math in float32; float64 for float64 inputs).
    """
    ridge, scale, block_size = check_inputs(q, k, v, ridge, scale, causal, block_size, key_mask)
    check_stream_options(cg_max_iters, cg_tol, chunk_size)
    name = resolve_backend(backend, q.device, needs_grad=False, needs_lse=False, supports=("reference", "torch"))
    if name == "reference":
        return lla_naive(q, k, v, ridge, scale, causal, block_size, key_mask, delta_eps)
    return lla_chunk(q, k, v, ridge, scale, causal, cg_max_iters, cg_tol, block_size, chunk_size, key_mask, delta_eps,
                     precondition)
