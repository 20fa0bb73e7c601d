"""RAT as a module swap (Wei, Yadav, Pascanu, Gulcehre, "RAT: Bridging RNN Efficiency and Attention Accuracy in
Language Modeling", arXiv 2507.04416; reference ``CLAIRE-Labo/RAT`` ``src/model/backbone/rat/rat.py``).

``vzoo.lm.convert(model, RATConfig(layers=(1, 3)))`` replaces those decoder layers' ``self_attn`` by
:class:`RATLayer`: projections give the output gate ``z = sigmoid(W_z x)``, values ``v`` (``H`` heads), the
forget gate ``g = sigmoid(W_g x + b_g)`` (``b_g`` initialised to ``log U(1, L - 1)``, computed in float32) and
queries / keys of ``ngroups`` shared groups (head ``h`` uses group ``h // (H / ngroups)``); then
:func:`vzoo.kernels.rat.rat_attention` (gated recurrence inside chunks of ``L`` tokens, softmax attention over
the previous chunks' final states plus the own state, RoPE at chunk numbers) and ``W_o(z * attn)``. The
decoder layer adds the residual.

Differences from the reference layer: it normalises its input with its own RMSNorm; here the decoder layer's
``input_layernorm`` already did, so there is no second norm. The reference fuses the projections into one
``in_proj`` (no biases) and tiles the shared groups (head ``h`` uses group ``h % ngroups``); here they are
separate linears (``q/k/v/o`` with the model's ``attention_bias``) and the GQA order, which is the same
model up to a permutation of heads. ``init_from_attention`` copies ``o_proj``, ``v_proj`` (a key-value head
for every query head that read it) and, per group, the query of its first head and the key-value head that
query read; the gates keep their fresh initialisation.

Cache (``layer_state``): ``keys`` / ``values`` ``[B, H, C, D]`` (the final states of the finished chunks,
``C`` rows of capacity), ``key_run`` / ``value_run`` ``[B, H, D]``; the position comes from the cache's token
count, so a prompt may end inside a chunk. Padded batches are refused (chunk boundaries are token positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from vzoo.kernels.rat import RATState, rat_attention, rat_step

from .convert import LMLayer, ModelDims, check_layers, copy_projections, layer_state, register_lm_layer, token_validity

__all__ = ["RATConfig", "RATLayer"]

_STATE = ("keys", "values", "key_run", "value_run")


@dataclass(frozen=True)
class RATConfig:
    """Args:
        layers: decoder layers to convert (``None``: all).
        chunk_size: ``L``, tokens per chunk (the paper's best trade-off is 16; the reference layer default 64).
        ngroups: shared query / key groups (must divide the attention heads); the reference uses 2.
        rope_base: base of the inter-chunk RoPE (the reference's ``InterRoPE``: 10000).
        backend: ``"torch"`` or ``"reference"`` for :func:`vzoo.kernels.rat.rat_attention`; ``None``: the
            :func:`vzoo.kernels.use_backend` override, else ``torch``.
    """

    layers: tuple[int, ...] | None = None
    chunk_size: int = 16
    ngroups: int = 2
    rope_base: float = 10000.0
    backend: str | None = None

    def __post_init__(self) -> None:
        check_layers("RATConfig", self.layers)
        for name in ("chunk_size", "ngroups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RATConfig.{name}={value!r} must be an int >= 1")
        base = self.rope_base
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not math.isfinite(base) or base <= 0:
            raise ValueError(f"RATConfig.rope_base={base!r} must be a positive finite number")
        if self.backend not in (None, "torch", "reference"):
            raise ValueError(f"RATConfig.backend={self.backend!r} must be None, 'torch' or 'reference'")


class RATLayer(nn.Module):
    """Drop-in ``self_attn``: ``hidden_states [B, T, C]`` -> ``(out [B, T, C], None)``."""

    def __init__(self, config: RATConfig, model_config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        dims = ModelDims.of(model_config)
        hidden, bias, qkv_bias = dims.hidden, dims.bias, dims.qkv_bias
        self.num_heads, self.num_kv_heads, self.head_dim = dims.heads, dims.kv_heads, dims.head_dim
        if self.num_heads % config.ngroups:
            raise ValueError(f"RATConfig.ngroups={config.ngroups} must divide the {self.num_heads} attention heads")
        if self.head_dim % 2:
            raise ValueError(f"RAT's inter-chunk RoPE needs an even head dim, got {self.head_dim}")
        width, groups = self.num_heads * self.head_dim, config.ngroups * self.head_dim
        self.q_proj = nn.Linear(hidden, groups, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, groups, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, width, bias=qkv_bias)
        self.o_proj = nn.Linear(width, hidden, bias=bias)
        self.z_proj = nn.Linear(hidden, width, bias=False)  # output gate
        self.g_proj = nn.Linear(hidden, width, bias=False)  # forget gate, with gate_bias
        self.gate_bias = nn.Parameter(torch.empty(width))
        self.reset_gate_bias()

    @torch.no_grad()
    def reset_gate_bias(self) -> None:
        """``log U(1, L - 1)`` (the reference's init: forget gates near 1 - 1/L ... 1/2); 0 when ``L <= 2``."""
        high = max(self.config.chunk_size - 1, 1)
        self.gate_bias.uniform_(1.0, float(high)).log_()

    @torch.no_grad()
    def init_from_attention(self, attn: nn.Module) -> None:
        """Copy ``o_proj``; ``v_proj`` expanded to every query head; for each group the query of its first head
        and the key-value head that head read (weights and biases, where the attention has them)."""
        d, per_group = self.head_dim, self.num_heads // self.config.ngroups
        src_heads = getattr(attn, "q_proj", None)
        if src_heads is None or src_heads.weight.shape[0] != self.num_heads * d:
            return
        per_kv = self.num_heads // self.num_kv_heads  # the attention's GQA: query head h reads kv head h // per_kv
        first = [g * per_group for g in range(self.config.ngroups)]
        copy_projections(self, attn, ("o_proj",))
        plans = {
            "v_proj": [h // per_kv for h in range(self.num_heads)],
            "q_proj": first,
            "k_proj": [h // per_kv for h in first],
        }
        for name, heads in plans.items():
            src, dst = getattr(attn, name, None), getattr(self, name)
            if src is None:
                continue
            rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads]).to(src.weight.device)
            if int(rows.max()) >= src.weight.shape[0]:
                continue
            dst.weight.copy_(src.weight.index_select(0, rows))
            if dst.bias is not None and getattr(src, "bias", None) is not None:
                dst.bias.copy_(src.bias.index_select(0, rows))

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.get("past_key_values")
        b, t, _ = hidden_states.shape
        if token_validity(attention_mask, t) is not None:
            raise ValueError("RAT does not support padded batches: chunk boundaries are token positions, so a "
                             "row shifted by padding would be chunked differently; run rows of different lengths "
                             "separately")
        h, d, groups = self.num_heads, self.head_dim, self.config.ngroups
        x = hidden_states
        q = self.q_proj(x).view(b, t, groups, d).transpose(1, 2).repeat_interleave(h // groups, dim=1)
        k = self.k_proj(x).view(b, t, groups, d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, h, d).transpose(1, 2)
        gate = torch.sigmoid((self.g_proj(x) + self.gate_bias).float()).view(b, t, h, d).transpose(1, 2)
        z = torch.sigmoid(self.z_proj(x))
        state = layer_state(cache, self.layer_idx, t)
        previous = None
        if state is not None and state.seen:
            previous = RATState(*(state[name] for name in _STATE), state.seen)
        c = self.config
        if state is None:
            out = rat_attention(q, k, v, gate, c.chunk_size, rope=c.rope_base, backend=c.backend)
        else:
            if t == 1:
                out, new = rat_step(q, k, v, gate, previous, c.chunk_size, rope=c.rope_base)
            else:
                out, new = rat_attention(q, k, v, gate, c.chunk_size, rope=c.rope_base, state=previous,
                                         return_state=True, backend=c.backend)
            for name in _STATE:
                state[name] = getattr(new, name)
        out = out.transpose(1, 2).reshape(b, t, h * d)
        return self.o_proj(z * out), None


register_lm_layer(LMLayer(
    config=RATConfig, name="rat", label="RAT (recurrence + attention over chunks)", layer=RATLayer,
    paper="RAT: Bridging RNN Efficiency and Attention Accuracy in Language Modeling", arxiv="2507.04416",
    ops=("rat_attention",),
    status="exact to the reference semantics, tested (chunked == token loop == decode steps); cache = one key/value "
           "state per finished chunk plus the running state, prompts may end inside a chunk; padded batches refused; "
           "new gates and shared q/k groups need fine-tuning",
))
