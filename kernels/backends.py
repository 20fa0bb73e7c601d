"""Backend selection for vzoo attention ops.

Backends: ``reference`` (dense fp32 ground truth), ``torch`` (vectorised PyTorch, CPU default),
``triton`` (GPU kernels, forward and backward), ``flex`` (compiled FlexAttention, forward-only on CPU).
``backend=None`` picks triton for CUDA tensors and torch otherwise; ``use_backend(name)`` overrides
that default inside a ``with`` block. An explicit backend that cannot run raises ``RuntimeError``
saying why.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
from collections.abc import Iterator

import torch

from .triton_ops import INTERPRET

__all__ = ["BACKENDS", "use_backend", "backend_status", "resolve_backend"]

BACKENDS = ("reference", "torch", "triton", "flex")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("vzoo_backend", default=None)


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Make ``name`` the backend that ``backend=None`` resolves to inside the block."""
    _check_name(name)
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


_HAS_TRITON = importlib.util.find_spec("triton") is not None
_HAS_FLEX = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def _triton_reason(device: torch.device) -> str | None:
    if not _HAS_TRITON:
        return "the triton package is not installed"
    if device.type == "cuda" or INTERPRET:
        return None
    return f"triton kernels need a CUDA device (tensors are on {device.type}; set TRITON_INTERPRET=1 to emulate on CPU)"


def _flex_reason(device: torch.device, needs_grad: bool, needs_lse: bool) -> str | None:
    if not _HAS_FLEX:
        return f"this torch ({torch.__version__}) has no FlexAttention"
    if device.type == "cpu" and needs_grad:
        return "FlexAttention has no backward pass on CPU"
    if device.type == "cpu" and needs_lse:
        return "compiled FlexAttention on CPU cannot return the log-sum-exp"
    if device.type not in ("cpu", "cuda"):
        return f"FlexAttention does not run on {device.type}"
    return None


def backend_status(
    device: torch.device | str = "cpu", *, needs_grad: bool = False, needs_lse: bool = False
) -> dict[str, str | None]:
    """For each backend, ``None`` if it can run here, else the reason it cannot. ``needs_grad``: a
    backward pass will follow (grad mode is on and an input requires grad); the ops decide the same way,
    so a backend reported runnable runs (flex under ``torch.no_grad()`` detaches leaves that require grad)."""
    device = torch.device(device)
    return {
        "reference": None,
        "torch": None,
        "triton": _triton_reason(device),
        "flex": _flex_reason(device, needs_grad, needs_lse),
    }


def resolve_backend(
    backend: str | None, device: torch.device, *, needs_grad: bool, needs_lse: bool, supports: tuple[str, ...] = BACKENDS
) -> str:
    """The backend to run: the explicit one (checked), else the ``use_backend`` override, else the default."""
    explicit = backend is not None
    name = backend if explicit else _override.get()
    if name is None:
        gpu = device.type == "cuda" and "triton" in supports and _triton_reason(device) is None
        name = "triton" if gpu else "torch"
    _check_name(name)
    if name not in supports:
        raise RuntimeError(f"backend {name!r} does not implement this op (available: {', '.join(supports)})")
    reason = backend_status(device, needs_grad=needs_grad, needs_lse=needs_lse)[name]
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run: {reason}")
    return name
