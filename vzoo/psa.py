"""Pyramid Sparse Attention (Li et al., arXiv 2512.04025; ziplab/Pyramid-Sparse-Attention).

Instead of keeping or dropping a key block, PSA gives each (query block, key block) pair a pyramid
level: full keys, or keys mean-pooled by 2, 4 or 8, or nothing. Tokens are first put in generalised
Hilbert order so runs of tokens (blocks, pooling groups) are compact in (t, h, w). Block importance
comes from sampled tokens (per sampled query the max logit per key block, ``exp`` against the row max,
max over the block's samples, rows normalised to 1); levels follow cumulative importance thresholds
(or fixed quantile quotas), optionally capped where a key block is not self-similar enough to pool.
A pooled key stands for ``p`` keys, so its logit gets ``+ln p``.

Computation: on the Triton backend without gradients, one fused multi-level kernel
(:mod:`vzoo.kernels.pyramid_triton`) walks each query block's (block, level) list over the concatenated
pyramid. Otherwise (CPU, or training) one :func:`vzoo.kernels.block_sparse_attention` per level (pooled
levels on pooled keys with smaller blocks) merged exactly by log-sum-exp, forward and backward.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from vzoo.gilbert import gilbert_order
from vzoo.kernels import BlockSparseLayout, block_sparse_attention, merge_attention_states
from vzoo.kernels.backends import resolve_backend
from vzoo.registry import Method, register_method

__all__ = ["PSAConfig", "PyramidSparseAttention", "psa_attention", "psa_levels", "psa_pool", "PSA_PRESETS"]

POOLS = (1, 2, 4, 8)


@dataclass(frozen=True)
class PSAConfig:
    """Pyramid Sparse Attention settings (defaults: the Wan 2.1 1.3B ``psa_balanced`` preset).

    Args:
        block_q, block_k: query and key block sizes (tokens).
        mode: ``"threshold"`` (cumulative importance bounds per level) or ``"quantile"`` (fixed shares
            of the key blocks per level).
        thresholds: cumulative-importance upper bounds of levels 1x, 2x, 4x, 8x (the rest is skipped).
        quantiles: shares of key blocks at levels 1x, 2x, 4x, 8x (quantile mode; the rest is skipped).
        sim_cap: minimum mean cosine similarity of key pairs ``p/2`` apart in a block for pooling by
            ``p`` = 2, 4, 8 (``None``: no cap).
        min_full: share of key blocks per query block always kept at full resolution.
        reorder: put tokens in generalised Hilbert order over the grid first.
        dense_warmup: fraction of denoising steps kept dense (pipelines; preset: 15 of 50).
        dense_layers: layer numbers kept dense (pipelines).
        seed: seed of the token sampling for importance.
    """

    block_q: int = 128
    block_k: int = 128
    mode: str = "threshold"
    thresholds: tuple[float, float, float, float] = (0.5, 0.6, 0.7, 0.8)
    quantiles: tuple[float, float, float, float] = (0.10, 0.05, 0.0, 0.20)
    sim_cap: tuple[float, float, float] | None = (0.70, 0.65, 0.60)
    min_full: float = 0.06
    reorder: bool = True
    dense_warmup: float = 0.3
    dense_layers: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 8 or value % 8:
                raise ValueError(f"PSAConfig.{name}={value!r} must be a positive multiple of 8")
        if self.mode not in ("threshold", "quantile"):
            raise ValueError(f"PSAConfig.mode={self.mode!r} must be 'threshold' or 'quantile'")
        t = tuple(self.thresholds)
        if len(t) != 4 or any(not 0 < x <= 1 for x in t) or any(a > b for a, b in zip(t, t[1:])):
            raise ValueError(f"PSAConfig.thresholds={t!r} must be 4 non-decreasing values in (0, 1]")
        qs = tuple(self.quantiles)
        if len(qs) != 4 or any(x < 0 for x in qs) or sum(qs) > 1 + 1e-9:
            raise ValueError(f"PSAConfig.quantiles={qs!r} must be 4 non-negative shares summing to at most 1")
        if self.sim_cap is not None and (len(self.sim_cap) != 3 or any(not -1 <= x <= 1 for x in self.sim_cap)):
            raise ValueError(f"PSAConfig.sim_cap={self.sim_cap!r} must be None or 3 values in [-1, 1]")
        if not 0 <= self.min_full <= 1:
            raise ValueError(f"PSAConfig.min_full={self.min_full!r} must lie in [0, 1]")
        if not 0 <= self.dense_warmup <= 1:
            raise ValueError(f"PSAConfig.dense_warmup={self.dense_warmup!r} must lie in [0, 1]")
        if not all(isinstance(i, int) and i >= 0 for i in self.dense_layers):
            raise ValueError(f"PSAConfig.dense_layers={self.dense_layers!r} must be non-negative ints")

    @classmethod
    def preset(cls, name: str, **overrides) -> PSAConfig:
        """One of :data:`PSA_PRESETS` (``configs/attention_config.yaml`` of the official code)."""
        if name not in PSA_PRESETS:
            raise ValueError(f"PSAConfig.preset: unknown preset {name!r}; choose from {sorted(PSA_PRESETS)}")
        return replace(PSA_PRESETS[name], **overrides)


PSA_PRESETS: dict[str, PSAConfig] = {
    "balanced": PSAConfig(),  # Wan 2.1 1.3B psa_balanced
    "wan2.1-14b": PSAConfig(thresholds=(0.4, 0.5, 0.6, 0.8)),
    "wan2.2-a14b": PSAConfig(block_k=32, thresholds=(0.5, 0.6, 0.6, 0.8), dense_warmup=0.3),
    "wan2.2-5b": PSAConfig(block_k=32, thresholds=(0.6, 0.7, 0.7, 0.8)),
    "cogvideox-5b": PSAConfig(mode="quantile", quantiles=(0.10, 0.05, 0.0, 0.20), reorder=False, sim_cap=None),
}


def _pad_to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Replicate the last token of ``[B, H, S, D]`` until S is a multiple of ``block`` (the official padding)."""
    pad = -x.shape[2] % block
    return torch.cat([x, x[:, :, -1:].expand(-1, -1, pad, -1)], 2) if pad else x


