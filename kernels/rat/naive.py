"""RAT, plain token loop (the reference semantics spelled out; slow, for checking).

RAT (arXiv 2507.04416; reference ``CLAIRE-Labo/RAT`` ``src/model/backbone/rat/rat_slow.py``): token by token the
running [value; key] state follows ``h_t = g_t * h_{t-1} + (1 - g_t) * x_t`` (``h = 0`` before a chunk start);
query ``t`` in chunk ``c`` takes one softmax over the scores of the final key states of chunks ``0..c-1`` and of
its own key state (all rotated at their chunk numbers) and averages the matching value states.
"""

from __future__ import annotations

import torch

from ..layout import compute_dtype, repeat_kv
from .common import RATState, Rope, apply_rope, split_gate

__all__ = ["rat_naive"]


def rat_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, chunk_size: int, scale: float,
    rope: Rope = None, state: RATState | None = None,
) -> tuple[torch.Tensor, RATState]:
    """Token-loop RAT; arguments as :func:`vzoo.kernels.rat.rat_attention` (already checked).

    Returns ``(out [B, H, T, Dv]`` in ``q.dtype``, the state after the last token``)``.
    """
    b, h, t, d = q.shape
    dv = v.shape[-1]
    dt = compute_dtype(q.dtype)
    gv, gk = (x.to(dt) for x in split_gate(gate, dv))
    kh, vh, qh = repeat_kv(k, h).to(dt), v.to(dt), q.to(dt)
    length = 0 if state is None else state.length
    done = length // chunk_size
    keys = [] if state is None else [state.keys[:, :, c].to(dt) for c in range(done)]  # each [B, H, D]
    values = [] if state is None else [state.values[:, :, c].to(dt) for c in range(done)]
    k_run = None if state is None else state.key_run.to(dt)
    v_run = None if state is None else state.value_run.to(dt)
    outs = []
    for i in range(t):
        p = length + i
        c = p // chunk_size
        if p % chunk_size == 0:  # a chunk starts: the recurrence restarts from zero
            k_run, v_run = torch.zeros_like(kh[:, :, 0]), torch.zeros_like(vh[:, :, 0])
        k_run = gk[:, :, i] * k_run + (1.0 - gk[:, :, i]) * kh[:, :, i]
        v_run = gv[:, :, i] * v_run + (1.0 - gv[:, :, i]) * vh[:, :, i]
        at = torch.tensor([c], device=q.device)
        q_rot = apply_rope(qh[:, :, i : i + 1], at, rope)[:, :, 0]
        k_rot = apply_rope(k_run[:, :, None], at, rope)[:, :, 0]
        cand_k = torch.stack(keys[:c] + [k_rot], dim=2)  # [B, H, c + 1, D]
        cand_v = torch.stack(values[:c] + [v_run], dim=2)
        w = torch.softmax((cand_k * q_rot[:, :, None]).sum(-1) * scale, dim=-1)
        outs.append((w[..., None] * cand_v).sum(2))
        if p % chunk_size == chunk_size - 1:  # the chunk is finished: its final states become a summary
            keys.append(k_rot)
            values.append(v_run)

    def stack(rows: list[torch.Tensor], width: int) -> torch.Tensor:
        return torch.stack(rows, dim=2) if rows else q.new_zeros(b, h, 0, width, dtype=dt)

    out = torch.stack(outs, dim=2) if outs else q.new_zeros(b, h, 0, dv, dtype=dt)
    if k_run is None:
        k_run, v_run = q.new_zeros(b, h, d, dtype=dt), q.new_zeros(b, h, dv, dtype=dt)
    return out.to(q.dtype), RATState(stack(keys, d), stack(values, dv), k_run, v_run, length + t)
