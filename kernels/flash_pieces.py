"""Exact attention under a structured mask as PyTorch's fused CPU flash kernel on contiguous pieces, plus small
dense per-block folds, with a backward.

A mask made of a few contiguous rectangles (full or causal) and a band of ``block x block`` tiles along them
(block-causal, BD3) runs as:

- *flash pieces* ``(q0, q1, k0, k1, causal)``: queries ``q0:q1`` over keys ``k0:k1``, all of them or the
  causal triangle with the top-left alignment of ``is_causal`` (query ``q0 + m`` sees keys ``k0 .. k0 + m``);
  each returns its log-sum-exp and is merged into the running state of its rows;
- *folds* ``(q0, n, rows, slots)``: ``n`` query blocks of ``rows`` rows at ``q0, q0 + block, ...``; block ``i``
  sees, per slot ``(k0, keys, later)``, the keys ``k0 + i * block`` onward (``keys`` of them), all of them or,
  when ``later``, only those whose offset in the slot exceeds the row's offset in its block. One batched
  ``[rows, keys]`` product per block folds them into the state (no separate merge).

The backward runs PyTorch's flash backward on each piece with the *final* output and log-sum-exp (exact for
disjoint key sets, as in ring attention) and recomputes each fold's probabilities the same way. The pieces
and folds must give every query row at least one key, and the folds' key sets must not overlap each other or
the pieces'. CPU float32 only; callers pick the block-sparse path elsewhere.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .block_sparse import block_sparse_attention
from .layout import BlockSparseLayout, repeat_kv
from .merge import merge_attention_states

__all__ = ["Fold", "Piece", "available", "flash_pieces_attention", "segment_causal_attention"]


class Piece(NamedTuple):
    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool


class Fold(NamedTuple):
    q0: int
    n: int
    rows: int
    slots: tuple[tuple[int, int, bool], ...]  # (k0, keys, later)


def available(*tensors: torch.Tensor) -> bool:
    """Whether the fused path applies: CPU float32 tensors and a PyTorch with the CPU flash kernel."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"))


def _blocks(x: torch.Tensor, start: int, n: int, stride: int, size: int) -> torch.Tensor:
    """``[B, H, n, size, D]`` view of rows ``start + i * stride + (0 .. size-1)`` of ``x [B, H, S, D]``."""
    return x.narrow(2, start, (n - 1) * stride + size).unfold(2, size, stride).transpose(-1, -2)


def _fold_scores(q: torch.Tensor, k: torch.Tensor, fold: Fold, block: int, scale: float):
    """Scores ``[B, H, n, rows, keys]`` of one fold (hidden = ``-inf``) and its key blocks per slot."""
    qb = _blocks(q, fold.q0, fold.n, block, fold.rows)
    parts, keys = [], []
    for k0, size, later in fold.slots:
        kb = _blocks(k, k0, fold.n, block, size)
        s = torch.matmul(qb, kb.transpose(-1, -2)).mul_(scale)
        if later:
            r = torch.arange(max(fold.rows, size), device=q.device)
            s.masked_fill_(r[None, :size] <= r[:fold.rows, None], float("-inf"))
        parts.append(s)
        keys.append((k0, size))
    return (parts[0] if len(parts) == 1 else torch.cat(parts, -1)), keys


def _gather(x: torch.Tensor, fold: Fold, keys: list[tuple[int, int]], block: int) -> torch.Tensor:
    blocks = [_blocks(x, k0, fold.n, block, size) for k0, size in keys]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, -2)


def _forward(q, k, v, pieces, folds, block, scale):
    b, h, t, d = q.shape
    out = lse = None  # the state, made on first use
    covered: list[tuple[int, int]] = []
    for p in pieces:
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[:, :, p.q0:p.q1], k[:, :, p.k0:p.k1], v[:, :, p.k0:p.k1], 0.0, p.causal, scale=scale)
        if out is None and (p.q0, p.q1) == (0, t):  # the first piece covers every row: its result is the state
            out, lse = o.contiguous(), l.contiguous()
        else:
            if out is None:
                out, lse = q.new_zeros(b, h, t, d), q.new_full((b, h, t), float("-inf"))
            if any(a < p.q1 and p.q0 < z for a, z in covered):  # rows already hold a state: merge by log-sum-exp
                o, l = merge_attention_states([out[:, :, p.q0:p.q1], o], [lse[:, :, p.q0:p.q1], l])
            out[:, :, p.q0:p.q1], lse[:, :, p.q0:p.q1] = o, l
        covered.append((p.q0, p.q1))
    if out is None:  # no piece: the folds alone
        out, lse = q.new_zeros(b, h, t, d), q.new_full((b, h, t), float("-inf"))
    for f in folds:
        s, keys = _fold_scores(q, k, f, block, scale)
        ob, lb = _blocks(out, f.q0, f.n, block, f.rows), _blocks(lse[..., None], f.q0, f.n, block, f.rows)[..., 0]
        peak = torch.maximum(s.amax(-1), lb)
        p = s.sub_(peak[..., None]).exp_()
        w = (lb - peak).exp_()
        total = p.sum(-1).add_(w)
        ob.mul_(w[..., None]).add_(torch.matmul(p, _gather(v, f, keys, block))).div_(total[..., None])
        lb.copy_(total.log_().add_(peak))
    return out, lse


