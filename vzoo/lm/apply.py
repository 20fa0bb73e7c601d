"""``apply_sparse_attention`` for transformers causal LMs, symmetric with :mod:`vzoo.pipelines`."""

from __future__ import annotations

import torch.nn as nn

from .moba import MoBAConfig, moba_attention

__all__ = ["SparseAttentionHandle", "apply_sparse_attention", "register_methods"]

_METHODS = {MoBAConfig: ("vzoo_moba", moba_attention)}


def register_methods() -> None:
    """Register every vzoo method under its ``attn_implementation`` name, with transformers' SDPA mask
    function (a boolean padding mask, or ``None`` when only causality applies)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, fn in _METHODS.values():
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    if not mods:
        raise ValueError(f"{type(model).__name__}: no transformers attention modules (with layer_idx) found")
    return mods


class SparseAttentionHandle:
    """``remove()`` (or leaving a ``with`` block) restores the model's attention implementation."""

    def __init__(self, model: nn.Module, original: str, modules: list[nn.Module]) -> None:
        self.model, self.original, self.modules = model, original, modules

    def remove(self) -> None:
        if self.model is None:
            return
        for m in self.modules:
            if hasattr(m, "vzoo_config"):
                del m.vzoo_config
        self.model.set_attn_implementation(self.original)
        self.model = None

    def __enter__(self) -> SparseAttentionHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_sparse_attention(model: nn.Module, config: MoBAConfig) -> SparseAttentionHandle:
    """Switch a transformers causal LM to a vzoo method (per-layer via ``config.layers``)."""
    if type(config) not in _METHODS:
        raise ValueError(f"config must be one of {[c.__name__ for c in _METHODS]}, got {type(config).__name__}")
    register_methods()
    modules = _attention_modules(model)
    if any(hasattr(m, "vzoo_config") for m in modules):
        raise RuntimeError("the model already has vzoo sparse attention; remove() it first")
    original = model.config._attn_implementation
    for m in modules:
        if config.layers is None or m.layer_idx in config.layers:
            m.vzoo_config = config
    model.set_attn_implementation(_METHODS[type(config)][0])
    return SparseAttentionHandle(model, original, modules)
