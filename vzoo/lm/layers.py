"""What the LM methods share about layers: choosing them and undoing what was attached to them."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["Attachment", "key_validity", "select_layers"]


def select_layers(owner: str, layers: tuple[int, ...] | None, num_layers: int) -> tuple[int, ...]:
    """``layers`` (``None``: all ``num_layers``), checked against the model; ``owner`` names the field."""
    if layers is None:
        return tuple(range(num_layers))
    if any(i >= num_layers for i in layers):
        raise ValueError(f"{owner}={layers} has indices >= num_layers={num_layers}")
    return tuple(layers)


def key_validity(attention_mask: torch.Tensor) -> torch.Tensor:
    """bool ``[B, kv]``: the keys transformers' ``[B, 1, q, kv]`` mask (bool, or additive with 0 = keep)
    leaves visible to its last query, which sits at the last position, i.e. the unpadded keys."""
    mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    return mask[:, 0, -1, :]


class Attachment:
    """Undoes what a method added to one attention module: removes ``hooks`` and deletes the
    attributes (submodules included) named in ``attrs``."""

    def __init__(self, module: nn.Module, attrs: tuple[str, ...], hooks: tuple = ()) -> None:
        self.module, self.attrs, self.hooks = module, attrs, hooks

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for name in self.attrs:
            if hasattr(self.module, name):
                delattr(self.module, name)
