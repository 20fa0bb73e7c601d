"""``apply_sparse_attention`` for transformers causal LMs, symmetric with :mod:`vzoo.pipelines`.

Model features the methods must not drop silently: sliding-window layers (Mistral, Qwen2 with
``use_sliding_window``, Gemma 2/3 local layers; transformers passes ``sliding_window=`` to the
attention function) are honoured at token level by MoBA, SeerAttention and LongGen (the window
intersected with the method's pattern) and refused where a method cannot; attention logit
soft-capping (Gemma 2's ``attn_logit_softcapping``, passed as ``softcap=``) is refused by every
method. MoBA and LongGen's ``local_stride`` place blocks at absolute positions, so on such models the
sliding-window layers keep their whole KV cache (:func:`~vzoo.lm.layers.keep_full_cache`) and cached
generation equals recomputation. Refusals are ``ValueError`` at ``apply_sparse_attention`` time naming the feature
(and, as a backstop, on a call that passes a refused ``softcap=`` / ``sliding_window=``).

Never slower than dense: a MoBA call or SeerAttention prompt whose selection is denser than the
break-even density of the device (:func:`vzoo.kernels.dense_is_faster`) runs the model's dense
attention instead (``dense_fallback=True``, the default; both methods approximate dense attention by
design). The handle's density statistics count those calls. LongGen and BlockRank are fixed
architectures the model is fine-tuned for: they always run their pattern.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vzoo.kernels.break_even import DensityReport, DensityStats

from .blockrank import BlockRankConfig, attach_scoring, blockrank_attention, key_validity_mask
from .layers import keep_full_cache
from .longgen import LongGenConfig, attach_eviction, longgen_attention, longgen_window_error
from .moba import MoBAConfig, attach_key_conv, moba_attention
from .seer import SeerAttentionConfig, attach_gate, seer_attention

__all__ = ["SparseAttentionHandle", "apply_sparse_attention", "register_methods"]


@dataclass(frozen=True)
class _Method:
    name: str  # the attn_implementation name
    label: str  # the method's name in messages
    attention: Callable  # (config, query, key, value, attention_mask, scale, module, **kwargs) -> [B, H, q, D]
    attach: Callable | None = None  # (model, attention module, config) -> something with .remove(), or None
    mask: str = "sdpa"  # the mask function: "sdpa" (transformers' sdpa_mask) or "keys" (2-D key validity)
    # (config, a layer's sliding window) -> why the method cannot honour it, or None; no function: the
    # method honours every window (it receives sliding_window=)
    window_error: Callable | None = None
    # (config) -> whether the method's blocks sit at absolute positions, so sliding-window layers must
    # keep their whole KV cache for cached generation to equal recomputation
    full_cache: Callable = lambda config: False


_METHODS = {
    MoBAConfig: _Method("vzoo_moba", "MoBA", moba_attention, attach_key_conv, full_cache=lambda config: True),
    LongGenConfig: _Method("vzoo_longgen", "LongGen", longgen_attention, attach_eviction, window_error=longgen_window_error,
                           full_cache=lambda config: config.pattern == "local_stride"),
    SeerAttentionConfig: _Method("vzoo_seer", "SeerAttention", seer_attention, attach_gate),
    BlockRankConfig: _Method("vzoo_blockrank", "BlockRank", blockrank_attention, attach_scoring, mask="keys",
                             window_error=lambda config, window: "its pattern has no sliding-window rule"),
}


def _model_window(module: nn.Module) -> int | None:
    """The sliding window transformers passes for this attention module (Mistral reads its config)."""
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    return getattr(module.config, "sliding_window", None)


def _check_features(method: _Method, config, model: nn.Module, modules: list[nn.Module], patched: set[int]) -> None:
    """Refuse (``ValueError``) model features ``method`` would otherwise silently get wrong. Soft-capping
    on any layer (the other layers run SDPA, which has none); windows on the patched layers (the others
    keep transformers' windowed mask, except under BlockRank's key mask)."""
    kind = getattr(model.config, "model_type", type(model).__name__)
    for m in modules:
        cap = getattr(m, "attn_logit_softcapping", None)
        if cap is not None:
            raise ValueError(
                f"{kind} attention logit soft-capping (attn_logit_softcapping={cap}) is not supported by {method.label}"
            )
        if m.layer_idx not in patched and method.mask == "sdpa":
            continue
        window = _model_window(m)
        if window is not None and method.window_error is not None and (why := method.window_error(config, window)):
            raise ValueError(f"{kind} sliding-window attention (sliding_window={window}, layer {m.layer_idx}) is not "
                             f"supported by {method.label}: {why}")


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
        # _check_features refused these at apply time from where transformers' models keep them (module
        # attributes, config); this checks what the call really passes (no sync, a few dict look-ups), which
        # also covers a remote-code model keeping them elsewhere and a config changed after apply: the
        # methods take **kwargs and would otherwise drop softcap= / sliding_window= silently.
        if kwargs.get("softcap") is not None:
            raise ValueError(f"attention logit soft-capping (softcap={kwargs['softcap']}) is not supported by {method.label}")
        window = kwargs.get("sliding_window")
        if window is not None and method.window_error is not None and (why := method.window_error(config, window)):
            raise ValueError(f"sliding-window attention (sliding_window={window}) is not supported by {method.label}: {why}")
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


class SparseAttentionHandle(DensityReport):
    """``remove()`` (or leaving a ``with`` block) restores the model's attention implementation.

    Density statistics over the patched layers' calls that selected blocks (MoBA calls, SeerAttention
    prompts): ``density`` is their mean selected share of the causal (query, key) pairs (``None``
    before any), ``sparse_calls`` their number, ``dense_calls`` how many of them ran dense attention
    because they were above the device's break-even density (``dense_fallback``)."""

    def __init__(self, model: nn.Module, original: str, modules: list[nn.Module], attached: list) -> None:
        self.model, self.original, self.modules, self.attached = model, original, modules, attached
        self.stats = [m.vzoo_density for m in modules if hasattr(m, "vzoo_density")]

    def density_stats(self) -> list[DensityStats]:
        return self.stats

    def remove(self) -> None:
        if self.model is None:
            return
        for item in self.attached:
            item.remove()
        for m in self.modules:
            for name in ("vzoo_config", "vzoo_density"):
                if hasattr(m, name):
                    delattr(m, name)
        self.model.set_attn_implementation(self.original)
        self.model = None

    def __enter__(self) -> SparseAttentionHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_sparse_attention(
    model: nn.Module, config: MoBAConfig | LongGenConfig | SeerAttentionConfig | BlockRankConfig
) -> SparseAttentionHandle:
    """Switch a transformers causal LM to a vzoo method on the layers ``config.layer_ids`` names.

    Raises ``ValueError`` for model features the method cannot honour on those layers (logit
    soft-capping; sliding windows where the method says so)."""
    if type(config) not in _METHODS:
        raise ValueError(f"config must be one of {[c.__name__ for c in _METHODS]}, got {type(config).__name__}")
    method = _METHODS[type(config)]
    register_methods()
    modules = _attention_modules(model)
    if any(hasattr(m, "vzoo_config") for m in modules):
        raise RuntimeError("the model already has vzoo sparse attention; remove() it first")
    layers = set(config.layer_ids(max(m.layer_idx for m in modules) + 1))
    _check_features(method, config, model, modules, layers)
    original = model.config._attn_implementation
    attached = []
    if method.full_cache(config) and any(_model_window(m) is not None for m in modules):
        attached += [keep_full_cache(m) for m in modules]
    for m in modules:
        if m.layer_idx in layers:
            m.vzoo_config, m.vzoo_density = config, DensityStats()
            if method.attach is not None and (item := method.attach(model, m, config)) is not None:
                attached.append(item)
    model.set_attn_implementation(method.name)
    return SparseAttentionHandle(model, original, modules, attached)
