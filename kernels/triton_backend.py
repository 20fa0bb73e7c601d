"""Triton backend of block-sparse attention: forward and deterministic backward kernels.

The kernels follow FlashAttention-2 (Dao, arXiv 2307.08691) as laid out in the Triton fused-attention
tutorial (triton-lang/triton ``python/tutorials/06-fused-attention.py``): one program per query tile
with an online softmax in fp32 (exp2 with ``scale * log2(e)`` folded in), and a backward pass in three
kernels -- ``delta = rowsum(dO * O) - dlse``, dK/dV per key tile, dQ per query tile -- with no atomics.
The sparse loops walk the layout's row lists (forward, dQ) and their transpose, the column lists
(dK/dV), as FlexAttention's BlockMask and mit-han-lab/Block-Sparse-Attention do. Kernels use plain
pointer arithmetic and masks (no block pointers), so they run under ``TRITON_INTERPRET=1`` on CPU.

Ops (namespace ``vzoo``): ``block_sparse_fwd`` and ``block_sparse_bwd``, glued by ``register_autograd``.
On a GPU they are ``torch.library.triton_op`` s, so ``torch.compile`` sees the kernels. Under the
interpreter ``wrap_triton`` cannot trace interpreted kernels, so the same ops are opaque
``torch.library.custom_op`` s with fake implementations; ``torch.compile`` then calls them as black boxes.

Logical blocks of any size are covered by power-of-two tiles of 16 to 64 tokens (at most 32 when a
padded head row exceeds 256 bytes): a query block of ``block_m`` tokens is ``cdiv(block_m, BLOCK_M)``
programs, a key block ``cdiv(block_n, BLOCK_N)`` loop steps; rows and columns past the block or the
sequence are masked. Head dims up to 256 are padded to a power of two.

Keys and values holding NaN or Inf are zeroed as they are loaded and poison (NaN) only the rows that
see them, so garbage in hidden keys (padding, empty cache slots) never reaches an output or gradient.
"""


import torch
import triton
import triton.language as tl
from torch import Tensor

from .block_sparse import broadcast_heads
from .layout import BlockSparseLayout
from .triton_ops import INTERPRET, register_pair

__all__ = ["attend"]

