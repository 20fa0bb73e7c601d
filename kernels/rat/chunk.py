"""RAT, chunked parallel form (the CPU fast path, differentiable by autograd).

RAT (arXiv 2507.04416; reference ``CLAIRE-Labo/RAT`` ``src/model/backbone/rat/rat.py``): the recurrence runs for
all chunks at once (a loop over the ``chunk_size`` positions of a chunk), then every query attends, in blocks of
query chunks, to the final states of the previous chunks plus its own running state: one softmax over
``[previous summaries ; own state]``, which is the reference's ``merge_last_token`` of the FlexAttention output
with the own-state term. A start in the middle of a chunk (``state``) is handled by prepending the
chunk's first positions as virtual tokens whose gate 0 loads the running state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import compute_dtype, repeat_kv
from .common import RATState, Rope, apply_rope, split_gate

__all__ = ["rat_chunk"]

# Query tokens per attention block: bounds the score tensor to ``block x chunks`` per head.
_QUERY_BLOCK = 1024


def _scan(u: torch.Tensor, g: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``h_t = g_t * h_{t-1} + u_t`` with ``h = 0`` before every chunk start; ``u, g [B, H, M*L, C]``."""
    b, h, t, c = u.shape
    m = t // chunk_size
    u = u.reshape(b, h, m, chunk_size, c).movedim(3, 0)  # [L, B, H, M, C]
    g = g.reshape(b, h, m, chunk_size, c).movedim(3, 0)
    run = u[0]
    out = [run]
    for i in range(1, chunk_size):
        run = torch.addcmul(u[i], g[i], run)
        out.append(run)
    return torch.stack(out, dim=3).reshape(b, h, t, c)


def _attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, own: torch.Tensor, v_run: torch.Tensor,
    first_chunk: int, chunk_size: int,
) -> torch.Tensor:
    """Token ``i`` of ``q [B, H, M*L, D]`` (scaled) is in chunk ``first_chunk + i // L``; it attends to the rows of
    ``keys/values [B, H, >= first_chunk + M - 1, *]`` before its chunk and to its own state (score ``own [B, H, M*L]``,
    value ``v_run [B, H, M*L, Dv]``)."""
    t = q.shape[2]
    blk = max(chunk_size, _QUERY_BLOCK // chunk_size * chunk_size)
    outs = []
    for a in range(0, t, blk):
        e = min(a + blk, t)
        ca, cb = first_chunk + a // chunk_size, first_chunk + (e - 1) // chunk_size  # chunks of the block
        own_s = own[:, :, a:e, None]
        if cb == 0:  # only chunk 0: nothing before it, attention weight 1 on the own state
            outs.append(v_run[:, :, a:e])
            continue
        s = torch.matmul(q[:, :, a:e], keys[:, :, :cb].transpose(-1, -2))
        s = torch.cat([s, own_s], dim=-1)
        if cb > ca:  # rows ca..cb-1 are hidden from the block's queries in chunks <= row
            rows = torch.arange(ca, cb, device=q.device)
            chunk = torch.arange(a, e, device=q.device) // chunk_size + first_chunk
            s[..., ca:cb].masked_fill_(rows[None, :] >= chunk[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        outs.append(torch.matmul(p[..., :-1], values[:, :, :cb]) + p[..., -1:] * v_run[:, :, a:e])
    return torch.cat(outs, dim=2)


def rat_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, chunk_size: int, scale: float,
    rope: Rope = None, state: RATState | None = None,
) -> tuple[torch.Tensor, RATState]:
    """Chunked RAT; arguments as :func:`vzoo.kernels.rat.rat_attention` (already checked).

    Returns ``(out [B, H, T, Dv]`` in ``q.dtype``, the state after the last token``)``.
    """
    b, h, t, d = q.shape
    dv = v.shape[-1]
    L = chunk_size
    dt = compute_dtype(q.dtype)
    start = 0 if state is None else state.length
    lead, done = start % L, start // L  # position inside the current chunk, finished chunks
    gv, gk = split_gate(gate.to(dt), dv)
    g = torch.cat([gv, gk], dim=-1)
    x = torch.cat([v.to(dt), repeat_kv(k, h).to(dt)], dim=-1)
    u = (1.0 - g) * x  # [B, H, T, Dv + D]
    if lead:  # virtual tokens: the last one (gate 0) loads the running state, earlier ones are never read
        pre_u = u.new_zeros(b, h, lead, dv + d)
        pre_u[:, :, -1] = torch.cat([state.value_run, state.key_run], dim=-1).to(dt)
        u = torch.cat([pre_u, u], dim=2)
        g = torch.cat([g.new_zeros(b, h, lead, dv + d), g], dim=2)
    total = lead + t
    tail = -total % L
    if tail:
        u, g = F.pad(u, (0, 0, 0, tail)), F.pad(g, (0, 0, 0, tail))
    run = _scan(u, g, L)  # [B, H, M*L, Dv + D]
    m = run.shape[2] // L
    full = total // L  # chunks of this call that end inside it
    chunk_ids = torch.arange(done, done + m, device=q.device)
    summaries = run[:, :, L - 1 :: L][:, :, :full]
    new_keys = apply_rope(summaries[..., dv:], chunk_ids[:full], rope)
    if state is not None and done:
        keys = torch.cat([state.keys[:, :, :done].to(dt), new_keys], dim=2)
        values = torch.cat([state.values[:, :, :done].to(dt), summaries[..., :dv]], dim=2)
    else:
        keys, values = new_keys, summaries[..., :dv]

    pos = torch.arange(start, start + t, device=q.device) // L
    qr = F.pad(apply_rope(q.to(dt), pos, rope) * scale, (0, 0, lead, tail))
    # Own-state score: q and the key state share a chunk, so RoPE rotates both by the same angle and drops out.
    own = (F.pad(q.to(dt), (0, 0, lead, tail)) * run[..., dv:]).sum(-1) * scale
    out = _attend(qr, keys, values, own, run[..., :dv], done, L)[:, :, lead : lead + t]
    # Own buffers for the state: views would keep the whole scan ``run`` alive and leave the value rows strided
    # ``L * (Dv + D)`` apart, which makes every decoding step read them slowly.
    last = run[:, :, total - 1]
    new_state = RATState(keys.contiguous(), values.contiguous(), last[..., dv:].clone(), last[..., :dv].clone(), start + t)
    return out.to(q.dtype), new_state
