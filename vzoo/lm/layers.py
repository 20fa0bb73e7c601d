"""What the LM methods share about layers: choosing them, undoing what was attached to them, dense
attention and the rule for falling back to it."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from vzoo.kernels import BlockSparseLayout, block_sparse_attention, dense_is_faster
from vzoo.kernels.reference import visible_at, visible_keys
from vzoo.kernels.torch_backend import masked_sdpa

__all__ = [
    "Attachment", "attend_blocks", "attention_modules", "dense_attention", "key_validity", "key_validity_mask", "keep_full_cache", "masked_softmax", "record_density", "run_dense",
    "select_layers", "swap_cache_layer", "visible_mask",
]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The transformers attention modules of ``model`` (those with ``layer_idx`` and ``num_key_value_groups``)."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    if not mods:
        raise ValueError(f"{type(model).__name__}: no transformers attention modules (with layer_idx) found")
    return mods


def select_layers(owner: str, layers: tuple[int, ...] | None, num_layers: int) -> tuple[int, ...]:
    """``layers`` (``None``: all ``num_layers``), checked against the model; ``owner`` names the field."""
    if layers is None:
        return tuple(range(num_layers))
    if any(i >= num_layers for i in layers):
        raise ValueError(f"{owner}={layers} has indices >= num_layers={num_layers}")
    return tuple(layers)


def key_validity(attention_mask: torch.Tensor, windowed: bool = False) -> torch.Tensor:
    """bool ``[B, kv]``: the keys transformers' ``[B, 1, q, kv]`` mask (bool, or additive with 0 = keep)
    leaves visible to some query, i.e. the unpadded keys. Without a window that is the last query's row;
    on a sliding-window layer (``windowed``) that row would hide every key before its window, so it is
    any row's (a full pass over the mask; a key outside every row's window is hidden by the window rule
    the methods apply anyway)."""
    mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    return mask[:, 0].any(-2) if windowed else mask[:, 0, -1]


def key_validity_mask(attention_mask: torch.Tensor | None = None, kv_length: int | None = None, kv_offset: int = 0, **_):
    """``AttentionMaskInterface`` function: hand the attention the 2-D key validity ``[B, kv]`` (bool)
    instead of a dense ``[B, 1, q, kv]`` mask (``None`` without padding)."""
    if attention_mask is None:
        return None
    valid = attention_mask.bool()
    if kv_length is not None:
        valid = valid[:, kv_offset : kv_offset + kv_length]
    return None if bool(valid.all()) else valid


class Attachment:
    """Undoes what a method added to one attention module: removes ``hooks`` and deletes the
    attributes (submodules included) named in ``attrs``."""

    def __init__(self, module: nn.Module, attrs: tuple[str, ...], hooks: tuple = ()) -> None:
        self.module, self.attrs, self.hooks = module, attrs, hooks

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for name in self.attrs:
            if hasattr(self.module, name):
                delattr(self.module, name)


def visible_mask(attention_mask: torch.Tensor | None, sq: int, skv: int, sliding_window: int | None = None,
                 device: torch.device | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """bool ``[B|1, 1, stop - start, skv]``: which keys the query rows ``rows = (start, stop)`` (default all ``sq``,
    the last ``sq`` of ``skv`` positions) may see: transformers' mask (bool or additive ``[B, 1, q, kv]``; it holds
    causality, window and padding) or, for ``None``, causality and the layer's ``sliding_window``."""
    start, stop = (0, sq) if rows is None else rows
    if attention_mask is not None:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        return mask[:, :, start:stop, :skv]
    q_pos = torch.arange(start, stop, device=device) + (skv - sq)
    return visible_at(q_pos, torch.arange(skv, device=device), True, sliding_window or 0)[None, None]


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax of ``scores [..., q, kv]`` over the ``visible`` keys (bool, broadcasting); rows that see none give
    zeros."""
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
    return torch.where(visible.any(-1, keepdim=True), probs, 0.0)


def dense_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The model's own attention, as SDPA: ``query [B, H, q, D]`` (the last ``q`` positions), ``key, value
    [B, Hkv, kv, D]``, transformers' mask (bool or additive ``[B, 1, q, kv]``; ``None``: causal only) and
    the layer's ``sliding_window``. Returns ``[B, H, q, D]``; rows that see no key give zeros."""
    sq, skv = query.shape[2], key.shape[2]
    if attention_mask is not None:  # transformers' mask already holds causality, window and padding
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        return masked_sdpa(query, key, value, mask[:, :, :, :skv], scale)
    if sliding_window is not None and skv > sliding_window:  # not from transformers, which then passes a mask
        return masked_sdpa(query, key, value, visible_keys(sq, skv, True, sliding_window, 0, query.device), scale)
    # sdpa_mask leaves None only for a prompt without cache (sq == skv) or one new token
    gqa = query.shape[1] != key.shape[1]
    return F.scaled_dot_product_attention(query, key, value, is_causal=sq > 1, scale=scale, enable_gqa=gqa)


