"""Causal sliding-window attention with attention sinks (StreamingLLM / LongGen's sink+window layers).

The query at position ``p`` (bottom-right aligned: ``p = i + Skv - Sq``) sees the keys
``p - window < j <= p`` and the first ``sink`` keys ``j < sink`` (with ``j <= p``).

On the CPU (``torch`` backend) queries run in chunks of ``chunk`` tokens; each chunk calls fused SDPA
on the sink keys plus one contiguous key range with a shared boolean band mask, so the work is
``Sq x (sink + window + chunk)`` instead of ``Sq x Skv`` and autograd comes from SDPA. The other
backends run :func:`block_sparse_attention` on :func:`sink_window_layout` with the same token rule.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .backends import resolve_backend
from .block_sparse import block_sparse_attention, check_int, check_key_mask, check_qkv, resolve_scale
from .layout import BlockSparseLayout
from .reference import all_finite, visible_at
from .torch_backend import masked_sdpa

__all__ = ["sink_window_attention", "sink_window_layout"]


@functools.lru_cache(maxsize=64)  # layouts are immutable; every layer and step asks for the same few
def sink_window_layout(
    q_len: int, kv_len: int, window: int, sink: int, block: int = 64, device: torch.device | str | None = None
) -> BlockSparseLayout:
    """A static layout whose blocks cover every key the sink+window rule can show (the rule itself is
    applied at token level by the kernel): the sink blocks and the blocks a ``block``-token query
    block's windows reach, ``ceil((block + window - 2) / block)`` behind its own."""
    local = -(-(block + window - 2) // block) + 1
    return BlockSparseLayout.static(
        q_len, kv_len, block, block, sink_blocks=-(-sink // block), local_blocks=local, causal=True, device=device
    )


def _chunked_sdpa(q, k, v, window: int, sink: int, scale: float, chunk: int, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Chunks of plain SDPA: without ``key_mask`` every query sees itself, so no row is empty, and NaN /
    Inf are looked for once, in the output; only if it is not finite (or with ``key_mask``, which can
    empty a row) do the chunks run through :func:`masked_sdpa`, which zeroes empty rows and keeps
    non-finite keys to the rows that see them."""
    if key_mask is None:
        out = _chunks(q, k, v, window, sink, scale, chunk, None, guarded=False)
        if all_finite(out.detach()):
            return out
    return _chunks(q, k, v, window, sink, scale, chunk, key_mask, guarded=True)


def _chunks(q, k, v, window: int, sink: int, scale: float, chunk: int, key_mask: torch.Tensor | None, guarded: bool) -> torch.Tensor:
    sq, skv = q.shape[2], k.shape[2]
    dev = q.device
    shift = skv - sq
    q = q.contiguous()
    gqa = q.shape[1] != k.shape[1]
    interior = None  # the band mask of every full chunk past the sink is the same
    outs = []
    for a in range(0, sq, chunk):
        e = min(a + chunk, sq)
        lo = max(0, a + shift - window + 1)  # first window key of the chunk's first query
        hi = e + shift  # one past the chunk's last query position
        q_pos = torch.arange(a, e, device=dev) + shift
        if lo <= sink:  # the sink touches the window: one contiguous range
            ks, vs = k[:, :, :hi], v[:, :, :hi]
            kept = None if key_mask is None else key_mask[:, :hi]
            mask = visible_at(q_pos, torch.arange(hi, device=dev), True, window, sink)
        else:
            ks = torch.cat([k[:, :, :sink], k[:, :, lo:hi]], 2)
            vs = torch.cat([v[:, :, :sink], v[:, :, lo:hi]], 2)
            kept = None if key_mask is None else torch.cat([key_mask[:, :sink], key_mask[:, lo:hi]], 1)
            if e - a < chunk or interior is None:
                key_pos = torch.cat([torch.arange(sink, device=dev), torch.arange(lo, hi, device=dev)])
                mask = visible_at(q_pos, key_pos, True, window, sink)
                interior = mask if e - a == chunk else interior
            else:
                mask = interior
        if guarded:  # padded keys can leave a query with nothing to see; NaN / Inf in a hidden key must not leak
            outs.append(masked_sdpa(q[:, :, a:e], ks, vs, mask if kept is None else mask & kept[:, None, None, :], scale))
        else:
            outs.append(F.scaled_dot_product_attention(q[:, :, a:e], ks, vs, attn_mask=mask, scale=scale, enable_gqa=gqa))
    return torch.cat(outs, 2)


def sink_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sink: int = 0,
    *,
    scale: float | None = None,
    backend: str | None = None,
    chunk: int = 256,
    block: int = 64,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal sink+window attention.

    Args:
        q: ``[B, Hq, Sq, D]``; the last ``Sq`` positions of the keys.
        k, v: ``[B, Hkv, Skv, D]`` with ``Skv >= Sq``; ``Hq`` a multiple of ``Hkv`` (GQA).
        window: local keys per query, itself included.
        sink: leading keys every query sees.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"reference" | "torch" | "triton" | "flex"`` or ``None`` for the default.
        chunk: queries per SDPA call on the ``torch`` backend.
        block: block size of the layout the other backends use.
        key_mask: bool ``[B, Skv]``; keys marked False are hidden (padding).

    Returns:
        ``[B, Hq, Sq, D]`` in ``q.dtype``.
    """
    check_qkv(q, k, v)
    check_key_mask(key_mask, k)
    for name, value, low in (("window", window, 1), ("sink", sink, 0), ("chunk", chunk, 1), ("block", block, 1)):
        check_int(name, value, low)
    sq, skv = q.shape[2], k.shape[2]
    if skv < sq:
        raise ValueError(f"the {sq} queries must be the last of the keys, but there are only {skv} keys")
    scale = resolve_scale(scale, q.shape[-1])
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    name = resolve_backend(backend, q.device, needs_grad=needs_grad, needs_lse=False)
    if name == "torch" and q.numel() and skv:
        return _chunked_sdpa(q, k, v, window, sink, scale, chunk, key_mask)
    layout = sink_window_layout(sq, skv, window, sink, block, q.device)
    return block_sparse_attention(
        q, k, v, layout, causal=True, scale=scale, backend=name, window=window, sink=sink, key_mask=key_mask
    )
