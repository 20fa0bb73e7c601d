"""``apply_sparse_attention`` for transformers causal LMs, symmetric with :mod:`vzoo.pipelines`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .blockrank import BlockRankConfig, attach_scoring, blockrank_attention, key_validity_mask
from .longgen import LongGenConfig, attach_eviction, longgen_attention
from .moba import MoBAConfig, attach_key_conv, moba_attention
from .seer import SeerAttentionConfig, attach_gate, seer_attention

__all__ = ["SparseAttentionHandle", "apply_sparse_attention", "register_methods"]


@dataclass(frozen=True)
class _Method:
    name: str  # the attn_implementation name
    attention: Callable  # (config, query, key, value, attention_mask, scale, module, **kwargs) -> [B, H, q, D]
    attach: Callable | None = None  # (model, attention module, config) -> something with .remove(), or None
    mask: str = "sdpa"  # the mask function: "sdpa" (transformers' sdpa_mask) or "keys" (2-D key validity)


_METHODS = {
    MoBAConfig: _Method("vzoo_moba", moba_attention, attach_key_conv),
    LongGenConfig: _Method("vzoo_longgen", longgen_attention, attach_eviction),
    SeerAttentionConfig: _Method("vzoo_seer", seer_attention, attach_gate),
    BlockRankConfig: _Method("vzoo_blockrank", blockrank_attention, attach_scoring, mask="keys"),
}


def _interface_function(method: _Method) -> Callable:
    """The ``AttentionInterface`` function: ``query [B, H, q, D]`` after RoPE, ``key, value [B, Hkv, kv, D]``
    after the cache update; returns ``([B, q, H, D], None)``. Layers without a vzoo config run SDPA."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        config = getattr(module, "vzoo_config", None)
        if config is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if dropout and module.training:
            raise ValueError(
                f"{method.name} has no attention dropout (the model's attention_dropout is {dropout}); "
                "set model.config.attention_dropout = 0.0 to train with it"
            )
        scale = module.scaling if scaling is None else scaling
        out = method.attention(config, query, key, value, attention_mask, scale, module, **kwargs)
        return out.transpose(1, 2).contiguous(), None

    attention.__name__ = f"{method.name}_attention"
    return attention


def register_methods() -> None:
    """Register every vzoo method under its ``attn_implementation`` name, with transformers' SDPA mask
    function (a boolean padding mask, or ``None`` when only causality applies)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for method in _METHODS.values():
        AttentionInterface.register(method.name, _interface_function(method))
        AttentionMaskInterface.register(method.name, sdpa_mask if method.mask == "sdpa" else key_validity_mask)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    if not mods:
        raise ValueError(f"{type(model).__name__}: no transformers attention modules (with layer_idx) found")
    return mods


class SparseAttentionHandle:
    """``remove()`` (or leaving a ``with`` block) restores the model's attention implementation."""

    def __init__(self, model: nn.Module, original: str, modules: list[nn.Module], attached: list) -> None:
        self.model, self.original, self.modules, self.attached = model, original, modules, attached

    def remove(self) -> None:
        if self.model is None:
            return
        for item in self.attached:
            item.remove()
        for m in self.modules:
            if hasattr(m, "vzoo_config"):
                del m.vzoo_config
        self.model.set_attn_implementation(self.original)
        self.model = None

    def __enter__(self) -> SparseAttentionHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_sparse_attention(
    model: nn.Module, config: MoBAConfig | LongGenConfig | SeerAttentionConfig | BlockRankConfig
) -> SparseAttentionHandle:
    """Switch a transformers causal LM to a vzoo method on the layers ``config.layer_ids`` names."""
    if type(config) not in _METHODS:
        raise ValueError(f"config must be one of {[c.__name__ for c in _METHODS]}, got {type(config).__name__}")
    method = _METHODS[type(config)]
    register_methods()
    modules = _attention_modules(model)
    if any(hasattr(m, "vzoo_config") for m in modules):
        raise RuntimeError("the model already has vzoo sparse attention; remove() it first")
    layers = set(config.layer_ids(max(m.layer_idx for m in modules) + 1))
    original = model.config._attn_implementation
    attached = []
    for m in modules:
        if m.layer_idx in layers:
            m.vzoo_config = config
            if method.attach is not None and (item := method.attach(model, m, config)) is not None:
                attached.append(item)
    model.set_attn_implementation(method.name)
    return SparseAttentionHandle(model, original, modules, attached)
