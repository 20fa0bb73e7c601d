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

import torch.nn as nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vzoo.kernels.break_even import DensityReport, DensityStats

from .layers import attention_modules, keep_full_cache, key_validity_mask
from .registry import LMMethod, lm_method, lm_methods

__all__ = ["SparseAttentionHandle", "apply_sparse_attention", "register_methods"]


def _model_window(module: nn.Module) -> int | None:
    """The sliding window transformers passes for this attention module (Mistral reads its config)."""
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    return getattr(module.config, "sliding_window", None)


def _check_features(method: LMMethod, config, model: nn.Module, modules: list[nn.Module], patched: set[int]) -> None:
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


def _interface_function(method: LMMethod) -> Callable:
    """The ``AttentionInterface`` function: ``query [B, H, q, D]`` after RoPE, ``key, value [B, Hkv, kv, D]``
    after the cache update; returns ``([B, q, H, D], None)``. Layers without a vzoo config run SDPA."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        config = getattr(module, "vzoo_config", None)
        if config is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if dropout and module.training:
            raise ValueError(
                f"{method.attn_implementation} has no attention dropout (the model's attention_dropout is {dropout}); "
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

    attention.__name__ = f"{method.attn_implementation}_attention"
    return attention


def register_methods() -> None:
    """Register every vzoo method under its ``attn_implementation`` name, with transformers' SDPA mask
    function (a boolean padding mask, or ``None`` when only causality applies)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for method in lm_methods():
        AttentionInterface.register(method.attn_implementation, _interface_function(method))
        AttentionMaskInterface.register(method.attn_implementation, sdpa_mask if method.mask == "sdpa" else key_validity_mask)


class SparseAttentionHandle(DensityReport):
    """``remove()`` (or leaving a ``with`` block) restores the model's attention implementation.

    Density statistics over the patched layers' calls that selected blocks (MoBA calls, SeerAttention
    prompts): ``density`` is their mean selected share of the causal (query, key) pairs (``None``
    before any), ``sparse_calls`` their number, ``dense_calls`` how many of them ran dense attention
    because they were above the device's break-even density (``dense_fallback``)."""

    def __init__(self, model: nn.Module, original: str, modules: list[nn.Module], attached: list) -> None:
        self.model, self.original, self.modules, self.attached = model, original, modules, attached
        self.stats: list[DensityStats] = []  # one per patched layer

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


def apply_sparse_attention(model: nn.Module, config) -> SparseAttentionHandle:
    """Switch a transformers causal LM to a vzoo method on the layers ``config.layer_ids`` names;
    ``config`` is the config of any registered method (:func:`vzoo.lm.registry.lm_methods`:
    ``MoBAConfig``, ``PBSConfig``, ...).

    Raises ``ValueError`` for model features the method cannot honour on those layers (logit
    soft-capping; sliding windows where the method says so)."""
    method = lm_method(config)
    register_methods()
    modules = attention_modules(model)
    if any(hasattr(m, "vzoo_config") for m in modules):
        raise RuntimeError("the model already has vzoo sparse attention; remove() it first")
    layers = set(config.layer_ids(max(m.layer_idx for m in modules) + 1))
    _check_features(method, config, model, modules, layers)
    original = model.config._attn_implementation
    handle = SparseAttentionHandle(model, original, modules, [])
    try:  # an attach that raises (a setting the model does not fit) leaves the model as it was
        if method.full_cache(config) and any(_model_window(m) is not None for m in modules):
            handle.attached += [keep_full_cache(m) for m in modules]
        for m in modules:
            if m.layer_idx in layers:
                m.vzoo_config, m.vzoo_density = config, DensityStats()
                handle.stats.append(m.vzoo_density)
                if method.attach is not None and (item := method.attach(model, m, config)) is not None:
                    handle.attached.append(item)
        model.set_attn_implementation(method.attn_implementation)
    except Exception:
        handle.remove()
        raise
    return handle
