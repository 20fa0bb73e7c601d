"""Memory layout of a vision module's input map: a constructor argument, never guessed from the shape.

A map ``[N, C, H, W]`` (``"NCHW"``) and ``[N, H, W, C]`` (``"NHWC"``) cannot be told apart when
``H == W == C``, so every module that takes a map is told its layout and checks the channel axis
that layout names.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from timm.layers import register_notrace_function

import vzoo

__all__ = ["Layout", "LAYOUTS", "check_layout", "check_map", "to_layout"]

Layout = Literal["NCHW", "NHWC"]
LAYOUTS: tuple[str, ...] = get_args(Layout)  # ("NCHW", "NHWC")


def check_layout(owner: str, layout: str) -> Layout:
    """``layout`` if it is ``"NCHW"`` or ``"NHWC"``, else a ValueError naming ``owner``."""
    if layout not in LAYOUTS:
        raise ValueError(f"{owner}: layout={layout!r} must be 'NCHW' or 'NHWC'")
    return layout


@register_notrace_function  # shape checks are control flow: FX records the call instead of tracing it
def check_map(x: torch.Tensor, layout: str, channels: int, owner: str) -> None:
    """ValueError unless ``x`` is a 4-D map with ``channels`` channels on the axis ``layout`` names.

    TorchScript compiles it (``str.format``, no f-strings), so a scripted module checks its input as
    the eager one does; under TorchScript the ValueError reaches the caller as a RuntimeError that
    carries the same message."""
    if x.dim() != 4 or x.shape[1 if layout == "NCHW" else 3] != channels:
        want = "[N, {}, H, W]".format(channels) if layout == "NCHW" else "[N, H, W, {}]".format(channels)
        raise ValueError("{} (layout='{}') expects {}, got {}".format(owner, layout, want, list(x.shape)))


def to_layout(x: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """``x`` in layout ``src`` as a view in layout ``dst`` (a permute, no copy)."""
    if src == dst:
        return x
    return x.permute(0, 2, 3, 1) if dst == "NHWC" else x.permute(0, 3, 1, 2)


vzoo.register_timm_models(finished=__name__)  # this module brought timm in: vzoo's timm models can register now
