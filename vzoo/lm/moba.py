"""MoBA: Mixture of Block Attention for long-context LLMs (Lu et al., arXiv 2502.13189; MoonshotAI/MoBA).

Keys are cut into blocks of ``block_size`` positions. Each query scores the *complete past* blocks by
``q . mean(K_block)`` (fp32, no scale), keeps the ``topk - 1`` best of them and always its own block, in
which a token-level causal mask applies; blocks that end after the query are never candidates.

As in the official efficient version, the own block (causal) and the routed past blocks (entirely
before the query, so no mask) are computed separately and merged by log-sum-exp; the past part runs
per key block over the queries that chose it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vzoo.kernels import merge_attention_states, token_routed_attention

from .layers import Attachment, dense_attention, key_validity, run_dense, select_layers
from .registry import LMMethod, register_lm_method

__all__ = ["KeyConv", "MoBAConfig", "attach_key_conv", "moba_attention", "moba_routing"]


@dataclass(frozen=True)
class MoBAConfig:
    """MoBA settings (the tech report's 8K/32K runs: blocks of 512, top-3).

    FlashMoBA (arXiv 2511.11571) improves routing with small blocks (e.g. 128, top-8) and a short
    causal convolution on the keys; ``key_conv=w`` adds that as a trainable :class:`KeyConv` to each
    patched attention layer (identity at start, so a pretrained model is unchanged until trained).

    Args:
        block_size: key positions per block.
        topk: blocks per query, its own block included.
        layers: layer indices that use MoBA (``None``: all); the others keep SDPA.
        key_conv: width of the depthwise causal key convolution (0: none).
        dense_fallback: a call whose routing selects more of the causal (query, key) pairs than the
            break-even density of this device (:func:`vzoo.kernels.dense_is_faster`, op ``"moba"``)
            runs dense attention instead (MoBA and full attention are interchangeable by design):
            never slower than dense. ``False``: always the routing, as the official code.
        sink: always route to the first block (the attention sink pretrained models rely on) once it
            is complete and past; it takes one of the ``topk - 1`` routed slots. ``False``: the
            official rule, where the first block competes like any other.
    """

    block_size: int = 512
    topk: int = 3
    layers: tuple[int, ...] | None = None
    key_conv: int = 0
    dense_fallback: bool = True
    sink: bool = False

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        """The layers that use MoBA."""
        return select_layers("MoBAConfig.layers", self.layers, num_layers)

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"MoBAConfig.block_size={self.block_size!r} must be a positive int")
        if not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"MoBAConfig.topk={self.topk!r} must be a positive int (the own block counts)")
        if self.layers is not None and not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise ValueError(f"MoBAConfig.layers={self.layers!r} must be None or non-negative layer indices")
        if not isinstance(self.key_conv, int) or self.key_conv < 0:
            raise ValueError(f"MoBAConfig.key_conv={self.key_conv!r} must be a non-negative int (0: no convolution)")
        for name in ("dense_fallback", "sink"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MoBAConfig.{name}={getattr(self, name)!r} must be a bool")


class KeyConv(nn.Module):
    """Depthwise causal convolution along the sequence, per key/value head and channel (FlashMoBA's
    short key convolution): ``k [B, Hkv, S, D] -> [B, Hkv, S, D]``, position ``t`` mixing ``t - w + 1 .. t``.
    Starts as the identity (last tap 1). It runs on the full cached keys, so decoding stays exact."""

    def __init__(self, heads: int, head_dim: int, width: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.width = heads, head_dim, width
        weight = torch.zeros(heads * head_dim, 1, width)
        weight[:, 0, -1] = 1.0
        self.weight = nn.Parameter(weight)

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        b, h, s, d = k.shape
        if (h, d) != (self.heads, self.head_dim):
            raise ValueError(f"KeyConv for {self.heads} heads of {self.head_dim} got keys {tuple(k.shape)}")
        x = k.permute(0, 1, 3, 2).reshape(b, h * d, s)
        y = F.conv1d(F.pad(x, (self.width - 1, 0)), self.weight.to(k.dtype), groups=h * d)
        return y.view(b, h, d, s).permute(0, 1, 3, 2)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, width={self.width}"


def attach_key_conv(model: nn.Module, module: nn.Module, config: MoBAConfig) -> Attachment | None:
    """Give a patched attention ``module`` its trainable ``vzoo_key_conv`` (when ``config.key_conv``)."""
    if not config.key_conv:
        return None
    ref = module.k_proj.weight
    heads = module.config.num_key_value_heads
    module.vzoo_key_conv = KeyConv(heads, module.head_dim, config.key_conv).to(ref.device, ref.dtype)
    return Attachment(module, ("vzoo_key_conv",))


@torch.no_grad()
def moba_routing(
    q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int, window: int | None = None, sink: bool = False
) -> torch.Tensor:
    """Key-block ids per query ``[B, H, Sq, topk]`` (``-1`` unused): slot 0 is the own block, then the best
    ``topk - 1`` complete past blocks. ``q [B, H, Sq, D]`` are the last ``Sq`` of ``Skv`` positions.
    With a sliding ``window``, blocks wholly before the query's window are no candidates; with
    ``sink``, block 0 is always among the routed blocks when it is a candidate."""
    b, h, sq, _ = q.shape
    skv = k.shape[2]
    pos = torch.arange(skv - sq, skv, device=q.device)
    own = (pos // block_size).expand(b, h, sq)[..., None]
    full = skv // block_size
    if topk == 1 or full == 0:
        return own
    means = k[:, :, : full * block_size].float().unflatten(2, (full, block_size)).mean(3)
    means = means.repeat_interleave(h // k.shape[1], 1)
    gate = q.float() @ means.transpose(-1, -2)  # [B, H, Sq, full]
    if sink:
        gate[..., 0] = float("inf")
    ends = (torch.arange(full, device=q.device) + 1) * block_size
    gate = gate.masked_fill(ends > pos[:, None], float("-inf"))  # only blocks that end before the query
    if window is not None:  # and that reach into its window (their last key j = end - 1 > pos - window)
        gate = gate.masked_fill(ends <= pos[:, None] - window + 1, float("-inf"))
    n = min(topk - 1, full)
    best = gate.topk(n, dim=-1)
    picked = torch.where(best.values > float("-inf"), best.indices, -1)
    return torch.cat([own, picked], -1)


def routed_density(block_idx: torch.Tensor, skv: int, block_size: int, window: int | None = None) -> float:
    """Share of the causal (and windowed) (query, key) pairs the routing ``block_idx [B, H, Sq, K]`` of
    :func:`moba_routing` selects, for queries at the last ``Sq`` of ``skv`` positions."""
    b, h, sq = block_idx.shape[:3]
    # the query at position p sees n = p + 1 keys, or min(n, window): sum over n = skv - sq + 1 .. skv in Python
    lo, cap = skv - sq, skv if not window else min(skv, max(window, skv - sq))
    total = ((cap * (cap + 1) - lo * (lo + 1)) // 2 + (skv - cap) * (window or 0)) * b * h
    pos = torch.arange(skv - sq, skv, device=block_idx.device)
    first = (pos - window + 1).clamp_min(0) if window else torch.zeros_like(pos)  # first visible key
    start = block_idx * block_size
    end = torch.minimum(start + block_size, pos[:, None] + 1)
    picked = (end - torch.maximum(start, first[:, None])).clamp_min(0) * (block_idx >= 0)
    return picked.sum().item() / total


def moba_attention(
    config: MoBAConfig, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scale: float, module=None, sliding_window: int | None = None, **_,
) -> torch.Tensor:
    """MoBA over ``query [B, H, q, D]`` (after RoPE), the last ``q`` of ``key, value [B, Hkv, kv, D]``;
    ``attention_mask`` is transformers' (``None``: causal only, else bool / additive ``[B, 1, q, kv]``).
    Returns ``[B, H, q, D]``. A ``module`` with a ``vzoo_key_conv`` convolves the keys first. On a
    model's sliding-window layer each query also keeps only the last ``sliding_window`` keys."""
    conv = getattr(module, "vzoo_key_conv", None)
    key = conv(key) if conv is not None else key
    block_idx = moba_routing(query, key, config.block_size, config.topk, sliding_window, config.sink)
    # the density (one host sync) only serves the fallback decision and the handle's statistics
    if config.dense_fallback or getattr(module, "vzoo_density", None) is not None:
        density = routed_density(block_idx, key.shape[2], config.block_size, sliding_window)
        if run_dense(module, config.dense_fallback, density, query.device, "moba"):
            return dense_attention(query, key, value, attention_mask, scale, sliding_window)
    keys = None if attention_mask is None else key_validity(attention_mask, sliding_window is not None)
    own_block = block_idx[:1, :1, :, :1]  # the same for every row and head
    own, lse = token_routed_attention(
        query, key, value, own_block, block_n=config.block_size, causal=True, scale=scale, return_lse=True, key_mask=keys,
        window=sliding_window,
    )
    past = block_idx[..., 1:]
    if not past.shape[-1]:  # top-1, or no complete past block yet (otherwise some query has a candidate)
        return own
    routed, lse_r = token_routed_attention(
        query, key, value, past, block_n=config.block_size, scale=scale, return_lse=True, key_mask=keys, window=sliding_window
    )
    return merge_attention_states([own, routed], [lse, lse_r])[0]


register_lm_method(LMMethod(
    config=MoBAConfig, attn_implementation="vzoo_moba", label="MoBA", attention=moba_attention,
    paper="MoBA: Mixture of Block Attention for Long-Context LLMs (2025)", arxiv="2502.13189",
    ops=("token_routed_attention", "merge_attention_states"), status="exact (golden outputs of the official code)",
    attach=attach_key_conv, full_cache=lambda config: True,
    bench=lambda tokens: {
        "moba (512, top-3)": MoBAConfig(block_size=512, topk=3),
        "moba (512, top-3, sink)": MoBAConfig(block_size=512, topk=3, sink=True),
        "flashmoba-style (128, top-8, key conv 3)": MoBAConfig(block_size=128, topk=8, key_conv=3),
    },
    contract=lambda: {"moba": MoBAConfig(block_size=8, topk=64, dense_fallback=False),
                      "moba-sink": MoBAConfig(block_size=8, topk=64, dense_fallback=False, sink=True)},
))
