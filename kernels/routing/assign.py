"""Routing Transformer cluster assignment and input checks (Roy et al., arXiv 2003.05997).

Shared by both backends of :func:`vzoo.kernels.routing_attention` and by the cached decoding of
:mod:`vzoo.lm.routing`. Routing vectors and centroids are L2-normalised here; routing is discrete (no gradient).

- keys: inside every *complete* segment of ``segment`` tokens, each centroid takes the ``window`` keys with
  the largest dot product with it (balanced: a key may join 0 or several clusters);
- queries: each query joins its ``query_clusters`` nearest centroids (largest dot product, best first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..block_sparse import resolve_scale
from ..layout import check_int

__all__ = [
    "check_routing_inputs", "compute_dtype", "gather_members", "key_members", "nearest_clusters", "routing_assignment",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32 (half inputs are computed in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_tensor(name: str, t: object, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, q on {device}; all must be on one device")


def _check_routing(centroids, route_q, route_k, window: int, segment: int, query_clusters: int) -> None:
    """Shapes of ``route_q [B, H, Tq, D]``, ``route_k [B, G, Tk, D]``, ``centroids [H, C, D]`` and the ints."""
    device = route_q.device if isinstance(route_q, torch.Tensor) else None
    for name, t in (("route_q", route_q), ("route_k", route_k), ("centroids", centroids)):
        _check_tensor(name, t, device)
    if route_q.dim() != 4 or route_k.dim() != 4:
        raise ValueError(f"route_q {tuple(route_q.shape)} and route_k {tuple(route_k.shape)} must be 4-D [B, H, T, D]")
    b, h, _, d = route_q.shape
    if route_k.shape[0] != b or route_k.shape[3] != d or route_k.shape[1] == 0 or h % route_k.shape[1]:
        raise ValueError(f"route_k has shape {tuple(route_k.shape)}; expected [{b}, G, Tk, {d}] with {h} heads a multiple of G")
    if centroids.dim() != 3 or centroids.shape[0] != h or centroids.shape[2] != d or centroids.shape[1] == 0:
        raise ValueError(f"centroids has shape {tuple(centroids.shape)}; expected [{h}, C, {d}] with C >= 1")
    check_int("segment", segment, 1)
    check_int("window", window, 1)
    if window > segment:
        raise ValueError(f"window={window} must be <= segment={segment} (each centroid takes window keys of a segment)")
    check_int("query_clusters", query_clusters, 1)
    if query_clusters > centroids.shape[1]:
        raise ValueError(f"query_clusters={query_clusters} must be <= the {centroids.shape[1]} clusters")


def check_routing_inputs(q, k, v, centroids, null_k, null_v, route_q, route_k, window, segment, query_clusters, scale) -> float:
    """Validate :func:`vzoo.kernels.routing_attention`'s arguments (``route_q``/``route_k`` already defaulted);
    returns the softmax scale."""
    _check_tensor("q", q, q.device if isinstance(q, torch.Tensor) else None)
    for name, t in (("k", k), ("v", v)):
        _check_tensor(name, t, q.device)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be 4-D [B, H, T, D]")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, tq, d = q.shape
    g, tk = k.shape[1], k.shape[2]
    if d == 0 or v.shape[-1] == 0:
        raise ValueError(f"head dims must be positive, got D={d}, Dv={v.shape[-1]}")
    if k.shape[0] != b or k.shape[3] != d or g == 0 or h % g:
        raise ValueError(f"k has shape {tuple(k.shape)}; expected [{b}, G, Tk, {d}] with {h} heads a multiple of G")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v has shape {tuple(v.shape)}; expected [{b}, {g}, {tk}, Dv] like k")
    if tk < tq:
        raise ValueError(f"the {tq} queries must be the last of the keys, but there are only {tk} keys")
    if route_q.shape != q.shape:
        raise ValueError(f"route_q has shape {tuple(route_q.shape)}; expected q's {tuple(q.shape)}")
    if route_k.shape != k.shape:
        raise ValueError(f"route_k has shape {tuple(route_k.shape)}; expected k's {tuple(k.shape)}")
    _check_routing(centroids, route_q, route_k, window, segment, query_clusters)
    if (null_k is None) != (null_v is None):
        raise ValueError("give both null_k and null_v, or neither")
    if null_k is not None:
        c = centroids.shape[1]
        _check_tensor("null_k", null_k, q.device)
        _check_tensor("null_v", null_v, q.device)
        if null_k.shape != (h, c, d) or null_v.shape != (h, c, v.shape[-1]):
            raise ValueError(f"null_k {tuple(null_k.shape)} / null_v {tuple(null_v.shape)} must be [{h}, {c}, {d}] / "
                             f"[{h}, {c}, {v.shape[-1]}]")
    return resolve_scale(scale, d)


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, G, T, D] -> [B, H, T, D]`` (a view): head ``h`` reads group ``h // (H / G)``, SDPA's GQA order."""
    b, g, t, d = x.shape
    return x if g == heads else x[:, :, None].expand(b, g, heads // g, t, d).reshape(b, heads, t, d)


@torch.no_grad()
def key_members(route_k: torch.Tensor, centroids: torch.Tensor, window: int, segment: int) -> torch.Tensor:
    """int64 ``[B, H, C, n, W]``: for each head, cluster and complete segment ``s < n = Tk // segment``, the
    positions (ascending) of the ``window`` keys of that segment closest to the centroid. ``route_k [B, G, Tk, D]``
    (GQA groups, ``H`` a multiple of ``G``), ``centroids [H, C, D]``."""
    h, c, _ = centroids.shape
    b, _, tk, d = route_k.shape
    n = tk // segment
    dt = compute_dtype(route_k.dtype)
    x = F.normalize(_expand_heads(route_k[:, :, : n * segment].to(dt), h), dim=-1).view(b, h, n, segment, d)
    mu = F.normalize(centroids.to(dt), dim=-1)
    dots = torch.einsum("bhnsd,hcd->bhncs", x, mu)
    top = dots.topk(window, dim=-1).indices.sort(dim=-1).values  # [B, H, n, C, W]
    top = top + torch.arange(n, device=top.device).view(1, 1, n, 1, 1) * segment
    return top.transpose(2, 3).contiguous()


@torch.no_grad()
def nearest_clusters(route_q: torch.Tensor, centroids: torch.Tensor, query_clusters: int) -> torch.Tensor:
    """int64 ``[B, H, Tq, query_clusters]``: each query's nearest centroids (largest dot product), best first."""
    dt = compute_dtype(route_q.dtype)
    dots = torch.einsum("bhtd,hcd->bhtc", F.normalize(route_q.to(dt), dim=-1), F.normalize(centroids.to(dt), dim=-1))
    return dots.topk(query_clusters, dim=-1).indices


def routing_assignment(
    centroids: torch.Tensor, route_q: torch.Tensor, route_k: torch.Tensor, *, window: int, segment: int,
    query_clusters: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clusters :func:`vzoo.kernels.routing_attention` uses.

    Args:
        centroids: ``[H, C, D]`` (normalised here).
        route_q: ``[B, H, Tq, D]`` query routing vectors; route_k: ``[B, G, Tk, D]`` key routing vectors.
        window: keys per (cluster, complete segment); segment: tokens per segment.
        query_clusters: clusters per query.

    Returns:
        ``(key_idx [B, H, C, Tk // segment, window]`` int64 key positions, ascending within a segment,
        ``q_clusters [B, H, Tq, query_clusters]`` int64, best first``)``.
    """
    _check_routing(centroids, route_q, route_k, window, segment, query_clusters)
    return key_members(route_k, centroids, window, segment), nearest_clusters(route_q, centroids, query_clusters)


def gather_members(x: torch.Tensor, key_idx: torch.Tensor) -> torch.Tensor:
    """``x [B, G, Tk, E]`` (GQA groups of the ``H`` heads of ``key_idx``) gathered at ``key_idx [B, H, C, n, W]``
    into cluster rows ``[B, H, C, n * W, E]`` (cluster-major, segment-minor); differentiable in ``x``."""
    b, g, tk, e = x.shape
    _, h, c, n, w = key_idx.shape
    group = (torch.arange(b, device=x.device)[:, None] * g + torch.arange(h, device=x.device)[None, :] // (h // g)) * tk
    flat = (key_idx.reshape(b, h, -1) + group[:, :, None]).reshape(-1)
    return x.reshape(b * g * tk, e).index_select(0, flat).view(b, h, c, n * w, e)
