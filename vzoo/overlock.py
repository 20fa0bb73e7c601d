"""OverLoCK building blocks (Lou & Yu, "OverLoCK: An Overview-first-Look-Closely-next ConvNet with
Context-Mixing Dynamic Kernels", CVPR 2025, arXiv 2502.20087; LMMMEng/OverLoCK ``models/overlock.py``).

GRN, the dilated re-parameterisable large-kernel block, the RepConvBlock of the Base-Net and
Overview-Net, and ContMix: per-pixel dynamic kernels built from the affinity of each pixel to 7 x 7
pooled region centres (:func:`contmix_kernels`), applied with NATTEN's border rule by
:func:`vzoo.kernels.neighborhood_aggregate`. :class:`ContMix` is the plug-in block (``models/contmix.py``),
:class:`DynamicConvBlock` the Focus-Net block with its context stream. Module and parameter names follow
the official code so its checkpoints map one to one. All modules take NCHW maps (:class:`ContMix` also
NHWC, with ``layout="NHWC"``).

Built under timm's ``set_scriptable(True)`` (or ``set_exportable(True)``), and whenever TorchScript compiles
them, the blocks aggregate with :func:`vzoo.kernels.neighborhood_aggregate_plain` (plain torch ops) instead of the
``vzoo.kernels`` op: same parameters, same numbers (fp32 to ~1e-6), and ``torch.jit.script`` compiles them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, is_exportable, is_scriptable, register_notrace_module, trunc_normal_

import vzoo
from vzoo.kernels import neighborhood_aggregate, neighborhood_aggregate_plain, neighborhood_rpb_index
from vzoo.map_layout import Layout, check_layout, check_map, to_layout
from vzoo.registry import Method, register_method

__all__ = [
    "GRN", "DilatedReparamBlock", "SEModule", "LayerScale", "ResDWConv", "RepConvBlock",
    "contmix_kernels", "ContMix", "DynamicConvBlock", "CTXDownsample",
]


class GRN(nn.Module):
    """Global response normalisation (ConvNeXt V2, arXiv 2301.00808) on ``[N, C, H, W]``:
    ``x * (1 + gamma * N(x)) + beta`` with ``N(x) = ||x||_HW / (mean_C ||x||_HW + 1e-6)``."""

    def __init__(self, dim: int, use_bias: bool = True) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1)) if use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
        nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
        out = (self.gamma * nx + 1) * x
        return out if self.beta is None else out + self.beta


# Small dilated branches per large kernel size (UniRepLKNet's defaults, kept by OverLoCK).
_BRANCHES: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    19: ((5, 7, 9, 9, 3, 3, 3), (1, 1, 1, 2, 4, 5, 7)),
    17: ((5, 7, 9, 3, 3, 3), (1, 1, 2, 4, 5, 7)),
    15: ((5, 7, 7, 3, 3, 3), (1, 1, 2, 3, 5, 7)),
    13: ((5, 7, 7, 3, 3, 3), (1, 1, 2, 3, 4, 5)),
    11: ((5, 7, 5, 3, 3, 3), (1, 1, 2, 3, 4, 5)),
    9: ((5, 7, 5, 3, 3), (1, 1, 2, 3, 4)),
    7: ((5, 3, 3, 3), (1, 1, 2, 3)),
    5: ((3, 3), (1, 2)),
}


def _fuse_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise conv + eval-mode BatchNorm -> one conv's ``(weight, bias)``."""
    factor = bn.weight / (bn.running_var + bn.eps).sqrt()
    bias = torch.zeros_like(bn.running_mean) if bias is None else bias
    return weight * factor.reshape(-1, 1, 1, 1), bn.bias + (bias - bn.running_mean) * factor


def _dilated_as_dense(weight: torch.Tensor, rate: int, size: int) -> torch.Tensor:
    """A ``k x k`` kernel with dilation ``rate`` as the equivalent dense ``size x size`` kernel
    (zeros between taps, centred)."""
    k = weight.shape[-1]
    span = rate * (k - 1) + 1
    dense = weight.new_zeros(*weight.shape[:2], size, size)
    start = (size - span) // 2
    dense[..., start : start + span : rate, start : start + span : rate] = weight
    return dense


