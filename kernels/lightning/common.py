"""Input checks and small helpers shared by the Lightning Attention implementations."""

from __future__ import annotations

import math
import numbers

import torch

from ..layout import check_tensor, repeat_kv

__all__ = ["accum_dtype", "check_inputs", "check_scale", "decay_rates", "final_state", "prepare", "repeat_kv"]

def check_scale(scale: object) -> float:
    """``scale`` as a float; ``ValueError`` unless it is a finite real number."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale={scale!r} must be a finite number")
    return float(scale)


def check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None, step: bool = False
) -> None:
    """``ValueError`` unless ``q [B, H, T, D]``, ``k [B, Hkv, T, D]``, ``v [B, Hkv, T, Dv]`` (``H`` a multiple
    of ``Hkv``) and ``initial_state [B, H, D, Dv]`` fit together; ``step``: one token, no ``T`` axis."""
    layout = "[B, H, D]" if step else "[B, H, T, D]"
    dims = 3 if step else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dims=dims, layout=layout)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] != v.shape[1] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of the key/value heads (k {k.shape[1]}, v {v.shape[1]})")
    if not step and not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(f"q, k, v must have the same length T, got {q.shape[2]}, {k.shape[2]}, {v.shape[2]}")
    if q.shape[-1] != k.shape[-1] or q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(
            f"q and k need the same non-zero head dim and v a non-zero one, got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}"
        )
    if initial_state is not None:
        want = (q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
        ok = isinstance(initial_state, torch.Tensor) and initial_state.is_floating_point()
        if not ok or tuple(initial_state.shape) != want:
            got = (f"{initial_state.dtype} {tuple(initial_state.shape)}" if isinstance(initial_state, torch.Tensor)
                   else type(initial_state).__name__)
            raise ValueError(f"initial_state must be a floating tensor {want} ([B, H, D, Dv]), got {got}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")


def decay_rates(decay: torch.Tensor | float | None, num_heads: int, device: torch.device) -> torch.Tensor | None:
    """The per-head rates ``s [H]`` (float32, on ``device``; ``lambda = exp(-s)``) from ``decay``: ``None``
    (no decay), a number for every head, or a tensor ``[H]``. Rates must be finite and >= 0 (checked
    for numbers and CPU tensors; a CUDA tensor is not read back)."""
    if decay is None:
        return None
    if isinstance(decay, numbers.Real) and not isinstance(decay, bool):
        if not math.isfinite(decay) or decay < 0:
            raise ValueError(f"decay={decay!r} must be a finite rate >= 0 (lambda = exp(-decay))")
        return torch.full((num_heads,), float(decay), dtype=torch.float32, device=device)
    if not isinstance(decay, torch.Tensor) or not decay.is_floating_point() or tuple(decay.shape) != (num_heads,):
        got = f"{decay.dtype} {tuple(decay.shape)}" if isinstance(decay, torch.Tensor) else type(decay).__name__
        raise ValueError(f"decay must be None, a number or a floating tensor ({num_heads},) of per-head rates, got {got}")
    s = decay.detach().to(device=device, dtype=torch.float32)
    if s.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(((s >= 0) & torch.isfinite(s)).all()):
        raise ValueError(f"decay rates must be finite and >= 0 (lambda = exp(-s)), got {s.tolist()}")
    return s


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def prepare(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked inputs in the accumulation dtype, as the PyTorch forms use them: ``q * scale [B, H, T, D]``,
    ``k [B, H, T, D]`` and ``v [B, H, T, Dv]`` expanded to the query heads, and the rates ``[H]`` (zeros
    without decay: ``lambda = 1``)."""
    acc = accum_dtype(q.dtype)
    h = q.shape[1]
    q = q.to(acc) if scale == 1.0 else q.to(acc) * scale
    rates = torch.zeros(h, dtype=acc, device=q.device) if s is None else s.to(acc)
    return q, repeat_kv(k.to(acc), h), repeat_kv(v.to(acc), h), rates


def final_state(k: torch.Tensor, v: torch.Tensor, rates: torch.Tensor, initial_state: torch.Tensor | None) -> torch.Tensor:
    """The state after the last token in closed form, ``S_{T-1} = sum_s lambda^(T-1-s) k_s^T v_s + lambda^T
    S_{-1}``, from :func:`prepare`'s ``k, v, rates``: ``[B, H, D, Dv]``."""
    t = k.shape[2]
    keep = torch.exp(-rates[:, None] * torch.arange(t - 1, -1, -1, device=k.device, dtype=k.dtype))  # lambda^(T-1-s)
    final = (k * keep[..., None]).transpose(-1, -2) @ v
    if initial_state is not None:
        final = final + torch.exp(-rates * t)[:, None, None] * initial_state.to(k.dtype)
    return final
