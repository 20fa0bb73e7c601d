"""vzoo.kernels: shared block-sparse attention ops, layouts and backends.

Tensors follow ``torch.nn.functional.scaled_dot_product_attention``: ``[B, H, S, D]``, GQA when the
query heads are a multiple of the key/value heads. Imports only torch; triton loads lazily.
"""

from .backends import BACKENDS, backend_status, use_backend
from .block_max import attention_block_max
from .block_sparse import block_sparse_attention
from .break_even import break_even, dense_is_faster
from .landmark import landmark_attention
from .layout import BlockSparseLayout
from .lightning import lightning_attention, lightning_attention_step, lightning_slopes
from .lla import local_linear_attention
from .merge import merge_attention_states
from .neighborhood import (
    neighborhood_aggregate,
    neighborhood_aggregate_plain,
    neighborhood_rpb_index,
    neighborhood_window_start,
    neighborhood_windows,
)
from .rat import rat_attention, rat_step
from .routing import routing_attention
from .titans import neural_memory
from .token_routed import token_routed_attention
from .window import sink_window_attention, sink_window_layout

__all__ = [
    "BACKENDS",
    "BlockSparseLayout",
    "attention_block_max",
    "backend_status",
    "block_sparse_attention",
    "break_even",
    "dense_is_faster",
    "landmark_attention",
    "lightning_attention",
    "lightning_attention_step",
    "lightning_slopes",
    "local_linear_attention",
    "merge_attention_states",
    "neighborhood_aggregate",
    "neighborhood_aggregate_plain",
    "neighborhood_rpb_index",
    "neighborhood_window_start",
    "neighborhood_windows",
    "neural_memory",
    "rat_attention",
    "rat_step",
    "routing_attention",
    "sink_window_attention",
    "sink_window_layout",
    "token_routed_attention",
    "use_backend",
]
