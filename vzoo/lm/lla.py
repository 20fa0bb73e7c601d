"""Local Linear Attention as a module swap (Zuo et al., arXiv 2510.01450; FlashLLA,
github.com/Yifei-Zuo/FlashLLA).

``vzoo.lm.convert(model, LLAConfig(layers=(1,)))`` replaces those decoder layers' ``self_attn`` by
:class:`LocalLinearAttention`: the same q/k/v/o projections (copied from the attention, GQA kept) and
RoPE, with softmax attention replaced by :func:`vzoo.kernels.lla.local_linear_attention` (each query's
output is the intercept of a kernel-weighted local linear regression of the values on the keys). The
decoding state is the key/value cache (``state["k"]``, ``state["v"]``, ``[B, Hkv, T, D]``): a new token
is one query over it. Left padding is exact: pad keys get zero weight (``state["valid"]`` remembers
which cached tokens were padding). A large ``ridge`` gives back softmax attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from vzoo.kernels.lla import local_linear_attention

from .convert import LMLayer, ModelDims, check_layers, copy_projections, layer_state, register_lm_layer, token_validity

__all__ = ["LLAConfig", "LocalLinearAttention"]


@dataclass(frozen=True)
class LLAConfig:
    """Args:
        layers: decoder layers to convert (``None``: all).
        ridge: ``lambda >= 0``; the slope penalty is ``lambda * omega_i`` (weight sum). Large: softmax attention.
        cg_max_iters, cg_tol: conjugate-gradient budget and relative residual tolerance (``torch`` backend).
        block_size: independent diagonal sub-blocks of ``Sigma`` (must divide the head dim); ``None``: one.
        chunk_size: keys per tile of the streamed passes.
        backend: ``"torch"`` (streamed, CG) or ``"reference"`` (dense solve); ``None``: the
            :func:`vzoo.kernels.use_backend` override, else ``torch``.
    """

    layers: tuple[int, ...] | None = None
    ridge: float = 10.0
    cg_max_iters: int = 32
    cg_tol: float = 1e-6
    block_size: int | None = None
    chunk_size: int = 64
    backend: str | None = None

    def __post_init__(self) -> None:
        check_layers("LLAConfig", self.layers)
        for name, low in (("ridge", 0.0), ("cg_tol", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
                raise ValueError(f"LLAConfig.{name}={value!r} must be a finite number >= {low}")
        for name, low in (("cg_max_iters", 0), ("chunk_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"LLAConfig.{name}={value!r} must be an int >= {low}")
        if self.block_size is not None and (
            isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1
        ):
            raise ValueError(f"LLAConfig.block_size={self.block_size!r} must be None or an int >= 1")
        if self.backend not in (None, "torch", "reference"):
            raise ValueError(f"LLAConfig.backend={self.backend!r} must be None, 'torch' or 'reference'")


class LocalLinearAttention(nn.Module):
    """Drop-in ``self_attn``: ``hidden_states [B, T, C]`` -> ``(out [B, T, C], None)``."""

    def __init__(self, config: LLAConfig, model_config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        dims = ModelDims.of(model_config)
        self.num_heads, self.num_kv_heads, self.head_dim = dims.heads, dims.kv_heads, dims.head_dim
        if config.block_size is not None and self.head_dim % config.block_size:
            raise ValueError(f"LLAConfig.block_size={config.block_size} must divide the head dim {self.head_dim}")
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = dims.projections()

    def init_from_attention(self, attn: nn.Module) -> None:
        """Copy ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (weights and biases) from the replaced attention."""
        copy_projections(self, attn)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cache = cache if cache is not None else kwargs.get("past_key_values")
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        valid = token_validity(attention_mask, t)  # [B, T] or None
        state = layer_state(cache, self.layer_idx, t)
        if state is not None:
            if "k" in state:
                k, v = torch.cat([state["k"], k], 2), torch.cat([state["v"], v], 2)
            if valid is not None or "valid" in state:
                past = state.get("valid")
                if past is None:
                    past = torch.ones(b, state.seen, dtype=torch.bool, device=k.device)
                valid = torch.cat([past, torch.ones(b, t, dtype=torch.bool, device=k.device) if valid is None else valid], 1)
                state["valid"] = valid
            state["k"], state["v"] = k, v
        c = self.config
        out = local_linear_attention(q, k, v, ridge=c.ridge, causal=True, cg_max_iters=c.cg_max_iters, cg_tol=c.cg_tol,
                                     block_size=c.block_size, chunk_size=c.chunk_size, backend=c.backend, key_mask=valid)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), None


register_lm_layer(LMLayer(
    config=LLAConfig, name="lla", label="Local Linear Attention", layer=LocalLinearAttention,
    paper="Local Linear Attention: An Optimal Interpolation of Linear and Softmax Attention For Test-Time Regression",
    arxiv="2510.01450", ops=("local_linear_attention",),
    status="exact, tested (dense closed form and streamed CG agree; large ridge == softmax attention); "
           "padding exact (pad keys get zero weight); decoding keeps the key/value cache",
))
