"""Chunked PyTorch Lightning Attention: the CPU fast path (Lightning-2) and the left-product tiling (Lightning-1).

Lightning Attention-2 (Qin et al., arXiv 2401.04658; ``lightning_attn/ops/triton/lightning_attn2.py`` of
OpenNLPLab/lightning-attention): split the sequence into blocks of ``B`` tokens; inside a block the left
product ``(Q_i K_i^T * M) V_i`` with ``M[a, b] = lambda^(a - b)`` (``a >= b``), across blocks the right
product with the running state, ``(Q_i * lambda^(a + 1)) KV``, and ``KV <- lambda^B KV + (K_i *
lambda^(B - 1 - b))^T V_i``. Here every block's left product, right product and state contribution is
one batched matmul over all blocks at once, and so is the state scan inside groups of blocks; only the
group-to-group state updates run in sequence. Differentiable by autograd.

Lightning Attention-1 (TransNormerLLM, arXiv 2307.14995): the IO-aware tiling of the left product
``(Q K^T * M) V``, query block by query block over key blocks, never materialising ``T x T``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import final_state, prepare

__all__ = ["lightning_chunk", "lightning_left"]

SEGMENT_ELEMENTS = 2**19  # elements of one [B, H, blocks, C, max(C, D, Dv)] tensor of a segment (2 MiB in fp32)


def _exp_decay(rates: torch.Tensor, exponent: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``exp(-rates * exponent)`` broadcast as ``[H, *exponent.shape]``; 0 where ``keep`` is False (where the
    exponent may be negative and the power would overflow)."""
    e = exponent if keep is None else exponent.clamp_min(0)
    out = torch.exp(-rates.reshape(-1, *([1] * exponent.dim())) * e)
    return out if keep is None else torch.where(keep, out, 0.0)


