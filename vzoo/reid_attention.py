"""A lightweight attention block for re-ID backbones, and placing attention blocks in any timm CNN.

In the spirit of Eisenbach et al., "A Little Bit Attention Is All You Need for Person
Re-Identification" (arXiv 2302.14574): the paper's block design is not public (see
``shared/specs/sab_reid.md`` section 2.2), so this is vzoo's own cheap channel-and-spatial block, and
the paper's point, *where* to put attention, is made measurable by :func:`insert_attention` and
``vzoo reid-search``.

:class:`LiteAttention`, for ``x [B, C, H, W]``::

    channel gate  g_c = sigmoid(W2 relu(W1 GAP(x)))          W1: C -> C/r, W2: C/r -> C (1x1 convs)
    spatial gate  g_s = sigmoid(conv3x3([mean_C x, max_C x]))   2 -> 1 channels
    y = x * g_c * g_s

Cost: ``2 C^2 / r + 18`` parameters; about ``2 C^2 / r + 22 HW + 3 C HW`` multiply-adds (r = 16), against
CBAM's 7x7 spatial conv with avg+max channel pooling, SE's per-block insertion everywhere, or a
non-local block's ``O((HW)^2 C)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from vzoo.map_layout import Layout, check_layout, check_map, to_layout

__all__ = ["LiteAttention", "ATTENTION_BLOCKS", "insert_attention", "parse_placement"]


class LiteAttention(nn.Module):
    """Channel gate from global average pooling and spatial gate from channel mean/max, multiplied in.
    ``[B, C, H, W]`` in and out, or ``[B, H, W, C]`` with ``layout="NHWC"``."""

    def __init__(self, channels: int, reduction: int = 16, layout: Layout = "NCHW") -> None:
        super().__init__()
        self.channels, self.layout = channels, check_layout("LiteAttention", layout)
        hidden = max(8, channels // reduction)
        self.channel = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_map(x, self.layout, self.channels, "LiteAttention")
        x = to_layout(x, self.layout, "NCHW")
        squeeze = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        out = x * torch.sigmoid(self.channel(x)) * torch.sigmoid(self.spatial(squeeze))
        return to_layout(out, "NCHW", self.layout)


def _timm_block(kind: str):
    from timm.layers import NonLocalAttn, SEModule
    from timm.layers.cbam import CbamModule

    return {"se": SEModule, "cbam": CbamModule, "nonlocal": NonLocalAttn}[kind]


ATTENTION_BLOCKS = ("lite", "se", "cbam", "nonlocal")


def parse_placement(text: str) -> tuple[str, tuple[int, ...]]:
    """``"none"`` or ``"KIND:i,j"`` (stage indices of the model's ``feature_info``), e.g. ``"lite:3,4"``."""
    if text == "none":
        return "none", ()
    kind, _, stages = text.partition(":")
    if kind not in ATTENTION_BLOCKS or not stages:
        raise ValueError(f"placement {text!r}: expected 'none' or KIND:STAGES with KIND in {ATTENTION_BLOCKS}, e.g. 'lite:3,4'")
    try:
        return kind, tuple(int(s) for s in stages.split(","))
    except ValueError as err:
        raise ValueError(f"placement {text!r}: stages must be integers") from err


def insert_attention(model: nn.Module, kind: str, stages: Sequence[int]) -> nn.Module:
    """Append an attention block of ``kind`` after each chosen stage of a timm model (indices into its
    ``feature_info``; e.g. ResNet: 1..4 = layer1..layer4). In place; returns the model."""
    if kind == "none" or not stages:
        return model
    if kind not in ATTENTION_BLOCKS:
        raise ValueError(f"attention kind {kind!r} must be one of {ATTENTION_BLOCKS}")
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(f"{type(model).__name__} has no timm feature_info to place attention by stage")
    info = info.info if hasattr(info, "info") else info
    for stage in stages:
        if not 0 <= stage < len(info):
            raise ValueError(f"stage {stage} is out of range: the model has stages 0..{len(info) - 1}")
        name, channels = info[stage]["module"], info[stage]["num_chs"]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        block = LiteAttention(channels) if kind == "lite" else _timm_block(kind)(channels)
        setattr(parent, child, nn.Sequential(getattr(parent, child), block))
    return model
