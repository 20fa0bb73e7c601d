"""BiFormer attention: bi-level routing attention (BRA) and the stage-4 attention with LePE.

Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023, arXiv 2303.08810.
Numerically the legacy op the released weights use (rayleizhu/BiFormer ``ops/bra_legacy.py`` and
``models/_common.py::AttentionLePE`` at 1697bbb); see ``shared/specs/biformer.md``. Instead of gathering
the routed regions' keys and values (a top-k-fold copy), tokens are put in region-major order and the
routing becomes a :class:`vzoo.kernels.BlockSparseLayout` (one block = one region) for
:func:`vzoo.kernels.block_sparse_attention`.

Both modules take and return NHWC maps ``[N, H, W, C]``, the official layout; built with
``layout="NCHW"`` they take and return ``[N, C, H, W]`` (same numbers, permuted at the boundary).
Both are FX leaves (``register_notrace_module``): their routing and padding depend on the map's size.
Built under timm's ``set_scriptable(True)`` (or ``set_exportable(True)``), and whenever TorchScript compiles
it, :class:`BiLevelRoutingAttention` attends with :func:`routed_attention` (plain torch ops, the official
gather of the routed regions' keys and values) instead of the ``vzoo.kernels`` op: same parameters, same
numbers (fp32 to ~1e-6), and ``torch.jit.script`` compiles it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import is_exportable, is_scriptable, register_notrace_module

import vzoo
from vzoo.kernels import BlockSparseLayout, block_sparse_attention
from vzoo.map_layout import Layout, check_layout, check_map, to_layout
from vzoo.registry import Method, register_method

__all__ = ["BiLevelRoutingAttention", "AttentionLePE", "region_routing", "routed_attention"]


def region_routing(q_win: torch.Tensor, k_win: torch.Tensor, topk: int, scale: float) -> torch.Tensor:
    """Top-k regions per region, ``[N, R, topk]``, from region queries/keys ``[N, R, C]``.

    Routing gets no gradient (the official ``diff_routing=False``); the query's own region is not
    forced in, and the top-k scores are not used to reweight values.
    """
    logits = (q_win.detach() * scale) @ k_win.detach().transpose(-1, -2)
    return torch.topk(logits, k=topk, dim=-1)[1]


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of each region's tokens over the tokens of its routed regions, in plain torch ops: the
    routed keys and values are gathered (a top-k-fold copy, as the official op does), then SDPA.

    Args:
        q, k, v: ``[N, heads, R, r, d]``: ``R`` regions of ``r`` tokens.
        idx: ``[N, R, topk]`` routed regions per region (shared by all heads).
        scale: softmax scale.

    Returns:
        ``[N, heads, R, r, d]``.
    """
    n, m, regions, r, d = k.shape
    topk = idx.shape[-1]
    index = idx.reshape(n, 1, regions * topk, 1).expand(n, m, regions * topk, r * d)
    k_sel = k.reshape(n, m, regions, r * d).gather(2, index).view(n, m, regions, topk * r, d)
    v_sel = v.reshape(n, m, regions, r * d).gather(2, index).view(n, m, regions, topk * r, d)
    return F.scaled_dot_product_attention(q, k_sel, v_sel, scale=scale)


class _LePEAttention(nn.Module):
    """What both BiFormer attentions share: fused qkv Linear, output Linear, depthwise LePE conv."""

    def __init__(self, dim: int, num_heads: int, side_dwconv: int, qkv_bias: bool, layout: Layout) -> None:
        super().__init__()
        name = self._owner = type(self).__name__  # an attribute: TorchScript cannot read type(self).__name__
        self.layout = check_layout(name, layout)
        if dim % num_heads:
            raise ValueError(f"{name}: dim={dim} must be divisible by num_heads={num_heads}")
        if side_dwconv < 1 or side_dwconv % 2 == 0:
            raise ValueError(f"{name}: side_dwconv={side_dwconv} must be a positive odd int")
        self.dim, self.num_heads = dim, num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def _nhwc(self, x: torch.Tensor) -> torch.Tensor:
        """The checked input map as NHWC."""
        check_map(x, self.layout, self.dim, self._owner)
        return to_layout(x, self.layout, "NHWC")


