"""RAT, one decoding step (the reference's ``RAT.step``).

RAT (arXiv 2507.04416; reference ``CLAIRE-Labo/RAT`` ``src/model/backbone/rat/rat.py``, ``step``): the running
[value; key] state is updated by the gated recurrence (reset at a chunk start), the query attends to the
stored final states of the finished chunks plus its own running state, and when the token closes a chunk
its rotated key state and value state are appended to the cache. The cache grows by doubling its capacity
and, outside autograd, rows are written in place, so a step costs no copy of the whole cache.
"""

from __future__ import annotations

import torch

from ..layout import compute_dtype, repeat_kv
from .common import RATState, Rope, apply_rope, check_inputs, check_rope, check_state, split_gate

__all__ = ["rat_step"]

_MIN_CAPACITY = 16


def _append(buf: torch.Tensor, row: torch.Tensor, n: int, in_place: bool) -> torch.Tensor:
    """``buf [B, H, C, X]`` with ``row [B, H, X]`` as row ``n`` (rows ``< n`` kept)."""
    if not in_place:
        return torch.cat([buf[:, :, :n], row[:, :, None]], dim=2)
    if n >= buf.shape[2]:
        grown = buf.new_empty(*buf.shape[:2], max(2 * n, _MIN_CAPACITY), buf.shape[3])
        grown[:, :, :n] = buf[:, :, :n]
        buf = grown
    buf[:, :, n] = row
    return buf


def rat_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, state: RATState | None = None,
    chunk_size: int = 16, *, scale: float | None = None, rope: Rope = None,
) -> tuple[torch.Tensor, RATState]:
    """Decode one token of RAT.

    Args:
        q: ``[B, H, 1, D]``; k: ``[B, G, 1, D]`` (``H`` a multiple of ``G``); v: ``[B, H, 1, Dv]``;
        gate: ``[B, H, 1, D]`` (shared by the value and key states, ``Dv == D``) or ``[B, H, 1, Dv + D]``;
            forget gates in (0, 1).
        state: the :class:`RATState` after the previous tokens (from :func:`rat_attention` with
            ``return_state=True`` or from this function), or None to start.
        chunk_size, scale, rope: as :func:`vzoo.kernels.rat.rat_attention`.

    Returns:
        ``(out [B, H, 1, Dv]`` in ``q.dtype``, the new state``)``. Outside autograd the new state may share and
        extend the buffers of ``state`` in place (rows past the finished chunks), so do not decode two
        continuations from one state without cloning it.
    """
    scale = check_inputs(q, k, v, gate, chunk_size, scale, step=True)
    dv = v.shape[-1]
    check_state(state, q, dv, chunk_size)
    length = 0 if state is None else state.length
    check_rope(rope, q.shape[-1], length // chunk_size, q.device)
    dt = compute_dtype(q.dtype)
    n, lead = length // chunk_size, length % chunk_size
    gv, gk = (x[:, :, 0].to(dt) for x in split_gate(gate, dv))
    xv, xk = v[:, :, 0].to(dt), repeat_kv(k, q.shape[1])[:, :, 0].to(dt)
    v_run, k_run = (1.0 - gv) * xv, (1.0 - gk) * xk
    if lead:
        v_run = v_run + gv * state.value_run.to(dt)
        k_run = k_run + gk * state.key_run.to(dt)
    pos = torch.full((1,), n, dtype=torch.long, device=q.device)
    qr = apply_rope(q.to(dt), pos, rope)  # [B, H, 1, D]
    own = (q[:, :, 0].to(dt) * k_run).sum(-1, keepdim=True) * scale  # RoPE drops out: same chunk
    if n:  # bmm on [B*H, n, *] views of the cache: no copy of its rows
        b, h = q.shape[:2]
        keys, values = state.keys[:, :, :n].to(dt).flatten(0, 1), state.values[:, :, :n].to(dt).flatten(0, 1)
        s = torch.bmm(qr.reshape(b * h, 1, -1), keys.transpose(1, 2)).reshape(b, h, n) * scale
        p = torch.softmax(torch.cat([s, own], dim=-1), dim=-1)
        out = torch.bmm(p[..., :-1].reshape(b * h, 1, n), values).reshape(b, h, dv) + p[..., -1:] * v_run
    else:
        out = v_run
    if lead == chunk_size - 1:  # this token closes chunk n
        in_place = not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, gate, *(state or ())[:4])))
        key_row = apply_rope(k_run[:, :, None], pos, rope)[:, :, 0]
        if state is None:  # chunk_size 1
            keys, values = key_row[:, :, None], v_run[:, :, None]
        else:
            keys = _append(state.keys.to(dt), key_row, n, in_place)
            values = _append(state.values.to(dt), v_run, n, in_place)
    elif state is None:
        keys, values = q.new_zeros(*q.shape[:2], 0, q.shape[-1], dtype=dt), q.new_zeros(*q.shape[:2], 0, dv, dtype=dt)
    else:
        keys, values = state.keys, state.values
    return out[:, :, None].to(q.dtype), RATState(keys, values, k_run, v_run, length + 1)