class DilatedReparamBlock(nn.Module):
    """A depthwise ``kernel_size`` conv plus parallel dilated small depthwise convs, each followed by
    BatchNorm and summed (UniRepLKNet, arXiv 2311.15599). :meth:`reparameterize` merges all branches
    into the single large conv (eval-mode BN statistics), which is how the ``*_reparam`` checkpoints
    store it (``lk_origin.weight``/``lk_origin.bias``)."""

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False) -> None:
        super().__init__()
        if kernel_size not in _BRANCHES:
            raise ValueError(f"DilatedReparamBlock: kernel_size={kernel_size} must be one of {sorted(_BRANCHES)}")
        self.kernel_sizes, self.dilates = _BRANCHES[kernel_size]
        self.lk_origin = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=deploy)
        if not deploy:
            self.origin_bn = nn.BatchNorm2d(channels)
            for k, r in zip(self.kernel_sizes, self.dilates):
                conv = nn.Conv2d(channels, channels, k, padding=(r * (k - 1) + 1) // 2, dilation=r, groups=channels, bias=False)
                self.add_module(f"dil_conv_k{k}_{r}", conv)
                self.add_module(f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels))

    @property
    def deployed(self) -> bool:
        return not hasattr(self, "origin_bn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lk_origin(x)
        if not hasattr(self, "origin_bn"):  # deployed
            return out
        out = self.origin_bn(out)
        branch = x
        # the branches in registration order (conv, bn, conv, bn, ...): a loop TorchScript unrolls, unlike
        # attribute names built at run time
        for name, m in self.named_children():
            if name.startswith("dil_conv"):
                branch = m(x)
            elif name.startswith("dil_bn"):
                out = out + m(branch)
        return out

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold every branch and BatchNorm into ``lk_origin`` (in place; outputs unchanged in eval mode)."""
        if self.deployed:
            return
        size = self.lk_origin.kernel_size[0]
        weight, bias = _fuse_bn(self.lk_origin.weight, self.lk_origin.bias, self.origin_bn)
        for k, r in zip(self.kernel_sizes, self.dilates):
            w_b, b_b = _fuse_bn(getattr(self, f"dil_conv_k{k}_{r}").weight, None, getattr(self, f"dil_bn_k{k}_{r}"))
            weight = weight + _dilated_as_dense(w_b, r, size)
            bias = bias + b_b
            delattr(self, f"dil_conv_k{k}_{r}")
            delattr(self, f"dil_bn_k{k}_{r}")
        channels = weight.shape[0]
        merged = nn.Conv2d(channels, channels, size, padding=size // 2, groups=channels, bias=True).to(weight)
        merged.weight.copy_(weight)
        merged.bias.copy_(bias)
        self.lk_origin = merged
        del self.origin_bn


class SEModule(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(W2 GELU(W1 avgpool(x)))``, hidden ``max(16, C / red)``."""

    def __init__(self, dim: int, red: int = 8) -> None:
        super().__init__()
        inner = max(16, dim // red)
        self.proj = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, inner, 1), nn.GELU(), nn.Conv2d(inner, dim, 1), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.proj(x)


class LayerScale(nn.Module):
    """Per-channel scale and shift, stored as OverLoCK does (a depthwise 1x1 conv weight ``[C, 1, 1, 1]``)."""

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim, 1, 1, 1), float(init_value)))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, groups=x.shape[1])


class ResDWConv(nn.Conv2d):
    """``x + DWConv(x)`` (depthwise, with bias)."""

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self._conv_forward(x, self.weight, self.bias)