class _FlashPieces(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pieces, folds, block, scale):
        out, lse = _forward(q, k, v, pieces, folds, block, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = pieces, folds, block, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        pieces, folds, block, scale = ctx.plan
        dout = dout.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for p in pieces:
            rows, keys = slice(p.q0, p.q1), slice(p.k0, p.k1)
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], out[:, :, rows], lse[:, :, rows],
                0.0, p.causal, scale=scale)
            dq[:, :, rows] += gq
            dk[:, :, keys] += gk
            dv[:, :, keys] += gv
        delta = (dout * out).sum(-1, keepdim=True)  # [B, H, S, 1]
        for f in folds:
            s, keys = _fold_scores(q, k, f, block, scale)
            lb = _blocks(lse[..., None], f.q0, f.n, block, f.rows)
            p = s.sub_(lb).exp_()  # final probabilities over this fold's keys
            do = _blocks(dout, f.q0, f.n, block, f.rows)
            ds = torch.matmul(do, _gather(v, f, keys, block).transpose(-1, -2))
            ds = ds.sub_(_blocks(delta, f.q0, f.n, block, f.rows)).mul_(p).mul_(scale)
            _blocks(dq, f.q0, f.n, block, f.rows).add_(torch.matmul(ds, _gather(k, f, keys, block)))
            qb = _blocks(q, f.q0, f.n, block, f.rows)
            at = 0
            for k0, size in keys:
                _blocks(dk, k0, f.n, block, size).add_(torch.matmul(ds[..., at:at + size].transpose(-1, -2), qb))
                _blocks(dv, k0, f.n, block, size).add_(torch.matmul(p[..., at:at + size].transpose(-1, -2), do))
                at += size
        return dq, dk, dv, None, None, None, None


def flash_pieces_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pieces: tuple[Piece, ...],
                           folds: tuple[Fold, ...], block: int, scale: float) -> torch.Tensor:
    """Attention of ``q [B, H, Sq, D]`` over ``k, v [B, H, Skv, D]`` (same heads) restricted to ``pieces`` and
    ``folds`` (module docstring): ``[B, H, Sq, D]``, differentiable in ``q, k, v``."""
    return _FlashPieces.apply(q, k, v, pieces, folds, block, scale)


def segment_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: int, scale: float,
                             key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of ``q [B, H, T, D]`` over ``k, v [B, Hkv, T, D]`` (GQA) inside consecutive segments of
    ``segment`` tokens: ``(out [B, H, T, D], lse [B, H, T])``. Inference on the CPU in float32 folds the segments
    into the batch of one causal flash call; otherwise (gradients, ``key_mask [B, T]``, other devices) the
    one-block-per-row layout on :func:`vzoo.kernels.block_sparse_attention`."""
    b, h, t, d = q.shape
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if key_mask is not None or grad or not available(q, k, v) or k.shape[2] != t or t == 0:
        layout = BlockSparseLayout.static(t, t, segment, segment, local_blocks=1, causal=True, device=q.device)
        return block_sparse_attention(q, k, v, layout, causal=True, scale=scale, return_lse=True, key_mask=key_mask)
    k, v = repeat_kv(k, h), repeat_kv(v, h)
    n, tail = divmod(t, segment)
    full = n * segment
    out, lse = q.new_empty(b, h, t, d), q.new_empty(b, h, t)
    if n:
        def fold(x: torch.Tensor) -> torch.Tensor:  # [B, H, n * S, D] -> [B * n, H, S, D]
            return x[:, :, :full].unflatten(2, (n, segment)).transpose(1, 2).reshape(b * n, h, segment, d)

        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(fold(q), fold(k), fold(v), 0.0, True,
                                                                           scale=scale)
        out[:, :, :full] = o.reshape(b, n, h, segment, d).transpose(1, 2).reshape(b, h, full, d)
        lse[:, :, :full] = l.reshape(b, n, h, segment).transpose(1, 2).reshape(b, h, full)
    if tail:
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[:, :, full:], k[:, :, full:], v[:, :, full:], 0.0, True, scale=scale)
        out[:, :, full:], lse[:, :, full:] = o, l
    return out, lse
