"""Landmark Attention: the grouped softmax over blocks gated by landmark tokens, exact or top-k retrieved.

Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for Transformers", arXiv 2305.16300
(NeurIPS 2023); semantics of the reference ``epfml/landmark-attention`` (``lm_benchmark/models/landmark.py``:
``landmark_grouped_softmax`` with the masks of ``CausalSelfAttention``; ``llama/llama_mem.py``: top-k retrieval).

Backends (vzoo's names, :mod:`vzoo.kernels.backends`): ``reference`` (dense ``[Tq, Tk]`` masked softmaxes,
:mod:`.naive`), ``torch`` (:mod:`.chunk`, the default: tiled autograd function for the exact op, gathered blocks
for top-k).
"""

from __future__ import annotations

import torch

from ..backends import resolve_backend
from .chunk import landmark_exact, landmark_topk
from ..layout import compute_dtype
from .common import check_inputs, landmark_mask
from .naive import landmark_naive

__all__ = ["landmark_attention", "landmark_mask"]


def landmark_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block: int,
    *,
    top_k: int | None = None,
    local_blocks: int = 0,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Landmark Attention's grouped softmax.

    Positions ``p = 0..Tk-1`` form groups of ``P = block + 1``: ``block`` regular tokens, then a landmark
    (``p % P == block``, see :func:`landmark_mask`); ``p`` is in block ``p // P``. Query ``j`` sits at
    ``i = Tk - Tq + j`` (bottom-right aligned, a KV cache in front when ``Tq < Tk``), in block ``c = i // P``.
    Its current section is the regular keys ``p <= i`` of block ``c`` (block ``c``'s landmark is hidden, even
    from itself); a past block ``g < c`` offers its landmark and its ``block`` regular keys. With scores
    ``scale * q . k``, stage 1 is a softmax over the landmarks of the kept past blocks and the current section;
    stage 2 a softmax over each kept past block's regular keys. A past regular key weighs
    ``P1(landmark of its block) * P2(key)``, a current key its ``P1``, a landmark 0; ``out = sum weight * v``.

    Args:
        q: ``[B, H, Tq, D]``; k: ``[B, G, Tk, D]``; v: ``[B, G, Tk, Dv]``; ``H`` a multiple of ``G`` (head ``h``
            reads kv head ``h // (H / G)``), ``Tq <= Tk``.
        block: regular tokens per block (the reference's ``mem_freq``), ``>= 1``.
        top_k: ``None`` keeps every past block (the exact training op). An int retrieves per batch, head and query:
            the ``local_blocks`` most recent past blocks (``c - local_blocks <= g < c``) always, and of the older
            ones the ``top_k`` with the highest landmark score (``torch.topk``); ``top_k >=`` their number gives
            the exact op.
        local_blocks: past blocks always kept with ``top_k`` (ignored when ``top_k`` is None), ``>= 0``.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"reference" | "torch"`` or ``None`` (the :func:`vzoo.kernels.use_backend` override, else torch).
            The torch path with ``top_k`` differentiates through plain autograd of its gathers (memory
            ``Tq * (top_k + local_blocks + 1) * P * (D + Dv)`` per head).

    Returns:
        ``out [B, H, Tq, Dv]`` in ``q.dtype`` (computed in fp32; fp64 for fp64 inputs).
    """
    scale = check_inputs(q, k, v, block, top_k, local_blocks, scale)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    name = resolve_backend(backend, q.device, needs_grad=needs_grad, needs_lse=False, supports=("reference", "torch"))
    b, h, tq, _ = q.shape
    if tq == 0:
        return q.new_zeros(b, h, 0, v.shape[-1])
    dt = compute_dtype(q.dtype)
    qc, kc, vc = q.to(dt), k.to(dt), v.to(dt)
    if name == "reference":
        out = landmark_naive(qc, kc, vc, block, top_k, local_blocks, scale)
    elif top_k is None:
        out = landmark_exact(qc, kc, vc, block, scale)
    else:
        out = landmark_topk(qc, kc, vc, block, top_k, local_blocks, scale)
    return out.to(q.dtype)
