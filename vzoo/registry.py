"""The vzoo registry: the ops of ``vzoo.kernels`` and the attention methods built on them.

``vzoo list`` and ``vzoo bench`` read it. A method is registered only once it works end to end, by
the file that defines it; :func:`methods` first imports every module of the ``vzoo`` package (and
``vzoo.lm`` when transformers is installed), so no table here names them.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass

__all__ = ["Method", "OPS", "discover", "methods", "register_method"]


@dataclass(frozen=True)
class Method:
    """One attention method of the zoo."""

    name: str
    paper: str
    arxiv: str
    modality: str  # "vision" | "video" | "language"
    ops: tuple[str, ...]  # names from OPS that it uses
    status: str  # e.g. "exact, tested"

    def __post_init__(self) -> None:
        unknown = [op for op in self.ops if op not in OPS]
        if unknown:
            raise ValueError(f"Method {self.name!r} uses unknown ops {unknown}; known: {sorted(OPS)}")
        if self.modality not in ("vision", "video", "language"):
            raise ValueError(f"Method {self.name!r}: modality={self.modality!r} must be vision, video or language")


# op name -> (one-line description, backends that implement it)
OPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "block_sparse_attention": (
        "attention of query blocks over the key blocks a BlockSparseLayout selects",
        ("reference", "torch", "triton", "flex"),
    ),
    "token_routed_attention": (
        "attention of each query token over its own routed key blocks (MoBA, VMoBA)",
        ("reference", "torch", "triton", "flex"),
    ),
    "sink_window_attention": (
        "causal sliding-window attention with attention sinks, token-exact (LongGen, StreamingLLM)",
        ("reference", "torch", "triton", "flex"),
    ),
    "attention_block_max": (
        "block max-pooled attention probabilities without the full matrix (SeerAttention's gate target)",
        ("reference", "torch"),
    ),
    "merge_attention_states": ("exact log-sum-exp merge of partial attention results", ("torch",)),
    "flash_pieces_attention": (
        "structured masks (block-causal, BD3) as fused CPU flash pieces plus per-block folds, with backward",
        ("torch",),
    ),
    "lightning_attention": (
        "causal linear attention with per-head decay, chunked (Lightning-2) or left-product tiled (Lightning-1)",
        ("reference", "torch", "triton"),
    ),
    "local_linear_attention": (
        "local linear regression attention: streamed closed form with conjugate gradients (LLA)",
        ("reference", "torch"),
    ),
    "rat_attention": (
        "chunk-reset gated recurrence plus softmax attention over chunk summaries (RAT)",
        ("reference", "torch"),
    ),
    "neural_memory": (
        "test-time-trained MLP memory: mini-batch gradients, momentum and decay as a scan (Titans)",
        ("reference", "torch"),
    ),
    "landmark_attention": (
        "Landmark Attention's grouped softmax over landmark-gated blocks, exact or top-k retrieved blocks",
        ("reference", "torch"),
    ),
    "routing_attention": (
        "Routing Transformer: attention inside balanced k-means clusters of the completed segments (causal)",
        ("reference", "torch"),
    ),
    "neighborhood_aggregate": (
        "per-pixel weighted k x k neighbourhood sum, NATTEN border rule (ContMix dynamic kernels)",
        ("reference", "torch", "triton"),
    ),
}

_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def discover() -> None:
    """Import every top-level module of ``vzoo`` (each method file registers its method) and, when
    transformers is installed, ``vzoo.lm``."""
    import vzoo

    for info in pkgutil.iter_modules(vzoo.__path__):
        if not info.ispkg and info.name not in ("cli", "__main__"):
            importlib.import_module(f"vzoo.{info.name}")
    if importlib.util.find_spec("transformers") is not None:
        importlib.import_module("vzoo.lm")
    vzoo.register_timm_models()


def methods() -> list[Method]:
    """Every registered method (after :func:`discover`), by name."""
    discover()
    return sorted(_METHODS.values(), key=lambda m: m.name)
