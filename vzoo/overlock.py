"""OverLoCK building blocks (Lou & Yu, "OverLoCK: An Overview-first-Look-Closely-next ConvNet with
Context-Mixing Dynamic Kernels", CVPR 2025, arXiv 2502.20087; LMMMEng/OverLoCK ``models/overlock.py``).

So far: GRN and the dilated re-parameterisable large-kernel block. Module and parameter names follow
the official code so its checkpoints map one to one. All modules take NCHW maps.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["GRN", "DilatedReparamBlock"]


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
