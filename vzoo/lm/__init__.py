"""Hugging Face transformers causal LMs: sparse attention with ``apply_sparse_attention(model, MoBAConfig())``,
hybrids with linear or recurrent layers with ``convert(model, LightningConfig(layers=...))``.

Every method file in this package registers itself (:mod:`vzoo.lm.registry`): importing ``vzoo.lm``
imports them all, and each method's config class is then available here by name
(``vzoo.lm.PBSConfig``). Each method is registered under its ``attn_implementation`` name
(``vzoo_moba``, ...) in both transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (so
padding masks survive).
"""

import importlib
import pkgutil

from .apply import SparseAttentionHandle, apply_sparse_attention
from .blockrank import blockrank_aux_loss, pack_prompt, rank
from .convert import convert, lm_layers, load_converted
from .diffusion_decode import diffusion_generate
from .longgen import longgen_attention
from .moba import moba_attention
from .registry import lm_methods
from .seer import block_recall, load_gates, save_gates, seer_distill_loss

for _info in pkgutil.iter_modules(__path__):  # each method file registers its method on import
    importlib.import_module(f"{__name__}.{_info.name}")

_CONFIGS = {m.config.__name__: m.config for m in [*lm_methods(), *lm_layers()]}


def __getattr__(name: str):
    if name in _CONFIGS:
        return _CONFIGS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *sorted(_CONFIGS), "SparseAttentionHandle", "apply_sparse_attention", "block_recall", "blockrank_aux_loss", "convert", "diffusion_generate",
    "load_gates", "longgen_attention", "lm_layers", "lm_methods", "load_converted", "moba_attention", "pack_prompt", "rank", "save_gates",
    "seer_distill_loss",
]
