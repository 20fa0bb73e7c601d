"""Shared pieces of the RAT op: the decoding state, inter-chunk RoPE and input checks.

RAT (Wei, Yadav, Pascanu, Gulcehre, "RAT: Bridging RNN Efficiency and Attention Accuracy in Language
Modeling", arXiv 2507.04416;
reference ``CLAIRE-Labo/RAT``: ``src/model/backbone/rat/rat.py``, ``src/model/embedding/pe.py``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple, Union

import torch

from ..block_sparse import resolve_scale
from ..layout import check_int, check_tensor

__all__ = [
    "RATState", "Rope", "apply_rope", "check_inputs", "check_rope", "check_state",
    "rat_rope", "split_gate",
]


# A RoPE base (angles computed at the chunk numbers used), ``(cos, sin)`` tables ``[n, D]`` indexed by chunk
# number, or ``rope(x [B, H, S, D], pos int64 [S]) -> x rotated``.
Rope = Union[float, tuple[torch.Tensor, torch.Tensor], Callable[[torch.Tensor, torch.Tensor], torch.Tensor], None]


class RATState(NamedTuple):
    """What RAT keeps after ``length`` tokens (the cache: one key/value pair per finished chunk).

    keys: ``[B, H, C, D]`` with ``C >= length // chunk_size``; row ``c`` is the final key state of chunk ``c``,
        rotated at position ``c``. Rows past ``length // chunk_size`` are spare capacity (undefined).
    values: ``[B, H, C, Dv]``, the final value states, same rows.
    key_run, value_run: ``[B, H, D]``, ``[B, H, Dv]``: the running (unrotated) key / value state after the last
        token; the next token continues it unless it starts a new chunk (``length % chunk_size == 0``).
    length: tokens seen so far.

    State tensors are in the compute dtype (float32 for half inputs, else the input dtype).
    """

    keys: torch.Tensor
    values: torch.Tensor
    key_run: torch.Tensor
    value_run: torch.Tensor
    length: int


def _angles(pos: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    """float64 ``[S, dim]`` rotation angles ``pos * base ** (-2i / dim)``, repeated for the two halves."""
    inv_freq = 1.0 / (float(base) ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim))
    ang = pos.to(torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([ang, ang], dim=-1)


def rat_rope(
    n: int,
    dim: int,
    base: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RAT's inter-chunk RoPE tables (the reference's ``InterRoPE``): ``(cos, sin)``, each ``[n, dim]``, row ``c``
    for chunk number ``c``, frequencies ``base ** (-2i / dim)`` in the rotate-half layout of Llama / the reference."""
    check_int("n", n, 1)
    check_int("dim", dim, 2)
    if dim % 2:
        raise ValueError(f"dim={dim} must be even for RoPE")
    _check_base(base)
    ang = _angles(torch.arange(n, device=device), dim, base)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _check_base(base: object) -> None:
    if isinstance(base, bool) or not isinstance(base, numbers.Real) or not math.isfinite(base) or not base > 0:
        raise ValueError(f"rope base={base!r} must be a positive finite number")


