"""What vzoo needs to know about each diffusers video transformer family: its self-attention modules
(with layer numbers), the latent token grid of a forward call, where text tokens sit in self-attention,
and the name of the processor's rotary-embedding argument."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

__all__ = ["Adapter", "adapter_for", "call_arguments", "ADAPTERS"]


def _grid_cfhw(module: nn.Module, x) -> tuple[int, int, int]:
    """Wan / HunyuanVideo latents ``[B, C, F, H, W]``."""
    patch = module.config.patch_size
    pt, ph, pw = patch if isinstance(patch, (tuple, list)) else (getattr(module.config, "patch_size_t", 1) or 1, patch, patch)
    return (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)


def _grid_cogvideox(module: nn.Module, x) -> tuple[int, int, int]:
    """CogVideoX latents ``[B, F, C, H, W]``; 1.5 patches time by ``patch_size_t``."""
    p, pt = module.config.patch_size, module.config.patch_size_t or 1
    return (math.ceil(x.shape[1] / pt), x.shape[3] // p, x.shape[4] // p)


@dataclass(frozen=True)
class Adapter:
    family: str
    class_name: str
    self_attention: Callable[[nn.Module], list[tuple[int, nn.Module]]]
    grid: Callable[[nn.Module, dict], tuple[int, int, int]]
    text_first: bool  # text tokens before the video tokens inside self-attention (else after, if any)
    rotary_arg: str  # the processor's rotary-embedding parameter
    gathers: bool = True  # the processor's attention does diffusers' Ulysses all-to-all (dispatch_attention_fn)


ADAPTERS = (
    Adapter(
        "wan", "WanTransformer3DModel",
        lambda t: [(i, blk.attn1) for i, blk in enumerate(t.blocks)],
        lambda t, a: _grid_cfhw(t, a["hidden_states"]),
        text_first=False, rotary_arg="rotary_emb",
    ),
    Adapter(
        "cogvideox", "CogVideoXTransformer3DModel",
        lambda t: [(i, blk.attn1) for i, blk in enumerate(t.transformer_blocks)],
        lambda t, a: _grid_cogvideox(t, a["hidden_states"]),
        text_first=True, rotary_arg="image_rotary_emb", gathers=False,  # calls F.scaled_dot_product_attention itself
    ),
    Adapter(
        "hunyuanvideo", "HunyuanVideoTransformer3DModel",
        lambda t: [(i, blk.attn) for i, blk in enumerate([*t.transformer_blocks, *t.single_transformer_blocks])],
        lambda t, a: _grid_cfhw(t, a["hidden_states"]),
        text_first=False, rotary_arg="image_rotary_emb",
    ),
    Adapter(
        "ltx", "LTXVideoTransformer3DModel",
        lambda t: [(i, blk.attn1) for i, blk in enumerate(t.transformer_blocks)],
        lambda t, a: (int(a["num_frames"]), int(a["height"]), int(a["width"])),
        text_first=False, rotary_arg="image_rotary_emb",
    ),
)


def adapter_for(transformer: nn.Module) -> Adapter:
    """The adapter of ``transformer``'s family (subclasses included); ``ValueError`` if unsupported."""
    names = {cls.__name__ for cls in type(transformer).__mro__}
    for adapter in ADAPTERS:
        if adapter.class_name in names:
            return adapter
    supported = ", ".join(a.class_name for a in ADAPTERS)
    raise ValueError(f"apply_sparse_attention: {type(transformer).__name__} is not supported; supported: {supported}")


def call_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The forward call's arguments by name (positional ones included)."""
    return inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