def _decayed_scan(
    contrib: torch.Tensor, rates: torch.Tensor, c: int, h0: torch.Tensor | None, group: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """The state before each block, ``S_n = lambda^C S_{n-1} + U_{n-1}`` (``S_0 = h0``), for ``contrib = U
    [B, H, N, D, Dv]``: returns ``(S [B, H, N, D, Dv], S_{N-1})``. Two levels: inside groups of ``group``
    blocks a matmul with the decay matrix ``L[j, m] = lambda^(C (j-1-m))`` (``m < j``); across groups
    ``N / group`` sequential updates."""
    bsz, h, n, d, e = contrib.shape
    g = min(group, n)
    ng = -(-n // g)
    u = F.pad(contrib.reshape(bsz, h, n, d * e), (0, 0, 0, ng * g - n)).view(bsz, h, ng, g, d * e)
    j = torch.arange(g + 1, device=contrib.device)
    lag = (j[:, None] - 1 - j[None, :g]).to(contrib.dtype)  # [G+1, G]; row G: the whole group
    decay = _exp_decay(rates * c, lag, lag >= 0)  # [H, G+1, G]
    inner = decay[:, None] @ u  # [B, H, NG, G+1, DDv]: the group's own blocks' share, before block j (j = G: after all)
    start = h0.reshape(bsz, h, d * e) if h0 is not None else contrib.new_zeros(bsz, h, d * e)
    group_decay = torch.exp(-rates * c * g)[:, None]  # [H, 1]
    starts = []
    for total in inner[:, :, :, g].unbind(2):  # state at each group's start
        starts.append(start)
        start = group_decay * start + total
    offset = _exp_decay(rates * c, j[:g].to(contrib.dtype))[:, None, :, None]  # [H, 1, G, 1]: lambda^(C j)
    states = inner[:, :, :, :g] + offset * torch.stack(starts, 2)[:, :, :, None]
    states = states.reshape(bsz, h, ng * g, d, e)[:, :, :n]
    return states, states[:, :, -1]


def _segment(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rates: torch.Tensor, h0: torch.Tensor | None, c: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lightning-2 over one segment (head-expanded, accumulation dtype, ``q`` not yet scaled: ``scale`` goes
    into the decay factors, saving a pass over ``q``; ``h0`` the state before it or ``None`` for zeros):
    every block's products at once. Returns ``o [B, H, N, C, Dv]`` (blocks; the last one zero-padded) and
    the state after the segment's tokens."""
    bsz, h, length, d = q.shape
    e = v.shape[-1]
    n = -(-length // c)
    pad = n * c - length
    last = c - pad  # tokens in the last block
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    qb, kb, vb = q.view(bsz, h, n, c, d), k.view(bsz, h, n, c, d), v.view(bsz, h, n, c, e)
    idx = torch.arange(c, device=q.device)
    diff = idx[:, None] - idx[None, :]
    dt = q.dtype
    mask = _exp_decay(rates, diff.to(dt), diff >= 0) * scale  # [H, C, C]: scale lambda^(a-b), a >= b
    q_decay = _exp_decay(rates, (idx + 1).to(dt))[:, None, :, None] * scale  # [H, 1, C, 1]: scale lambda^(a+1)
    k_decay = _exp_decay(rates, (c - 1 - idx).to(dt))[:, None, :, None]  # lambda^(C-1-b)
    out = ((qb @ kb.transpose(-1, -2)) * mask[:, None]) @ vb
    contrib = (kb * k_decay).transpose(-1, -2) @ vb  # [B, H, N, D, Dv]
    before, state = _decayed_scan(contrib, rates, c, h0)
    out = out + (qb * q_decay) @ before
    # the last block holds `last` tokens: its update decays the state by lambda^last, token b by lambda^(last-1-b)
    tail = _exp_decay(rates, (last - 1 - idx).to(dt), idx < last)[:, :, None]  # [H, C, 1]
    final = torch.exp(-rates * last)[:, None, None] * state + (kb[:, :, -1] * tail).transpose(-1, -2) @ vb[:, :, -1]
    return out, final


def lightning_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    scale: float,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lightning-2 with all blocks of a segment batched. Checked ``q [B, H, T, D]``, ``k [B, Hkv, T, D]``,
    ``v [B, Hkv, T, Dv]``, rates ``s [H]`` or ``None``, ``initial_state [B, H, D, Dv]`` or ``None``. Returns
    ``o [B, H, T, Dv]`` and the final state ``[B, H, D, Dv]``, both in the accumulation dtype.

    The sequence runs in segments of whole blocks (about 2^19 elements per ``[B, H, blocks, C, max(C, D,
    Dv)]`` tensor, so a segment's working set stays in cache), carrying the state between them: the cost is
    linear in ``T``."""
    bsz, h, t, d = q.shape
    e = v.shape[-1]
    c = max(1, min(chunk_size, t))
    q, k, v, rates = prepare(q, k, v, s, 1.0)  # the scale is applied in _segment
    state = None if initial_state is None else initial_state.to(q.dtype)
    seg = c * max(1, SEGMENT_ELEMENTS // (bsz * h * c * max(c, d, e)))
    # Without autograd each segment's output goes straight into the result (no list of live segments and
    # no concatenation: two fewer passes over fresh memory); with autograd they are concatenated, since
    # writes into slices of one buffer would copy the whole gradient once per segment in the backward.
    tracked = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, state))
    out = None if tracked else q.new_empty(bsz, h, t, e)
    outs, start = [], 0
    for qs, ks, vs in zip(q.split(seg, 2), k.split(seg, 2), v.split(seg, 2)):  # split: one gradient buffer, not one per slice
        part, state = _segment(qs, ks, vs, rates, state, c, scale)
        length = qs.shape[2]
        part = part.reshape(bsz, h, -1, e)[:, :, :length]
        if out is None:
            outs.append(part)
        else:
            out[:, :, start : start + length] = part
        start += length
    if out is None:
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
    return out, state


def lightning_left(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    scale: float,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lightning-1 tiling (quadratic cost, ``chunk_size x chunk_size`` tiles); arguments and results as
    :func:`lightning_chunk`."""
    t = q.shape[2]
    c = max(1, chunk_size)
    q, k, v, rates = prepare(q, k, v, s, scale)
    acc = q.dtype
    pos = torch.arange(t, device=q.device)
    outs = []
    for a in range(0, t, c):
        qi = q[:, :, a : a + c]
        qpos = pos[a : a + c]
        acc_o = None
        for b in range(0, a + 1, c):
            diff = qpos[:, None] - pos[None, b : b + c]
            tile = (qi @ k[:, :, b : b + c].transpose(-1, -2)) * _exp_decay(rates, diff.to(acc), diff >= 0)[None]
            part = tile @ v[:, :, b : b + c]
            acc_o = part if acc_o is None else acc_o + part
        if initial_state is not None:
            acc_o = acc_o + (qi * _exp_decay(rates, (qpos + 1).to(acc))[None, :, :, None]) @ initial_state.to(acc)
        outs.append(acc_o)
    out = torch.cat(outs, 2) if outs else q.new_zeros(*q.shape[:3], v.shape[-1])
    return out, final_state(k, v, rates, initial_state)