def apply_rope(x: torch.Tensor, pos: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate ``x [B, H, S, D]`` at chunk numbers ``pos`` (int64 ``[S]``, non-decreasing)."""
    if rope is None or x.shape[-2] == 0:
        return x
    if callable(rope):
        out = rope(x, pos)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise ValueError(f"rope callable must return a tensor of shape {tuple(x.shape)}")
        return out.to(x.dtype)
    if isinstance(rope, numbers.Real):  # angles once per distinct chunk number
        chunks, which = torch.unique_consecutive(pos, return_inverse=True)
        ang = _angles(chunks, x.shape[-1], rope)
        cos, sin = ang.cos().to(x.dtype)[which], ang.sin().to(x.dtype)[which]
    else:
        cos, sin = rope
        cos, sin = cos.index_select(0, pos).to(x.dtype), sin.index_select(0, pos).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def check_rope(rope: object, dim: int, last_chunk: int, device: torch.device) -> None:
    """Raise ``ValueError`` unless ``rope`` is None, a callable, a base or ``(cos, sin)`` tables reaching
    chunk number ``last_chunk``."""
    if rope is None or callable(rope):
        return
    if dim % 2:
        raise ValueError(f"head dim {dim} must be even for RoPE")
    if isinstance(rope, numbers.Real):
        _check_base(rope)
        return
    if not (isinstance(rope, (tuple, list)) and len(rope) == 2 and all(isinstance(t, torch.Tensor) for t in rope)):
        raise ValueError(
            f"rope must be None, a base, a callable or a (cos, sin) pair of tensors, got {type(rope).__name__}"
        )
    for name, t in zip(("cos", "sin"), rope):
        if t.dim() != 2 or t.shape[1] != dim or t.shape[0] <= last_chunk:
            raise ValueError(
                f"rope {name} has shape {tuple(t.shape)}; expected [n, {dim}] with n > {last_chunk} "
                "(one row per chunk number used)"
            )
        if not t.is_floating_point() or t.device != device:
            raise ValueError(f"rope {name} must be a floating tensor on {device}, got {t.dtype} on {t.device}")


def check_inputs(q, k, v, gate, chunk_size: int, scale, step: bool = False) -> float:
    """Validate the op's tensors; returns the softmax scale."""
    check_tensor("q", q)
    for name, t in (("k", k), ("v", v), ("gate", gate)):
        check_tensor(name, t, q.device)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, t, d = q.shape
    if d == 0 or v.shape[-1] == 0:
        raise ValueError(f"head dims must be positive, got q D={d}, v Dv={v.shape[-1]}")
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d or k.shape[1] == 0 or h % k.shape[1]:
        raise ValueError(f"k has shape {tuple(k.shape)}; expected [{b}, G, {t}, {d}] with {h} heads a multiple of G")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v has shape {tuple(v.shape)}; expected [{b}, {h}, {t}, Dv]")
    dv = v.shape[-1]
    widths = (dv, dv + d) if dv == d else (dv + d,)
    if gate.shape[:3] != q.shape[:3] or gate.shape[3] not in widths:
        allowed = " or ".join(f"[{b}, {h}, {t}, {w}]" for w in widths)
        raise ValueError(f"gate has shape {tuple(gate.shape)}; expected {allowed} (one gate per [v; k] state channel)")
    if step and t != 1:
        raise ValueError(f"rat_step takes one token (T=1), got q of shape {tuple(q.shape)}")
    check_int("chunk_size", chunk_size, 1)
    return resolve_scale(scale, d)


def check_state(state: object, q: torch.Tensor, dv: int, chunk_size: int) -> None:
    """Raise ``ValueError`` unless ``state`` is None or a :class:`RATState` matching ``q [B, H, T, D]``."""
    if state is None:
        return
    if not isinstance(state, RATState):
        raise ValueError(f"state must be a RATState or None, got {type(state).__name__}")
    b, h, _, d = q.shape
    if isinstance(state.length, bool) or not isinstance(state.length, int) or state.length < 0:
        raise ValueError(f"state.length={state.length!r} must be a non-negative int")
    done = state.length // chunk_size
    for name, t, width in (("keys", state.keys, d), ("values", state.values, dv)):
        if t.dim() != 4 or t.shape[:2] != (b, h) or t.shape[3] != width or t.shape[2] < done:
            raise ValueError(
                f"state.{name} has shape {tuple(t.shape)}; expected [{b}, {h}, >={done}, {width}] "
                f"({state.length} tokens seen, chunk_size={chunk_size})"
            )
    for name, t, width in (("key_run", state.key_run, d), ("value_run", state.value_run, dv)):
        if t.shape != (b, h, width):
            raise ValueError(f"state.{name} has shape {tuple(t.shape)}; expected [{b}, {h}, {width}]")
    for name in ("keys", "values", "key_run", "value_run"):
        if getattr(state, name).device != q.device:
            raise ValueError(f"state.{name} is on {getattr(state, name).device}, q on {q.device}")


def split_gate(gate: torch.Tensor, dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(value gate [..., Dv], key gate [..., D])``: one shared gate (the reference, ``Dv == D``) or ``[v; k]``."""
    if gate.shape[-1] == dv:
        return gate, gate
    return gate[..., :dv], gate[..., dv:]