def psa_pool(x: torch.Tensor, p: int, block: int) -> torch.Tensor:
    """Mean-pool ``[B, H, S, D]`` by ``p`` along S after replicate-padding S to a multiple of ``block``."""
    return x if p == 1 else _pad_to_blocks(x, block).unflatten(2, (-1, p)).mean(3)


@functools.lru_cache(maxsize=16)
def _offsets(seed: int, bq: int, bk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled token offsets inside query and key blocks: random, shared by all blocks, fixed by
    ``seed`` (built once per device)."""
    gen = torch.Generator().manual_seed(seed)
    off_q = torch.randperm(bq, generator=gen)[: bq // 4].sort().values
    off_k = torch.randperm(bk, generator=gen)[: bk // 4].sort().values
    return off_q.to(device), off_k.to(device)


@torch.no_grad()
def _importance(q: torch.Tensor, k: torch.Tensor, config: PSAConfig, scale: float) -> torch.Tensor:
    """Row-normalised block importance ``[B, H, NQB, NKB]`` from ``block/4`` sampled tokens per block."""
    b, h, s, _ = q.shape
    bq, bk = config.block_q, config.block_k
    nqb, nkb = -(-s // bq), -(-k.shape[2] // bk)
    off_q, off_k = _offsets(config.seed, bq, bk, q.device)
    # clamped into the (possibly short) last block
    iq = (torch.arange(nqb, device=q.device)[:, None] * bq + off_q).clamp_max(s - 1).flatten()
    ik = (torch.arange(nkb, device=q.device)[:, None] * bk + off_k).clamp_max(k.shape[2] - 1).flatten()
    logits = (q[:, :, iq].float() @ k[:, :, ik].float().transpose(-1, -2)) * scale  # [B, H, NQB*sq, NKB*sk]
    per_block = logits.unflatten(-1, (nkb, -1)).amax(-1)  # max logit per key block
    score = (per_block - per_block.amax(-1, keepdim=True)).exp().unflatten(2, (nqb, -1)).amax(3)
    return score / score.sum(-1, keepdim=True)


@torch.no_grad()
def _similarity_cap(k: torch.Tensor, config: PSAConfig) -> torch.Tensor:
    """Coarsest level index (1..4) each key block allows: level ``l`` (pool ``2^(l-1)``) needs mean
    cosine similarity above ``sim_cap[l-2]`` for tokens ``2^(l-2)`` apart, and every finer level too."""
    bk = config.block_k
    blocks = F.normalize(_pad_to_blocks(k.float(), bk).unflatten(2, (-1, bk)), dim=-1)  # [B, H, NKB, bk, D]
    allowed = torch.ones(blocks.shape[:3], dtype=torch.long, device=k.device)
    ok = torch.ones_like(allowed, dtype=torch.bool)
    for level, cap in zip((2, 3, 4), config.sim_cap):
        gap = 2 ** (level - 2)
        sim = (blocks[..., gap:, :] * blocks[..., :-gap, :]).sum(-1).mean(-1)
        ok &= sim > cap
        allowed = torch.where(ok, level, allowed)
    return allowed


@torch.no_grad()
def psa_levels(q: torch.Tensor, k: torch.Tensor, config: PSAConfig, scale: float | None = None) -> torch.Tensor:
    """Level of every (query block, key block): int ``[B, H, NQB, NKB]``, 1..4 for pooling 1, 2, 4, 8 and
    0 for skipped. ``q, k``: ``[B, H, S, D]`` (already reordered), same head count."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    score = _importance(q, k, config, scale)
    nkb = score.shape[-1]
    order = score.argsort(-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nkb, device=q.device).expand_as(order))
    if config.mode == "threshold":
        # mass before a block in descending order decides its level: [0, t1) full, [t1, t2) 2x, ...
        ranked = score.gather(-1, order)
        before = ranked.cumsum(-1) - ranked
        sorted_level = torch.zeros_like(order)
        for level, bound in reversed(list(enumerate(config.thresholds, 1))):
            sorted_level = torch.where(before < bound - 1e-12, level, sorted_level)
        levels = sorted_level.gather(-1, rank)
    else:
        edges = torch.tensor(config.quantiles, device=q.device).cumsum(0) * nkb
        levels = torch.zeros_like(rank)
        for level in (4, 3, 2, 1):
            levels = torch.where(rank < edges[level - 1].round().long(), level, levels)
    levels = torch.where(rank < math.ceil(config.min_full * nkb), 1, levels)
    if config.sim_cap is not None:
        cap = _similarity_cap(k, config)[:, :, None, :]
        levels = torch.where(levels > 0, torch.minimum(levels, cap), levels)
    return levels


