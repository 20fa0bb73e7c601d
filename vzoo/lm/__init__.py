"""Sparse attention for Hugging Face transformers causal LMs: ``apply_sparse_attention(model, MoBAConfig())``.

Each method is registered under an ``attn_implementation`` name (``vzoo_moba``, ``vzoo_longgen``) in both
transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (so padding masks survive)."""

from .apply import SparseAttentionHandle, apply_sparse_attention
from .longgen import LongGenConfig, longgen_attention
from .moba import MoBAConfig, moba_attention

__all__ = [
    "LongGenConfig", "MoBAConfig", "SparseAttentionHandle", "apply_sparse_attention", "longgen_attention", "moba_attention",
]
