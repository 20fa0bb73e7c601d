"""Lightning Attention: causal linear attention with a per-head exponential decay, chunked (Lightning-2).

Qin et al., "Lightning Attention-2" (arXiv 2401.04658) and TransNormerLLM / Lightning Attention-1
(arXiv 2307.14995); reference implementation OpenNLPLab/lightning-attention (``lightning_attn_func``),
and fla-org/flash-linear-attention's ``chunk_lightning_attn`` (simple GLA with a constant per-head
decay), whose recurrence, initial and final state this op matches:

``S_t = lambda_h S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``, ``S_{-1} = initial_state`` (zeros by
default), ``lambda_h = exp(-s_h)``. Unrolled:
``o_t = scale * (sum_{s<=t} lambda^(t-s) (q_t . k_s) v_s + lambda^(t+1) q_t S_{-1})``; no normaliser
(unnormalised, as in the official and fla ops). The final state is ``S_{T-1}``.

Backends (vzoo's names, :mod:`vzoo.kernels.backends`): ``reference`` (quadratic masked-decay form,
:mod:`.naive`), ``torch`` (:mod:`.chunk`, the CPU default; ``strategy="chunk"`` Lightning-2,
``strategy="left"`` Lightning-1's left-product tiling), ``triton`` (GPU, or CPU under
``TRITON_INTERPRET=1``); :func:`lightning_attention_step` decodes one token.
"""

from __future__ import annotations

import torch

from ..backends import resolve_backend
from ..layout import check_flag, check_int
from .chunk import lightning_chunk, lightning_left
from .common import check_inputs, check_scale, decay_rates
from .naive import lightning_naive
from .recurrent import lightning_attention_recurrent, lightning_attention_step
from .slopes import fla_decay, lightning_slopes, transnormer_decay

__all__ = [
    "fla_decay", "lightning_attention", "lightning_attention_recurrent", "lightning_attention_step", "lightning_slopes",
    "transnormer_decay",
]

_STRATEGIES = ("chunk", "left")


def _resolve(backend: str | None, strategy: str, device: torch.device) -> str:
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; choose 'chunk' (Lightning-2) or 'left' (Lightning-1 tiling)")
    if backend == "triton" and strategy != "chunk":
        raise ValueError(f"strategy={strategy!r} is a PyTorch tiling; the triton backend implements 'chunk' only")
    supports = ("reference", "torch", "triton") if strategy == "chunk" else ("reference", "torch")
    return resolve_backend(backend, device, needs_grad=False, needs_lse=False, supports=supports)


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor | float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    scale: float = 1.0,
    chunk_size: int = 64,
    strategy: str = "chunk",
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal Lightning Attention.

    Args:
        q: ``[B, H, T, D]``; k: ``[B, Hkv, T, D]``; v: ``[B, Hkv, T, Dv]`` (``H`` a multiple of ``Hkv``).
        decay: per-head rates ``s [H]`` (``lambda = exp(-s)``, ``s >= 0``; e.g. :func:`lightning_slopes`),
            one number for all heads, or ``None`` (plain causal linear attention). Not differentiated.
        initial_state: ``[B, H, D, Dv]``, the state before token 0 (``None``: zeros).
        output_final_state: also return the state after the last token.
        scale: multiplies ``q`` (1.0 like the official op).
        chunk_size: tokens per block (the result does not depend on it beyond rounding).
        strategy: ``"chunk"`` (Lightning-2: left product inside blocks, right product across) or ``"left"``
            (Lightning-1: left-product tiles, quadratic cost); the torch backend.
        backend: ``"reference" | "torch" | "triton"`` or ``None`` (the :func:`vzoo.kernels.use_backend`
            override, else triton for CUDA tensors with ``strategy="chunk"``, else torch).

    Returns:
        ``o [B, H, T, Dv]`` in ``q.dtype`` (accumulated in fp32; fp64 for fp64 inputs), and with
        ``output_final_state`` the final state ``[B, H, D, Dv]`` in fp32 (fp64 for fp64 inputs).
    """
    check_inputs(q, k, v, initial_state)
    scale = check_scale(scale)
    check_int("chunk_size", chunk_size, 1)
    check_flag("output_final_state", output_final_state)
    name = _resolve(backend, strategy, q.device)
    s = decay_rates(decay, q.shape[1], q.device)
    if q.shape[2] == 0:
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        final = (initial_state.to(acc).clone() if initial_state is not None
                 else q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1], dtype=acc))
        return (out, final) if output_final_state else out
    if name == "triton":
        from .triton import lightning_triton

        out, final = lightning_triton(q, k, v, s, initial_state, scale, chunk_size)
    elif name == "reference":
        out, final = lightning_naive(q, k, v, s, initial_state, scale)
    else:
        fn = lightning_chunk if strategy == "chunk" else lightning_left
        out, final = fn(q, k, v, s, initial_state, scale, chunk_size)
    out = out.to(q.dtype)
    return (out, final) if output_final_state else out
