"""Block-sparse attention: each query block attends to the key blocks its layout row lists.

The shared op under BiFormer routing, VMoBA, Pyramid Sparse Attention, MoBA, SeerAttention, PBS-Attn,
ProxyAttn and LongGen (see ``shared/specs/kernels.md`` §6). Semantics follow
``torch.nn.functional.scaled_dot_product_attention`` restricted to the selected blocks.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch

from .backends import resolve_backend
from .layout import BlockSparseLayout, check_flag, check_int, check_tensor
from .reference import all_finite, dense_attention, layout_token_mask

__all__ = ["block_sparse_attention"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Skv, D]`` fit together, and, for CPU
    tensors outside ``torch.compile``, unless ``q`` is finite. On CUDA NaN / Inf in ``q`` is not checked
    (it would cost a host sync per call) and gives NaN rows, as SDPA does."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, layout="[B, H, S, D]", dtypes=_DTYPES)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch sizes differ: q has {q.shape[0]}, k has {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head dims differ: q has {q.shape[3]}, k has {k.shape[3]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if q.shape[3] == 0:
        raise ValueError("head dim D=0: q, k, v need at least one feature")
    # The one cheap finiteness check: every query is used. Keys and values are not checked, since
    # those a query cannot see (padding, unselected blocks, empty cache slots) may hold anything.
    # CPU only: on CUDA the check is a host sync per call.
    if q.device.type == "cpu" and not torch.compiler.is_compiling() and not all_finite(q):
        raise ValueError("q contains NaN or Inf")


def resolve_scale(scale: object, dim: int) -> float:
    """The softmax scale: ``1/sqrt(dim)`` for ``None``, else ``scale`` checked to be a finite number."""
    if scale is None:
        return 1.0 / math.sqrt(dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale={scale!r} must be a finite number (or None for 1/sqrt(D))")
    return float(scale)


class _Empty(torch.autograd.Function):
    """Attention over no key: zeros and ``lse = -inf``, connected to the graph (zero gradients)."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.like = [(t.shape, t.dtype, t.device) for t in (q, k, v)]
        return q.new_zeros(q.shape), torch.full(q.shape[:3], float("-inf"), device=q.device)

    @staticmethod
    def backward(ctx, dout, dlse):
        return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.like)


def empty_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``out [B, Hq, Sq, D]`` zeros and ``lse [B, Hq, Sq]`` -inf for problems where no query sees a key."""
    return _Empty.apply(q, k, v)


def check_layout(layout: BlockSparseLayout, q: torch.Tensor, k: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``layout`` fits ``q [B, Hq, Sq, D]`` and ``k [B, Hkv, Skv, D]``."""
    if not isinstance(layout, BlockSparseLayout):
        raise ValueError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    if (layout.q_len, layout.kv_len) != (q.shape[2], k.shape[2]):
        raise ValueError(
            f"layout is for q_len={layout.q_len}, kv_len={layout.kv_len} but q has {q.shape[2]} "
            f"and k has {k.shape[2]} tokens"
        )
    if layout.batch_size not in (1, q.shape[0]):
        raise ValueError(f"layout batch {layout.batch_size} must be 1 or the batch size {q.shape[0]}")
    if layout.num_heads not in (1, k.shape[1], q.shape[1]):
        raise ValueError(
            f"layout has {layout.num_heads} heads; allowed: 1, the key/value heads ({k.shape[1]}) "
            f"or the query heads ({q.shape[1]})"
        )
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}")


