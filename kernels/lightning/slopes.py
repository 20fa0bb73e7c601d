"""Per-head decay rates of Lightning Attention.

* :func:`lightning_slopes`: the ALiBi-style slopes of ``lightning_attn/utils/utils.py::_build_slope_tensor``
  (OpenNLPLab/lightning-attention; TransNormerLLM, Qin et al., arXiv 2307.14995): for ``n`` a power of two
  ``r^1, r^2, ..., r^n`` with ``r = 2^(-8/n)``; otherwise the slopes of the closest smaller power of two
  ``p``, then every other slope of the ``2p`` set, ``n - p`` of them.
* :func:`transnormer_decay`: TransNormerLLM's depth scaling of those slopes,
  ``slopes * (1 - layer_idx / (num_layers - 1) + 1e-5)`` (``TransnormerModel.forward``).
* :func:`fla_decay`: fla's ``chunk_lightning_attn`` (fla-org/flash-linear-attention,
  ``fla/ops/lightning_attn/chunk.py``): log-decay ``g_h = -(8 / H) (1 - layer_idx / num_layers) h`` for
  ``h = 0..H-1``, returned as the rate ``s_h = -g_h``.

All return float32 rates ``s [H]`` with ``lambda_h = exp(-s_h)``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["fla_decay", "lightning_slopes", "transnormer_decay"]


def _check_heads(num_heads: object) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads={num_heads!r} must be an int >= 1")
    return num_heads


def _check_layer(layer_idx: object, num_layers: object) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers={num_layers!r} must be an int >= 1")
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx={layer_idx!r} must be an int in [0, {num_layers})")


def _slope_list(n: int) -> list[float]:
    if math.log2(n).is_integer():
        ratio = 2.0 ** (-8.0 / n)  # = 2 ** (-(2 ** -(log2(n) - 3)))
        return [ratio ** (i + 1) for i in range(n)]
    p = 2 ** math.floor(math.log2(n))
    return _slope_list(p) + _slope_list(2 * p)[0::2][: n - p]


def lightning_slopes(num_heads: int) -> torch.Tensor:
    """The official Lightning / TransNormerLLM slopes ``[num_heads]`` (float32)."""
    return torch.tensor(_slope_list(_check_heads(num_heads)), dtype=torch.float32)


def transnormer_decay(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """TransNormerLLM's rates for layer ``layer_idx`` of ``num_layers``: the slopes times
    ``1 - layer_idx / (num_layers - 1) + 1e-5`` (a one-layer model keeps the slopes, times ``1 + 1e-5``)."""
    _check_layer(layer_idx, num_layers)
    depth = 1.0 - (layer_idx / (num_layers - 1) if num_layers > 1 else 0.0) + 1e-5
    return lightning_slopes(num_heads) * depth


def fla_decay(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """fla's rates ``s_h = (8 / H) (1 - layer_idx / num_layers) h`` ``[num_heads]`` (float32; head 0 does not decay)."""
    _check_heads(num_heads)
    _check_layer(layer_idx, num_layers)
    return (8.0 / num_heads) * (1.0 - layer_idx / num_layers) * torch.arange(num_heads, dtype=torch.float32)