class RepConvBlock(nn.Module):
    """Base-Net / Overview-Net block: ``x = x + DW3x3(x)``, then a residual branch LN -> dilated large
    kernel -> BN -> SE -> 1x1 (x mlp_ratio) -> GELU -> residual DW3x3 -> GRN -> 1x1, scaled by
    LayerScale; with ``res_scale`` the shortcut is scaled instead (``ls(x) + branch(x)``)."""

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = None,
        res_scale: bool = False,
        drop_path: float = 0.0,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.res_scale = res_scale
        hidden = int(dim * mlp_ratio)
        self.dwconv = ResDWConv(dim, 3)
        self.proj = nn.Sequential(
            LayerNorm2d(dim, eps=1e-6),
            DilatedReparamBlock(dim, kernel_size, deploy=deploy),
            nn.BatchNorm2d(dim),
            SEModule(dim),
            nn.Conv2d(dim, hidden, 1),
            nn.GELU(),
            ResDWConv(hidden, 3),
            GRN(hidden),
            nn.Conv2d(hidden, dim, 1),
            DropPath(drop_path) if drop_path > 0 else nn.Identity(),
        )
        self.ls = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dwconv(x)
        if self.res_scale:
            return self.ls(x) + self.proj(x)
        branch = x
        for i, m in enumerate(self.proj):  # LayerScale before the last module (DropPath)
            if i == len(self.proj) - 1:
                branch = self.ls(branch)
            branch = m(branch)
        return x + branch


def _with_rpb(logits: torch.Tensor, rpb: torch.Tensor) -> torch.Tensor:
    """Add a ``[G, 2k-1, 2k-1]`` relative-position bias to tap logits ``[B, G, H, W, k*k]``, looked up with
    the same border-clamped windows the aggregation uses: index ``(key - query) + (k - 1)`` per axis."""
    k = (rpb.shape[-1] + 1) // 2
    index = neighborhood_rpb_index(k, logits.shape[2], logits.shape[3], logits.device)
    return logits + rpb.flatten(1)[:, index]


