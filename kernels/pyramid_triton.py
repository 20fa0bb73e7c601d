"""Fused multi-level (pyramid) block-sparse attention forward in Triton, for Pyramid Sparse Attention.

One program owns a query tile and walks its row's entries ``level * NKB + j``: key block ``j`` read at
pyramid level ``level`` (keys mean-pooled by ``2**level``, blocks of ``block_n >> level`` keys) from the
concatenated pyramid ``[K^1 | K^2 | K^4 | K^8]``, with ``+ln(2**level)`` on its logits, in one online
softmax. Forward only (inference); training uses one block-sparse call per level (Triton forward and
backward) merged by log-sum-exp, which computes the same function.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_backend import _LOG2E, _dot, _flags, _softmax_step, _store_rows, _tiles

__all__ = ["pyramid_attention_fwd"]


@triton.jit
def _pyramid_fwd_kernel(
    Q, K, V, O, LSE, NUM, IDX,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    H, GROUP, SQ, HEAD_D, NQB, NKB, MAXE,
    end0, end1, end2, end3,
    block_m, block_n, n_sub_n, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, N_SUB_M: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """Grid ``(NQB * N_SUB_M, B * H)``."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hkv = h // GROUP
    qb = pid_m // N_SUB_M
    row_start = qb * block_m + (pid_m % N_SUB_M) * BLOCK_M
    row_end = tl.minimum(qb * block_m + block_m, SQ)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_D
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qm + d[None, :] * s_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * s_kb + hkv * s_kh
    v_base = V + b * s_vb + hkv * s_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row_id = (b * H + h) * NQB + qb
    count = tl.load(NUM + row_id)
    if row_start < row_end:
        for slot in range(0, count):
            entry = tl.load(IDX + row_id * MAXE + slot)
            level = entry // NKB
            kb = entry % NKB
            width = block_n >> level
            offset = tl.where(level == 0, 0, tl.where(level == 1, end0, tl.where(level == 2, end1, end2)))  # levels are back to back
            level_end = tl.where(level == 0, end0, tl.where(level == 1, end1, tl.where(level == 2, end2, end3)))
            col_end = tl.minimum(offset + kb * width + width, level_end)
            bias = level.to(tl.float32)  # log2(2**level): one pooled key stands for 2**level keys
            for sub in range(0, n_sub_n):
                col_start = offset + kb * width + sub * BLOCK_N
                if col_start < col_end:
                    cols = col_start + tl.arange(0, BLOCK_N)
                    col_ok = cols < col_end
                    kt = tl.load(k_base + cols[None, :] * s_kn + d[:, None] * s_kd,
                                 mask=col_ok[None, :] & d_ok[:, None], other=0.0)
                    v = tl.load(v_base + cols[:, None] * s_vn + d[None, :] * s_vd,
                                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                    s = tl.where(row_ok[:, None] & col_ok[None, :], _dot(q, kt, UPCAST, PREC) * qk_scale + bias, float("-inf"))
                    m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST, PREC)
    _store_rows(O, LSE, acc, m_i, l_i, (b * H + h) * SQ + rows, row_ok, d, d_ok, HEAD_D)


@torch.compiler.disable
def pyramid_attention_fwd(
    q: Tensor, pyramid_k: Tensor, pyramid_v: Tensor, levels: Tensor, lengths: tuple[int, int, int, int],
    block_m: int, block_n: int, scale: float,
) -> tuple[Tensor, Tensor]:
    """Attention of ``q [B, H, S, D]`` over the pyramid levels chosen per (query block, key block).

    Args:
        pyramid_k, pyramid_v: ``[B, Hkv, L1 + L2 + L4 + L8, D]``, the four levels concatenated.
        levels: int ``[B, H, NQB, NKB]``: 1..4 for pooling 1, 2, 4, 8; 0 skips the block.
        lengths: the four level lengths ``(L1, L2, L4, L8)``.
        block_m, block_n: query block and full-resolution key block (level ``l`` uses ``block_n >> (l-1)``).

    Returns:
        ``(out [B, H, S, D], lse [B, H, S] fp32)``.
    """
    bsz, hq, sq, dim = q.shape
    nqb, nkb = levels.shape[2:]
    kept = levels > 0
    count = kept.sum(-1, dtype=torch.int32)
    maxe = max(int(count.max()), 1)
    entries = torch.where(kept, (levels - 1) * nkb + torch.arange(nkb, device=q.device), 2**30)
    entries = entries.sort(-1).values[..., :maxe].to(torch.int32).contiguous()  # grouped by level
    out = torch.empty_like(q)
    lse = torch.empty((bsz, hq, sq), dtype=torch.float32, device=q.device)
    block_mt, n_sub_m, block_nt, n_sub_n, block_d = _tiles(block_m, block_n, dim, q.element_size())
    ends = torch.tensor(lengths).cumsum(0).tolist()
    _pyramid_fwd_kernel[(nqb * n_sub_m, bsz * hq)](
        q, pyramid_k, pyramid_v, out, lse, count.contiguous(), entries,
        *q.stride(), *pyramid_k.stride(), *pyramid_v.stride(),
        hq, hq // pyramid_k.shape[1], sq, dim, nqb, nkb, maxe,
        *ends,
        block_m, block_n, n_sub_n, scale * _LOG2E,
        BLOCK_M=block_mt, BLOCK_N=block_nt, BLOCK_D=block_d, N_SUB_M=n_sub_m, **_flags(q), num_warps=4,
    )
    return out, lse
