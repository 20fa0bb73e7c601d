"""Lightning Attention as a module swap: TransNormerLLM's gated linear attention layer (Qin et al.,
TransNormerLLM, arXiv 2307.14995; Lightning Attention-2, arXiv 2401.04658).

``vzoo.lm.convert(model, LightningConfig(layers=(1,)))`` replaces those decoder layers' ``self_attn`` by
:class:`LightningAttention`, the token mixer of TransNormerLLM (``NormLinearAttention`` in its Hugging
Face ``modeling_transnormer.py``; OpenNLPLab/TransnormerLLM):

``q = phi(x W_q)``, ``k = phi(x W_k)``, ``v = x W_v``, ``u = x W_u``; ``o = LightningAttention(q, k, v;
lambda_h)`` (causal linear attention with the per-head decay, unnormalised); ``out = (Norm(o) * u) W_o``,
``phi = SiLU`` and ``Norm`` = SRMSNorm (``x / rms(x)`` over all heads' channels, no weight).

``q, k, v, o`` projections are copied from the replaced attention (GQA kept: one key/value head serves
``H / Hkv`` query heads, each query head with its own decay and state); ``W_u`` is new. RoPE is not used
(TransNormerLLM has no rotary embedding). Decay rates: ``"alibi"``, TransNormerLLM's slopes scaled by
depth, ``slopes * (1 - layer_idx / (L - 1) + 1e-5)``; ``"fla"``, fla's ``(8 / H)(1 - layer_idx / L) h``;
``"none"``. Decoding keeps the state ``state["kv"] [B, H, D, Dv]`` (fp32) and advances it one token at a
time (:func:`vzoo.kernels.lightning.lightning_attention_step`); a prefill starts from the cached state.
Left padding is exact: pad tokens' keys and values are zeroed, so they add nothing to the state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vzoo.kernels.lightning import fla_decay, lightning_attention, lightning_attention_step, transnormer_decay

from .convert import LMLayer, ModelDims, check_layers, copy_projections, layer_state, register_lm_layer, token_validity

__all__ = ["LightningAttention", "LightningConfig"]

_DECAYS = ("alibi", "fla", "none")
_ACTIVATIONS = ("silu", "relu", "identity")
_NORMS = ("srms", "rms")
_GATES = ("linear", "sigmoid", "none")


@dataclass(frozen=True)
class LightningConfig:
    """Args:
        layers: decoder layers to convert (``None``: all).
        decay: ``"alibi"`` (TransNormerLLM: ALiBi-style slopes scaled by depth), ``"fla"`` (fla's
            ``chunk_lightning_attn`` rates) or ``"none"``.
        chunk_size: tokens per Lightning-2 block.
        activation: ``phi`` on queries and keys: ``"silu"`` (TransNormerLLM), ``"relu"``, ``"identity"``.
        norm: on the attention output over all heads' channels: ``"srms"`` (TransNormerLLM's SRMSNorm, no
            weight) or ``"rms"`` (RMSNorm with a learnable weight); eps is the model's ``rms_norm_eps``.
        gate: output gate ``u``: ``"linear"`` (TransNormerLLM, ``u = x W_u``), ``"sigmoid"`` (``sigmoid(x W_u)``)
            or ``"none"``.
        scale: multiplies ``q`` (1.0 in TransNormerLLM; the norm makes the output scale-free).
        backend: kernel backend, ``"torch"`` | ``"reference"`` | ``"triton"`` or ``None`` (the
            :func:`vzoo.kernels.use_backend` override, else triton on CUDA, else torch).
    """

    layers: tuple[int, ...] | None = None
    decay: str = "alibi"
    chunk_size: int = 64
    activation: str = "silu"
    norm: str = "srms"
    gate: str = "linear"
    scale: float = 1.0
    backend: str | None = None

    def __post_init__(self) -> None:
        check_layers("LightningConfig", self.layers)
        for name, allowed in (("decay", _DECAYS), ("activation", _ACTIVATIONS), ("norm", _NORMS), ("gate", _GATES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"LightningConfig.{name}={getattr(self, name)!r} must be one of {allowed}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"LightningConfig.chunk_size={self.chunk_size!r} must be an int >= 1")
        number = isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool)
        if not number or not math.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"LightningConfig.scale={self.scale!r} must be a finite number > 0")
        if self.backend not in (None, "torch", "reference", "triton"):
            raise ValueError(f"LightningConfig.backend={self.backend!r} must be None, 'torch', 'reference' or 'triton'")


class LightningAttention(nn.Module):
    """Drop-in ``self_attn``: ``hidden_states [B, T, C]`` -> ``(out [B, T, C], None)``."""

    def __init__(self, config: LightningConfig, model_config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        dims = ModelDims.of(model_config)
        self.num_heads, self.num_kv_heads, self.head_dim, self.eps = dims.heads, dims.kv_heads, dims.head_dim, dims.eps
        inner = self.num_heads * self.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = dims.projections()
        self.u_proj = nn.Linear(dims.hidden, inner, bias=False) if config.gate != "none" else None
        self.norm_weight = nn.Parameter(torch.ones(inner)) if config.norm == "rms" else None
        if config.decay == "alibi":
            rates = transnormer_decay(self.num_heads, layer_idx, dims.num_layers)
        elif config.decay == "fla":
            rates = fla_decay(self.num_heads, layer_idx, dims.num_layers)
        else:
            rates = None
        self.rates = None if rates is None else tuple(rates.tolist())  # kept in fp32 whatever the model dtype
        self._rates_cache: dict[torch.device, torch.Tensor] = {}

    def init_from_attention(self, attn: nn.Module) -> None:
        """Copy ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (weights and biases) from the replaced attention."""
        copy_projections(self, attn)

    def decay(self, device: torch.device) -> torch.Tensor | None:
        """The per-head rates ``[H]`` (float32 on ``device``), or ``None`` without decay."""
        if self.rates is None:
            return None
        if device not in self._rates_cache:
            self._rates_cache[device] = torch.tensor(self.rates, dtype=torch.float32, device=device)
        return self._rates_cache[device]

    def _phi(self, x: torch.Tensor) -> torch.Tensor:
        act = self.config.activation
        return F.silu(x) if act == "silu" else F.relu(x) if act == "relu" else x

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.get("past_key_values")
        b, t, _ = hidden_states.shape
        c = self.config
        q = self._phi(self.q_proj(hidden_states)).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self._phi(self.k_proj(hidden_states)).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
        valid = token_validity(attention_mask, t)  # [B, T] or None
        if valid is not None:  # pad tokens add nothing to the state
            keep = valid[:, None, :, None].to(k.dtype)
            k, v = k * keep, v * keep
        state = layer_state(cache, self.layer_idx, t)
        h0 = state.get("kv") if state is not None else None
        rates = self.decay(hidden_states.device)
        if t == 1 and h0 is not None:
            o, new = lightning_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], h0, rates, c.scale)
            o = o[:, :, None]
        else:
            o, new = lightning_attention(q, k, v, rates, h0, True, c.scale, c.chunk_size, backend=c.backend)
        if state is not None:
            state["kv"] = new
        o = o.transpose(1, 2).reshape(b, t, -1).float()
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.norm_weight is not None:
            o = o * self.norm_weight.float()
        o = o.to(hidden_states.dtype)
        if self.u_proj is not None:
            u = self.u_proj(hidden_states)
            o = o * (torch.sigmoid(u) if c.gate == "sigmoid" else u)
        return self.o_proj(o), None


register_lm_layer(LMLayer(
    config=LightningConfig, name="lightning", label="Lightning Attention (TransNormerLLM)", layer=LightningAttention,
    paper="Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models",
    arxiv="2401.04658", ops=("lightning_attention",),
    status="exact, tested (chunked Lightning-2 == quadratic reference == token recurrence; layer == a float64 "
           "re-implementation); padding exact (pad keys/values zeroed); decoding keeps a [B, H, D, D] state",
))