def contmix_kernels(
    query: torch.Tensor, key: torch.Tensor, weight_proj: nn.Conv2d, rpb_small: torch.Tensor, rpb_large: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ContMix's dynamic kernels: ``softmax(RPB + Linear_{L -> k^2 + K^2}(q . k_regions))`` per pixel and group.

    Args:
        query: ``[B, G*c, H, W]``, already scaled.
        key: ``[B, G*c, 7, 7]``: the ``L = 49`` pooled region tokens (any ``L`` matching ``weight_proj``).
        weight_proj: ``Conv2d(L, k*k + K*K, 1)`` (with bias), shared by all pixels and groups.
        rpb_small, rpb_large: ``[G, 2k-1, 2k-1]`` and ``[G, 2K-1, 2K-1]`` relative-position biases.

    Returns:
        ``([B, G, H, W, k*k], [B, G, H, W, K*K])`` softmaxed taps, NATTEN's tap order.
    """
    groups = rpb_small.shape[0]
    b, channels, h, w = query.shape
    if channels % groups or key.shape[:2] != query.shape[:2] or key[0, 0].numel() != weight_proj.in_channels:
        raise ValueError(
            f"contmix_kernels: query {tuple(query.shape)} and key {tuple(key.shape)} must share [B, C] with C divisible "
            f"by {groups} groups, and key must hold {weight_proj.in_channels} region tokens"
        )
    sizes = [((rpb.shape[-1] + 1) // 2) ** 2 for rpb in (rpb_small, rpb_large)]
    if weight_proj.out_channels != sum(sizes):
        raise ValueError(
            f"contmix_kernels: weight_proj gives {weight_proj.out_channels} taps but the biases need {sizes[0]} + {sizes[1]}"
        )
    return _contmix_kernels(query, key, weight_proj.weight, weight_proj.bias, rpb_small, rpb_large)


def _contmix_kernels(
    query: torch.Tensor,
    key: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rpb_small: torch.Tensor,
    rpb_large: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`contmix_kernels` with the projection as ``weight [T, L, 1, 1]``, ``bias [T]``; unchecked."""
    groups = rpb_small.shape[0]
    b, channels, h, w = query.shape
    q = query.reshape(b, groups, channels // groups, h * w).transpose(-1, -2)  # [B, G, HW, c]
    regions = key.reshape(b, groups, channels // groups, -1)  # [B, G, c, L]
    # The L -> taps projection is linear in the affinity q . k, so fold it into the keys first:
    # (q^T k) W^T = q^T (k W^T) costs c*T per pixel instead of L*(c + T).
    taps = q @ (regions @ weight.flatten(1).t())  # [B, G, HW, T]
    if bias is not None:
        taps = taps + bias
    k = (rpb_small.shape[-1] + 1) // 2
    small_size = k * k
    taps = taps.view(b, groups, h, w, -1)
    small, large = taps[..., :small_size], taps[..., small_size:]
    return _with_rpb(small, rpb_small).softmax(-1), _with_rpb(large, rpb_large).softmax(-1)


class _ContMixBase(nn.Module):
    """What the plug-in ContMix and the Focus-Net DynamicConvBlock share: query/key/tap projections, the
    two dynamic-kernel branches, LEPE, SE, gate, output projection and the ConvFFN, with the official names.

    ``dim`` channels are mixed; the block's input and output have ``out_dim`` channels (``dim`` plus the
    context stream, if any); keys are pooled from ``key_dim`` channels.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        key_dim: int,
        kernel_size: int,
        smk_size: int,
        num_heads: int,
        mlp_ratio: float,
        ls_init_value: float | None,
        res_scale: bool,
        drop_path: float,
        deploy: bool,
        rpb_std: float,
    ) -> None:
        super().__init__()
        groups = 2 * num_heads
        if dim % (2 * groups):
            raise ValueError(f"{type(self).__name__}: dim={dim} must be divisible by 4 * num_heads = {2 * groups}")
        if smk_size > kernel_size or smk_size % 2 == 0:
            raise ValueError(f"{type(self).__name__}: smk_size={smk_size} must be odd and at most kernel_size={kernel_size}")
        self.dim, self.kernel_size, self.smk_size, self.num_heads, self.res_scale = dim, kernel_size, smk_size, groups, res_scale
        self.plain_torch = is_scriptable() or is_exportable()  # neighborhood_aggregate_plain instead of the kernel op
        self.weight_value: nn.Module | None = None  # the value's own projection (ContMix only)
        self.scale = (dim // groups) ** -0.5  # official quirk: the group width is dim / (2 G)
        self.weight_query = nn.Sequential(nn.Conv2d(dim, dim // 2, 1, bias=False), nn.BatchNorm2d(dim // 2))
        self.weight_key = nn.Sequential(nn.AdaptiveAvgPool2d(7), nn.Conv2d(key_dim, dim // 2, 1, bias=False), nn.BatchNorm2d(dim // 2))
        self.weight_proj = nn.Conv2d(49, kernel_size**2 + smk_size**2, 1)
        self.lepe = nn.Sequential(DilatedReparamBlock(dim, kernel_size, deploy=deploy), nn.BatchNorm2d(dim))
        self.se_layer = SEModule(dim)
        self.gate = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.SiLU())
        self.proj = nn.Sequential(nn.BatchNorm2d(dim), nn.Conv2d(dim, out_dim, 1))
        self.dwconv2 = ResDWConv(out_dim, 3)
        self.norm2 = LayerNorm2d(out_dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Conv2d(out_dim, hidden, 1), nn.GELU(), ResDWConv(hidden, 3), GRN(hidden), nn.Conv2d(hidden, out_dim, 1)
        )
        self.ls1 = LayerScale(out_dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ls2 = LayerScale(out_dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.rpb1 = nn.Parameter(torch.zeros(groups, 2 * smk_size - 1, 2 * smk_size - 1))
        self.rpb2 = nn.Parameter(torch.zeros(groups, 2 * kernel_size - 1, 2 * kernel_size - 1))
        if rpb_std:
            trunc_normal_(self.rpb1, std=rpb_std)
            trunc_normal_(self.rpb2, std=rpb_std)

    def _working_size(self, h: int, w: int) -> tuple[int, int] | None:
        """Maps smaller than the kernel are upsampled so the short side is ``kernel_size`` (official rule)."""
        k = self.kernel_size
        if min(h, w) >= k:
            return None
        return (k, int(k / h * w)) if h < w else (int(k / w * h), k)

    def _mix(self, feats: torch.Tensor, value: torch.Tensor | None = None) -> torch.Tensor:
        """Dynamic-kernel mixing of ``value [B, dim, H, W]`` (``None``: ``feats`` through ``weight_value``);
        the query comes from ``feats[:, :dim]`` and the keys from ``feats[:, dim:]`` (the context stream)
        or, without one, from ``feats`` itself."""
        size_in = feats.shape[-2:]
        size = self._working_size(size_in[0], size_in[1])
        if size is not None:
            feats = F.interpolate(feats, size=[size[0], size[1]], mode="bilinear", align_corners=False)
            if value is not None:
                value = F.interpolate(value, size=[size[0], size[1]], mode="bilinear", align_corners=False)
        if value is None:
            value = feats
        if self.weight_value is not None:
            value = self.weight_value(value)
        query = self.weight_query(feats[:, : self.dim]) * self.scale
        key = self.weight_key(feats[:, self.dim :] if feats.shape[1] > self.dim else feats)
        small, large = _contmix_kernels(query, key, self.weight_proj.weight, self.weight_proj.bias, self.rpb1, self.rpb2)
        b, _, h, w = value.shape
        halves = value.view(b, 2, self.num_heads, -1, h, w).permute(1, 0, 2, 4, 5, 3)  # [2, B, G, H, W, c]
        out = torch.cat(
            [self._aggregate(small, halves[0], self.smk_size), self._aggregate(large, halves[1], self.kernel_size)], 1
        )
        out = out.permute(0, 1, 4, 2, 3).reshape(b, -1, h, w)
        return out if size is None else F.adaptive_avg_pool2d(out, size_in)

    def _aggregate(self, attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
        """``neighborhood_aggregate`` of one half, ``[B, G, H, W, c]``."""
        if self.plain_torch or torch.jit.is_scripting():
            return neighborhood_aggregate_plain(attn, value, kernel_size)
        return neighborhood_aggregate(attn, value.contiguous(), kernel_size)

    def _finish(self, mixed: torch.Tensor, gate: torch.Tensor, lepe: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        """``+ LEPE -> SE -> x gate -> proj`` residual onto ``identity``, then the DW3x3 residual and ConvFFN."""
        x = self.proj(gate * self.se_layer(mixed + lepe))
        x = self.ls1(identity) + self.drop_path(x) if self.res_scale else identity + self.drop_path(self.ls1(x))
        x = self.dwconv2(x)
        if self.res_scale:
            return self.ls2(x) + self.drop_path(self.mlp(self.norm2(x)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


@register_notrace_module  # FX leaf: small maps are upsampled, a branch on the map's size
class ContMix(_ContMixBase):
    """The plug-in ContMix block (``models/contmix.py`` ``ContMixBlock``): keys pooled from the block's own
    features; the value has its own 1x1 + BN. ``[B, dim, H, W] -> [B, dim, H, W]``, or ``[B, H, W, dim]``
    in and out with ``layout="NHWC"`` (same numbers, permuted at the boundary).

    Args:
        dim: channels, divisible by ``4 * num_heads``.
        kernel_size: large dynamic kernel ``K`` (and the LEPE kernel); smk_size: small one ``k``.
        num_heads: each of the two channel halves is split into ``2 * num_heads`` kernel groups.
        mlp_ratio, ls_init_value, res_scale, drop_path, deploy: as in :class:`RepConvBlock`.
        layout: ``"NCHW"`` (official) or ``"NHWC"``.
    """

    def __init__(
        self,
        dim: int = 64,
        kernel_size: int = 7,
        smk_size: int = 5,
        num_heads: int = 2,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = None,
        res_scale: bool = False,
        drop_path: float = 0.0,
        deploy: bool = False,
        layout: Layout = "NCHW",
    ) -> None:
        super().__init__(dim, dim, dim, kernel_size, smk_size, num_heads, mlp_ratio, ls_init_value, res_scale, drop_path, deploy, 0.02)
        self.layout = check_layout("ContMix", layout)
        self.dwconv1 = ResDWConv(dim, 3)
        self.norm1 = LayerNorm2d(dim, eps=1e-6)
        self.weight_value = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim))
        self.fusion_proj = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_map(x, self.layout, self.dim, "ContMix")
        x = self.dwconv1(to_layout(x, self.layout, "NCHW").contiguous())
        identity, x = x, self.norm1(x)
        mixed = self.fusion_proj(self._mix(x))
        return to_layout(self._finish(mixed, self.gate(x), self.lepe(x), identity), "NCHW", self.layout)


@register_notrace_module  # FX leaf, as ContMix
class DynamicConvBlock(_ContMixBase):
    """Focus-Net block: ContMix over ``[x, h]`` whose keys come from the context stream ``h``.

    ``forward(x [B, dim, H, W], h [B, ctx_dim, H, W], h_ref [B, ctx_dim, H, W])`` first re-injects the
    top-down prior (``h = x_scale(h) + h_scale(h_ref)``, except in the first block), then returns
    ``(x, h)`` (the official last block returns ``cat[x, h]``: the backbone concatenates them).

    Args:
        dim: channels of ``x``; ctx_dim: channels of the context stream (``C3 / 4`` in OverLoCK).
        others: as in :class:`ContMix`; the RPB starts at zero as in ``models/overlock.py``.
    """

    __constants__ = ["is_first"]  # TorchScript prunes the branch it decides (x_scale, h_scale exist)

    def __init__(
        self,
        dim: int,
        ctx_dim: int,
        kernel_size: int = 7,
        smk_size: int = 5,
        num_heads: int = 2,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = None,
        res_scale: bool = False,
        drop_path: float = 0.0,
        is_first: bool = False,
        deploy: bool = False,
    ) -> None:
        out_dim = dim + ctx_dim
        super().__init__(dim, out_dim, ctx_dim, kernel_size, smk_size, num_heads, mlp_ratio, ls_init_value, res_scale, drop_path, deploy, 0.0)
        self.is_first = is_first
        if not is_first:
            self.x_scale = LayerScale(ctx_dim, 1.0)
            self.h_scale = LayerScale(ctx_dim, 1.0)
        self.dwconv1 = ResDWConv(out_dim, 3)
        self.norm1 = LayerNorm2d(out_dim, eps=1e-6)
        self.fusion = nn.Sequential(
            nn.Conv2d(out_dim, out_dim, 3, padding=1, groups=out_dim),
            nn.BatchNorm2d(out_dim),
            nn.GELU(),
            nn.Conv2d(out_dim, dim, 1),
            GRN(dim),
        )
        self.dyconv_proj = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim))

    def forward(self, x: torch.Tensor, h: torch.Tensor, h_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_first:
            h = self.x_scale(h) + self.h_scale(h_ref)
        feats = self.dwconv1(torch.cat([x, h], 1))
        identity, feats = feats, self.norm1(feats)
        value = self.fusion(feats)
        mixed = self.dyconv_proj(self._mix(feats, value))
        out = self._finish(mixed, self.gate(value), self.lepe(value), identity)
        x, h = out.split([self.dim, out.shape[1] - self.dim], 1)
        return x, h


class CTXDownsample(nn.Module):
    """Conv3x3 stride 2 + BN on both streams between the Focus-Net stages: ``x`` (dim -> h_dim) and the
    context (``h_dim / 4`` channels)."""

    def __init__(self, dim: int, h_dim: int) -> None:
        super().__init__()
        self.x_proj = nn.Sequential(nn.Conv2d(dim, h_dim, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(h_dim))
        ctx = h_dim // 4
        self.h_proj = nn.Sequential(nn.Conv2d(ctx, ctx, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(ctx))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_proj(x), self.h_proj(h)


register_method(
    Method(
        name="overlock",
        paper="OverLoCK: An Overview-first-Look-Closely-next ConvNet with Context-Mixing Dynamic Kernels (CVPR 2025)",
        arxiv="2502.20087",
        modality="vision",
        ops=("neighborhood_aggregate",),
        status="exact to the official code (golden fixtures, dense backbones included); timm models overlock_xt/t/s/b",
    )
)


vzoo.register_timm_models(finished=__name__)  # this module brought timm in: vzoo's timm models can register now
