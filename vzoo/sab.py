"""Sentence Attention Block (Khoshsirat & Kambhamettu, "Sentence Attention Blocks for Answer Grounding",
ICCV 2023, arXiv 2309.11593; khoshsirat/embedding-attention-blocks ``model.py`` ``SentenceAttention``).

A channel gate computed from the sentence embedding alone: ``MLP(t) = Linear(E, 4E) -> LayerNorm ->
ReLU -> Linear(4E, C)``, softmax over the channels, multiplied into the image map. No image squeeze,
no sigmoid, no residual: the gates sum to 1 over channels, as in the official code.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vzoo.map_layout import Layout, check_layout, check_map

__all__ = ["SentenceAttentionBlock"]


class SentenceAttentionBlock(nn.Module):
    """``forward(x [B, C, H, W], text [B, E]) -> [B, C, H, W]`` with ``x * softmax_C(MLP(text))``;
    ``x`` and the output are ``[B, H, W, C]`` with ``layout="NHWC"``."""

    def __init__(self, channels: int, text_dim: int = 384, expansion: int = 4, layout: Layout = "NCHW") -> None:
        super().__init__()
        self.channels, self.layout = channels, check_layout("SentenceAttentionBlock", layout)
        hidden = text_dim * expansion
        self.mlp = nn.Sequential(nn.Linear(text_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if text.dim() != 2 or text.shape[0] != x.shape[0] or text.shape[1] != self.mlp[0].in_features:
            raise ValueError(f"SentenceAttentionBlock: text {tuple(text.shape)} must be [B={x.shape[0]}, {self.mlp[0].in_features}]")
        check_map(x, self.layout, self.channels, "SentenceAttentionBlock")
        gate = torch.softmax(self.mlp(text), dim=-1).to(x.dtype)
        return x * (gate[:, :, None, None] if self.layout == "NCHW" else gate[:, None, None, :])
