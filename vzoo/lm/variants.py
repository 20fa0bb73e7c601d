"""Deconstructing Attention (Xue, Moosavi, Aletras; arXiv 2510.11602): variants of dot-product attention
that each relax one of its design principles, on every layer or in hybrids that keep standard attention
in the other layers (``layers``).

What was checked (public pages, December 2026; no official code was found): the abstract names the four
principles (token mixing across positions, sequence-dependent weights, the dot-product + softmax form,
queries and keys coupled to the current layer's hidden state), the all-layers and hybrid settings and the
findings (no mixing collapses to near-random; form and sequence dependency can be relaxed, especially in
hybrids; variants that fail alone work interleaved with standard attention). The variant names
``RndEmbQK``, ``FixedSeqQK``, ``StaticEmbQK``, ``Approximate`` and ``Non-approximate`` come only from a
third-party summary; their exact definitions could not be read. The variants here therefore carry
descriptive names; the likely paper counterpart in brackets is NOT verified. Each gives weights ``w[i, j]``
over the keys ``j`` query ``i`` may see (causal, the model's window, padding); the output is
``sum_j w[i, j] v_j``:

- ``standard``: the model's own softmax attention (the baseline).
- ``no_mixing``: ``o_i = v_i``, no token mixing [the paper's no-mixing control].
- ``random_qk``: softmax of Q·K, with Q, K this layer's projections of fixed random per-position vectors:
  weights independent of the input [RndEmbQK].
- ``static_mixing``: softmax of learned logits ``P[h, i, j]``, a static causal row-stochastic matrix per
  head: independent of the input [sequence-independent, FixedSeqQK-like].
- ``embedding_qk``: softmax of Q·K, with Q, K this layer's projections of the layer-0 token embeddings
  instead of its hidden state [StaticEmbQK].
- ``elu_kernel``: ``phi(q_i)·phi(k_j) / sum_j' phi(q_i)·phi(k_j')`` with ``phi = elu + 1``, a positive
  kernel in place of softmax's exponential [Approximate?].
- ``sigmoid``: ``sigmoid(s q_i·k_j - log n_i)`` with ``n_i`` the keys row ``i`` sees, not normalised
  (sigmoid attention's bias) [Non-approximate?].

Q and K built from another source (``random_qk``, ``embedding_qk``) go through the decoder layer's input
norm, the layer's ``q_proj`` / ``k_proj`` (and ``q_norm`` / ``k_norm`` where the model has them) and the
model's RoPE at the tokens' ``position_ids``, i.e. only the input of the Q/K projections changes. Values
always come from the hidden state. Parameters and state a variant owns are attached to the patched layer
(:func:`attach_variant`): the static logits (``vzoo_static_logits``, trained with the model), the random
vectors (a buffer), a forward hook on the input embeddings, and the record of positions (and embeddings)
of the tokens already in the KV cache, so cached generation equals recomputation.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Attachment, dense_attention, masked_softmax, select_layers, visible_mask
from .registry import LMMethod, register_lm_method

__all__ = ["VARIANTS", "AttentionVariantConfig", "attach_variant", "variant_attention", "variant_weights"]

VARIANTS = ("standard", "no_mixing", "random_qk", "static_mixing", "embedding_qk", "elu_kernel", "sigmoid")
_POSITIONAL = ("random_qk", "static_mixing", "embedding_qk")  # keep a per-layer record of the cached tokens


@dataclass(frozen=True)
class AttentionVariantConfig:
    """One Deconstructing-Attention variant (see the module docstring).

    Args:
        variant: one of :data:`VARIANTS`.
        layers: layers that run the variant (``None``: all); the others keep standard attention (the
            paper's hybrids, e.g. every other layer). ``()`` changes nothing.
        max_len: positions ``random_qk`` and ``static_mixing`` cover (their tables are ``max_len`` long;
            ``static_mixing`` owns ``heads * max_len**2`` parameters per layer).
        seed: seed of ``random_qk``'s fixed random vectors.
    """

    variant: str
    layers: tuple[int, ...] | None = None
    max_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"AttentionVariantConfig.variant={self.variant!r} must be one of {VARIANTS}")
        if self.layers is not None and (not isinstance(self.layers, tuple)
                                        or not all(isinstance(i, int) and i >= 0 for i in self.layers)):
            raise ValueError(f"AttentionVariantConfig.layers={self.layers!r} must be None or a tuple of non-negative ints")
        if not isinstance(self.max_len, int) or self.max_len < 1:
            raise ValueError(f"AttentionVariantConfig.max_len={self.max_len!r} must be a positive int")
        if not isinstance(self.seed, int):
            raise ValueError(f"AttentionVariantConfig.seed={self.seed!r} must be an int")

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        """The layers that run the variant."""
        return select_layers("AttentionVariantConfig.layers", self.layers, num_layers)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half convention) on ``x [B, H, N, D]`` with ``cos, sin [B, N, D]``."""
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]


