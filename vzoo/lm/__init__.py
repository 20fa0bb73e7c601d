"""Sparse attention for Hugging Face transformers causal LMs: ``apply_sparse_attention(model, MoBAConfig())``.

Each method is registered under an ``attn_implementation`` name (``vzoo_moba``, ``vzoo_longgen``,
``vzoo_seer``, ``vzoo_blockrank``) in both transformers' ``AttentionInterface`` and
``AttentionMaskInterface`` (so padding masks survive)."""

from .apply import SparseAttentionHandle, apply_sparse_attention
from .blockrank import BlockRankConfig, blockrank_aux_loss, pack_prompt, rank
from .longgen import LongGenConfig, longgen_attention
from .moba import MoBAConfig, moba_attention
from .seer import SeerAttentionConfig, block_recall, load_gates, save_gates, seer_distill_loss

__all__ = [
    "BlockRankConfig", "LongGenConfig", "MoBAConfig", "SeerAttentionConfig", "SparseAttentionHandle",
    "apply_sparse_attention", "block_recall", "blockrank_aux_loss", "load_gates", "longgen_attention", "moba_attention",
    "pack_prompt", "rank", "save_gates", "seer_distill_loss",
]
