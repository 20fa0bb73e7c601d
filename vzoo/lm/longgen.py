"""LongGen: hybrid full / sparse attention layers for long context (Ge et al., ICLR 2025, arXiv 2410.01485).

The middle third of the layers keeps full attention; the first and last thirds use a static,
KV-cache friendly pattern:

- ``"sink_window"``: the first ``sink`` tokens plus the last ``window`` tokens (the query included),
  exact at token level. These layers evict everything else from the KV cache, so their cache holds
  at most ``sink + window`` tokens.
- ``"local_stride"``: blocks of ``block_size`` tokens; a query block sees the ``window // block_size``
  nearest key blocks (its own included, token-causal), the sink blocks, and every ``stride``-th block
  counted from position 0 (absolute, so a block used by a later token is used by all earlier ones).

Both run on :func:`vzoo.kernels.block_sparse_attention` with a :meth:`BlockSparseLayout.static` layout.

On a model's own sliding-window layers (window ``W``) the pattern is intersected with the window at
token level: ``local_stride`` keeps its layout under the window rule; ``sink_window`` becomes a plain
window of ``min(W, window)`` when ``sink == 0`` or ``W <= window`` (the sink then always lies outside
``W`` or inside the LongGen window); other combinations are refused by ``apply_sparse_attention``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.cache_utils import DynamicLayer

from vzoo.kernels import BlockSparseLayout, block_sparse_attention, sink_window_attention

from .layers import key_validity, record_density, select_layers, swap_cache_layer
from .registry import LMMethod, register_lm_method

__all__ = ["LongGenConfig", "SinkWindowLayer", "attach_eviction", "longgen_attention", "longgen_window_error"]

PATTERNS = ("sink_window", "local_stride")


@dataclass(frozen=True)
class LongGenConfig:
    """LongGen settings.

    Args:
        pattern: ``"sink_window"`` or ``"local_stride"``.
        sink: always-visible first tokens (attention sink; whole blocks under ``local_stride``).
        window: local tokens each query sees, itself included (whole blocks under ``local_stride``).
        block_size: kernel block size in tokens (the pattern's unit under ``local_stride``).
        stride: ``local_stride`` only: every ``stride``-th key block is also visible (0: none).
        full_layers: layers that keep full attention; ``None``: the middle third (``round(L / 3)``,
            at least one, centred).
        evict: drop evicted tokens from the KV cache on ``sink_window`` layers.
    """

    pattern: str = "sink_window"
    sink: int = 64
    window: int = 2048
    block_size: int = 64
    stride: int = 0
    full_layers: tuple[int, ...] | None = None
    evict: bool = True

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"LongGenConfig.pattern={self.pattern!r} must be one of {PATTERNS}")
        for name, low in (("sink", 0), ("window", 1), ("block_size", 1), ("stride", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"LongGenConfig.{name}={value!r} must be an int >= {low}")
        if self.pattern == "local_stride" and (self.window % self.block_size or self.sink % self.block_size):
            raise ValueError(
                f"LongGenConfig.window={self.window} and sink={self.sink} must be multiples of block_size="
                f"{self.block_size} under pattern='local_stride'"
            )
        if self.stride and self.pattern != "local_stride":
            raise ValueError(f"LongGenConfig.stride={self.stride} applies to pattern='local_stride' only")
        if self.full_layers is not None and not all(isinstance(i, int) and i >= 0 for i in self.full_layers):
            raise ValueError(f"LongGenConfig.full_layers={self.full_layers!r} must be None or non-negative layer indices")

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        """The sparse layers of a ``num_layers`` model: all but :attr:`full_layers`."""
        if self.full_layers is None:
            n = max(1, round(num_layers / 3))
            first = (num_layers - n) // 2
            full = set(range(first, first + n))
        else:
            full = set(select_layers("LongGenConfig.full_layers", self.full_layers, num_layers))
        return tuple(i for i in range(num_layers) if i not in full)

    @property
    def evicts(self) -> bool:
        return self.evict and self.pattern == "sink_window"


@functools.lru_cache(maxsize=64)  # the same few layouts for every layer and step
def _stride_layout(config: LongGenConfig, q_len: int, kv_len: int, device: torch.device) -> BlockSparseLayout:
    """The ``local_stride`` pattern as a static layout shared by all heads (token-causal in the kernel)."""
    b = config.block_size
    return BlockSparseLayout.static(
        q_len, kv_len, b, b, sink_blocks=config.sink // b, local_blocks=config.window // b, stride=config.stride,
        causal=True, device=device,
    )


def longgen_window_error(config: LongGenConfig, window: int) -> str | None:
    """Why ``config`` cannot be intersected exactly with a model's sliding ``window`` (``None``: it can)."""
    if config.pattern == "sink_window" and config.sink and window > config.window:
        return (f"it is wider than window={config.window} with sink={config.sink}, and their intersection is not a "
                f"sink+window pattern; use sink=0 or window >= {window}")
    return None


def longgen_attention(
    config: LongGenConfig, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scale: float, module=None, sliding_window: int | None = None, **_,
) -> torch.Tensor:
    """LongGen sparse attention over ``query [B, H, q, D]`` (after RoPE), the last ``q`` of ``key, value
    [B, Hkv, kv, D]`` (on evicting layers: the sink, the kept window and the new tokens);
    ``attention_mask`` is transformers' (``None``: causal only); ``sliding_window`` the model's own
    window on this layer (intersected, see the module docstring). Returns ``[B, H, q, D]``."""
    sq, skv = query.shape[2], key.shape[2]
    if config.pattern == "local_stride":
        layout = _stride_layout(config, sq, skv, query.device)
        if sq == skv:
            record_density(module, layout.density(causal=True))
        keys = None if attention_mask is None else key_validity(attention_mask, sliding_window is not None)
        return block_sparse_attention(
            query, key, value, layout, causal=True, scale=scale, key_mask=keys, window=sliding_window
        )
    sink, window, keys = config.sink, config.window, None
    if sliding_window is not None and (not sink or sliding_window <= window):
        sink, window = 0, min(window, sliding_window)
    if attention_mask is not None:  # padding (sdpa_mask gives None when only causality applies)
        keys = key_validity(attention_mask, sliding_window is not None)
        if keys.shape[-1] > skv:  # the cache evicted the middle: keep the sink's and the tail's columns
            kept = config.sink
            keys = torch.cat([keys[:, :kept], keys[:, keys.shape[-1] - (skv - kept) :]], -1)
    if sq == skv:
        record_density(module, sink_window_density(skv, sink, window))
    return sink_window_attention(query, key, value, window, sink, scale=scale, block=config.block_size, key_mask=keys)


def sink_window_density(n: int, sink: int, window: int) -> float:
    """Share of the causal pairs of an ``n``-token prompt that ``sink`` + ``window`` keep: the query at
    ``p`` sees ``min(p + 1, window)`` recent keys and ``min(sink, max(0, p + 1 - window))`` sink keys."""
    recent = min(n, window) * (min(n, window) + 1) // 2 + window * max(n - window, 0)
    beyond = max(n - window, 0)
    sinks = min(beyond, sink) * (min(beyond, sink) + 1) // 2 + sink * max(beyond - sink, 0)
    return (recent + sinks) / (n * (n + 1) // 2)


class SinkWindowLayer(DynamicLayer):
    """A transformers ``DynamicLayer`` that keeps only the first ``sink`` and the last ``window - 1``
    tokens (the next query brings the ``window``-th). It reports the full length seen, so positions
    and masks stay those of the whole sequence."""

    def __init__(self, sink: int, window: int) -> None:
        super().__init__()
        self.sink, self.window, self.seen = sink, window, 0

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.seen += key_states.shape[-2]
        n, tail = keys.shape[-2], self.window - 1
        if n > self.sink + tail:
            self.keys = torch.cat([keys[..., : self.sink, :], keys[..., n - tail :, :]], -2)
            self.values = torch.cat([values[..., : self.sink, :], values[..., n - tail :, :]], -2)
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen

    def reset(self) -> None:
        super().reset()
        self.seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("LongGen sink+window cache layers evict tokens and cannot be cropped")


def attach_eviction(model: nn.Module, module: nn.Module, config: LongGenConfig):
    """Before each call of the attention ``module``, swap its layer of the call's ``DynamicCache`` for a
    :class:`SinkWindowLayer` (keeping what it holds). Returns the hook handle (``None`` when
    ``config`` does not evict)."""
    if not config.evicts:
        return None

    def evicting(layer):
        return SinkWindowLayer(config.sink, config.window) if type(layer) is DynamicLayer else None

    return module.register_forward_pre_hook(lambda mod, args, kwargs: swap_cache_layer(mod, kwargs, evicting), with_kwargs=True)


def _bench(tokens: int) -> dict:
    config = LongGenConfig(sink=64, window=2048)
    return {"longgen (sink 64 + window 2048, middle third full)": config}


register_lm_method(LMMethod(
    config=LongGenConfig, attn_implementation="vzoo_longgen", label="LongGen", attention=longgen_attention,
    paper="A Little Goes a Long Way: Efficient Long Context Training and Inference with Partial Contexts (ICLR 2025)",
    arxiv="2410.01485", ops=("block_sparse_attention", "sink_window_attention"),
    status="exact; KV eviction on sink+window layers", attach=attach_eviction, window_error=longgen_window_error,
    full_cache=lambda config: config.pattern == "local_stride", bench=_bench,
    contract=lambda: {
        "longgen-sink-window": LongGenConfig(sink=4, window=64, block_size=8, full_layers=()),
        "longgen-local-stride": LongGenConfig(pattern="local_stride", sink=0, window=64, block_size=8, full_layers=()),
    },
))