class _LayerState:
    """What a patched layer of a positional variant keeps between calls: the positions ``[B, kv]`` (and,
    for ``embedding_qk``, the layer-0 embeddings ``[B, kv, hidden]``) of the tokens its KV cache holds,
    the model's rotary embedding and the decoder layer's input norm (plain references, not submodules)."""

    def __init__(self, rotary: nn.Module | None, norm: nn.Module, layer_type: str | None) -> None:
        self.rotary, self.norm = rotary, norm
        accepts = rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters
        self.rope_kwargs = {"layer_type": layer_type} if accepts else {}
        self.pending: torch.Tensor | None = None  # embeddings of the current forward pass (hook)
        self.positions: torch.Tensor | None = None
        self.embeds: torch.Tensor | None = None

    def capture(self, embeds: torch.Tensor) -> None:
        self.pending = embeds

    def record(self, kv: int, sq: int, batch: int, position_ids: torch.Tensor | None, device, needs_embeds: bool) -> None:
        """Append this call's ``sq`` tokens (a prompt without cache, ``kv == sq``, starts afresh)."""
        pos = torch.arange(kv - sq, kv, device=device)[None] if position_ids is None else position_ids[:, -sq:]
        pos = pos.expand(batch, sq)
        new = None
        if needs_embeds:
            new, self.pending = self.pending, None
            if new is None or tuple(new.shape[:2]) != (batch, sq):
                raise ValueError(
                    "embedding_qk needs the input embeddings of this forward pass: call the model with input_ids "
                    f"(got {None if new is None else tuple(new.shape)} for {sq} new tokens)"
                )
        if kv == sq or self.positions is None:
            self.positions, self.embeds = pos, new
        else:
            self.positions = torch.cat([self.positions, pos], 1)
            self.embeds = None if new is None else torch.cat([self.embeds, new], 1)
        if self.positions.shape[1] != kv:
            raise ValueError(f"the variant's record holds {self.positions.shape[1]} tokens but the KV cache {kv}; "
                             "start a new cache after apply_sparse_attention")


def _rotary_module(model: nn.Module) -> nn.Module:
    rotary = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    if rotary is None:
        raise ValueError(f"{type(model).__name__}: no rotary embedding module found (random_qk / embedding_qk need RoPE)")
    return rotary


def attach_variant(model: nn.Module, module: nn.Module, config: AttentionVariantConfig) -> Attachment | None:
    """Give the patched attention ``module`` what ``config.variant`` owns: ``static_mixing`` its logits
    ``vzoo_static_logits [H, max_len, max_len]`` (a parameter, zeros: uniform causal averaging at start);
    ``random_qk`` its vectors ``vzoo_random_vectors [max_len, hidden]`` (a buffer, N(0, 1) from ``seed``);
    ``embedding_qk`` a forward hook on the model's input embeddings; positional variants a
    ``vzoo_variant`` record of the cached tokens."""
    if config.variant not in _POSITIONAL:
        return None
    ref = module.q_proj.weight
    heads, hidden = module.config.num_attention_heads, module.q_proj.in_features
    layer = next((m for m in model.modules() if getattr(m, "self_attn", None) is module), None)
    norm = getattr(layer, "input_layernorm", None) or nn.Identity()
    rotary = None if config.variant == "static_mixing" else _rotary_module(model)
    state = _LayerState(rotary, norm, getattr(module, "layer_type", None))
    attrs, hooks = ["vzoo_variant"], []
    if config.variant == "static_mixing":
        module.vzoo_static_logits = nn.Parameter(torch.zeros(heads, config.max_len, config.max_len, device=ref.device, dtype=ref.dtype))
        attrs.append("vzoo_static_logits")
    elif config.variant == "random_qk":
        vectors = torch.randn(config.max_len, hidden, generator=torch.Generator().manual_seed(config.seed))
        module.register_buffer("vzoo_random_vectors", vectors.to(ref.device, ref.dtype), persistent=False)
        attrs.append("vzoo_random_vectors")
    else:
        hooks.append(model.get_input_embeddings().register_forward_hook(lambda mod, args, out: state.capture(out)))
    module.vzoo_variant = state
    return Attachment(module, tuple(attrs), tuple(hooks))