_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
_LOG2E_K = tl.constexpr(_LOG2E)  # the same constant, readable inside kernels


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """``a @ b`` accumulated in fp32; ``UPCAST`` works around bf16 ``tl.dot`` under the interpreter."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _finite(x, AXIS: tl.constexpr):
    """True where every entry of ``x`` along ``AXIS`` is finite (NaN fails every comparison)."""
    return tl.min((tl.abs(x.to(tl.float32)) < float("inf")).to(tl.int32), AXIS) > 0


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax update with the logit tile ``s`` (log2 units, ``-inf`` = masked) and values ``v``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PREC)
    return m_new, l_i, acc


@triton.jit
def _visible(allowed, rows, cols, causal_shift, window, sink, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """``allowed`` less the keys the token rule hides (``rows``/``cols`` broadcast against each other)."""
    pos = rows + causal_shift
    if CAUSAL:
        allowed = allowed & (cols <= pos)
    if WINDOW:
        allowed = allowed & ((cols > pos - window) | (cols < sink))
    return allowed


@triton.jit
def _store_rows(O, LSE, acc, m_i, l_i, bh_row, row_ok, d, d_ok, HEAD_D):
    """Normalise and store a query tile's output and natural-log LSE (zeros and ``-inf`` for empty rows)."""
    live = l_i > 0.0
    out = acc / tl.where(live, l_i, 1.0)[:, None]
    lse = tl.where(live, (m_i + tl.log2(tl.where(live, l_i, 1.0))) / _LOG2E_K, float("-inf"))
    tl.store(O + bh_row[:, None] * HEAD_D + d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh_row, lse, mask=row_ok)


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KV_NUM, KV_IDX, TOK, KMASK,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_tb, s_th, s_tm, s_ts, s_km,
    H, HU, GROUP, HU_DIV, SQ, SKV, HEAD_D, NQB, MAXK,
    block_m, block_n, n_sub_n, causal_shift, window, sink, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, N_SUB_M: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_TOKEN_MASK: tl.constexpr, HAS_KEY_MASK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """Grid ``(NQB * N_SUB_M, B * H)``: one query tile of one head over its row's key blocks."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hkv = h // GROUP
    hu = h // HU_DIV
    qb = pid_m // N_SUB_M
    row_start = qb * block_m + (pid_m % N_SUB_M) * BLOCK_M
    row_end = tl.minimum(qb * block_m + block_m, SQ)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    last_row = tl.minimum(row_start + BLOCK_M, row_end) - 1
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_D

    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qm + d[None, :] * s_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * s_kb + hkv * s_kh
    v_base = V + b * s_vb + hkv * s_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    poison = tl.zeros([BLOCK_M], tl.int32)  # rows that see a key holding NaN / Inf
    row_id = (b * HU + hu) * NQB + qb
    count = tl.load(KV_NUM + row_id)
    if row_start < row_end:
        for slot in range(0, count):
            kb = tl.load(KV_IDX + row_id * MAXK + slot)
            use = row_ok
            if HAS_TOKEN_MASK:
                tok = tl.load(TOK + b * s_tb + hu * s_th + rows * s_tm + slot * s_ts, mask=row_ok, other=0)
                use = use & (tok != 0)
            col_end = tl.minimum(kb * block_n + block_n, SKV)
            for sub in range(0, n_sub_n):
                col_start = kb * block_n + sub * BLOCK_N
                run = col_start < col_end
                if CAUSAL:
                    run = run & (col_start <= last_row + causal_shift)
                if run:
                    cols = col_start + tl.arange(0, BLOCK_N)
                    col_ok = cols < col_end
                    kt = tl.load(k_base + cols[None, :] * s_kn + d[:, None] * s_kd,
                                 mask=col_ok[None, :] & d_ok[:, None], other=0.0)
                    v = tl.load(v_base + cols[:, None] * s_vn + d[None, :] * s_vd,
                                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                    fin = _finite(kt, 0) & _finite(v, 1)
                    kt = tl.where(fin[None, :], kt, 0.0)
                    v = tl.where(fin[:, None], v, 0.0)
                    allowed = _visible(use[:, None] & col_ok[None, :], rows[:, None], cols[None, :],
                                       causal_shift, window, sink, CAUSAL, WINDOW)
                    if HAS_KEY_MASK:
                        kept = tl.load(KMASK + b * s_km + cols, mask=col_ok, other=0)
                        allowed = allowed & (kept != 0)[None, :]
                    poison = tl.maximum(poison, tl.max((allowed & (fin == 0)[None, :]).to(tl.int32), 1))
                    s = tl.where(allowed, _dot(q, kt, UPCAST, PREC) * qk_scale, float("-inf"))
                    m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST, PREC)

    acc = tl.where(poison[:, None] > 0, float("nan"), acc)
    m_i = tl.where(poison > 0, float("nan"), m_i)
    _store_rows(O, LSE, acc, m_i, l_i, (b * H + h) * SQ + rows, row_ok, d, d_ok, HEAD_D)


@triton.jit
def _delta_kernel(
    O, DO, DLSE, DELTA,
    s_ob, s_oh, s_om, s_od, s_db, s_dh, s_dm, s_dd,
    H, SQ, HEAD_D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(SQ, BLOCK_M), B * H)``: ``delta = rowsum(dO * O) - dlse`` in fp32."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    mask = (rows < SQ)[:, None] & (d < HEAD_D)[None, :]
    o = tl.load(O + b * s_ob + h * s_oh + rows[:, None] * s_om + d[None, :] * s_od, mask=mask, other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + rows[:, None] * s_dm + d[None, :] * s_dd, mask=mask, other=0.0)
    bh_row = (b * H + h) * SQ + rows
    dlse = tl.load(DLSE + bh_row, mask=rows < SQ, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) - dlse
    tl.store(DELTA + bh_row, delta, mask=rows < SQ)


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, Q_NUM, Q_IDX, Q_SLOT, TOK, KMASK,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_tb, s_th, s_tm, s_ts, s_km,
    H, HKV, HU, GROUP, HU_DIV, SQ, SKV, HEAD_D, NKB, NQB,
    block_m, block_n, n_sub_m, causal_shift, window, sink, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, N_SUB_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_TOKEN_MASK: tl.constexpr, HAS_KEY_MASK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """Grid ``(NKB * N_SUB_N, B * HKV)``: one key tile, summed over the ``GROUP`` query heads sharing it
    and, for each, over the query blocks of its column list (``Q_NUM``/``Q_IDX``, width ``NQB``)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    hkv = (bh % HKV).to(tl.int64)
    kb = pid_n // N_SUB_N
    col_start = kb * block_n + (pid_n % N_SUB_N) * BLOCK_N
    col_end = tl.minimum(kb * block_n + block_n, SKV)
    cols = col_start + tl.arange(0, BLOCK_N)
    col_ok = cols < col_end
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_D
    kv_mask = col_ok[:, None] & d_ok[None, :]
    key_ok = col_ok  # the key mask is fixed for this key tile: load it once
    if HAS_KEY_MASK:
        key_ok = key_ok & (tl.load(KMASK + b * s_km + cols, mask=col_ok, other=0) != 0)
    k = tl.load(K + b * s_kb + hkv * s_kh + cols[:, None] * s_kn + d[None, :] * s_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * s_vb + hkv * s_vh + cols[:, None] * s_vn + d[None, :] * s_vd, mask=kv_mask, other=0.0)
    fin = _finite(k, 1) & _finite(v, 1)
    k = tl.where(fin[:, None], k, 0.0)
    v = tl.where(fin[:, None], v, 0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    if col_start < col_end:
        for g in range(0, GROUP):
            h = hkv * GROUP + g
            hu = h // HU_DIV
            col_id = (b * HU + hu) * NKB + kb
            count = tl.load(Q_NUM + col_id)
            q_base = Q + b * s_qb + h * s_qh
            do_base = DO + b * s_ob + h * s_oh
            stat_base = (b * H + h) * SQ
            for t in range(0, count):
                qb = tl.load(Q_IDX + col_id * NQB + t)
                if HAS_TOKEN_MASK:
                    slot = tl.load(Q_SLOT + col_id * NQB + t)
                row_end = tl.minimum(qb * block_m + block_m, SQ)
                for sub in range(0, n_sub_m):
                    row_start = qb * block_m + sub * BLOCK_M
                    last_row = tl.minimum(row_start + BLOCK_M, row_end) - 1
                    run = row_start < row_end
                    if CAUSAL:
                        run = run & (last_row + causal_shift >= col_start)
                    if run:
                        rows = row_start + tl.arange(0, BLOCK_M)
                        row_ok = rows < row_end
                        q_mask = row_ok[:, None] & d_ok[None, :]
                        q = tl.load(q_base + rows[:, None] * s_qm + d[None, :] * s_qd, mask=q_mask, other=0.0)
                        do = tl.load(do_base + rows[:, None] * s_om + d[None, :] * s_od, mask=q_mask, other=0.0)
                        lse = tl.load(LSE + stat_base + rows, mask=row_ok, other=0.0)
                        lse = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E_K)
                        delta = tl.load(DELTA + stat_base + rows, mask=row_ok, other=0.0)
                        use = row_ok
                        if HAS_TOKEN_MASK:
                            tok = tl.load(TOK + b * s_tb + hu * s_th + rows * s_tm + slot * s_ts,
                                          mask=row_ok, other=0)
                            use = use & (tok != 0)
                        allowed = _visible(key_ok[:, None] & use[None, :], rows[None, :], cols[:, None],
                                           causal_shift, window, sink, CAUSAL, WINDOW)
                        st = _dot(k, tl.trans(q), UPCAST, PREC) * qk_scale
                        pt = tl.where(allowed, tl.exp2(st - lse[None, :]), 0.0)
                        dv += _dot(pt.to(do.dtype), do, UPCAST, PREC)
                        dpt = _dot(v, tl.trans(do), UPCAST, PREC)
                        dst = pt * (dpt - delta[None, :])
                        dk += _dot(dst.to(q.dtype), q, UPCAST, PREC)

    out_off = ((b * HKV + hkv) * SKV + cols)[:, None] * HEAD_D + d[None, :]
    tl.store(DK + out_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_NUM, KV_IDX, TOK, KMASK,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_tb, s_th, s_tm, s_ts, s_km,
    H, HU, GROUP, HU_DIV, SQ, SKV, HEAD_D, NQB, MAXK,
    block_m, block_n, n_sub_n, causal_shift, window, sink, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, N_SUB_M: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_TOKEN_MASK: tl.constexpr, HAS_KEY_MASK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """Grid ``(NQB * N_SUB_M, B * H)``: dQ of one query tile over its row's key blocks."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hkv = h // GROUP
    hu = h // HU_DIV
    qb = pid_m // N_SUB_M
    row_start = qb * block_m + (pid_m % N_SUB_M) * BLOCK_M
    row_end = tl.minimum(qb * block_m + block_m, SQ)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    last_row = tl.minimum(row_start + BLOCK_M, row_end) - 1
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_D
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qm + d[None, :] * s_qd, mask=q_mask, other=0.0)
    do = tl.load(DO + b * s_ob + h * s_oh + rows[:, None] * s_om + d[None, :] * s_od, mask=q_mask, other=0.0)
    bh_row = (b * H + h) * SQ + rows
    lse = tl.load(LSE + bh_row, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E_K)
    delta = tl.load(DELTA + bh_row, mask=row_ok, other=0.0)
    k_base = K + b * s_kb + hkv * s_kh
    v_base = V + b * s_vb + hkv * s_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    row_id = (b * HU + hu) * NQB + qb
    count = tl.load(KV_NUM + row_id)
    if row_start < row_end:
        for slot in range(0, count):
            kb = tl.load(KV_IDX + row_id * MAXK + slot)
            use = row_ok
            if HAS_TOKEN_MASK:
                tok = tl.load(TOK + b * s_tb + hu * s_th + rows * s_tm + slot * s_ts, mask=row_ok, other=0)
                use = use & (tok != 0)
            col_end = tl.minimum(kb * block_n + block_n, SKV)
            for sub in range(0, n_sub_n):
                col_start = kb * block_n + sub * BLOCK_N
                run = col_start < col_end
                if CAUSAL:
                    run = run & (col_start <= last_row + causal_shift)
                if run:
                    cols = col_start + tl.arange(0, BLOCK_N)
                    col_ok = cols < col_end
                    kt = tl.load(k_base + cols[None, :] * s_kn + d[:, None] * s_kd,
                                 mask=col_ok[None, :] & d_ok[:, None], other=0.0)
                    vt = tl.load(v_base + cols[None, :] * s_vn + d[:, None] * s_vd,
                                 mask=col_ok[None, :] & d_ok[:, None], other=0.0)
                    fin = _finite(kt, 0) & _finite(vt, 0)
                    kt = tl.where(fin[None, :], kt, 0.0)
                    vt = tl.where(fin[None, :], vt, 0.0)
                    allowed = _visible(use[:, None] & col_ok[None, :], rows[:, None], cols[None, :],
                                       causal_shift, window, sink, CAUSAL, WINDOW)
                    if HAS_KEY_MASK:
                        kept = tl.load(KMASK + b * s_km + cols, mask=col_ok, other=0)
                        allowed = allowed & (kept != 0)[None, :]
                    s = _dot(q, kt, UPCAST, PREC) * qk_scale
                    p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
                    dp = _dot(do, vt, UPCAST, PREC)
                    ds = p * (dp - delta[:, None])
                    dq += _dot(ds.to(kt.dtype), tl.trans(kt), UPCAST, PREC)

    tl.store(DQ + bh_row[:, None] * HEAD_D + d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------
def _tiles(block_m: int, block_n: int, dim: int, itemsize: int) -> tuple[int, int, int, int, int]:
    """Power-of-two tiles ``(BLOCK_M, N_SUB_M, BLOCK_N, N_SUB_N, BLOCK_D)``: each logical block is
    covered by ``N_SUB`` tiles of 16..64 tokens (16..32 when a padded row of q/k/v exceeds 256 bytes,
    e.g. fp32 with D=128, to bound shared memory)."""
    block_d = max(16, triton.next_power_of_2(dim))
    cap = 64 if block_d * itemsize <= 256 else 32
    tile_m = min(max(16, triton.next_power_of_2(block_m)), cap)
    tile_n = min(max(16, triton.next_power_of_2(block_n)), cap)
    return tile_m, triton.cdiv(block_m, tile_m), tile_n, triton.cdiv(block_n, tile_n), block_d


def _flags(q: Tensor) -> dict[str, object]:
    """Compile-time flags: fp32 upcast before ``tl.dot`` under the interpreter, IEEE fp32 dots."""
    return {
        "UPCAST": INTERPRET,
        "PREC": "ieee" if q.dtype == torch.float32 else None,
    }


def _token_args(token_mask: Tensor | None, fallback: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The token mask as bytes with its strides, or a dummy pointer with zero strides."""
    if token_mask is None:
        return fallback, (0, 0, 0, 0)
    return token_mask.view(torch.uint8), tuple(token_mask.stride())


def _key_args(key_mask: Tensor | None, fallback: Tensor) -> tuple[Tensor, int]:
    """The key mask as bytes with its batch stride, or a dummy pointer."""
    if key_mask is None:
        return fallback, 0
    key_mask = key_mask.contiguous()
    return key_mask.view(torch.uint8), key_mask.stride(0)


def _column_lists(kv_num_blocks: Tensor, kv_indices: Tensor, nkb: int) -> tuple[Tensor, Tensor, Tensor]:
    """Transpose row lists ``[B, Hu, NQB(, MAXK)]`` into column lists with static shapes.

    Returns ``q_num [B, Hu, NKB]`` (query blocks per key block), ``q_idx [B, Hu, NKB, NQB]`` (their ids,
    ascending; entries past ``q_num`` are arbitrary) and ``q_slot [B, Hu, NKB, NQB]`` (the slot the key
    block occupies in that query block's row, to index ``token_mask``). Unlike
    ``BlockSparseLayout.transpose`` it never syncs on data, so the backward traces under ``torch.compile``.
    """
    b, hu, nqb, maxk = kv_indices.shape
    slots = torch.arange(maxk, device=kv_indices.device, dtype=torch.int32).expand(b, hu, nqb, maxk)
    valid = slots < kv_num_blocks[..., None]
    target = torch.where(valid, kv_indices.long(), nkb)
    table = torch.full((b, hu, nqb, nkb + 1), -1, dtype=torch.int32, device=kv_indices.device)
    table.scatter_(-1, target, slots)  # padding lands in the spare column nkb, dropped below
    table = table[..., :nkb].transpose(-1, -2)  # [B, Hu, NKB, NQB]
    selected = table >= 0
    q_num = selected.sum(-1, dtype=torch.int32)
    order = torch.sort((~selected).to(torch.uint8), dim=-1, stable=True).indices
    return q_num.contiguous(), order.to(torch.int32).contiguous(), table.gather(-1, order).contiguous()


def _fwd_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_num_blocks: Tensor,
    kv_indices: Tensor,
    token_mask: Tensor | None,
    block_m: int,
    block_n: int,
    causal: bool,
    window: int,
    sink: int,
    key_mask: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor]:
    bsz, hq, sq, dim = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz, hq, sq), dtype=torch.float32, device=q.device)
    if q.numel() == 0 or skv == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    kv_num = kv_num_blocks.contiguous()
    kv_idx = kv_indices.contiguous()
    hu, nqb, maxk = kv_idx.shape[1:]
    block_mt, n_sub_m, block_nt, n_sub_n, block_d = _tiles(block_m, block_n, dim, q.element_size())
    tok, tok_strides = _token_args(token_mask, kv_num)
    kmask, km_stride = _key_args(key_mask, kv_num)
    grid = (nqb * n_sub_m, bsz * hq)
    torch.library.wrap_triton(_fwd_kernel)[grid](
        q, k, v, out, lse, kv_num, kv_idx, tok, kmask,
        *q.stride(), *k.stride(), *v.stride(), *tok_strides, km_stride,
        hq, hu, hq // hkv, hq // hu, sq, skv, dim, nqb, maxk,
        block_m, block_n, n_sub_n, skv - sq, window, sink, scale * _LOG2E,
        BLOCK_M=block_mt, BLOCK_N=block_nt, BLOCK_D=block_d, N_SUB_M=n_sub_m,
        CAUSAL=causal, WINDOW=window > 0, HAS_TOKEN_MASK=token_mask is not None, HAS_KEY_MASK=key_mask is not None,
        **_flags(q), num_warps=4,
    )
    return out, lse


