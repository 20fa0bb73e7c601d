"""LongHeads: training-free per-head chunk selection for long contexts (Lu et al., arXiv 2402.10685;
LuLuLuyi/LongHeads ``modeling_longheads/modeling_llama.py``).

The KV cache is cut into chunks of ``chunk_size`` slots. Each query head represents a complete chunk by
one *chunk key*: non-causal attention of the chunk's queries over its keys (chunk-local RoPE positions),
outputs mean-pooled into a summary; the chunk key is the summary-weighted average (softmax of
``summary . k / sqrt(D)``) of the chunk's keys at chunk-local positions. Each query token, per head,
keeps ``atten_length // chunk_size`` chunks: the sink (first) chunk, its previous and its own chunk,
and the best other past chunks by ``q_pre . chunk_key`` (the un-rotated query, no scale), and attends
to them with RoPE re-applied at *contiguous* positions (the selected chunks in order, the query in its
own chunk's slot), so a model never sees a distance longer than ``atten_length``.

Rotations: the attention function receives q/k after RoPE (keys from the cache). RoPE rotations
compose exactly, so instead of hooks and a second, pre-RoPE KV cache this module rotates by position
*differences* with the model's own rotary frequencies (``inv_freq`` of its rotary class): the chunk's
keys by ``-(chunk start)`` for chunk-local positions, the query by ``-position`` for scoring, and,
for each (query, selected chunk), the query by ``-chunk_size * m`` where ``m`` is the number of
unselected chunks between that chunk and the query's (so ``q . k`` sees the remapped distance). Keys
are never re-rotated; the local (previous + own) chunks need no rotation (``m = 0``).

Decoding: the chunk keys of complete chunks and the post-RoPE queries of the incomplete last chunk
live on the model's KV-cache layer (set by a forward pre-hook); a cache that already held tokens
before :func:`vzoo.lm.apply_sparse_attention` is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from vzoo.kernels import merge_attention_states, token_routed_attention

from .layers import Attachment, dense_attention, key_validity, run_dense, select_layers, swap_cache_layer
from .registry import LMMethod, register_lm_method

__all__ = [
    "LongHeadsConfig", "LongHeadsContext", "attach_longheads", "chunk_keys", "longheads_attention", "rope_rotate",
    "select_chunks", "slot_shifts",
]


@dataclass(frozen=True)
class LongHeadsConfig:
    """LongHeads settings (the official defaults: chunks of 256, ``atten_length`` 4096, i.e. 16 chunks).

    Per query and head: the first chunk (sink), the previous and the own chunk, and the
    ``atten_length // chunk_size - 3`` best other past chunks. A prompt of at most ``atten_length``
    tokens selects every chunk and equals dense attention; the method is meant to read past a model's
    trained length, so ``atten_length`` must lie within it. At 8K tokens the defaults select 73 % of
    the causal pairs (the paper's setting, not a speed setting): one CPU thread, 9 / 3 heads of 64, one
    layer's attention takes 8.7 s against SDPA's 2.8 s (each (query, chunk) pair needs its own rotated
    query). Chunk keys are computed once per chunk, so prefill and decode cost no dense score pass.

    Differences from the official code (documented choices): the query attends to itself in prefill too
    (the official prefill drops its own key, its decode keeps it); the previous chunk is always kept,
    also in decode steps that complete a chunk; chunks are KV-cache slots, a left-padded row's padding
    keys are hidden, chunks made only of padding are never selected and its sink is its first chunk
    holding a real token; the summary averages the chunk's real query rows only.

    Args:
        chunk_size: tokens per chunk ``w``.
        atten_length: keys each query attends to at most; a multiple of ``chunk_size`` with at least
            3 chunks (sink, previous, own).
        layers: layer indices that use LongHeads (``None``: all); the others keep SDPA.
        dense_fallback: a prompt whose selection is above the break-even density of this device
            (:func:`vzoo.kernels.dense_is_faster`, op ``"longheads"``) runs dense attention instead.
            Default ``False``: past ``atten_length`` the position remapping is the point of the method
            (dense attention past the trained length is another model), as in the official code.
    """

    chunk_size: int = 256
    atten_length: int = 4096
    layers: tuple[int, ...] | None = None
    dense_fallback: bool = False

    @property
    def chunks(self) -> int:
        """Chunks per query ``k``."""
        return self.atten_length // self.chunk_size

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        """The layers that use LongHeads."""
        return select_layers("LongHeadsConfig.layers", self.layers, num_layers)

    def __post_init__(self) -> None:
        for name in ("chunk_size", "atten_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LongHeadsConfig.{name}={value!r} must be a positive int")
        if self.atten_length % self.chunk_size or self.atten_length // self.chunk_size < 3:
            raise ValueError(
                f"LongHeadsConfig.atten_length={self.atten_length!r} must be a multiple of chunk_size={self.chunk_size} "
                "holding at least 3 chunks (sink, previous, own)"
            )
        if self.layers is not None and not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise ValueError(f"LongHeadsConfig.layers={self.layers!r} must be None or non-negative layer indices")
        if not isinstance(self.dense_fallback, bool):
            raise ValueError(f"LongHeadsConfig.dense_fallback={self.dense_fallback!r} must be a bool")


class LongHeadsState:
    """What decoding needs from earlier calls, kept on a KV-cache layer: ``keys [B, H, n, D]`` (chunk
    keys of the ``n`` complete chunks), ``pending [B, H, r, D]`` (post-RoPE queries of the incomplete
    last chunk) and ``length`` (cache slots seen)."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None
        self.length = 0


class LongHeadsContext:
    """Attached to a patched attention module as ``vzoo_longheads``: ``rotary`` (anything with the
    model's ``inv_freq [D/2]``) and ``state`` (the current call's :class:`LongHeadsState`, ``None``
    without a cache). A plain object, so the model's rotary module is not registered twice."""

    def __init__(self, rotary) -> None:
        self.rotary, self.state = rotary, None


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., D]`` by RoPE at ``positions`` (broadcast to ``x.shape[:-1]``, any sign) with
    frequencies ``inv_freq [D/2]`` in the halves layout of Llama-style models (no attention scaling).
    Cosines and sines are computed once per distinct position (few: shifts are multiples of a chunk)."""
    distinct, which = torch.unique(positions.expand(x.shape[:-1]), return_inverse=True)
    angles = distinct.to(torch.float32)[:, None] * inv_freq.to(x.device, torch.float32)
    cos, sin = angles.cos().to(x.dtype)[which], angles.sin().to(x.dtype)[which]
    lo, hi = x.chunk(2, -1)
    return torch.cat([lo * cos - hi * sin, hi * cos + lo * sin], -1)


def chunk_keys(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, offset: torch.Tensor, inv_freq: torch.Tensor,
    chunk: int, scale: float, valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunk keys ``[B, H, n, D]`` (fp32) of ``n`` complete chunks from post-RoPE ``q [B, H, n*w, D]`` and
    ``k, v [B, Hkv, n*w, D]`` at cache slots ``first*w ..`` (slot ``s`` holds position ``s + offset[b]``,
    ``offset [B]``); ``valid [B, n*w]`` marks real (unpadded) tokens. Within a chunk only relative
    positions matter, so the non-causal attention runs on the stored rotations; the keys pooled into
    the chunk key are turned to chunk-local positions ``0 .. w-1``."""
    b, h, length, d = q.shape
    n = length // chunk
    group = h // k.shape[1]
    qc, kc, vc = (x.float().unflatten(2, (n, chunk)) for x in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
    if valid is None:
        valid = torch.ones(b, length, dtype=torch.bool, device=q.device)
    real = valid.view(b, 1, n, chunk)
    keep = real | ~real.any(-1, keepdim=True)  # a chunk of padding keeps its keys (never selected anyway)
    logits = (qc @ kc.transpose(-1, -2)) * scale  # [B, H, n, w, w]
    rows = torch.softmax(logits.masked_fill(~keep[..., None, :], float("-inf")), -1) @ vc
    weight = real[..., None].float()
    summary = (rows * weight).sum(3) / weight.sum(3).clamp_min(1.0)  # [B, H, n, D]
    start = (torch.arange(first, first + n, device=q.device) * chunk)[None] + offset.view(-1, 1)  # [B, n]
    local = rope_rotate(kc, -start[:, None, :, None], inv_freq)
    pool = (summary[..., None, :] @ local.transpose(-1, -2)) / math.sqrt(d)  # [B, H, n, 1, w]
    pool = torch.softmax(pool.masked_fill(~keep[..., None, :], float("-inf")), -1)
    return (pool @ local).squeeze(-2)


def select_chunks(scores: torch.Tensor, skv: int, chunk: int, k: int, first: torch.Tensor) -> torch.Tensor:
    """Routed chunk ids ``[B, H, Sq, k-2]`` ascending, ``-1`` unused, for queries at the last ``Sq`` of
    ``skv`` slots scoring the complete chunks ``scores [B, H, Sq, n]``. Query chunk ``c``: candidates are
    chunks ``first[b] <= j < c - 1`` (before its previous chunk; ``first [B]`` is the row's first chunk
    with a real token, always kept as the sink); the ``k - 3`` best others join it. The previous and the
    own chunk (the local part) are not listed."""
    b, h, sq, n = scores.shape
    slots = max(min(k - 2, n), 0)
    own = torch.arange(skv - sq, skv, device=scores.device) // chunk  # [Sq]
    j = torch.arange(n, device=scores.device)
    candidate = (j < own[:, None] - 1) & (j >= first.view(-1, 1, 1, 1))  # [B, 1, Sq, n]
    gate = scores.float().masked_fill(~candidate, float("-inf"))
    gate = gate.masked_fill(candidate & (j == first.view(-1, 1, 1, 1)), float("inf"))
    best = gate.topk(slots, -1)
    ids = torch.where(best.values > float("-inf"), best.indices, n).sort(-1).values
    return ids.masked_fill(ids == n, -1)


def slot_shifts(routed: torch.Tensor, skv: int, chunk: int) -> torch.Tensor:
    """Per routed chunk ``[B, H, Sq, R]`` (ascending, ``-1`` unused): the number ``m`` of unselected
    chunks between it and the query's own chunk (the previous and own chunk are always selected), so
    contiguous positions bring the chunk ``chunk * m`` closer to the query. ``0`` for unused entries."""
    sq, r = routed.shape[2], routed.shape[3]
    own = (torch.arange(skv - sq, skv, device=routed.device) // chunk)[:, None]  # [Sq, 1]
    used = routed >= 0
    later = used.sum(-1, keepdim=True) - 1 - torch.arange(r, device=routed.device)  # selected routed chunks after it
    return torch.where(used, own - routed - 2 - later, 0)


def _offsets(position_ids: torch.Tensor | None, b: int, skv: int, device: torch.device) -> torch.Tensor:
    """``[B]``: position minus cache slot, from the last query (a real token even in left-padded rows)."""
    if position_ids is None:
        return torch.zeros(b, dtype=torch.long, device=device)
    return (position_ids[:, -1].long() - (skv - 1)).expand(b)


def _all_chunk_keys(
    state: LongHeadsState | None, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, offset: torch.Tensor,
    inv_freq: torch.Tensor, chunk: int, scale: float, valid: torch.Tensor | None,
) -> torch.Tensor:
    """Chunk keys of every complete chunk of the cache ``[B, H, skv // w, D]``: the ones ``state`` holds
    plus those this call completes (then stored with the new pending queries)."""
    sq, skv = query.shape[2], key.shape[2]
    seen = 0 if state is None else state.length
    if seen != skv - sq:
        raise ValueError(
            f"LongHeads saw {seen} cache slots before this call, but the cache holds {skv - sq}: it needs the queries "
            "of every past chunk, so use a KV cache created after apply_sparse_attention (or no cache)"
        )
    done = 0 if state is None or state.keys is None else state.keys.shape[2]
    queries = query if state is None or state.pending is None else torch.cat([state.pending, query], 2)
    n = skv // chunk
    span = slice(done * chunk, n * chunk)
    new = chunk_keys(
        queries[:, :, : (n - done) * chunk], key[:, :, span], value[:, :, span], done, offset, inv_freq, chunk, scale,
        None if valid is None else valid[:, span],
    )
    keys = new if not done else torch.cat([state.keys, new], 2)
    if state is not None:
        state.keys, state.pending, state.length = keys, queries[:, :, (n - done) * chunk :], skv
    return keys


def _density(routed: torch.Tensor, skv: int, chunk: int) -> float:
    """Share of the causal (query, key) pairs selected: local keys (previous chunk to the query) plus
    ``w`` per routed chunk."""
    b, h, sq = routed.shape[:3]
    pos = torch.arange(skv - sq, skv, device=routed.device)
    local = pos - ((pos // chunk - 1).clamp_min(0) * chunk) + 1
    total = ((skv * (skv + 1) - (skv - sq) * (skv - sq + 1)) // 2) * b * h
    return (local.sum().item() * b * h + (routed >= 0).sum().item() * chunk) / total


def longheads_attention(
    config: LongHeadsConfig, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scale: float, module=None, position_ids: torch.Tensor | None = None, **_,
) -> torch.Tensor:
    """LongHeads over ``query [B, H, q, D]`` (after RoPE), the last ``q`` of ``key, value [B, Hkv, kv, D]``;
    ``attention_mask`` is transformers' (``None``: causal only, else bool / additive ``[B, 1, q, kv]``),
    ``position_ids [B|1, q]`` the queries' positions. ``module.vzoo_longheads`` is the
    :class:`LongHeadsContext`. Returns ``[B, H, q, D]``."""
    ctx: LongHeadsContext = module.vzoo_longheads
    b, h, sq, _ = query.shape
    skv, w = key.shape[2], config.chunk_size
    valid = None if attention_mask is None else key_validity(attention_mask)[:, :skv]
    offset = _offsets(position_ids, b, skv, query.device)
    inv_freq = ctx.rotary.inv_freq
    with torch.no_grad():
        keys = _all_chunk_keys(ctx.state, query, key, value, offset, inv_freq, w, scale, valid)
    if (skv - 1) // w + 1 <= config.chunks:  # every chunk selected, positions unchanged: dense attention
        run_dense(module, config.dense_fallback, 1.0, query.device, "longheads")
        return dense_attention(query, key, value, attention_mask, scale)
    with torch.no_grad():
        pos = torch.arange(skv - sq, skv, device=query.device)
        q_pre = rope_rotate(query, -(pos + offset.view(-1, 1))[:, None], inv_freq)
        first = torch.zeros(b, dtype=torch.long, device=query.device) if valid is None else valid.int().argmax(1) // w
        routed = select_chunks(q_pre.float() @ keys.transpose(-1, -2), skv, w, config.chunks, first)
        shifts = slot_shifts(routed, skv, w)
    if run_dense(module, config.dense_fallback, _density(routed, skv, w), query.device, "longheads"):
        return dense_attention(query, key, value, attention_mask, scale)
    own = pos // w
    local_ids = torch.stack([own - 1, own], -1)[None, None]  # [1, 1, Sq, 2]; -1 for the first chunk
    out, lse = token_routed_attention(
        query, key, value, local_ids, block_n=w, causal=True, scale=scale, return_lse=True, key_mask=valid
    )
    r = routed.shape[-1]
    if not r:
        return out
    moved = rope_rotate(query[..., None, :].expand(-1, -1, -1, r, -1), -w * shifts, inv_freq)  # [B, H, Sq, R, D]
    far, far_lse = token_routed_attention(
        moved.flatten(2, 3), key, value, routed.flatten(2, 3)[..., None], block_n=w, scale=scale, return_lse=True,
        key_mask=valid,
    )
    parts, lses = far.unflatten(2, (sq, r)).unbind(3), far_lse.unflatten(2, (sq, r)).unbind(3)
    return merge_attention_states([out, *parts], [lse, *lses])[0]


def _cache_state(module: nn.Module, kwargs: dict) -> LongHeadsState | None:
    """The :class:`LongHeadsState` on this call's KV-cache layer (created with the layer), ``None`` without a cache."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    swap_cache_layer(module, kwargs, lambda layer: None)  # makes sure the layer exists
    if module.layer_idx >= len(layers):
        return None
    layer = layers[module.layer_idx]
    if getattr(layer, "vzoo_longheads", None) is None:
        layer.vzoo_longheads = LongHeadsState()
    return layer.vzoo_longheads


def attach_longheads(model: nn.Module, module: nn.Module, config: LongHeadsConfig) -> Attachment:
    """Give ``module`` its :class:`LongHeadsContext` (the model's rotary frequencies) and a forward
    pre-hook that hands it the state of the call's KV-cache layer."""
    rotary = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    if rotary is None or not isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__}: no rotary embedding with inv_freq found (LongHeads remaps RoPE positions)")
    ctx = LongHeadsContext(rotary)
    module.vzoo_longheads = ctx

    def hook(mod, args, kwargs):
        ctx.state = _cache_state(mod, kwargs)

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    return Attachment(module, ("vzoo_longheads",), (handle,))


register_lm_method(LMMethod(
    config=LongHeadsConfig, attn_implementation="vzoo_longheads", label="LongHeads", attention=longheads_attention,
    paper="LongHeads: Multi-Head Attention is Secretly a Long Context Processor (2024)", arxiv="2402.10685",
    ops=("token_routed_attention", "merge_attention_states"),
    status="per-head chunk selection with contiguous RoPE remapping (loop oracle), prefill and decode",
    attach=attach_longheads,
    window_error=lambda config, window: "it selects chunks from the whole context",
    bench=lambda tokens: {"longheads (256 x 16)": LongHeadsConfig()},
    contract=lambda: {"longheads": LongHeadsConfig(chunk_size=8, atten_length=64)},  # every chunk selected
))
