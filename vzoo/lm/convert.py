"""Module swaps for transformers causal LMs: ``vzoo.lm.convert(model, LightningConfig(layers=...))``.

Methods that own parameters or a recurrent state (Lightning Attention, Local Linear Attention, RAT,
Titans) replace a decoder layer's ``self_attn`` module instead of registering an attention function.
A method file defines its config (a frozen dataclass with a ``layers`` field) and its layer class and
ends with one :func:`register_lm_layer` call; nothing here names a method.

The layer contract: ``Layer(config, model_config, layer_idx)``; ``layer.init_from_attention(attn)``
copies the replaced attention's weights where the shapes allow; ``layer(hidden_states [B, T, C],
position_embeddings=(cos, sin), attention_mask=[B, 1, T, kv] | None, cache=Cache | None) -> (out
[B, T, C], None)``. A layer keeps its decoding state in :func:`layer_state`, a cache layer of
transformers' ``Cache`` (so ``generate()``, its default ``DynamicCache`` and beam search work
unchanged) that counts the tokens the layer has seen.

A converted model is recorded in ``model.config.vzoo_conversion``, so ``model.save_pretrained(dir)``
keeps what :func:`load_converted` needs to rebuild it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.cache_utils import CacheLayerMixin

from vzoo.registry import Method, register_method

from .layers import select_layers

__all__ = [
    "LMLayer", "ModelDims", "RecurrentState", "check_layers", "convert", "copy_projections", "layer_state", "lm_layer",
    "lm_layers", "load_converted", "register_lm_layer", "token_validity",
]


@dataclass(frozen=True)
class LMLayer:
    """One module-swap method: ``layer(config, model_config, layer_idx)`` builds the replacement of a
    decoder layer's ``self_attn``; ``config`` is its frozen dataclass (with ``layers``); ``name`` is the
    key in ``vzoo list`` and in saved conversions."""

    config: type
    name: str
    label: str
    layer: Callable[..., nn.Module]
    paper: str
    arxiv: str
    ops: tuple[str, ...]
    status: str

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.config) or "layers" not in {f.name for f in dataclasses.fields(self.config)}:
            raise ValueError(f"LMLayer {self.name!r}: config {self.config.__name__} must be a dataclass with a 'layers' field")


def check_layers(owner: str, layers: object) -> None:
    """The check of a config's ``layers`` field: ``ValueError`` naming ``owner.layers`` unless it is ``None``
    or a tuple of layer indices >= 0 (the model's layer count is checked at conversion)."""
    if layers is None:
        return
    if not isinstance(layers, tuple) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        raise ValueError(f"{owner}.layers={layers!r} must be None or a tuple of non-negative layer indices")


@dataclass(frozen=True)
class ModelDims:
    """What a layer reads from the transformers text config: ``ModelDims.of(model_config)``.

    ``bias`` is ``attention_bias`` (False where the config has none); ``qkv_bias`` also holds for Qwen2,
    whose attention has q / k / v biases without an ``attention_bias`` field."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    num_layers: int
    bias: bool
    qkv_bias: bool
    eps: float

    @classmethod
    def of(cls, model_config) -> ModelDims:
        hidden, heads = model_config.hidden_size, model_config.num_attention_heads
        bias = getattr(model_config, "attention_bias", None)
        return cls(
            hidden=hidden, heads=heads, kv_heads=getattr(model_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(model_config, "head_dim", None) or hidden // heads, num_layers=model_config.num_hidden_layers,
            bias=bool(bias), qkv_bias=bool(getattr(model_config, "model_type", "") == "qwen2" if bias is None else bias),
            eps=float(getattr(model_config, "rms_norm_eps", 1e-6)),
        )

    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        """Fresh ``q_proj, k_proj, v_proj, o_proj`` of the model's attention shapes (GQA: ``k, v`` have
        ``kv_heads``), created in that order; biases as the model's attention has them (``qkv_bias`` for
        ``q, k, v``, ``bias`` for ``o``)."""
        inner, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return (nn.Linear(self.hidden, inner, bias=self.qkv_bias), nn.Linear(self.hidden, kv, bias=self.qkv_bias),
                nn.Linear(self.hidden, kv, bias=self.qkv_bias), nn.Linear(inner, self.hidden, bias=self.bias))


@torch.no_grad()
def copy_projections(dst: nn.Module, attn: nn.Module, names: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> None:
    """``init_from_attention``'s copy: each linear ``names`` of ``attn`` into ``dst``'s linear of that name
    (weight, and bias where both have one) when the weight shapes match; the others keep their init."""
    for name in names:
        src, out = getattr(attn, name, None), getattr(dst, name)
        if src is None or src.weight.shape != out.weight.shape:
            continue
        out.weight.copy_(src.weight)
        if out.bias is not None and getattr(src, "bias", None) is not None:
            out.bias.copy_(src.bias)


_LAYERS: dict[str, LMLayer] = {}


def register_lm_layer(entry: LMLayer) -> LMLayer:
    """Add ``entry`` to the module-swap registry and to :mod:`vzoo.registry` (``vzoo list``)."""
    if entry.name in _LAYERS or any(e.config is entry.config for e in _LAYERS.values()):
        raise ValueError(f"LM layer {entry.name!r} ({entry.config.__name__}) is already registered")
    register_method(Method(
        name=entry.name, paper=entry.paper, arxiv=entry.arxiv, modality="language", ops=entry.ops,
        status=f"{entry.status}; module swap via vzoo.lm.convert({entry.config.__name__}(...))",
    ))
    _LAYERS[entry.name] = entry
    return entry


def lm_layers() -> list[LMLayer]:
    """Every registered module-swap method, in registration order."""
    return list(_LAYERS.values())


def lm_layer(config: object) -> LMLayer:
    """The module-swap method ``config`` belongs to."""
    for entry in _LAYERS.values():
        if type(config) is entry.config:
            return entry
    raise ValueError(f"config must be one of {[e.config.__name__ for e in _LAYERS.values()]}, got {type(config).__name__}")


class RecurrentState(dict, CacheLayerMixin):
    """The decoding state of one converted layer inside a transformers ``Cache``: a ``dict`` of tensors
    (batch first) plus the number of tokens the layer has seen, which is the cache's sequence length
    for that layer (``generate()`` and the mask builders read it through ``get_seq_length``, also
    when every layer is converted)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self) -> None:
        dict.__init__(self)
        CacheLayerMixin.__init__(self)
        self.seen = 0  # tokens before the current call
        self._count = 0

    def lazy_initialization(self, *args, **kwargs) -> None:
        pass

    def update(self, *args, **kwargs):
        raise RuntimeError("a vzoo converted layer keeps a recurrent state; nothing may append keys to its cache layer")

    def get_seq_length(self) -> int:
        return self._count

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._count + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.clear()
        self.seen = self._count = 0
        self.is_initialized = False

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name, value in self.items():
            if torch.is_tensor(value):
                self[name] = fn(value)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("a recurrent state cannot be cropped (assisted decoding and cache rollback need attention layers)")

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass


