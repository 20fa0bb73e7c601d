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
:func:`vzoo.kernels.token_routed_attention` computes in one exact, differentiable pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from vzoo.kernels import token_routed_attention
from vzoo.registry import Method, register_method

__all__ = ["VMoBAConfig", "VMoBAAttention", "vmoba_attention", "vmoba_routing", "vmoba_permutation"]

_POOLS = ("head_global", "query_head")


def _positive_ints(name: str, value: tuple[int, ...] | None, n: int) -> None:
    if value is not None and (len(value) != n or not all(isinstance(v, int) and v > 0 for v in value)):
        raise ValueError(f"VMoBAConfig.{name}={value!r} must be None or {n} positive int(s)")


def _divisor_near(n: int, target: float) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - target), d))


@dataclass(frozen=True)
class VMoBAConfig:
    """VMoBA settings.

    Block sizes left at ``None`` follow the grid: the divisor nearest to 1/8 of T for 1D blocks (the
    paper's 21 frames -> 3), 1/4 of H and W for 2D blocks, 1/4 of each axis for 3D cubes; on a
    16x32x32 grid that is (2,), (8, 8), (4, 8, 8). Top-k defaults keep about a quarter of the blocks.

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

    def block(self, layer_idx: int, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """``(s_T, s_H, s_W)`` of the key blocks in layer ``layer_idx`` on ``grid`` (0 = the whole axis)."""
        t, h, w = grid
        kind = layer_idx % 3
        if kind == 0:
            return ((self.temporal_block or (_divisor_near(t, t / 8),))[0], 0, 0)
        if kind == 1:
            return (0, *(self.spatial_block or (_divisor_near(h, h / 4), _divisor_near(w, w / 4))))
        return tuple(self.cube_block or (_divisor_near(t, t / 4), _divisor_near(h, h / 4), _divisor_near(w, w / 4)))

    def check_grid(self, grid: tuple[int, int, int]) -> None:
        """Raise ``ValueError`` naming the field whose block does not tile ``grid`` exactly."""
        for kind, field in enumerate(("temporal_block", "spatial_block", "cube_block")):
            for size, n, axis in zip(self.block(kind, grid), grid, "THW"):
                if size and n % size:
                    raise ValueError(f"VMoBAConfig.{field}={getattr(self, field)} does not tile the latent grid {tuple(grid)} ({axis}={n})")


def vmoba_permutation(grid: tuple[int, int, int], block: tuple[int, int, int], device=None) -> tuple[torch.Tensor, int]:
    """Token order that makes each block contiguous, and the block size in tokens.

    ``block = (s_T, s_H, s_W)`` with 0 meaning "the whole axis". Tokens are in (t, h, w) order; blocks
    are numbered (t-block, h-block, w-block) row-major and tokens inside a block keep (t, h, w) order.
    """
    t, h, w = grid
    st, sh, sw = (size or n for size, n in zip(block, grid))
    if t % st or h % sh or w % sw:
        raise ValueError(f"block {block} does not tile the latent grid {tuple(grid)}")
    ids = torch.arange(t * h * w, device=device).view(t // st, st, h // sh, sh, w // sw, sw)
    return ids.permute(0, 2, 4, 1, 3, 5).reshape(-1), st * sh * sw


@torch.no_grad()
def vmoba_routing(
    q: torch.Tensor, k: torch.Tensor, block_n: int, *, topk: int | None = None, tau: float | None = None, pool: str = "head_global"
) -> torch.Tensor:
    """Which key blocks each query attends to: bool ``[B, H, S, N_b]`` (own block always included).

    ``q, k``: ``[B, H, S, D]`` in block-contiguous order, ``S`` a multiple of ``block_n``. Exactly one of
    ``topk`` (per query) or ``tau`` (min-max normalised cumulative share over ``pool``) is given.
    """
    if (topk is None) == (tau is None):
        raise ValueError("vmoba_routing: give exactly one of topk and tau")
    b, h, s, d = q.shape
    nb = s // block_n
    means = k.float().view(b, -1, nb, block_n, d).mean(3)  # [B, Hk, Nb, D]
    if means.shape[1] != h:
        means = means.repeat_interleave(h // means.shape[1], 1)
    gate = q.float() @ means.transpose(-1, -2)  # [B, H, S, Nb]: raw dot products, no 1/sqrt(d)
    own = (torch.arange(s, device=q.device) // block_n)[:, None] == torch.arange(nb, device=q.device)  # [S, Nb]
    if topk is not None:
        chosen = gate.masked_fill(own, float("inf")).topk(min(topk, nb), dim=-1).indices
        return torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, chosen, True)
    own = own.expand_as(gate)
    # the pool is the last axis: all (query, block) pairs of a head, or the blocks of one query
    g, o = (gate.flatten(-2)[..., None, :], own.flatten(-2)[..., None, :]) if pool == "head_global" else (gate, own)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    norm = (g - lo) / (hi - lo).clamp_min(1e-12)  # min-max, not softmax
    total = norm.sum(-1, keepdim=True).clamp_min(1e-12)
    remain = (tau - norm.masked_fill(~o, 0).sum(-1, keepdim=True) / total).clamp_min(0)  # own blocks count toward tau
    values, order = norm.masked_fill(o, -1.0).sort(-1, descending=True)  # own blocks sort last
    share = values.clamp_min(0).cumsum(-1) / total
    # keep while the cumulative share is below what remains, plus the first entry that reaches it
    keep_n = (share < remain).sum(-1, keepdim=True) + 1
    keep = (torch.arange(values.shape[-1], device=q.device) < keep_n) & (values >= 0)
    return torch.zeros_like(keep).scatter_(-1, order, keep).view_as(gate) | own


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
) -> torch.Tensor | tuple:
    """VMoBA attention over video tokens.

    Args:
        q, k, v: ``[B, H, S, D]`` (SDPA layout; GQA allowed), ``S = T*H*W`` tokens in (t, h, w) order.
        grid: latent token grid ``(T, H, W)``.
        layer_idx: selects the 1D / 2D / 3D block shape (``layer_idx % 3``).
        config: :class:`VMoBAConfig` (default settings if None).
        scale: softmax scale (default ``D ** -0.5``).
        return_lse: also return the log-sum-exp ``[B, H, S]`` (fp32), e.g. to merge with text attention.
        return_density: also return the fraction of (query, key) pairs attended.

    Returns:
        ``out [B, H, S, D]`` in the input order, followed by ``lse`` and ``density`` when asked for.
    """
    config = config or VMoBAConfig()
    t, h, w = grid
    if q.dim() != 4 or q.shape[2] != t * h * w or k.shape[2] != q.shape[2]:
        raise ValueError(f"vmoba_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, H, T*H*W, D] for grid {tuple(grid)}")
    config.check_grid(grid)
    perm, block_n = vmoba_permutation(grid, config.block(layer_idx, grid), q.device)
    qp, kp, vp = (x.index_select(2, perm) for x in (q, k, v))
    if config.mode == "topk":
        mask = vmoba_routing(qp, kp, block_n, topk=config.topk[layer_idx % 3])
    else:
        mask = vmoba_routing(qp, kp, block_n, tau=config.tau, pool=config.pool)
    block_idx = torch.where(mask, torch.arange(mask.shape[-1], device=q.device), -1)
    out, lse = token_routed_attention(qp, kp, vp, block_idx, block_n=block_n, scale=scale, return_lse=True, backend=backend)
    out = torch.empty_like(out).index_copy_(2, perm, out)
    extras = (torch.empty_like(lse).index_copy_(2, perm, lse),) if return_lse else ()
    extras += (mask.float().mean().item(),) if return_density else ()
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