def _sourced_qk(module: nn.Module, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's queries ``[B, H, N, D]`` and keys ``[B, Hkv, N, D]`` of the Q/K input ``x [B, N, hidden]``
    at ``positions [B, N]``: input norm, projections, per-head norms where the model has them, RoPE."""
    state: _LayerState = module.vzoo_variant
    b, n, _ = x.shape
    x = state.norm(x)
    q = module.q_proj(x).view(b, n, -1, module.head_dim)
    k = module.k_proj(x).view(b, n, -1, module.head_dim)
    if hasattr(module, "q_norm"):
        q, k = module.q_norm(q), module.k_norm(k)
    cos, sin = state.rotary(x, positions, **state.rope_kwargs)
    return _rope(q.transpose(1, 2), cos, sin), _rope(k.transpose(1, 2), cos, sin)


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], 1)


def variant_weights(
    config: AttentionVariantConfig, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
    scale: float, module: nn.Module | None = None, sliding_window: int | None = None,
) -> torch.Tensor:
    """The mixing weights ``[B, H, q, kv]`` (fp32, or fp64 for fp64 inputs) of ``config.variant`` for ``query [B, H, q, D]`` (after
    RoPE; the last ``q`` of the ``kv`` positions) over ``key [B, Hkv, kv, D]``; zero outside the visible
    keys. Positional variants read the patched ``module``'s record of this call (see :func:`attach_variant`)."""
    b, h, sq, _ = query.shape
    skv = key.shape[2]
    allowed = visible_mask(attention_mask, sq, skv, sliding_window, query.device)
    variant, dtype = config.variant, torch.promote_types(query.dtype, torch.float32)
    if variant == "no_mixing":
        own = torch.arange(sq, device=query.device)[:, None] + (skv - sq) == torch.arange(skv, device=query.device)
        return own.to(dtype).expand(b, h, sq, skv)
    if variant in _POSITIONAL:
        state: _LayerState = module.vzoo_variant
        pos = state.positions.clamp_min(0)  # padding may carry negative ids; it is masked anyway
        if variant != "embedding_qk" and int(pos.max()) >= config.max_len:
            raise ValueError(f"position {int(pos.max())} is beyond AttentionVariantConfig.max_len={config.max_len}")
        if variant == "static_mixing":
            logits = module.vzoo_static_logits[:, pos[:, -sq:, None], pos[:, None, :]]  # [H, B, q, kv]
            return masked_softmax(logits.transpose(0, 1).to(dtype), allowed)
        x = module.vzoo_random_vectors[pos] if variant == "random_qk" else state.embeds
        q_all, key = _sourced_qk(module, x.to(query.dtype), pos)
        query = q_all[:, :, -sq:]
    k, q = _expand(key, h).to(dtype), query.to(dtype)
    if variant == "elu_kernel":
        w = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2) * allowed
        return w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    scores = q @ k.transpose(-1, -2) * scale
    if variant == "sigmoid":
        count = allowed.sum(-1, keepdim=True).clamp_min(1)
        return torch.sigmoid(scores - count.to(dtype).log()) * allowed
    return masked_softmax(scores, allowed)  # standard, random_qk, embedding_qk


def variant_attention(
    config: AttentionVariantConfig, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scale: float, module: nn.Module | None = None,
    position_ids: torch.Tensor | None = None, sliding_window: int | None = None, **_,
) -> torch.Tensor:
    """``config.variant`` over ``query [B, H, q, D]`` (after RoPE), ``key, value [B, Hkv, kv, D]`` (after
    the cache update); returns ``[B, H, q, D]``. ``standard`` is the model's own attention (SDPA)."""
    b, h, sq, _ = query.shape
    if config.variant == "standard":
        return dense_attention(query, key, value, attention_mask, scale, sliding_window)
    if config.variant == "no_mixing":
        return _expand(value[:, :, -sq:], h)
    if config.variant in _POSITIONAL:
        module.vzoo_variant.record(key.shape[2], sq, b, position_ids, query.device, config.variant == "embedding_qk")
    w = variant_weights(config, query, key, attention_mask, scale, module, sliding_window)
    return (w @ _expand(value, h).to(w.dtype)).to(value.dtype)


register_lm_method(LMMethod(
    config=AttentionVariantConfig, attn_implementation="vzoo_variants", label="Deconstructed attention",
    attention=variant_attention,
    paper="Deconstructing Attention: Investigating Design Principles for Effective Language Modeling (2025)",
    arxiv="2510.11602", ops=(),
    status="no mixing, random / static / embedding Q-K, elu-kernel and sigmoid forms, all layers or hybrid; "
           "variant definitions not verified against the paper",
    attach=attach_variant,
    full_cache=lambda config: config.variant in _POSITIONAL,
    bench=lambda tokens: {"no token mixing": AttentionVariantConfig("no_mixing")},
    contract=lambda: {"variants-standard": AttentionVariantConfig("standard"),
                      "variants-no-layers": AttentionVariantConfig("no_mixing", layers=())},
))
