"""RAT: intra-chunk gated recurrence + inter-chunk softmax attention over chunk summaries.

Wei, Yadav, Pascanu, Gulcehre, "RAT: Bridging RNN Efficiency and Attention Accuracy in Language Modeling",
arXiv 2507.04416; semantics of the reference ``CLAIRE-Labo/RAT`` (``src/model/backbone/rat/rat.py`` forward and
step, ``src/model/op/merge_lastt.py``, ``src/model/embedding/pe.py`` ``InterRoPE``).

Token ``t`` lies in chunk ``c = t // L``. Within a chunk the [value; key] state follows
``h_t = g_t * h_{t-1} + (1 - g_t) * x_t`` from ``h = 0`` at the chunk start, giving ``v~_t`` and ``k~_t``. Query
``q_t`` and key states are rotated by RoPE at the chunk number (every token of chunk ``c`` has position ``c``).
The output is one softmax attention of ``q_t`` over the final states ``(k~, v~)`` of chunks ``0..c-1`` and its
own state ``(k~_t, v~_t)``. Backends (vzoo's names, :mod:`vzoo.kernels.backends`): ``"reference"`` (token
loop, :mod:`.naive`), ``"torch"`` (vectorised, :mod:`.chunk`, the default); decoding uses :func:`rat_step`.
"""

from __future__ import annotations

import torch

from ..backends import resolve_backend
from .chunk import rat_chunk
from ..layout import compute_dtype
from .common import RATState, Rope, check_inputs, check_rope, check_state, rat_rope
from .naive import rat_naive
from .recurrent import rat_step

__all__ = ["RATState", "rat_attention", "rat_rope", "rat_step"]


def rat_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    chunk_size: int = 16,
    *,
    scale: float | None = None,
    rope: Rope = None,
    state: RATState | None = None,
    return_state: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, RATState]:
    """RAT attention over a sequence (prefill / training).

    Args:
        q: ``[B, H, T, D]`` queries.
        k: ``[B, G, T, D]`` keys of ``G`` shared groups; head ``h`` reads group ``h // (H / G)`` (the GQA order of
            SDPA; the reference tiles groups, ``h % G``, which is the same up to a permutation of heads).
        v: ``[B, H, T, Dv]`` values.
        gate: forget gates in (0, 1): ``[B, H, T, D]`` shared by the value and key states (the reference; needs
            ``Dv == D``) or ``[B, H, T, Dv + D]`` for the ``[v; k]`` state channels.
        chunk_size: ``L``, tokens per chunk.
        scale: softmax scale, default ``1/sqrt(D)``.
        rope: inter-chunk RoPE (the reference's ``InterRoPE``, rotate-half layout): None (no rotation); a float
            base (e.g. ``10000.0``, the reference's; angles computed at the chunk numbers used); ``(cos, sin)``
            tables ``[n, D]`` indexed by chunk number (:func:`rat_rope` makes them); or a callable
            ``rope(x [B, H, S, D], pos int64 [S])`` returning ``x`` rotated at chunk numbers ``pos``. It must be
            a rotation: the chunk and step paths score a query against its own key state unrotated (both share
            a chunk number, so the angle drops out).
        state: a :class:`RATState` to continue from (its ``length`` may end inside a chunk), or None.
        return_state: also return the state after the last token (feed it to :func:`rat_step`).
        backend: ``"reference" | "torch"`` or ``None`` (the :func:`vzoo.kernels.use_backend` override, else
            ``torch``; no Triton kernel: the torch form runs on any device).

    Returns:
        ``out [B, H, T, Dv]`` in ``q.dtype``, and the :class:`RATState` when ``return_state``.
    """
    scale = check_inputs(q, k, v, gate, chunk_size, scale)
    check_state(state, q, v.shape[-1], chunk_size)
    name = resolve_backend(backend, q.device, needs_grad=False, needs_lse=False, supports=("reference", "torch"))
    start = 0 if state is None else state.length
    b, h, t, d = q.shape
    check_rope(rope, d, (start + max(t, 1) - 1) // chunk_size, q.device)
    if t == 0:
        dt = compute_dtype(q.dtype)
        out = v.new_zeros(b, h, 0, v.shape[-1])
        if state is None:
            state = RATState(q.new_zeros(b, h, 0, d, dtype=dt), q.new_zeros(b, h, 0, v.shape[-1], dtype=dt),
                             q.new_zeros(b, h, d, dtype=dt), q.new_zeros(b, h, v.shape[-1], dtype=dt), 0)
        return (out, state) if return_state else out
    out, new_state = (rat_naive if name == "reference" else rat_chunk)(q, k, v, gate, chunk_size, scale, rope, state)
    return (out, new_state) if return_state else out