def record_density(module: nn.Module | None, density: float, dense: bool = False) -> None:
    """Count one prompt call of a patched attention ``module`` that attended ``density`` of the causal
    (query, key) pairs (``dense``: it ran dense attention instead) on ``module.vzoo_density``, which
    the handle of :func:`~vzoo.lm.apply_sparse_attention` reports."""
    stats = getattr(module, "vzoo_density", None)
    if stats is not None:
        stats.add(density, dense)


def run_dense(module: nn.Module | None, enabled: bool, density: float, device: torch.device, op: str) -> bool:
    """Whether a call that selected ``density`` of the (causal) dense work runs dense attention instead:
    ``enabled`` (the config's ``dense_fallback``) and above the break-even density of ``op`` on
    ``device`` (:func:`vzoo.kernels.dense_is_faster`). Records the call (:func:`record_density`)."""
    dense = enabled and dense_is_faster(density, device, op)
    record_density(module, density, dense)
    return dense


def attend_blocks(
    chosen: torch.Tensor, block_q: int, block_k: int, op: str, fallback: bool, query: torch.Tensor, key: torch.Tensor,
    value: torch.Tensor, attention_mask: torch.Tensor | None, scale: float, module: nn.Module | None,
    keys: torch.Tensor | None, sliding_window: int | None,
) -> torch.Tensor:
    """Causal attention of ``query [B, H, q, D]`` (the last ``q`` of the ``kv`` positions of ``key, value
    [B, Hkv, kv, D]``) over the selected blocks ``chosen [B, H|Hkv|1, NQB, NKB]`` (bool; blocks of
    ``block_q`` queries and ``block_k`` keys), the unpadded ``keys [B, kv]`` and the model's
    ``sliding_window`` only; or the model's dense attention when ``fallback`` and the selection's
    causal density is above the break-even of ``op`` (:func:`run_dense`, which records the call).
    Returns ``[B, H, q, D]``."""
    layout = BlockSparseLayout.from_block_mask(chosen, block_q, block_k, query.shape[2], key.shape[2])
    if run_dense(module, fallback, layout.density(causal=True), query.device, op):
        return dense_attention(query, key, value, attention_mask, scale, sliding_window)
    return block_sparse_attention(query, key, value, layout, causal=True, scale=scale, key_mask=keys, window=sliding_window)


def swap_cache_layer(module: nn.Module, kwargs: dict, swap: Callable) -> None:
    """In the KV cache of this call of the attention ``module`` (its ``cache=`` / ``past_key_values=``
    argument, transformers 5.x / 4.57), replace the module's layer by ``swap(layer)`` unless that is
    ``None``, carrying over the tokens it holds. For forward pre-hooks."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    layers = getattr(cache, "layers", None)
    if layers is None:
        return
    i = module.layer_idx
    if getattr(cache, "layer_class_to_replicate", None) is not None:
        while len(layers) <= i:
            layers.append(cache.layer_class_to_replicate())
    if i >= len(layers) or (new := swap(layers[i])) is None:
        return
    old, layers[i] = layers[i], new
    if old.is_initialized and old.keys.numel():
        new.update(old.keys, old.values)


def keep_full_cache(module: nn.Module):
    """A forward pre-hook on the attention ``module`` that replaces its sliding-window cache layer
    (transformers keeps only the last ``window - 1`` tokens there) by a full ``DynamicLayer``, so cache
    indices stay absolute positions (MoBA's blocks, LongGen's strides). Installed on every layer of a
    model with sliding-window layers, so transformers builds all masks at full length (the window rule
    stays in them). Returns the hook handle."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    def full(layer):
        if not isinstance(layer, DynamicSlidingWindowLayer):
            return None
        if layer.is_initialized and layer.cumulative_length > layer.keys.shape[-2]:
            raise ValueError(
                f"the KV cache already evicted tokens of sliding-window layer {module.layer_idx}; start the cache "
                "after apply_sparse_attention"
            )
        return DynamicLayer()

    return module.register_forward_pre_hook(lambda mod, args, kwargs: swap_cache_layer(mod, kwargs, full), with_kwargs=True)
