"""Generalised Hilbert ("gilbert") order of a 3-D grid of any size (J. Cervený's construction).

The cuboid is walked by recursive halving: it is described by a start corner and three edge vectors
(``a`` the major axis the walk ends along, ``b`` and ``c`` the others); splitting the longer edges in two
(preferring even halves) and walking the parts with rotated edge vectors keeps consecutive cells face
neighbours, so runs of consecutive tokens are compact 3-D boxes. PSA mean-pools runs of tokens, which
is only meaningful in such an order.
"""

from __future__ import annotations

from functools import lru_cache

import torch

__all__ = ["gilbert_order"]

Vec = tuple[int, int, int]


def _sign(v: Vec) -> Vec:
    return tuple((x > 0) - (x < 0) for x in v)


def _add(*vs: Vec) -> Vec:
    return tuple(sum(c) for c in zip(*vs))


def _neg(v: Vec) -> Vec:
    return tuple(-x for x in v)


def _half(v: Vec) -> Vec:
    """``v // 2`` per component (floor division, as the reference), grown by one step when that length
    is odd (and the edge is longer than 2), so halves stay even where possible."""
    h = tuple(x // 2 for x in v)
    n = abs(sum(h))
    if n % 2 and abs(sum(v)) > 2:
        h = _add(h, _sign(v))
    return h


def _walk(p: Vec, a: Vec, b: Vec, c: Vec, out: list[Vec]) -> None:
    w, h, d = abs(sum(a)), abs(sum(b)), abs(sum(c))
    da, db, dc = _sign(a), _sign(b), _sign(c)
    for length, step, rest in ((w, da, h * d), (h, db, w * d), (d, dc, w * h)):
        if rest == 1:  # a single row: walk it
            for i in range(length):
                out.append(tuple(p[j] + i * step[j] for j in range(3)))
            return
    a2, b2, c2 = _half(a), _half(b), _half(c)
    a_rest, b_rest, c_rest = _add(a, _neg(a2)), _add(b, _neg(b2)), _add(c, _neg(c2))
    if 2 * w > 3 * h and 2 * w > 3 * d:  # long in a: two halves along a
        _walk(p, a2, b, c, out)
        _walk(_add(p, a2), a_rest, b, c, out)
    elif 3 * h > 4 * d:  # keep c whole: three parts in the a-b plane
        _walk(p, b2, c, a2, out)
        _walk(_add(p, b2), a, b_rest, c, out)
        _walk(_add(p, a, _neg(da), b2, _neg(db)), _neg(b2), c, _neg(a_rest), out)
    elif 3 * d > 4 * h:  # keep b whole: three parts in the a-c plane
        _walk(p, c2, a2, b, out)
        _walk(_add(p, c2), a, b, c_rest, out)
        _walk(_add(p, a, _neg(da), c2, _neg(dc)), _neg(c2), _neg(a_rest), b, out)
    else:  # split all three: five parts
        _walk(p, b2, c2, a2, out)
        _walk(_add(p, b2), c, a2, b_rest, out)
        _walk(_add(p, b2, _neg(db), c, _neg(dc)), a, _neg(b2), _neg(c_rest), out)
        _walk(_add(p, a, _neg(da), b2, c, _neg(dc)), _neg(c), _neg(a_rest), b_rest, out)
        _walk(_add(p, a, _neg(da), b2, _neg(db)), _neg(b2), c2, _neg(a_rest), out)


@lru_cache(maxsize=32)
def _order(t: int, h: int, w: int) -> tuple[int, ...]:
    cells: list[Vec] = []
    dims = (t, h, w)

    def edge(axis: int) -> Vec:
        return tuple(dims[axis] if j == axis else 0 for j in range(3))

    # the reference's choice of major axis (ties: w, then h) and of the other two edges' order
    if w >= h and w >= t:
        axes = (2, 1, 0)
    elif h >= w and h >= t:
        axes = (1, 2, 0)
    else:
        axes = (0, 2, 1)
    _walk((0, 0, 0), edge(axes[0]), edge(axes[1]), edge(axes[2]), cells)
    return tuple((x * h + y) * w + z for x, y, z in cells)


def gilbert_order(grid: tuple[int, int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """Permutation ``[T*H*W]`` of tokens in (t, h, w) order into generalised Hilbert order:
    ``x[..., gilbert_order(grid), :]`` reorders, ``argsort`` of it restores. Cached per grid and device
    (every layer and step asks again); do not modify the returned tensor in place."""
    t, h, w = (int(n) for n in grid)
    if min(t, h, w) < 1:
        raise ValueError(f"gilbert_order: grid {tuple(grid)} must have positive sizes")
    return _order_tensor(t, h, w, torch.device(device) if device is not None else torch.device("cpu"))


@lru_cache(maxsize=32)
def _order_tensor(t: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(_order(t, h, w), dtype=torch.long, device=device)
