"""OverLoCK building blocks (Lou & Yu, "OverLoCK: An Overview-first-Look-Closely-next ConvNet with
Context-Mixing Dynamic Kernels", CVPR 2025, arXiv 2502.20087; LMMMEng/OverLoCK ``models/overlock.py``).

So far: GRN, the dilated re-parameterisable large-kernel block and the RepConvBlock of the Base-Net
and Overview-Net (with SE, layer scale and residual depthwise convs). Module and parameter names follow
the official code so its checkpoints map one to one. All modules take NCHW maps.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d

__all__ = ["GRN", "DilatedReparamBlock", "SEModule", "LayerScale", "ResDWConv", "RepConvBlock"]


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
        if self.deployed:
            return out
        out = self.origin_bn(out)
        for k, r in zip(self.kernel_sizes, self.dilates):
            out = out + getattr(self, f"dil_bn_k{k}_{r}")(getattr(self, f"dil_conv_k{k}_{r}")(x))
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
        self.weight = nn.Parameter(torch.full((dim, 1, 1, 1), init_value))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, groups=x.shape[1])


class ResDWConv(nn.Conv2d):
    """``x + DWConv(x)`` (depthwise, with bias)."""

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


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
        return x + self.proj[-1](self.ls(self.proj[:-1](x)))