def check_key_mask(key_mask: torch.Tensor | None, k: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``key_mask`` is ``None`` or a bool ``[B, Skv]`` on ``k``'s device."""
    if key_mask is None:
        return
    want = (k.shape[0], k.shape[2])
    if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool or tuple(key_mask.shape) != want:
        got = f"{key_mask.dtype} {tuple(key_mask.shape)}" if isinstance(key_mask, torch.Tensor) else type(key_mask).__name__
        raise ValueError(f"key_mask must be a bool tensor {want} ([B, Skv]), got {got}")
    if key_mask.device != k.device:
        raise ValueError(f"key_mask is on {key_mask.device} but k is on {k.device}")


def broadcast_heads(
    layout: BlockSparseLayout, token_mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor
) -> tuple[BlockSparseLayout, torch.Tensor | None]:
    """Broadcast the layout (and token mask) to ``[B, Hu]``: ``Hu = Hq`` when there is one row list per
    query head, else ``Hu = Hkv`` (a list shared by a GQA group, or by all heads)."""
    heads = q.shape[1] if layout.num_heads == q.shape[1] else k.shape[1]
    layout = layout.expand_heads(q.shape[0], heads)
    if token_mask is not None:
        token_mask = token_mask.expand(q.shape[0], heads, *token_mask.shape[2:])
    return layout, token_mask


def run_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    token_mask: torch.Tensor | None,
    *,
    causal: bool,
    scale: float | None,
    return_lse: bool,
    backend: str | None,
    reference_mask: Callable[[], torch.Tensor] | None = None,
    window: int = 0,
    sink: int = 0,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dispatch a validated problem to a backend. ``token_mask [B, Hl, Sq, MAXK]`` (bool) switches
    individual slots of a query block's row off for single tokens; ``reference_mask`` builds the
    dense ``[B, Hl, Sq, Skv]`` mask the reference backend uses instead of the layout's; ``window``
    and ``sink`` add the token rule of :func:`~vzoo.kernels.reference.visible_keys` (0: no window);
    ``key_mask [B, Skv]`` (bool) hides the keys it marks False."""
    check_flag("causal", causal)
    check_flag("return_lse", return_lse)
    scale = resolve_scale(scale, q.shape[-1])
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    name = resolve_backend(backend, q.device, needs_grad=needs_grad, needs_lse=return_lse)
    if q.numel() == 0 or k.shape[2] == 0:
        out, lse = empty_attention(q, k, v)
        return (out, lse) if return_lse else out
    if name == "reference":
        allowed = layout_token_mask(layout, token_mask, causal, window, sink) if reference_mask is None else reference_mask()
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, :]
        if allowed.shape[1] not in (1, q.shape[1]):
            allowed = allowed.repeat_interleave(q.shape[1] // allowed.shape[1], dim=1)
        out, lse = dense_attention(q, k, v, allowed, scale)
    else:
        if name == "torch":
            from .torch_backend import attend
        elif name == "triton":
            from .triton_backend import attend
        else:
            from .flex_backend import attend
        out, lse = attend(
            q, k, v, layout, token_mask, causal=causal, scale=scale, need_lse=return_lse, window=window, sink=sink,
            key_mask=key_mask,
        )
    return (out, lse) if return_lse else out


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    window: int | None = None,
    sink: int = 0,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query block over the key blocks ``layout`` selects.

    Args:
        q: ``[B, Hq, Sq, D]``.
        k, v: ``[B, Hkv, Skv, D]``; ``Hq`` a multiple of ``Hkv`` (GQA).
        layout: a :class:`BlockSparseLayout` with ``q_len = Sq``, ``kv_len = Skv``.
        causal: also mask keys after the query position, bottom-right aligned when ``Sq != Skv``
            (query ``i`` sees key ``j`` iff ``j <= i + Skv - Sq``).
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the log-sum-exp.
        backend: ``"reference" | "torch" | "triton" | "flex"`` or ``None`` for the default.
        window: token-level sliding window inside the selected blocks: the query at position ``p``
            (bottom-right aligned) keeps keys ``j > p - window`` only (LongGen / StreamingLLM).
        sink: with ``window``, the first ``sink`` keys stay visible too (attention sinks).
        key_mask: bool ``[B, Skv]``; keys marked False are hidden from every query (padding).

    Returns:
        ``out [B, Hq, Sq, D]`` in ``q.dtype``; with ``return_lse`` also ``lse [B, Hq, Sq]`` fp32,
        natural log. Rows that select nothing give zeros and ``lse = -inf``.

    ``q`` must be finite (``ValueError`` on CPU; on CUDA it is not checked and NaN gives NaN rows). Keys
    and values a query cannot see may hold anything (NaN included) and never reach its output or
    gradients; a non-finite one it sees makes its row NaN.
    """
    check_qkv(q, k, v)
    check_layout(layout, q, k)
    if window is not None:
        check_int("window", window, 1)
    check_int("sink", sink, 0)
    if sink and window is None:
        raise ValueError(f"sink={sink} only applies with a window")
    check_key_mask(key_mask, k)
    return run_attention(
        q, k, v, layout, None, causal=causal, scale=scale, return_lse=return_lse, backend=backend,
        window=window or 0, sink=sink, key_mask=key_mask,
    )
