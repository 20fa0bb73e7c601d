"""Triton kernels of Lightning Attention-2: forward and backward, registered as ``vzoo::lightning_fwd/bwd``.

Follows ``lightning_attn/ops/triton/lightning_attn2.py`` (OpenNLPLab/lightning-attention; Qin et al.,
arXiv 2401.04658): one program per (batch * head, slice of ``BLOCK_E`` value channels) walks the sequence
in blocks of ``BLOCK`` tokens with the running state ``KV [D, BLOCK_E]`` in registers (fp32):

* forward: ``O = (Q K^T * M) V + (Q * lambda^(a+1)) KV``, then ``KV <- lambda^m KV + (K * lambda^(m-1-b))^T V``
  (``m`` tokens in the block, ``M[a, b] = lambda^(a-b)`` for ``a >= b``); the final ``KV`` is the final state.
* backward ``dQ``: the same forward walk, ``dQ = (dO V^T * M) K + (dO * lambda^(a+1)) KV^T``.
* backward ``dK, dV, dS_0``: a reverse walk with ``R = lambda G`` (``G`` the gradient of the state at a
  block's first token; ``R`` starts as the final state's gradient): ``dK = (dO V^T * M)^T Q + (V R^T) *
  lambda^(m-1-b)``, ``dV = (Q K^T * M)^T dO + (K R) * lambda^(m-1-b)``, ``R <- lambda^m R + (Q *
  lambda^(a+1))^T dO``; the last ``R`` is the initial state's gradient.

``dQ`` and ``dK`` sum over the value slices (partial sums per slice, added on the host), ``dK, dV`` over
the query heads of a GQA group (host). Plain pointer arithmetic and masks, so the kernels run under
``TRITON_INTERPRET=1``; ``torch.library.triton_op`` s on a GPU, opaque ``custom_op`` s under the
interpreter (see :mod:`vzoo.kernels.triton_ops`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_ops import register_pair

__all__ = ["lightning_triton"]

_MAX_D = 256


@triton.jit
def _decays(rate, BLOCK: tl.constexpr):
    """``(M [BLOCK, BLOCK], lambda^(a+1) [BLOCK], offsets)`` of a block of ``BLOCK`` tokens."""
    offs = tl.arange(0, BLOCK)
    fa = offs.to(tl.float32)
    diff = fa[:, None] - fa[None, :]
    mask = tl.where(offs[:, None] >= offs[None, :], tl.exp(-rate * tl.maximum(diff, 0.0)), 0.0)
    return mask, tl.exp(-rate * (fa + 1.0)), offs


@triton.jit
def _tail(rate, offs, m):
    """``lambda^(m-1-b)`` for the ``m`` tokens of a block, 0 past them (where the power would overflow)."""
    e = (m - 1 - offs).to(tl.float32)
    return tl.where(offs < m, tl.exp(-rate * tl.maximum(e, 0.0)), 0.0)


@triton.jit
def _program(H, G, D, E, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program of the grid ``(B * H, value slices)``: ``(bh, b, h, kv head, d [BLOCK_D], value channels
    ev [BLOCK_E], d_ok, e_ok, state offsets st [BLOCK_D, BLOCK_E] into a contiguous [B, H, D, Dv], st_ok)``."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    d = tl.arange(0, BLOCK_D)
    ev = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    d_ok, e_ok = d < D, ev < E
    return bh, b, h, h // G, d, ev, d_ok, e_ok, (bh * D + d[:, None]) * E + ev[None, :], d_ok[:, None] & e_ok[None, :]


@triton.jit
def _initial_state(H0, st, st_ok, HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """The state before token 0 (this program's slice, fp32): ``H0`` or zeros."""
    if HAS_H0:
        kv = tl.load(H0 + st, mask=st_ok, other=0.0).to(tl.float32)
    else:
        kv = tl.zeros([BLOCK_D, BLOCK_E], tl.float32)
    return kv


@triton.jit
def _rows(BASE, t, s_t, cols, t_ok, c_ok):
    """The block ``BASE[t, cols]`` (row stride ``s_t``, unit column stride) in fp32, 0 outside the masks."""
    return tl.load(BASE + t[:, None] * s_t + cols[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _advance(kv, k, v, rate, offs, m, PREC: tl.constexpr):
    """The state after a block of ``m`` tokens: ``KV <- lambda^m KV + (K * lambda^(m-1-b))^T V``."""
    kt = k * _tail(rate, offs, m)[:, None]
    return tl.exp(-rate * m.to(tl.float32)) * kv + tl.dot(tl.trans(kt), v, input_precision=PREC)


@triton.jit
def _fwd_kernel(
    Q, K, V, RATE, H0, O, HT,
    scale, T, H, G, D, E,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
    HAS_H0: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, PREC: tl.constexpr,
):
    """Grid ``(B * H, cdiv(Dv, BLOCK_E))``; ``q, k, v`` have unit last stride, ``O [B, H, T, Dv]``, ``H0, HT
    [B, H, D, Dv]`` contiguous."""
    bh, b, h, hk, d, ev, d_ok, e_ok, st, st_ok = _program(H, G, D, E, BLOCK_D, BLOCK_E)
    rate = tl.load(RATE + h)
    mask, q_dec, offs = _decays(rate, BLOCK)
    kv = _initial_state(H0, st, st_ok, HAS_H0, BLOCK_D, BLOCK_E)
    for start in range(0, T, BLOCK):
        t = start + offs
        t_ok = t < T
        q = _rows(Q + b * s_qb + h * s_qh, t, s_qt, d, t_ok, d_ok) * scale
        k = _rows(K + b * s_kb + hk * s_kh, t, s_kt, d, t_ok, d_ok)
        v = _rows(V + b * s_vb + hk * s_vh, t, s_vt, ev, t_ok, e_ok)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * mask
        o = tl.dot(qk, v, input_precision=PREC) + tl.dot(q * q_dec[:, None], kv, input_precision=PREC)
        tl.store(O + ((bh * T + t[:, None]) * E + ev[None, :]), o.to(O.dtype.element_ty), mask=t_ok[:, None] & e_ok[None, :])
        kv = _advance(kv, k, v, rate, offs, tl.minimum(T - start, BLOCK), PREC)
    tl.store(HT + st, kv, mask=st_ok)


@triton.jit
def _dq_kernel(
    DO, K, V, RATE, H0, DQ,
    scale, T, H, G, D, E,
    s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
    HAS_H0: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, PREC: tl.constexpr,
):
    """Grid ``(B * H, n_e)``: ``DQ [n_e, B, H, T, D]`` fp32, the slice's share of ``dq``; ``DO [B, H, T, Dv]``."""
    bh, b, h, hk, d, ev, d_ok, e_ok, st, st_ok = _program(H, G, D, E, BLOCK_D, BLOCK_E)
    pe = tl.program_id(1)
    nbh = tl.num_programs(0).to(tl.int64)
    rate = tl.load(RATE + h)
    mask, q_dec, offs = _decays(rate, BLOCK)
    kv = _initial_state(H0, st, st_ok, HAS_H0, BLOCK_D, BLOCK_E)
    for start in range(0, T, BLOCK):
        t = start + offs
        t_ok = t < T
        k = _rows(K + b * s_kb + hk * s_kh, t, s_kt, d, t_ok, d_ok)
        v = _rows(V + b * s_vb + hk * s_vh, t, s_vt, ev, t_ok, e_ok)
        do = _rows(DO + bh * T * E, t, E, ev, t_ok, e_ok)
        dov = tl.dot(do, tl.trans(v), input_precision=PREC) * mask
        dq = tl.dot(dov, k, input_precision=PREC) + tl.dot(do * q_dec[:, None], tl.trans(kv), input_precision=PREC)
        tl.store(DQ + (((pe * nbh + bh) * T + t[:, None]) * D + d[None, :]), dq * scale, mask=t_ok[:, None] & d_ok[None, :])
        kv = _advance(kv, k, v, rate, offs, tl.minimum(T - start, BLOCK), PREC)


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, RATE, DHT, DK, DV, DH0,
    scale, T, H, G, D, E,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, PREC: tl.constexpr,
):
    """Grid ``(B * H, n_e)``: ``DK [n_e, B, H, T, D]`` fp32 (the slice's share), ``DV [B, H, T, Dv]`` fp32
    (per query head), ``DH0 [B, H, D, Dv]`` fp32; ``DHT [B, H, D, Dv]`` the final state's gradient."""
    bh, b, h, hk, d, ev, d_ok, e_ok, st, st_ok = _program(H, G, D, E, BLOCK_D, BLOCK_E)
    pe = tl.program_id(1)
    nbh = tl.num_programs(0).to(tl.int64)
    rate = tl.load(RATE + h)
    mask, q_dec, offs = _decays(rate, BLOCK)
    r = tl.load(DHT + st, mask=st_ok, other=0.0).to(tl.float32)
    n_blocks = tl.cdiv(T, BLOCK)
    for i in range(0, n_blocks):
        start = (n_blocks - 1 - i) * BLOCK
        t = start + offs
        t_ok = t < T
        td_ok = t_ok[:, None] & d_ok[None, :]
        te_ok = t_ok[:, None] & e_ok[None, :]
        q = _rows(Q + b * s_qb + h * s_qh, t, s_qt, d, t_ok, d_ok) * scale
        k = _rows(K + b * s_kb + hk * s_kh, t, s_kt, d, t_ok, d_ok)
        v = _rows(V + b * s_vb + hk * s_vh, t, s_vt, ev, t_ok, e_ok)
        do = _rows(DO + bh * T * E, t, E, ev, t_ok, e_ok)
        m = tl.minimum(T - start, BLOCK)
        tail = _tail(rate, offs, m)[:, None]
        dov = tl.dot(do, tl.trans(v), input_precision=PREC) * mask  # [a, b]
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * mask
        dk = tl.dot(tl.trans(dov), q, input_precision=PREC) + tl.dot(v, tl.trans(r), input_precision=PREC) * tail
        dv = tl.dot(tl.trans(qk), do, input_precision=PREC) + tl.dot(k, r, input_precision=PREC) * tail
        tl.store(DK + (((pe * nbh + bh) * T + t[:, None]) * D + d[None, :]), dk, mask=td_ok)
        tl.store(DV + ((bh * T + t[:, None]) * E + ev[None, :]), dv, mask=te_ok)
        r = tl.exp(-rate * m.to(tl.float32)) * r + tl.dot(tl.trans(q * q_dec[:, None]), do, input_precision=PREC)
    tl.store(DH0 + st, r, mask=st_ok)


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------
def _tiles(d: int, e: int, block: int) -> tuple[int, int, int, int]:
    """``(BLOCK, BLOCK_D, BLOCK_E, n_e)``: powers of two >= 16 (``tl.dot``'s minimum)."""
    block_d = max(16, triton.next_power_of_2(d))
    block_e = min(64, max(16, triton.next_power_of_2(e)))
    return max(16, min(128, triton.next_power_of_2(block))), block_d, block_e, triton.cdiv(e, block_e)


def _precision(q: Tensor) -> str:
    """``tl.dot`` precision: IEEE fp32 for fp32 inputs (exact, as the CPU paths), tf32 for half inputs (the
    operands are upcast to fp32 in the kernels; tf32 keeps more bits than the inputs had)."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _fwd_impl(
    q: Tensor, k: Tensor, v: Tensor, rates: Tensor, h0: Tensor | None, scale: float, block: int
) -> tuple[Tensor, Tensor]:
    bsz, h, t, d = q.shape
    e = v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(bsz, h, t, e, dtype=q.dtype, device=q.device)
    ht = torch.empty(bsz, h, d, e, dtype=torch.float32, device=q.device)
    blk, block_d, block_e, n_e = _tiles(d, e, block)
    h0c = h0.float().contiguous() if h0 is not None else ht
    torch.library.wrap_triton(_fwd_kernel)[(bsz * h, n_e)](
        q, k, v, rates, h0c, out, ht, scale, t, h, h // k.shape[1], d, e,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        HAS_H0=h0 is not None, BLOCK=blk, BLOCK_D=block_d, BLOCK_E=block_e, PREC=_precision(q),
    )
    return out, ht


def _bwd_impl(
    do: Tensor, dht: Tensor, q: Tensor, k: Tensor, v: Tensor, rates: Tensor, h0: Tensor | None, scale: float, block: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    bsz, h, t, d = q.shape
    hk, e = k.shape[1], v.shape[-1]
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    blk, block_d, block_e, n_e = _tiles(d, e, block)
    dq = torch.empty(n_e, bsz, h, t, d, dtype=torch.float32, device=q.device)
    dk = torch.empty(n_e, bsz, h, t, d, dtype=torch.float32, device=q.device)
    dv = torch.empty(bsz, h, t, e, dtype=torch.float32, device=q.device)
    dh0 = torch.empty(bsz, h, d, e, dtype=torch.float32, device=q.device)
    h0c = h0.float().contiguous() if h0 is not None else dh0
    grid = (bsz * h, n_e)
    strides_kv = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
    torch.library.wrap_triton(_dq_kernel)[grid](
        do, k, v, rates, h0c, dq, scale, t, h, h // hk, d, e, *strides_kv,
        HAS_H0=h0 is not None, BLOCK=blk, BLOCK_D=block_d, BLOCK_E=block_e, PREC=_precision(q),
    )
    torch.library.wrap_triton(_dkdv_kernel)[grid](
        q, k, v, do, rates, dht.float().contiguous(), dk, dv, dh0, scale, t, h, h // hk, d, e,
        q.stride(0), q.stride(1), q.stride(2), *strides_kv, BLOCK=blk, BLOCK_D=block_d, BLOCK_E=block_e, PREC=_precision(q),
    )
    g = h // hk
    dk = dk.sum(0).view(bsz, hk, g, t, d).sum(2)
    dv = dv.view(bsz, hk, g, t, e).sum(2)
    return dq.sum(0).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dh0


def _fwd_fake(
    q: Tensor, k: Tensor, v: Tensor, rates: Tensor, h0: Tensor | None, scale: float, block: int
) -> tuple[Tensor, Tensor]:
    bsz, h, _, d = q.shape
    return q.new_empty(*q.shape[:3], v.shape[-1]), q.new_empty(bsz, h, d, v.shape[-1], dtype=torch.float32)


def _bwd_fake(
    do: Tensor, dht: Tensor, q: Tensor, k: Tensor, v: Tensor, rates: Tensor, h0: Tensor | None, scale: float, block: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    bsz, h, _, d = q.shape
    dh0 = q.new_empty(bsz, h, d, v.shape[-1], dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dh0


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, rates, h0, scale, block = inputs
    ctx.save_for_backward(q, k, v, rates, h0)
    ctx.scale, ctx.block, ctx.has_h0 = scale, block, h0 is not None
    ctx.h0_dtype = h0.dtype if h0 is not None else None


def _backward(ctx, do: Tensor, dht: Tensor | None):
    q, k, v, rates, h0 = ctx.saved_tensors
    if dht is None:
        dht = q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1], dtype=torch.float32)
    if do is None:
        do = q.new_zeros(*q.shape[:3], v.shape[-1])
    dq, dk, dv, dh0 = torch.ops.vzoo.lightning_bwd(do, dht, q, k, v, rates, h0, ctx.scale, ctx.block)
    return dq, dk, dv, None, dh0.to(ctx.h0_dtype) if ctx.has_h0 else None, None, None


register_pair("lightning", _fwd_impl, _bwd_impl, _fwd_fake, _bwd_fake, _backward, _setup_context)


def lightning_triton(
    q: Tensor, k: Tensor, v: Tensor, s: Tensor | None, initial_state: Tensor | None, scale: float, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """Lightning-2 with the Triton kernels (checked inputs as :func:`..chunk.lightning_chunk`; ``D <= 256``,
    fp16 / bf16 / fp32). Returns ``o [B, H, T, Dv]`` in ``q.dtype`` and the final state (fp32);
    differentiable in ``q, k, v`` and ``initial_state``."""
    if q.dtype == torch.float64:
        raise ValueError("the triton backend takes float16, bfloat16 or float32 inputs, not float64")
    if q.shape[-1] > _MAX_D:
        raise ValueError(f"the triton backend needs a head dim D <= {_MAX_D} (one tile), got D={q.shape[-1]}")
    rates = s if s is not None else torch.zeros(q.shape[1], dtype=torch.float32, device=q.device)
    return torch.ops.vzoo.lightning_fwd(q, k, v, rates.float().contiguous(), initial_state, float(scale), int(chunk_size))