def layer_state(cache, layer_idx: int, tokens: int) -> RecurrentState | None:
    """The :class:`RecurrentState` of layer ``layer_idx`` inside the transformers ``cache`` (``None``
    without a cache). Call it once per forward of the layer with the ``tokens`` of the call: ``.seen``
    is then the number of tokens before this call."""
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} has no per-layer storage; vzoo converted layers need a transformers Cache "
                        "(DynamicCache, the default of generate())")
    if getattr(cache, "layer_class_to_replicate", None) is not None:
        while len(layers) <= layer_idx:
            layers.append(cache.layer_class_to_replicate())
    if layer_idx >= len(layers):
        raise ValueError(f"the cache has {len(layers)} layers, so no room for layer {layer_idx}")
    state = layers[layer_idx]
    if not isinstance(state, RecurrentState):
        if getattr(state, "is_initialized", False) and state.get_seq_length():
            raise ValueError(f"cache layer {layer_idx} already holds {state.get_seq_length()} attention tokens; start a new "
                             "cache after vzoo.lm.convert")
        state = layers[layer_idx] = RecurrentState()
    state.seen, state._count = state._count, state._count + tokens
    state.is_initialized = True
    return state


def token_validity(attention_mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """bool ``[B, tokens]``: which of a call's ``tokens`` new tokens are real (``False``: padding), read
    from the diagonal of transformers' ``[B, 1, tokens, kv]`` mask (bool, or additive with 0 = keep);
    ``None`` when nothing is padded."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4 or attention_mask.shape[2] != tokens:
        raise ValueError(f"attention_mask must be [B, 1, {tokens}, kv] here, got {tuple(attention_mask.shape)}")
    mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    kv = mask.shape[-1]
    idx = torch.arange(tokens, device=mask.device)
    valid = mask[:, 0, idx, kv - tokens + idx]
    return None if bool(valid.all()) else valid


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"{type(model).__name__}: expected a transformers causal LM with model.layers[i].self_attn "
                         "(Llama, Qwen2, Mistral, ...)")
    return layers


def _apply(model: nn.Module, config, init: bool) -> None:
    entry = lm_layer(config)
    layers = _decoder_layers(model)
    chosen = select_layers(f"{type(config).__name__}.layers", config.layers, len(layers))
    text_config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    if getattr(text_config, "attn_logit_softcapping", None) is not None:
        raise ValueError(f"{entry.label}: attention logit soft-capping (attn_logit_softcapping) is not supported")
    for i in chosen:
        old = layers[i].self_attn
        if hasattr(old, "vzoo_layer"):
            raise ValueError(f"layer {i} was already converted to {old.vzoo_layer}; convert each layer once")
        weight = next(old.parameters())
        new = entry.layer(config, text_config, i)
        if init:
            new.init_from_attention(old)
        new.vzoo_layer = entry.name
        layers[i].self_attn = new.to(device=weight.device, dtype=weight.dtype)


def convert(model: nn.Module, config, local_window: int | None = None) -> nn.Module:
    """Turn a transformers causal LM into a hybrid, in place: the decoder layers ``config.layers``
    names get the method's layer (initialised from their attention's weights where the shapes allow);
    the others keep softmax attention, limited to a causal sliding window of ``local_window`` tokens
    when given (the papers' hybrids, e.g. RAT interleaved with local attention; through
    ``LongGenConfig(sink=0, window=local_window)``). Returns ``model``, which trains with an ordinary
    loop and generates with ``generate()``; ``save_pretrained`` then :func:`load_converted` round-trips."""
    if local_window is not None and (not isinstance(local_window, int) or local_window < 1):
        raise ValueError(f"local_window={local_window!r} must be None or an int >= 1")
    _apply(model, config, init=True)
    record = list(getattr(model.config, "vzoo_conversion", None) or [])
    record.append({"method": lm_layer(config).name, "config": dataclasses.asdict(config), "local_window": local_window})
    model.config.vzoo_conversion = record
    if local_window is not None:  # the softmax layers that are left
        _local(model, local_window)
    return model


def _local(model: nn.Module, window: int):
    from .apply import apply_sparse_attention
    from .longgen import LongGenConfig

    return apply_sparse_attention(model, LongGenConfig(pattern="sink_window", sink=0, window=window, full_layers=()))


def _from_record(record: dict):
    entry = _LAYERS.get(record.get("method"))
    if entry is None:
        raise ValueError(f"saved conversion names method {record.get('method')!r}; known: {sorted(_LAYERS)}")
    fields = {f.name for f in dataclasses.fields(entry.config)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in record["config"].items() if k in fields}
    return entry.config(**kwargs)


def load_converted(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> nn.Module:
    """Load a model that :func:`convert` changed and ``save_pretrained`` wrote to ``path``: the base
    architecture from ``config.json``, the recorded conversions re-applied, then every weight from the
    safetensors files (missing or unexpected weights are an error, tied ones excepted)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    config = AutoConfig.from_pretrained(path)
    records = getattr(config, "vzoo_conversion", None)
    if not records:
        raise ValueError(f"{path}/config.json has no vzoo_conversion: not a model saved after vzoo.lm.convert")
    model = AutoModelForCausalLM.from_config(config)  # model.config keeps vzoo_conversion
    for record in records:
        _apply(model, _from_record(record), init=False)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file} is missing (save with model.save_pretrained({path!r}))")
        state.update(load_file(file))
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: weights do not match the converted model: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    model.tie_weights()
    windows = [r["local_window"] for r in records if r.get("local_window") is not None]
    if windows:
        _local(model, windows[-1])
    return model.to(device=device, dtype=dtype).eval()
