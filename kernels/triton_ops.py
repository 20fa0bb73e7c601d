"""Registering a Triton forward/backward pair as ``torch.library`` ops under ``vzoo::``.

On a GPU the ops are ``torch.library.triton_op`` s, so ``torch.compile`` sees the kernels. Under
``TRITON_INTERPRET=1`` ``wrap_triton`` cannot trace interpreted kernels, so the same functions become
opaque ``torch.library.custom_op`` s with fake (shape) implementations.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

__all__ = ["INTERPRET", "register_pair"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def register_pair(
    name: str,
    fwd_impl: Callable,
    bwd_impl: Callable,
    fwd_fake: Callable,
    bwd_fake: Callable,
    backward: Callable,
    setup_context: Callable,
) -> None:
    """Define ``vzoo::{name}_fwd`` and ``vzoo::{name}_bwd`` (once per process) and make the forward
    differentiable through ``backward``, which calls ``torch.ops.vzoo.{name}_bwd``."""
    if hasattr(torch.ops.vzoo, f"{name}_fwd"):
        return
    if INTERPRET:
        fwd = torch.library.custom_op(f"vzoo::{name}_fwd", fwd_impl, mutates_args=())
        bwd = torch.library.custom_op(f"vzoo::{name}_bwd", bwd_impl, mutates_args=())
        fwd.register_fake(fwd_fake)
        bwd.register_fake(bwd_fake)
    else:
        fwd = torch.library.triton_op(f"vzoo::{name}_fwd", fwd_impl, mutates_args=())
        torch.library.triton_op(f"vzoo::{name}_bwd", bwd_impl, mutates_args=())
    fwd.register_autograd(backward, setup_context=setup_context)