def psa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int] | None = None,
    config: PSAConfig | None = None,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    return_density: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple:
    """Pyramid Sparse Attention.

    Args:
        q, k, v: ``[B, H, S, D]`` (SDPA layout; GQA allowed); tokens in (t, h, w) order of ``grid``.
        grid: latent grid ``(T, H, W)`` for the Hilbert reorder (required when ``config.reorder``).
        config: :class:`PSAConfig` (the balanced preset if None).
        return_lse: also return the log-sum-exp ``[B, H, S]`` (fp32).
        return_density: also return the FLOP-equivalent density ``mean(1 / pool)`` over all block pairs.

    Returns:
        ``out [B, H, S, D]`` in the input order, followed by ``lse`` and ``density`` when asked for.
    """
    config = config or PSAConfig()
    if q.dim() != 4 or k.shape[2] != q.shape[2]:
        raise ValueError(f"psa_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, H, S, D] self-attention")
    if config.reorder:
        if grid is None or math.prod(grid) != q.shape[2]:
            raise ValueError(f"psa_attention: grid {grid} must be given and hold S={q.shape[2]} tokens when reorder=True")
        perm = gilbert_order(grid, q.device)
        q, k, v = (x.index_select(2, perm) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # the levels are per query head; the kernels read the shared key/value heads themselves (GQA)
    k_heads = k if k.shape[1] == q.shape[1] else k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    levels = psa_levels(q, k_heads, config, scale)
    s, bq, bk = q.shape[2], config.block_q, config.block_k
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not needs_grad and resolve_backend(backend, q.device, needs_grad=False, needs_lse=True) == "triton":
        from vzoo.kernels.pyramid_triton import pyramid_attention_fwd

        ks, vs = [psa_pool(k, p, bk) for p in POOLS], [psa_pool(v, p, bk) for p in POOLS]
        lengths = tuple(x.shape[2] for x in ks)
        out, lse = pyramid_attention_fwd(q, torch.cat(ks, 2), torch.cat(vs, 2), levels, lengths, bq, bk, scale)
    else:
        outs, lses = [], []
        for level, p in enumerate(POOLS, 1):
            chosen = levels == level
            if not bool(chosen.any()):
                continue
            kp, vp = psa_pool(k, p, bk), psa_pool(v, p, bk)
            layout = BlockSparseLayout.from_block_mask(chosen, bq, bk // p, s, kp.shape[2] if p > 1 else s)
            out, lse = block_sparse_attention(q, kp, vp, layout, scale=scale, return_lse=True, backend=backend)
            outs.append(out)
            lses.append(lse + math.log(p))  # a pooled key stands for p keys
        out, lse = merge_attention_states(outs, lses)
    if config.reorder:
        out = torch.empty_like(out).index_copy_(2, perm, out)
        lse = torch.empty_like(lse).index_copy_(2, perm, lse)
    extras = (lse,) if return_lse else ()
    if return_density:
        weights = torch.tensor([0.0] + [1.0 / p for p in POOLS], device=levels.device)
        extras += (weights[levels].mean().item(),)
    return (out, *extras) if extras else out


class PyramidSparseAttention(nn.Module):
    """Module form of :func:`psa_attention` (no parameters): ``forward(q, k, v, grid) -> [B, H, S, D]``."""

    def __init__(self, config: PSAConfig | None = None) -> None:
        super().__init__()
        self.config = config or PSAConfig()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int] | None = None, scale: float | None = None) -> torch.Tensor:
        return psa_attention(q, k, v, grid, self.config, scale=scale)


register_method(
    Method(
        name="psa",
        paper="Pyramid Sparse Attention (PSA), ZIP Lab, Zhejiang University (2025)",
        arxiv="2512.04025",
        modality="video",
        ops=("block_sparse_attention", "merge_attention_states"),
        status="multi-level pyramid on the shared block-sparse kernels, exact LSE merge, differentiable",
    )
)
