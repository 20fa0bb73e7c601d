"""Sparse attention for Hugging Face transformers causal LMs: ``apply_sparse_attention(model, MoBAConfig())``.

Each method is registered under an ``attn_implementation`` name (``vzoo_moba``, ``vzoo_longgen``,
``vzoo_seer``) in both transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (so padding
masks survive)."""

from .apply import SparseAttentionHandle, apply_sparse_attention
from .longgen import LongGenConfig, longgen_attention
from .moba import MoBAConfig, moba_attention
from .seer import SeerAttentionConfig, block_recall, load_gates, save_gates, seer_distill_loss

__all__ = [
    "LongGenConfig", "MoBAConfig", "SeerAttentionConfig", "SparseAttentionHandle", "apply_sparse_attention",
    "block_recall", "load_gates", "longgen_attention", "moba_attention", "save_gates", "seer_distill_loss",
]