@register_notrace_module
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
        layout: ``"NHWC"`` (official) or ``"NCHW"``: the layout of the input and output maps.
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
        layout: Layout = "NHWC",
    ) -> None:
        super().__init__(dim, num_heads, side_dwconv, qkv_bias, layout)
        if not 1 <= topk <= n_win * n_win:
            raise ValueError(f"BiLevelRoutingAttention: topk={topk} must lie in [1, n_win**2={n_win * n_win}]")
        self.n_win, self.topk = n_win, topk
        self.scale = dim**-0.5
        self.backend = backend
        self.plain_torch = is_scriptable() or is_exportable()  # routed_attention instead of the kernel op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, H, W, C]`` -> ``[N, H, W, C]`` (NCHW in and out with ``layout="NCHW"``); any H, W."""
        x = self._nhwc(x)
        n, h_in, w_in, c = x.shape
        s = self.n_win
        pad_b, pad_r = -h_in % s, -w_in % s
        padded = pad_b > 0 or pad_r > 0
        if padded:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hh, ww = h_in + pad_b, w_in + pad_r

        m, d, rh, rw = self.num_heads, c // self.num_heads, hh // s, ww // s
        region = rh * rw
        # region-major token order (regions row by row, tokens row by row inside), then the projection
        xr = x.reshape(n, s, rh, s, rw, c).transpose(2, 3).reshape(n, s * s, region, c)
        qkv = self.qkv(xr)  # [N, R, r, 3C]
        win = qkv[..., : 2 * c].mean(2)  # region means of q and k: [N, R, 2C]
        idx = region_routing(win[..., :c], win[..., c:], self.topk, self.scale)
        length = s * s * region
        q, k, v = qkv.view(n, length, 3, m, d).permute(2, 0, 3, 1, 4).unbind(0)  # views [N, heads, L, d]
        if self.plain_torch or torch.jit.is_scripting():
            regions = (n, m, s * s, region, d)
            out = routed_attention(q.reshape(regions), k.reshape(regions), v.reshape(regions), idx, self.scale)
        else:
            rows = idx.sort(dim=-1).values.int()[:, None]  # [N, 1, R, topk]: distinct ids, shared by all heads
            counts = torch.full(rows.shape[:3], self.topk, dtype=torch.int32, device=x.device)
            layout = BlockSparseLayout(counts, rows, region, region, length, length)
            out = block_sparse_attention(q, k, v, layout, scale=self.scale, backend=self.backend)
        # LCE on V: back to the spatial map, channels-last so the conv reads and writes NHWC memory
        v_map = qkv[..., 2 * c :].view(n, s, s, rh, rw, c).transpose(2, 3).reshape(n, hh, ww, c)
        lepe = self.lepe(v_map.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # [N, H, W, C]
        # attention output back to the spatial map, summed with the LCE in the same pass (the sum
        # takes the memory order of its first operand: contiguous NHWC)
        spatial = (n, s, rh, s, rw, m, d)
        out = lepe.reshape(spatial) + out.reshape(n, m, s, s, rh, rw, d).permute(0, 2, 4, 3, 5, 1, 6)
        out = self.proj(out.reshape(n, hh, ww, c))
        return to_layout(out[:, :h_in, :w_in] if padded else out, "NHWC", self.layout)


@register_notrace_module
class AttentionLePE(_LePEAttention):
    """Plain multi-head self-attention over the whole map plus a depthwise LePE conv on the input ``x``,
    added before the output Linear (BiFormer stage 4; scale ``head_dim ** -0.5``, no qkv bias).
    ``layout``: ``"NHWC"`` (official) or ``"NCHW"``."""

    def __init__(
        self, dim: int, num_heads: int = 8, side_dwconv: int = 5, qkv_bias: bool = False, layout: Layout = "NHWC"
    ) -> None:
        super().__init__(dim, num_heads, side_dwconv, qkv_bias, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, H, W, C]`` -> ``[N, H, W, C]`` (NCHW in and out with ``layout="NCHW"``)."""
        x = self._nhwc(x)
        n, h, w, c = x.shape
        q, k, v = self.qkv(x.reshape(n, h * w, c)).view(n, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, h, w, c)
        lepe = self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return to_layout(self.proj(out + lepe), "NHWC", self.layout)


register_method(
    Method(
        name="biformer",
        paper="BiFormer: Vision Transformer with Bi-Level Routing Attention (CVPR 2023)",
        arxiv="2303.08810",
        modality="vision",
        ops=("block_sparse_attention",),
        status="exact to the official code (golden fixtures, dense backbones included); timm biformer_tiny/small/base",
    )
)


vzoo.register_timm_models(finished=__name__)  # this module brought timm in: vzoo's timm models can register now
