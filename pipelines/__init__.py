"""Sparse attention for diffusers video pipelines: ``apply_sparse_attention(pipe, VMoBAConfig())``."""

from vzoo.psa import PSAConfig
from vzoo.vmoba import VMoBAConfig

from .apply import DenseConfig, SparseAttentionHandle, apply_sparse_attention, make_config

__all__ = ["DenseConfig", "PSAConfig", "SparseAttentionHandle", "VMoBAConfig", "apply_sparse_attention", "make_config"]
