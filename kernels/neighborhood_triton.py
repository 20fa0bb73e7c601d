"""Triton backend of ``neighborhood_aggregate``: forward and deterministic backward kernels.

Semantics of NATTEN's ``na2d_av`` (Hassani et al., Neighborhood Attention Transformer, arXiv 2204.07143):
``attn [B, G, H, W, k*k]`` (tap ``t = a * k + c``), ``value [B, G, H, W, D]``,
``out[b, g, i, j] = sum_{a, c} attn[b, g, i, j, a * k + c] * value[b, g, si(i) + a, sj(j) + c]`` with the
window shifted inside the image at borders: ``si(i) = clamp(i - k // 2, 0, H - k)``, likewise ``sj``.

Kernels (plain pointer arithmetic and masks, so they run under ``TRITON_INTERPRET=1`` on CPU):

* forward: one program per ``BLOCK_W`` output pixels of one row, one ``(b, g)`` and one ``BLOCK_D`` slice
  of the channels; loops over the ``k * k`` taps, accumulating in fp32.
* ``dattn``: the same tiling; per tap, ``sum_d dout * value[shifted]`` (channels looped in chunks).
* ``dvalue``: one program per ``BLOCK_W`` *value* pixels of one row; loops over the output pixels whose
  windows contain them (a contiguous range of rows and of columns, precomputed per row / column on the
  host) and gathers ``attn * dout``. No atomics, fixed order: bit-identical across runs.

Ops (namespace ``vzoo``): ``neighborhood_fwd`` and ``neighborhood_bwd``, glued by ``register_autograd``;
``torch.library.triton_op`` s on a GPU, opaque ``custom_op`` s with fake implementations under the
interpreter (``wrap_triton`` cannot trace interpreted kernels).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from torch import Tensor

from .neighborhood import neighborhood_window_start
from .triton_ops import register_pair

__all__ = ["aggregate"]

_MAX_BLOCK_W = 32
_MAX_BLOCK_D = 64


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _window_start(pos, length, K: tl.constexpr):
    """``clamp(pos - K // 2, 0, length - K)``: the first row / column of ``pos``'s window."""
    return tl.minimum(tl.maximum(pos - K // 2, 0), length - K)


@triton.jit
def _tile(G, W, N_WT, BLOCK_W: tl.constexpr):
    """The ``(b, g)``, row and row-tile columns this program owns: grid axis 0 walks ``H * N_WT`` row
    tiles of ``BLOCK_W`` pixels, axis 1 ``B * G``."""
    pid = tl.program_id(0)
    bg = tl.program_id(1).to(tl.int64)
    j = (pid % N_WT) * BLOCK_W + tl.arange(0, BLOCK_W)
    return bg, bg // G, bg % G, (pid // N_WT).to(tl.int64), j, j < W


@triton.jit
def _fwd_kernel(
    A, V, O,
    s_ab, s_ag, s_ah, s_aw, s_at,
    s_vb, s_vg, s_vh, s_vw, s_vd,
    G, H, W, D, N_WT,
    K: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(H * N_WT, B * G, cdiv(D, BLOCK_D))``: ``out`` for one row tile of one ``(b, g)``."""
    bg, b, g, i, j, j_ok = _tile(G, W, N_WT, BLOCK_W)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    si = _window_start(i, H, K)
    sj = _window_start(j, W, K)

    w_ptr = A + b * s_ab + g * s_ag + i * s_ah + j * s_aw
    v_base = V + b * s_vb + g * s_vg + sj[:, None] * s_vw + d[None, :] * s_vd
    v_mask = j_ok[:, None] & d_ok[None, :]
    acc = tl.zeros([BLOCK_W, BLOCK_D], tl.float32)
    for a in range(0, K):
        v_ptr = v_base + (si + a) * s_vh
        for c in range(0, K):  # tap a * K + c: pointers step one tap / one value column
            w = tl.load(w_ptr, mask=j_ok, other=0.0).to(tl.float32)
            v = tl.load(v_ptr, mask=v_mask, other=0.0).to(tl.float32)
            acc += w[:, None] * v
            w_ptr += s_at
            v_ptr += s_vw

    o_ptr = O + ((bg * H + i) * W + j[:, None]) * D + d[None, :]
    tl.store(o_ptr, acc.to(O.dtype.element_ty), mask=v_mask)


@triton.jit
def _dattn_kernel(
    DO, V, DA,
    s_ob, s_og, s_oh, s_ow, s_od,
    s_vb, s_vg, s_vh, s_vw, s_vd,
    G, H, W, D, N_WT,
    K: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(H * N_WT, B * G)``: ``dattn[..., t] = sum_d dout * value[shifted by t]`` for one row tile."""
    bg, b, g, i, j, j_ok = _tile(G, W, N_WT, BLOCK_W)
    si = _window_start(i, H, K)
    sj = _window_start(j, W, K)

    do_ptr = DO + b * s_ob + g * s_og + i * s_oh + j[:, None] * s_ow
    v_base = V + b * s_vb + g * s_vg + sj[:, None] * s_vw
    da_ptr = DA + ((bg * H + i) * W + j) * (K * K)
    d = tl.arange(0, BLOCK_D)
    mask = j_ok[:, None] & (d < D)[None, :]
    do_first = tl.load(do_ptr + d[None, :] * s_od, mask=mask, other=0.0).to(tl.float32)  # channel chunk 0
    for a in range(0, K):
        v_ptr = v_base + (si + a) * s_vh
        for c in range(0, K):
            v = tl.load(v_ptr + d[None, :] * s_vd, mask=mask, other=0.0).to(tl.float32)
            acc = tl.sum(do_first * v, 1)
            for d0 in range(BLOCK_D, D, BLOCK_D):  # further chunks only when D > BLOCK_D
                dc = d0 + d
                mask_c = j_ok[:, None] & (dc < D)[None, :]
                do = tl.load(do_ptr + dc[None, :] * s_od, mask=mask_c, other=0.0).to(tl.float32)
                v = tl.load(v_ptr + dc[None, :] * s_vd, mask=mask_c, other=0.0).to(tl.float32)
                acc += tl.sum(do * v, 1)
            tl.store(da_ptr, acc.to(DA.dtype.element_ty), mask=j_ok)
            da_ptr += 1
            v_ptr += s_vw


@triton.jit
def _dvalue_kernel(
    A, DO, DV, FIRST_I, LAST_I, FIRST_J, LAST_J,
    s_ab, s_ag, s_ah, s_aw, s_at,
    s_ob, s_og, s_oh, s_ow, s_od,
    G, H, W, D, N_WT,
    K: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(H * N_WT, B * G, cdiv(D, BLOCK_D))``: ``dvalue`` for one row tile of value pixels, gathered
    over the output pixels ``[FIRST_I[y], LAST_I[y]] x [FIRST_J[x0], LAST_J[x_last]]`` whose windows may
    contain them; columns outside a pixel's own range are masked by the tap column ``x - sj(j)``."""
    pid = tl.program_id(0)
    bg = tl.program_id(1).to(tl.int64)
    b = bg // G
    g = bg % G
    y = pid // N_WT
    x0 = (pid % N_WT) * BLOCK_W
    x = x0 + tl.arange(0, BLOCK_W)
    x_ok = x < W
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D

    i_lo = tl.load(FIRST_I + y)
    i_hi = tl.load(LAST_I + y)
    j_lo = tl.load(FIRST_J + x0)
    j_hi = tl.load(LAST_J + tl.minimum(x0 + BLOCK_W, W) - 1)
    a_base = A + b * s_ab + g * s_ag + x * s_at
    do_base = DO + b * s_ob + g * s_og + d * s_od
    acc = tl.zeros([BLOCK_W, BLOCK_D], tl.float32)
    for i in range(i_lo, i_hi + 1):
        a_row = a_base + i * s_ah + (y - _window_start(i, H, K)) * K * s_at  # tap row y - si(i)
        do_row = do_base + i * s_oh
        for jj in range(j_lo, j_hi + 1):
            sj = _window_start(jj, W, K)
            ok = x_ok & (x >= sj) & (x < sj + K)  # tap column x - sj(jj) inside the window
            w = tl.load(a_row + jj * s_aw - sj * s_at, mask=ok, other=0.0).to(tl.float32)
            do = tl.load(do_row + jj * s_ow, mask=d_ok, other=0.0).to(tl.float32)
            acc += w[:, None] * do[None, :]

    dv_ptr = DV + ((bg * H + y) * W + x[:, None]) * D + d[None, :]
    tl.store(dv_ptr, acc.to(DV.dtype.element_ty), mask=x_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------
def _tiles(width: int, dim: int) -> tuple[int, int, int]:
    """Fixed power-of-two tiles ``(BLOCK_W, N_WT, BLOCK_D)``: up to 32 pixels by 64 channels."""
    block_w = min(_MAX_BLOCK_W, max(4, triton.next_power_of_2(width)))
    block_d = min(_MAX_BLOCK_D, max(4, triton.next_power_of_2(dim)))
    return block_w, triton.cdiv(width, block_w), block_d


def _cover_ranges(length: int, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """int32 ``first [length]``, ``last [length]``: the output indices whose windows contain each
    position ``p`` are exactly ``first[p]..last[p]`` (window starts are non-decreasing)."""
    start = neighborhood_window_start(length, k, device)
    pos = torch.arange(length, device=device)
    first = torch.searchsorted(start + k, pos, right=True)  # first i with start[i] + k > p
    last = torch.searchsorted(start, pos, right=True) - 1  # last i with start[i] <= p
    return first.to(torch.int32).contiguous(), last.to(torch.int32).contiguous()


def _fwd_impl(attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
    bsz, groups, h, w, dim = value.shape
    out = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    if out.numel() == 0:
        return out
    block_w, n_wt, block_d = _tiles(w, dim)
    grid = (h * n_wt, bsz * groups, triton.cdiv(dim, block_d))
    torch.library.wrap_triton(_fwd_kernel)[grid](
        attn, value, out, *attn.stride(), *value.stride(), groups, h, w, dim, n_wt,
        K=kernel_size, BLOCK_W=block_w, BLOCK_D=block_d, num_warps=4,
    )
    return out


def _bwd_impl(dout: Tensor, attn: Tensor, value: Tensor, kernel_size: int) -> tuple[Tensor, Tensor]:
    bsz, groups, h, w, dim = value.shape
    dattn = torch.empty(attn.shape, dtype=attn.dtype, device=attn.device)
    dvalue = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    if dvalue.numel() == 0:
        return dattn.zero_(), dvalue
    block_w, n_wt, block_d = _tiles(w, dim)
    torch.library.wrap_triton(_dattn_kernel)[(h * n_wt, bsz * groups)](
        dout, value, dattn, *dout.stride(), *value.stride(), groups, h, w, dim, n_wt,
        K=kernel_size, BLOCK_W=block_w, BLOCK_D=block_d, num_warps=4,
    )
    first_i, last_i = _cover_ranges(h, kernel_size, value.device)
    first_j, last_j = _cover_ranges(w, kernel_size, value.device)
    grid = (h * n_wt, bsz * groups, triton.cdiv(dim, block_d))
    torch.library.wrap_triton(_dvalue_kernel)[grid](
        attn, dout, dvalue, first_i, last_i, first_j, last_j,
        *attn.stride(), *dout.stride(), groups, h, w, dim, n_wt,
        K=kernel_size, BLOCK_W=block_w, BLOCK_D=block_d, num_warps=4,
    )
    return dattn, dvalue


def _fwd_fake(attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
    return value.new_empty(value.shape)


def _bwd_fake(dout: Tensor, attn: Tensor, value: Tensor, kernel_size: int) -> tuple[Tensor, Tensor]:
    return attn.new_empty(attn.shape), value.new_empty(value.shape)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    attn, value, kernel_size = inputs
    ctx.save_for_backward(attn, value)
    ctx.kernel_size = kernel_size


def _backward(ctx, dout: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    attn, value = ctx.saved_tensors
    dattn, dvalue = torch.ops.vzoo.neighborhood_bwd(dout, attn, value, ctx.kernel_size)
    return dattn, dvalue, None


register_pair("neighborhood", _fwd_impl, _bwd_impl, _fwd_fake, _bwd_fake, _backward, _setup_context)


def aggregate(attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
    """NATTEN ``na2d_av`` with the Triton kernels; differentiable in ``attn`` and ``value``.

    ``attn [B, G, H, W, k*k]``, ``value [B, G, H, W, D]`` (shapes checked by the caller), ``kernel_size``
    odd with ``H, W >= k``. Returns ``[B, G, H, W, D]`` in ``value.dtype`` (fp32 accumulation); gradients
    come back in the inputs' dtypes.
    """
    return torch.ops.vzoo.neighborhood_fwd(attn, value, int(kernel_size))
