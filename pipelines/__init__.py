"""Sparse attention for diffusers video pipelines: ``apply_sparse_attention(pipe, VMoBAConfig())``."""

from vzoo.psa import PSAConfig
from vzoo.vmoba import VMoBAConfig

from .apply import DenseConfig, SparseAttentionHandle, apply_sparse_attention, make_config
from .parallel import context_parallel_plan, enable_context_parallel

__all__ = [
    "DenseConfig", "PSAConfig", "SparseAttentionHandle", "VMoBAConfig", "apply_sparse_attention", "context_parallel_plan",
    "enable_context_parallel", "make_config",
]
