"""Pyramid Sparse Attention (Li et al., arXiv 2512.04025; ziplab/Pyramid-Sparse-Attention).

Instead of keeping or dropping a key block, PSA gives each (query block, key block) pair a pyramid
level: full keys, or keys mean-pooled by 2, 4 or 8, or nothing. Tokens are first put in generalised
Hilbert order (the official ``gilbert3d`` curve) so runs of tokens are compact in (t, h, w). Block
importance comes from ``block/4`` tokens sampled per block at offsets drawn per call, batch and head
(per sampled query the max logit per key block, ``exp`` against the row max, max over the block's
samples, rows normalised to 1); levels take consecutive intervals of the key blocks sorted by
importance (cumulative thresholds or fixed quotas, rounded as the official kernel's tiles need),
optionally capped where a key block is not self-similar enough to pool. A pooled key stands for ``p``
keys, so its logit gets ``+ln p``. Matches the official code's golden outputs
(tests/golden/make_video.py).

Computation: on the Triton backend without gradients, one fused multi-level kernel
(:mod:`vzoo.kernels.pyramid_triton`) walks each query block's (block, level) list over the concatenated
pyramid. Otherwise (CPU, or training) one :func:`vzoo.kernels.block_sparse_attention` per level (pooled
levels on pooled keys with smaller blocks) merged exactly by log-sum-exp, forward and backward. When
the selected density is above the device's break-even density (:mod:`vzoo.kernels.break_even`) the
call runs dense attention instead (on the tokens in their input order: no reorder needed).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from vzoo.gilbert import gilbert_order
from vzoo.kernels import BlockSparseLayout, block_sparse_attention, dense_is_faster, merge_attention_states
from vzoo.kernels.backends import resolve_backend
from vzoo.kernels.break_even import dense_attention_lse
from vzoo.registry import Method, register_method

__all__ = ["PSAConfig", "PyramidSparseAttention", "psa_attention", "psa_levels", "psa_offsets", "psa_pool", "PSA_PRESETS"]

POOLS = (1, 2, 4, 8)


@dataclass(frozen=True)
class PSAConfig:
    """Pyramid Sparse Attention settings (defaults: the official Wan 2.1 1.3B ``psa_balanced`` preset).

    Args:
        block_q, block_k: query and key block sizes (tokens).
        tile_k: the official kernel's key tile (``tile_n``); in each level the number of key blocks is
            rounded to a multiple of ``ceil(p / (block_k // tile_k))`` so small pooled blocks fill tiles.
        mode: ``"threshold"`` (cumulative importance bounds per level, official ``thresholdbound``) or
            ``"quantile"`` (fixed shares of the key blocks per level, official ``topk``).
        thresholds: cumulative-importance upper bounds of levels 1x, 2x, 4x, 8x (the rest is skipped).
        quantiles: shares of key blocks at levels 1x, 2x, 4x, 8x (quantile mode; the rest is skipped).
        sim_cap: minimum mean cosine similarity of the key pairs (0, 1), (0, 3), (0, 7) of each 2, 4, 8
            keys of a block for pooling it by 2, 4, 8 (the coarsest allowed pool wins); ``None``: no cap.
        min_full: threshold mode only: the ``int(min_full * n) + 1`` most important of the ``n`` key
            blocks stay at full resolution (official: 0.06).
        reorder: put tokens in generalised Hilbert order over the grid first.
        dense_warmup: fraction of denoising steps kept dense (pipelines; preset: 15 of 50).
        dense_layers: layer numbers kept dense (pipelines).
        seed: ``None`` draws the sampled token offsets from torch's global generator (the official way);
            an int seeds a generator that :class:`PyramidSparseAttention` and the pipelines advance call
            by call (reproducible runs, fresh offsets per call).
        dense_fallback: run dense attention for a call whose selected density is above the device's
            break-even density (:func:`vzoo.kernels.dense_is_faster`); False always runs PSA.
    """

    block_q: int = 128
    block_k: int = 128
    tile_k: int = 32
    mode: str = "threshold"
    thresholds: tuple[float, float, float, float] = (0.5, 0.6, 0.7, 0.8)
    quantiles: tuple[float, float, float, float] = (0.10, 0.05, 0.0, 0.20)
    sim_cap: tuple[float, float, float] | None = (0.70, 0.65, 0.60)
    min_full: float = 0.06
    reorder: bool = True
    dense_warmup: float = 0.3
    dense_layers: tuple[int, ...] = ()
    seed: int | None = None
    dense_fallback: bool = True

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k", "tile_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 8 or value % 8:
                raise ValueError(f"PSAConfig.{name}={value!r} must be a positive multiple of 8")
        if self.mode not in ("threshold", "quantile"):
            raise ValueError(f"PSAConfig.mode={self.mode!r} must be 'threshold' or 'quantile'")
        t = tuple(self.thresholds)
        if len(t) != 4 or any(not 0 < x <= 1 for x in t) or any(a > b for a, b in zip(t, t[1:])):
            raise ValueError(f"PSAConfig.thresholds={t!r} must be 4 non-decreasing values in (0, 1]")
        qs = tuple(self.quantiles)
        if len(qs) != 4 or any(x < 0 for x in qs) or sum(qs) > 1 + 1e-9:
            raise ValueError(f"PSAConfig.quantiles={qs!r} must be 4 non-negative shares summing to at most 1")
        if self.mode == "quantile" and sum(qs) == 0:
            raise ValueError(f"PSAConfig.quantiles={qs!r} select no key block (quantile mode needs a positive share)")
        if self.sim_cap is not None and (len(self.sim_cap) != 3 or any(not -1 <= x <= 1 for x in self.sim_cap)):
            raise ValueError(f"PSAConfig.sim_cap={self.sim_cap!r} must be None or 3 values in [-1, 1]")
        if not 0 <= self.min_full <= 1:
            raise ValueError(f"PSAConfig.min_full={self.min_full!r} must lie in [0, 1]")
        if not 0 <= self.dense_warmup <= 1:
            raise ValueError(f"PSAConfig.dense_warmup={self.dense_warmup!r} must lie in [0, 1]")
        if not all(isinstance(i, int) and i >= 0 for i in self.dense_layers):
            raise ValueError(f"PSAConfig.dense_layers={self.dense_layers!r} must be non-negative ints")
        if not isinstance(self.dense_fallback, bool):
            raise ValueError(f"PSAConfig.dense_fallback={self.dense_fallback!r} must be a bool")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"PSAConfig.seed={self.seed!r} must be None or an int")

    @classmethod
    def preset(cls, name: str, **overrides) -> PSAConfig:
        """One of :data:`PSA_PRESETS` (``configs/attention_config.yaml`` of the official code)."""
        if name not in PSA_PRESETS:
            raise ValueError(f"PSAConfig.preset: unknown preset {name!r}; choose from {sorted(PSA_PRESETS)}")
        return replace(PSA_PRESETS[name], **overrides)

    def alignment(self, pool: int) -> int:
        """Multiple the number of key blocks at pool ``pool`` is rounded to (official level rounding)."""
        return math.ceil(pool / max(1, self.block_k // self.tile_k))


# ziplab/Pyramid-Sparse-Attention@be122cf configs/attention_config.yaml, psa_balanced of each model
# (warm-up 15 of 50 steps, 12 of 40 for Wan 2.2 A14B; the similarity cap is on only for Wan 2.1 1.3B).
PSA_PRESETS: dict[str, PSAConfig] = {
    "balanced": PSAConfig(),  # Wan 2.1 1.3B
    "wan2.1-14b": PSAConfig(thresholds=(0.4, 0.5, 0.6, 0.8), sim_cap=None),
    "wan2.2-a14b": PSAConfig(block_k=32, thresholds=(0.5, 0.6, 0.6, 0.8), sim_cap=None),
    "wan2.2-5b": PSAConfig(block_k=32, thresholds=(0.6, 0.7, 0.7, 0.8), sim_cap=None),
    "cogvideox-5b": PSAConfig(mode="quantile", quantiles=(0.10, 0.05, 0.0, 0.20), reorder=False, sim_cap=None),
}


def _pad_to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Replicate the last token of ``[B, H, S, D]`` until S is a multiple of ``block`` (the official padding)."""
    pad = -x.shape[2] % block
    return torch.cat([x, x[:, :, -1:].expand(-1, -1, pad, -1)], 2) if pad else x


def psa_pool(x: torch.Tensor, p: int, block: int) -> torch.Tensor:
    """Mean-pool ``[B, H, S, D]`` by ``p`` along S after replicate-padding S to a multiple of ``block``."""
    return x if p == 1 else _pad_to_blocks(x, block).unflatten(2, (-1, p)).mean(3)


def psa_offsets(
    batch: int, heads: tuple[int, int], config: PSAConfig, device: torch.device | str, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled token offsets inside the query and key blocks, drawn as the official code does: per
    batch and head (shared by all blocks of a head), ``block/4`` distinct offsets from the top-k of
    uniform noise; query offsets first. ``heads = (Hq, Hkv)``. Returns int ``[B, Hq, bq/4]``, ``[B, Hkv, bk/4]``."""
    bq, bk = config.block_q, config.block_k
    off_q = torch.rand(batch, heads[0], bq, device=device, generator=generator).topk(bq // 4, -1).indices
    off_k = torch.rand(batch, heads[1], bk, device=device, generator=generator).topk(bk // 4, -1).indices
    return off_q, off_k


def _sample(x: torch.Tensor, offsets: torch.Tensor, block: int) -> torch.Tensor:
    """Tokens ``block * i + offsets[b, h]`` of every block i of ``x [B, H, S, D]`` (clamped into a short
    last block, i.e. its replicate padding): ``[B, H, NB * len(offsets), D]``."""
    nb = -(-x.shape[2] // block)
    idx = (torch.arange(nb, device=x.device)[:, None] * block + offsets[:, :, None, :]).clamp_max(x.shape[2] - 1)
    return x.gather(2, idx.flatten(2)[..., None].expand(-1, -1, -1, x.shape[-1]))


@torch.no_grad()
def _importance(q: torch.Tensor, k: torch.Tensor, config: PSAConfig, scale: float, offsets) -> torch.Tensor:
    """Row-normalised block importance ``[B, Hq, NQB, NKB]`` from the sampled tokens of every block."""
    bq, bk = config.block_q, config.block_k
    nqb, nkb = -(-q.shape[2] // bq), -(-k.shape[2] // bk)
    sq, sk = _sample(q, offsets[0], bq).float(), _sample(k, offsets[1], bk).float()
    if sk.shape[1] != sq.shape[1]:
        sk = sk.repeat_interleave(sq.shape[1] // sk.shape[1], 1)
    per_block = (sq @ sk.transpose(-1, -2)).unflatten(-1, (nkb, -1)).amax(-1) * scale  # max logit per key block
    score = (per_block - per_block.amax(-1, keepdim=True)).exp().unflatten(2, (nqb, -1)).amax(3)
    return score / score.sum(-1, keepdim=True)


@torch.no_grad()
def _similarity_cap(k: torch.Tensor, config: PSAConfig) -> torch.Tensor:
    """Coarsest level (1..4 for pool 1, 2, 4, 8) each key block allows ``[B, H, NKB]``: pool ``p`` when
    the mean cosine similarity of keys ``(p*i, p*i + p - 1)`` exceeds its cap; the coarsest such ``p``."""
    blocks = _pad_to_blocks(k.float(), config.block_k).unflatten(2, (-1, config.block_k))  # [B, H, NKB, bk, D]
    allowed = torch.ones(blocks.shape[:3], dtype=torch.long, device=k.device)
    for level, (p, cap) in enumerate(zip((2, 4, 8), config.sim_cap), 2):
        sim = F.cosine_similarity(blocks[..., 0::p, :], blocks[..., p - 1 :: p, :], dim=-1).mean(-1)
        allowed = torch.where(sim > cap, level, allowed)
    return allowed


def _sorted_levels(config: PSAConfig, ranked: torch.Tensor) -> torch.Tensor:
    """Levels (1..4, 0 skipped) of the key blocks in descending-importance order ``ranked [..., n]``.

    Each level takes the next interval of the order. Its end: threshold mode, one block past the last
    whose cumulative share is within the level's bound (+1e-6), or where the previous level ended if
    none is; quantile mode, ``int(n * cumulative share)``. An interval that grows is rounded up to a
    multiple of the level's alignment (down again at the end of the row); threshold mode keeps at least
    ``int(n * min_full) + 1`` blocks at full resolution."""
    n = ranked.shape[-1]
    start = torch.zeros(ranked.shape[:-1], dtype=torch.long, device=ranked.device)
    if config.mode == "threshold":
        energy = ranked.cumsum(-1)
        energy = energy / energy[..., -1:]
    pos = torch.arange(n, device=ranked.device)
    levels = torch.zeros(ranked.shape, dtype=torch.long, device=ranked.device)
    for level, pool in enumerate(POOLS, 1):
        if config.mode == "threshold":
            count = (energy <= config.thresholds[level - 1] + 1e-6).sum(-1)
            end = torch.where(count > 0, count + 1, start)
        else:
            end = torch.full_like(start, min(n, int(n * round(sum(config.quantiles[:level]), 12))))
        m = config.alignment(pool)
        if m > 1:
            length = (end - start).clamp_min(0)
            end = (start + -(-length // m) * m).clamp_max(n)
            end = torch.where(end == n, start + (end - start) // m * m, end)
        else:
            end = torch.maximum(end.clamp(0, n), start)
            if config.mode == "threshold" and level == 1:
                end = end.clamp_min(min(n, int(n * config.min_full) + 1))
        levels = torch.where((pos >= start[..., None]) & (pos < end[..., None]), level, levels)
        start = end
    return levels


@functools.lru_cache(maxsize=64)
def _quantiles_select_any(quantiles: tuple[float, ...], block_k: int, tile_k: int, nkb: int) -> bool:
    """Whether quantile mode gives any of ``nkb`` key blocks a level: its intervals depend only on the
    shares, the level alignment and ``nkb`` (not on the importance), so this is decided on the host."""
    config = PSAConfig(block_k=block_k, tile_k=tile_k, mode="quantile", quantiles=quantiles)
    return bool(_sorted_levels(config, torch.zeros(1, nkb)).any())


@torch.no_grad()
def psa_levels(
    q: torch.Tensor, k: torch.Tensor, config: PSAConfig, scale: float | None = None, *,
    offsets: tuple[torch.Tensor, torch.Tensor] | None = None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Level of every (query block, key block): int ``[B, Hq, NQB, NKB]``, 1..4 for pooling 1, 2, 4, 8 and
    0 for skipped, as the official ``transfer_attn_to_mask`` and similarity mask. ``q [B, Hq, S, D]``,
    ``k [B, Hkv, S, D]`` (already reordered). ``offsets``: the sampled token offsets (see
    :func:`psa_offsets`); drawn with ``generator`` (torch's global one if None) when not given."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    nkb = -(-k.shape[2] // config.block_k)
    if config.mode == "quantile" and not _quantiles_select_any(tuple(config.quantiles), config.block_k, config.tile_k, nkb):
        raise ValueError(
            f"PSAConfig.quantiles={tuple(config.quantiles)} select none of the {nkb} key blocks "
            f"(block_k={config.block_k}); raise the shares or lower block_k"
        )
    if offsets is None:
        offsets = psa_offsets(q.shape[0], (q.shape[1], k.shape[1]), config, q.device, generator)
    else:  # the caller's offsets (drawn ones are valid by construction: no range check, no host sync)
        for off, x, block, name in zip(offsets, (q, k), (config.block_q, config.block_k), ("query", "key")):
            want = (*x.shape[:2], block // 4)
            if off.shape != want or off.is_floating_point() or off.dtype == torch.bool or bool(((off < 0) | (off >= block)).any()):
                raise ValueError(f"psa_levels: {name} offsets {tuple(off.shape)} {off.dtype} must be integers in [0, {block}) of shape {want}")
    score = _importance(q, k, config, scale, offsets)
    ranked, order = score.sort(dim=-1, descending=True, stable=True)
    levels = torch.empty_like(order).scatter_(-1, order, _sorted_levels(config, ranked))
    if config.sim_cap is not None:
        cap = _similarity_cap(k, config)
        if cap.shape[1] != levels.shape[1]:
            cap = cap.repeat_interleave(levels.shape[1] // cap.shape[1], 1)
        levels = torch.where(levels > 0, torch.minimum(levels, cap[:, :, None, :]), levels)
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
    offsets: tuple[torch.Tensor, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    dense_fallback: bool | None = None,
) -> torch.Tensor | tuple:
    """Pyramid Sparse Attention.

    Args:
        q, k, v: ``[B, H, S, D]`` (SDPA layout; GQA allowed); tokens in (t, h, w) order of ``grid``.
        grid: latent grid ``(T, H, W)`` for the Hilbert reorder (required when ``config.reorder``).
        config: :class:`PSAConfig` (the balanced preset if None).
        return_lse: also return the log-sum-exp ``[B, H, S]`` (fp32).
        return_density: also return the FLOP-equivalent density ``mean(1 / pool)`` over all block pairs
            that PSA selected, and whether the dense kernel ran instead (bool).
        offsets: sampled token offsets inside the blocks (:func:`psa_offsets`); drawn per call if None,
            from ``generator`` (torch's global generator if None).
        dense_fallback: run dense attention instead when the selected density is above the break-even
            density of this device (:func:`vzoo.kernels.dense_is_faster`); None: ``config.dense_fallback``.

    Returns:
        ``out [B, H, S, D]`` in the input order, followed by ``lse`` and ``density, dense`` when asked for.
    """
    config = config or PSAConfig()
    if q.dim() != 4 or k.dim() != 4 or k.shape[2] != q.shape[2]:
        raise ValueError(f"psa_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, H, S, D] self-attention")
    if config.reorder and (grid is None or math.prod(grid) != q.shape[2]):
        raise ValueError(f"psa_attention: grid {grid} must be given and hold S={q.shape[2]} tokens when reorder=True")
    q_in, k_in = q, k  # dense attention does not depend on the token order: the fallback skips the reorder
    if config.reorder:
        perm = gilbert_order(grid, q.device)
        q, k = (x.index_select(2, perm) for x in (q, k))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    levels = psa_levels(q, k, config, scale, offsets=offsets, generator=generator)
    fallback = config.dense_fallback if dense_fallback is None else dense_fallback
    density = None
    if return_density or fallback:  # one host sync, only when the density is used
        weights = torch.tensor([0.0] + [1.0 / p for p in POOLS], device=levels.device)
        density = weights[levels].mean().item()
    dense = fallback and dense_is_faster(density, q.device, "psa")
    s, bq, bk = q.shape[2], config.block_q, config.block_k
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not dense and config.reorder:
        v = v.index_select(2, perm)
    if dense:
        out, lse = dense_attention_lse(q_in, k_in, v, scale, need_lse=return_lse)
    elif not needs_grad and resolve_backend(backend, q.device, needs_grad=False, needs_lse=True) == "triton":
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
    if config.reorder and not dense:
        out = torch.empty_like(out).index_copy_(2, perm, out)
        lse = torch.empty_like(lse).index_copy_(2, perm, lse) if return_lse else None
    extras = (lse,) if return_lse else ()
    extras += (density, dense) if return_density else ()
    return (out, *extras) if extras else out


def seeded_generator(seed: int | None, device: torch.device, cache: dict) -> torch.Generator | None:
    """The generator of ``device`` in ``cache``, made and seeded with ``seed`` on first use (``None``
    when ``seed`` is None: torch's global generator). Callers keep ``cache`` so calls draw in sequence."""
    if seed is None:
        return None
    if device not in cache:
        cache[device] = torch.Generator(device).manual_seed(seed)
    return cache[device]


class PyramidSparseAttention(nn.Module):
    """Module form of :func:`psa_attention` (no parameters): ``forward(q, k, v, grid) -> [B, H, S, D]``.
    With ``config.seed`` set, the sampled offsets come from a generator seeded once and advanced per call."""

    def __init__(self, config: PSAConfig | None = None) -> None:
        super().__init__()
        self.config = config or PSAConfig()
        self._generators: dict = {}

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int] | None = None, scale: float | None = None) -> torch.Tensor:
        generator = seeded_generator(self.config.seed, q.device, self._generators)
        return psa_attention(q, k, v, grid, self.config, scale=scale, generator=generator)


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
