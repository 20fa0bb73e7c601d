"""vzoo.kernels: shared block-sparse attention ops, layouts and backends.

Tensors follow ``torch.nn.functional.scaled_dot_product_attention``: ``[B, H, S, D]``, GQA when the
query heads are a multiple of the key/value heads. Imports only torch; triton loads lazily.
"""

from .backends import BACKENDS, backend_status, use_backend
from .block_max import attention_block_max
from .block_sparse import block_sparse_attention
from .break_even import break_even, dense_is_faster
from .layout import BlockSparseLayout
from .merge import merge_attention_states
from .neighborhood import (
    neighborhood_aggregate,
    neighborhood_aggregate_plain,
    neighborhood_rpb_index,
    neighborhood_window_start,
    neighborhood_windows,
)
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
    "merge_attention_states",
    "neighborhood_aggregate",
    "neighborhood_aggregate_plain",
    "neighborhood_rpb_index",
    "neighborhood_window_start",
    "neighborhood_windows",
    "sink_window_attention",
    "sink_window_layout",
    "token_routed_attention",
    "use_backend",
]
