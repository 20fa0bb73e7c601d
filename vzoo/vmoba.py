"""VMoBA: mixture of block attention for video diffusion (Wu et al., arXiv 2506.23858; KwaiVGI/VMoBA).

Keys are cut into blocks over the (T, H, W) latent grid, and the block shape cycles with the layer:
1D (``s_T`` whole frames), 2D (an ``s_H x s_W`` patch through all frames), 3D (an ``s_T x s_H x s_W``
cube). Tokens are permuted so every block is contiguous. Each query scores the blocks by the raw dot
product with their mean key (fp32, no ``1/sqrt(d)``) and always keeps its own block; it then keeps
either its top-k blocks (MoBA's per-query selection: the training-free default) or, for fine-tuning,
the smallest prefix of (query, block) pairs whose min-max normalised similarities reach a share ``tau``
of the pool (the paper's global threshold; the official code's default pool is per query).

The paper computes the own-block branch and the routed branch separately and merges them by
log-sum-exp; that is exactly softmax attention over the union of the chosen blocks, which
:func:`vzoo.kernels.token_routed_attention` computes in one exact, differentiable pass. Selections
match the official code's golden outputs (tests/golden/make_video.py); when the selected density is
above the device's break-even density (:mod:`vzoo.kernels.break_even`) the call runs dense attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from vzoo.kernels import dense_is_faster, token_routed_attention
from vzoo.kernels.break_even import dense_attention_lse
from vzoo.registry import Method, register_method

__all__ = ["VMoBAConfig", "VMoBAAttention", "vmoba_attention", "vmoba_route", "vmoba_routing", "vmoba_permutation"]

_POOLS = ("head_global", "query_head")


def _positive_ints(name: str, value: tuple[int, ...] | None, n: int) -> None:
    if value is not None and (len(value) != n or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"VMoBAConfig.{name}={value!r} must be None or {n} positive int(s)")


_MIN_BLOCK_TOKENS = 64  # automatic blocks grow (within the grid) to hold at least this many tokens


def _auto_size(n: int, target: float) -> int:
    """Block size along an axis of ``n``: the divisor of ``n`` nearest ``target`` when one lies within a
    factor of two of it, else ``round(target)`` with a shorter last block (prime or awkward axes)."""
    near = min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - target), d))
    return near if target / 2 <= near <= 2 * target else max(1, min(n, round(target)))


@dataclass(frozen=True)
class VMoBAConfig:
    """VMoBA settings.

    Block sizes left at ``None`` follow the grid: about 1/8 of T for 1D blocks (the paper's 21 frames
    -> 3), 1/4 of H and W for 2D blocks, 1/4 of each axis for 3D cubes, using the nearest divisor of the
    axis when one is within a factor of two (16x32x32: (2,), (8, 8), (4, 8, 8)), else a shorter last
    block (13x29x53: (1,), (7, 13), (3, 7, 13)); small grids grow the blocks to at least 64 tokens, so a
    block never shrinks to a token or two (the gate is ``[B, H, S, S / block]`` fp32). Sizes that
    do not divide an axis (given or automatic) leave the last block along it shorter: the official code
    does this for 1D blocks (a shorter last chunk) and asserts exact tiling for 2D and 3D blocks, which
    vzoo extends the same way. Top-k defaults keep about a quarter of the blocks.

    Args:
        temporal_block: ``(s_T,)`` frames per 1D block (layers ``l % 3 == 0``).
        spatial_block: ``(s_H, s_W)`` per 2D block, spanning all frames (layers ``l % 3 == 1``).
        cube_block: ``(s_T, s_H, s_W)`` per 3D block (layers ``l % 3 == 2``).
        mode: ``"topk"`` (training-free; ``topk`` blocks per query, own block included) or
            ``"threshold"`` (fine-tuning; share ``tau`` over ``pool``).
        topk: blocks per query for the 1D, 2D and 3D layers.
        tau: cumulative min-max share in ``(0, 1]`` (threshold mode; paper: 0.25).
        pool: ``"head_global"`` (all (query, block) pairs of a head: the paper) or ``"query_head"``
            (per query and head: the official code's default).
        dense_warmup: fraction of the denoising steps that stay dense (pipelines; paper: 0.25).
        dense_layers: layer numbers that stay dense (pipelines).
        dense_fallback: run dense attention for a call whose selected density is above the device's
            break-even density (:func:`vzoo.kernels.dense_is_faster`); False always runs VMoBA.
    """

    temporal_block: tuple[int] | None = None
    spatial_block: tuple[int, int] | None = None
    cube_block: tuple[int, int, int] | None = None
    mode: str = "topk"
    topk: tuple[int, int, int] = (2, 3, 10)
    tau: float = 0.25
    pool: str = "head_global"
    dense_warmup: float = 0.25
    dense_layers: tuple[int, ...] = ()
    dense_fallback: bool = True

    def __post_init__(self) -> None:
        _positive_ints("temporal_block", self.temporal_block, 1)
        _positive_ints("spatial_block", self.spatial_block, 2)
        _positive_ints("cube_block", self.cube_block, 3)
        _positive_ints("topk", tuple(self.topk), 3)
        if self.mode not in ("topk", "threshold"):
            raise ValueError(f"VMoBAConfig.mode={self.mode!r} must be 'topk' or 'threshold'")
        if not (isinstance(self.tau, (int, float)) and 0 < self.tau <= 1):
            raise ValueError(f"VMoBAConfig.tau={self.tau!r} must lie in (0, 1]")
        if self.pool not in _POOLS:
            raise ValueError(f"VMoBAConfig.pool={self.pool!r} must be one of {_POOLS}")
        if not 0 <= self.dense_warmup <= 1:
            raise ValueError(f"VMoBAConfig.dense_warmup={self.dense_warmup!r} must lie in [0, 1]")
        if not all(isinstance(i, int) and i >= 0 for i in self.dense_layers):
            raise ValueError(f"VMoBAConfig.dense_layers={self.dense_layers!r} must be non-negative ints")
        if not isinstance(self.dense_fallback, bool):
            raise ValueError(f"VMoBAConfig.dense_fallback={self.dense_fallback!r} must be a bool")

    def block(self, layer_idx: int, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """``(s_T, s_H, s_W)`` of the key blocks in layer ``layer_idx`` on ``grid`` (0 = the whole axis)."""
        kind = layer_idx % 3
        given = (self.temporal_block, self.spatial_block, self.cube_block)[kind]
        if given is not None:
            return (given[0], 0, 0) if kind == 0 else (0, *given) if kind == 1 else tuple(given)
        axes = ((0,), (1, 2), (0, 1, 2))[kind]
        targets = [grid[a] / (8 if kind == 0 else 4) for a in axes]
        whole = math.prod(grid) // math.prod(grid[a] for a in axes)  # tokens per block from whole axes
        grow = max(1.0, (_MIN_BLOCK_TOKENS / (whole * math.prod(targets))) ** (1 / len(axes)))
        sizes = {a: _auto_size(grid[a], min(grid[a], x * grow)) for a, x in zip(axes, targets)}
        return tuple(sizes.get(a, 0) for a in range(3))


def vmoba_permutation(grid: tuple[int, int, int], block: tuple[int, int, int], device=None) -> tuple[torch.Tensor, int]:
    """Token order that makes each block contiguous, and the block size in tokens.

    ``block = (s_T, s_H, s_W)`` with 0 meaning "the whole axis" (sizes above an axis are cut to it).
    Tokens are in (t, h, w) order; blocks are numbered (t-block, h-block, w-block) row-major and tokens
    inside a block keep (t, h, w) order. Where a size does not divide its axis the last block along it is
    shorter: it is padded to the full block with ``-1`` slots. Returns ``slots [N_b * block_n]``, the
    token in each slot (``-1``: padding).
    """
    t, h, w = grid
    st, sh, sw = (min(size, n) or n for size, n in zip(block, grid))
    pads = [-n % size for n, size in zip(grid, (st, sh, sw))]
    ids = torch.arange(t * h * w, device=device).view(t, h, w)
    if any(pads):
        ids = torch.nn.functional.pad(ids, (0, pads[2], 0, pads[1], 0, pads[0]), value=-1)
    tp, hp, wp = ids.shape
    ids = ids.view(tp // st, st, hp // sh, sh, wp // sw, sw)
    return ids.permute(0, 2, 4, 1, 3, 5).reshape(-1), st * sh * sw


@torch.no_grad()
def vmoba_routing(
    q: torch.Tensor, k: torch.Tensor, block_n: int, *, topk: int | None = None, tau: float | None = None,
    pool: str = "head_global", valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which key blocks each query attends to: bool ``[B, H, S, N_b]`` (own block always included).

    ``q, k``: ``[B, H, S, D]`` in block-contiguous order, ``S`` a multiple of ``block_n``. Exactly one of
    ``topk`` (per query) or ``tau`` (min-max normalised cumulative share over ``pool``) is given.
    ``valid``: bool ``[S]``, False for the padding slots of short blocks: left out of the mean keys and
    of the pools. ``head_global`` pools each batch element's (query, block) pairs of a head (the
    official code pools a whole packed batch).
    """
    if (topk is None) == (tau is None):
        raise ValueError("vmoba_routing: give exactly one of topk and tau")
    b, h, s, d = q.shape
    nb = s // block_n
    keys = k.float().view(b, -1, nb, block_n, d)
    if valid is None:
        means = keys.mean(3)  # [B, Hk, Nb, D]
    else:
        weight = valid.view(nb, block_n, 1).float()
        means = (keys * weight).sum(3) / weight.sum(1)
    if means.shape[1] != h:
        means = means.repeat_interleave(h // means.shape[1], 1)
    gate = q.float() @ means.transpose(-1, -2)  # [B, H, S, Nb]: raw dot products, no 1/sqrt(d)
    own = (torch.arange(s, device=q.device) // block_n)[:, None] == torch.arange(nb, device=q.device)  # [S, Nb]
    if topk is not None:
        chosen = gate.masked_fill(own, float("inf")).topk(min(topk, nb), dim=-1).indices
        return torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, chosen, True)
    own = own.expand_as(gate)
    real = torch.ones_like(own) if valid is None else valid[:, None].expand_as(gate)
    # the pool is the last axis: all (query, block) pairs of a head, or the blocks of one query
    if pool == "head_global":
        g, o, ok = (x.flatten(-2)[..., None, :] for x in (gate, own, real))
    else:
        g, o, ok = gate, own, real
    lo = g.masked_fill(~ok, float("inf")).amin(-1, keepdim=True)
    hi = g.masked_fill(~ok, float("-inf")).amax(-1, keepdim=True)
    span = torch.where(hi - lo <= 1e-6, 1.0, hi - lo)
    norm = ((g - lo) / span).masked_fill(~ok, 0.0)  # min-max, not softmax (eps as the official code)
    total = norm.sum(-1, keepdim=True) + 1e-6
    remain = (tau - norm.masked_fill(~o, 0).sum(-1, keepdim=True) / total).clamp_min(0)  # own blocks count toward tau
    values, order = norm.masked_fill(o | ~ok, -1.0).sort(-1, descending=True)  # own blocks and padding sort last
    share = values.clamp_min(0).cumsum(-1) / total
    # keep while the cumulative share is below what remains, plus the first entry that reaches it
    keep_n = (share < remain).sum(-1, keepdim=True) + 1
    keep = (torch.arange(values.shape[-1], device=q.device) < keep_n) & (values >= 0)
    return torch.zeros_like(keep).scatter_(-1, order, keep).view_as(gate) | own


def vmoba_route(
    q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int, int], layer_idx: int, config: VMoBAConfig
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """VMoBA's routing step for ``q, k [B, H, S, D]`` in (t, h, w) order of ``grid``: ``slots, block_n``
    of :func:`vmoba_permutation` for layer ``layer_idx``, q and k in slot order (keys zero in padding
    slots) and the :func:`vmoba_routing` mask of ``config`` (``[B, H, len(slots), N_b]``, queries in
    slot order)."""
    slots, block_n = vmoba_permutation(grid, config.block(layer_idx, grid), q.device)
    valid = slots >= 0
    padded = slots.numel() != q.shape[2]
    qp, kp = (x.index_select(2, slots.clamp_min(0)) for x in (q, k))
    if padded:  # padding slots: zero keys, hidden from every query
        kp = kp.masked_fill(~valid[:, None], 0.0)
    real = valid if padded else None
    if config.mode == "topk":
        mask = vmoba_routing(qp, kp, block_n, topk=config.topk[layer_idx % 3], valid=real)
    else:
        mask = vmoba_routing(qp, kp, block_n, tau=config.tau, pool=config.pool, valid=real)
    return slots, block_n, qp, kp, mask


def vmoba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int],
    layer_idx: int,
    config: VMoBAConfig | None = None,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    return_density: bool = False,
    backend: str | None = None,
    dense_fallback: bool | None = None,
) -> torch.Tensor | tuple:
    """VMoBA attention over video tokens.

    Args:
        q, k, v: ``[B, H, S, D]`` (SDPA layout; GQA allowed), ``S = T*H*W`` tokens in (t, h, w) order.
        grid: latent token grid ``(T, H, W)``.
        layer_idx: selects the 1D / 2D / 3D block shape (``layer_idx % 3``).
        config: :class:`VMoBAConfig` (default settings if None).
        scale: softmax scale (default ``D ** -0.5``).
        return_lse: also return the log-sum-exp ``[B, H, S]`` (fp32), e.g. to merge with text attention.
        return_density: also return the fraction of (query, key) pairs selected, and whether the dense
            kernel ran instead (bool).
        dense_fallback: run dense attention instead when the selected density is above the break-even
            density of this device (:func:`vzoo.kernels.dense_is_faster`); None: ``config.dense_fallback``.

    Returns:
        ``out [B, H, S, D]`` in the input order, followed by ``lse`` and ``density, dense`` when asked for.
    """
    config = config or VMoBAConfig()
    t, h, w = grid
    if q.dim() != 4 or q.shape[2] != t * h * w or k.shape[2] != q.shape[2]:
        raise ValueError(f"vmoba_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, H, T*H*W, D] for grid {tuple(grid)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    slots, block_n, qp, kp, mask = vmoba_route(q, k, grid, layer_idx, config)
    valid = slots >= 0
    padded = slots.numel() != q.shape[2]
    fallback = config.dense_fallback if dense_fallback is None else dense_fallback
    density = None
    if return_density or fallback:  # one host sync, only when the density is used
        sizes = valid.view(-1, block_n).sum(1).float()  # real tokens per block
        selected = (valid.float() @ mask.float() @ sizes).sum()  # key tokens chosen by the real queries
        density = selected.item() / (mask.shape[0] * mask.shape[1] * q.shape[2] ** 2)
    dense = fallback and dense_is_faster(density, q.device, "vmoba")
    if dense:
        out, lse = dense_attention_lse(q, k, v, scale, need_lse=return_lse)
    else:
        vp = v.index_select(2, slots.clamp_min(0))  # in slot order only here: dense attention needs no reorder
        if padded:  # padding slots: zero values, hidden from every query
            vp = vp.masked_fill(~valid[:, None], 0.0)
        block_idx = torch.where(mask, torch.arange(mask.shape[-1], device=q.device), -1)
        key_mask = valid.expand(q.shape[0], -1) if padded else None
        out, lse = token_routed_attention(qp, kp, vp, block_idx, block_n=block_n, scale=scale, return_lse=True, backend=backend, key_mask=key_mask)
        if padded:  # drop the padding slots
            slots, out, lse = slots[valid], out[:, :, valid], lse[:, :, valid] if return_lse else None
        out = torch.empty_like(q).index_copy_(2, slots, out)
        lse = torch.empty(q.shape[:3], dtype=lse.dtype, device=q.device).index_copy_(2, slots, lse) if return_lse else None
    extras = (lse,) if return_lse else ()
    extras += (density, dense) if return_density else ()
    return (out, *extras) if extras else out


class VMoBAAttention(nn.Module):
    """Module form of :func:`vmoba_attention` for one layer (no parameters):
    ``forward(q, k, v, grid) -> [B, H, S, D]``."""

    def __init__(self, layer_idx: int, config: VMoBAConfig | None = None) -> None:
        super().__init__()
        self.layer_idx, self.config = layer_idx, config or VMoBAConfig()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int], scale: float | None = None) -> torch.Tensor:
        return vmoba_attention(q, k, v, grid, self.layer_idx, self.config, scale=scale)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, mode={self.config.mode}"


register_method(
    Method(
        name="vmoba",
        paper="VMoBA: Mixture-of-Block Attention for Video Diffusion Models (ICLR 2026)",
        arxiv="2506.23858",
        modality="video",
        ops=("token_routed_attention",),
        status="exact token-level routing (top-k and global threshold), differentiable",
    )
)
