"""BiFormer attention: bi-level routing attention (BRA) and the stage-4 attention with LePE.

Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023, arXiv 2303.08810.
Numerically the legacy op the released weights use (rayleizhu/BiFormer ``ops/bra_legacy.py`` and
``models/_common.py::AttentionLePE`` at 1697bbb); see ``shared/specs/biformer.md``. Instead of gathering
the routed regions' keys and values (a top-k-fold copy), tokens are put in region-major order and the
routing becomes a :class:`vzoo.kernels.BlockSparseLayout` (one block = one region) for
:func:`vzoo.kernels.block_sparse_attention`.

Both modules take and return NHWC maps ``[N, H, W, C]``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vzoo.kernels import BlockSparseLayout, block_sparse_attention
from vzoo.registry import Method, register_method

__all__ = ["BiLevelRoutingAttention", "AttentionLePE", "region_routing"]


def region_routing(q_win: torch.Tensor, k_win: torch.Tensor, topk: int, scale: float) -> torch.Tensor:
    """Top-k regions per region, ``[N, R, topk]``, from region queries/keys ``[N, R, C]``.

    Routing gets no gradient (the official ``diff_routing=False``); the query's own region is not
    forced in, and the top-k scores are not used to reweight values.
    """
    logits = (q_win.detach() * scale) @ k_win.detach().transpose(-1, -2)
    return torch.topk(logits, k=topk, dim=-1).indices


class _LePEAttention(nn.Module):
    """What both BiFormer attentions share: fused qkv Linear, output Linear, depthwise LePE conv."""

    def __init__(self, dim: int, num_heads: int, side_dwconv: int, qkv_bias: bool) -> None:
        super().__init__()
        name = type(self).__name__
        if dim % num_heads:
            raise ValueError(f"{name}: dim={dim} must be divisible by num_heads={num_heads}")
        if side_dwconv < 1 or side_dwconv % 2 == 0:
            raise ValueError(f"{name}: side_dwconv={side_dwconv} must be a positive odd int")
        self.dim, self.num_heads = dim, num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects NHWC [N, H, W, {self.dim}], got {tuple(x.shape)}")


class BiLevelRoutingAttention(_LePEAttention):
    """Bi-level routing attention over an ``n_win x n_win`` grid of regions.

    1. zero-pad the map to a multiple of ``n_win`` (bottom/right, before the projection; padded tokens
       are not masked: the official ``auto_pad``), 2. fused qkv Linear, 3. region means of q and k
       (detached) -> region affinity -> top-k regions per region, 4. token attention of each region over
       its routed regions with scale ``dim ** -0.5`` (the full dim, not the head dim), 5. a depthwise
       ``side_dwconv`` conv on V (LCE) added before the output Linear.

    Args:
        dim: channels ``C`` (= qk_dim, as in every released model).
        num_heads: heads; ``C`` must divide by it.
        n_win: regions per side.
        topk: routed regions per region.
        side_dwconv: LCE kernel size.
        qkv_bias: bias of the fused qkv Linear.
        backend: kernel backend for the token attention (``None`` = default).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int = 7,
        topk: int = 4,
        side_dwconv: int = 5,
        qkv_bias: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__(dim, num_heads, side_dwconv, qkv_bias)
        if not 1 <= topk <= n_win * n_win:
            raise ValueError(f"BiLevelRoutingAttention: topk={topk} must lie in [1, n_win**2={n_win * n_win}]")
        self.n_win, self.topk = n_win, topk
        self.scale = dim**-0.5
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, H, W, C]`` -> ``[N, H, W, C]``; any H, W."""
        self._check(x)
        n, h_in, w_in, c = x.shape
        s = self.n_win
        pad_b, pad_r = -h_in % s, -w_in % s
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hh, ww = h_in + pad_b, w_in + pad_r

        m, d, rh, rw = self.num_heads, c // self.num_heads, hh // s, ww // s
        region = rh * rw
        # region-major token order (regions row by row, tokens row by row inside), then the projection
        xr = x.view(n, s, rh, s, rw, c).transpose(2, 3).reshape(n, s * s, region, c)
        qkv = self.qkv(xr)  # [N, R, r, 3C]
        win = qkv[..., : 2 * c].mean(2)  # region means of q and k: [N, R, 2C]
        idx = region_routing(win[..., :c], win[..., c:], self.topk, self.scale)
        rows = idx.sort(dim=-1).values.int()[:, None]  # [N, 1, R, topk]: distinct ids, shared by all heads
        counts = torch.full(rows.shape[:3], self.topk, dtype=torch.int32, device=x.device)
        length = s * s * region
        layout = BlockSparseLayout(counts, rows, region, region, length, length)
        q, k, v = qkv.view(n, length, 3, m, d).permute(2, 0, 3, 1, 4)  # views [N, heads, L, d]
        out = block_sparse_attention(q, k, v, layout, scale=self.scale, backend=self.backend)
        # LCE on V: back to the spatial map, channels-last so the conv reads and writes NHWC memory
        v_map = qkv[..., 2 * c :].view(n, s, s, rh, rw, c).transpose(2, 3).reshape(n, hh, ww, c)
        lepe = self.lepe(v_map.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # [N, H, W, C]
        # attention output back to the spatial map, summed with the LCE in the same pass (the sum
        # takes the memory order of its first operand: contiguous NHWC)
        spatial = (n, s, rh, s, rw, m, d)
        out = lepe.reshape(spatial) + out.reshape(n, m, s, s, rh, rw, d).permute(0, 2, 4, 3, 5, 1, 6)
        out = self.proj(out.reshape(n, hh, ww, c))
        return out[:, :h_in, :w_in] if (pad_b or pad_r) else out


class AttentionLePE(_LePEAttention):
    """Plain multi-head self-attention over the whole map plus a depthwise LePE conv on the input ``x``,
    added before the output Linear (BiFormer stage 4; scale ``head_dim ** -0.5``, no qkv bias)."""

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5, qkv_bias: bool = False) -> None:
        super().__init__(dim, num_heads, side_dwconv, qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, H, W, C]`` -> ``[N, H, W, C]``."""
        self._check(x)
        n, h, w, c = x.shape
        q, k, v = self.qkv(x.reshape(n, h * w, c)).view(n, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, h, w, c)
        lepe = self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out + lepe)


register_method(
    Method(
        name="biformer",
        paper="BiFormer: Vision Transformer with Bi-Level Routing Attention (CVPR 2023)",
        arxiv="2303.08810",
        modality="vision",
        ops=("block_sparse_attention",),
        status="exact to the released weights; timm biformer_tiny/small/base",
    )
)