def _bwd_impl(
    dout: Tensor,
    dlse: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    kv_num_blocks: Tensor,
    kv_indices: Tensor,
    token_mask: Tensor | None,
    block_m: int,
    block_n: int,
    causal: bool,
    window: int,
    sink: int,
    key_mask: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    bsz, hq, sq, dim = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq, dk, dv
    kv_num = kv_num_blocks.contiguous()
    kv_idx = kv_indices.contiguous()
    hu, nqb, maxk = kv_idx.shape[1:]
    nkb = triton.cdiv(skv, block_n)
    block_mt, n_sub_m, block_nt, n_sub_n, block_d = _tiles(block_m, block_n, dim, q.element_size())
    tok, tok_strides = _token_args(token_mask, kv_num)
    kmask, km_stride = _key_args(key_mask, kv_num)
    lse = lse.contiguous()
    flags = _flags(q)

    delta = torch.empty((bsz, hq, sq), dtype=torch.float32, device=q.device)
    torch.library.wrap_triton(_delta_kernel)[(triton.cdiv(sq, 64), bsz * hq)](
        out, dout, dlse.contiguous(), delta, *out.stride(), *dout.stride(), hq, sq, dim,
        BLOCK_M=64, BLOCK_D=block_d, num_warps=4,
    )
    q_num, q_idx, q_slot = _column_lists(kv_num, kv_idx, nkb)
    torch.library.wrap_triton(_dkdv_kernel)[(nkb * n_sub_n, bsz * hkv)](
        q, k, v, dout, lse, delta, dk, dv, q_num, q_idx, q_slot, tok, kmask,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *tok_strides, km_stride,
        hq, hkv, hu, hq // hkv, hq // hu, sq, skv, dim, nkb, nqb,
        block_m, block_n, n_sub_m, skv - sq, window, sink, scale * _LOG2E, scale,
        BLOCK_M=block_mt, BLOCK_N=block_nt, BLOCK_D=block_d, N_SUB_N=n_sub_n,
        CAUSAL=causal, WINDOW=window > 0, HAS_TOKEN_MASK=token_mask is not None, HAS_KEY_MASK=key_mask is not None,
        **flags, num_warps=4,
    )
    torch.library.wrap_triton(_dq_kernel)[(nqb * n_sub_m, bsz * hq)](
        q, k, v, dout, lse, delta, dq, kv_num, kv_idx, tok, kmask,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *tok_strides, km_stride,
        hq, hu, hq // hkv, hq // hu, sq, skv, dim, nqb, maxk,
        block_m, block_n, n_sub_n, skv - sq, window, sink, scale * _LOG2E, scale,
        BLOCK_M=block_mt, BLOCK_N=block_nt, BLOCK_D=block_d, N_SUB_M=n_sub_m,
        CAUSAL=causal, WINDOW=window > 0, HAS_TOKEN_MASK=token_mask is not None, HAS_KEY_MASK=key_mask is not None,
        **flags, num_warps=4,
    )
    return dq, dk, dv


def _fwd_fake(q: Tensor, k: Tensor, v: Tensor, *_) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _bwd_fake(dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, *_) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    q, k, v, kv_num_blocks, kv_indices, token_mask, block_m, block_n, causal, window, sink, key_mask, scale = inputs
    ctx.save_for_backward(q, k, v, *output, kv_num_blocks, kv_indices, token_mask, key_mask)
    ctx.meta = (block_m, block_n, causal, window, sink)
    ctx.scale = scale


def _backward(ctx, dout: Tensor | None, dlse: Tensor | None) -> tuple[Tensor | None, ...]:
    q, k, v, out, lse, kv_num_blocks, kv_indices, token_mask, key_mask = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    dlse = torch.zeros_like(lse) if dlse is None else dlse
    dq, dk, dv = torch.ops.vzoo.block_sparse_bwd(
        dout, dlse, q, k, v, out, lse, kv_num_blocks, kv_indices, token_mask, *ctx.meta, key_mask, ctx.scale
    )
    return dq, dk, dv, *([None] * 10)


register_pair("block_sparse", _fwd_impl, _bwd_impl, _fwd_fake, _bwd_fake, _backward, _setup_context)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: BlockSparseLayout,
    token_mask: Tensor | None,
    *,
    causal: bool,
    scale: float,
    need_lse: bool,
    window: int = 0,
    sink: int = 0,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Block-sparse attention with the Triton kernels; differentiable in ``q, k, v`` (and through lse).

    ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Skv, D]``; ``layout`` with ``Hl`` in ``{1, Hkv, Hq}``; ``token_mask`` ``None`` or bool ``[B, Hu, Sq, MAXK]``. Returns
    ``out [B, Hq, Sq, D]`` in ``q.dtype`` and, when ``need_lse``, ``lse [B, Hq, Sq]`` fp32 (natural log).
    """
    layout, token_mask = broadcast_heads(layout, token_mask, q, k)
    dim = q.shape[-1]
    if not 1 <= dim <= _MAX_HEAD_DIM:
        raise ValueError(f"triton backend: head dim D={dim} unsupported (must be 1..{_MAX_HEAD_DIM})")
    bsz, hq = q.shape[:2]
    hkv = k.shape[1]
    lb, hu = layout.kv_num_blocks.shape[:2]
    if lb != bsz or hu not in (hkv, hq):
        raise ValueError(
            f"triton backend: layout broadcast to B={lb}, H={hu}; expected B={bsz} and H in ({hkv}, {hq})"
        )
    mask_shape = (bsz, hu, q.shape[2], layout.max_blocks)
    if token_mask is not None and (token_mask.dtype != torch.bool or token_mask.shape != mask_shape):
        raise ValueError(
            f"triton backend: token_mask must be bool {mask_shape}, got "
            f"{token_mask.dtype} {tuple(token_mask.shape)}"
        )
    out, lse = torch.ops.vzoo.block_sparse_fwd(
        q, k, v, layout.kv_num_blocks, layout.kv_indices, token_mask,
        layout.block_m, layout.block_n, bool(causal), int(window), int(sink), key_mask, float(scale),
    )
    return out, (lse if need_lse else None)
