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
from ..layout import check_cached_qkv, check_int, check_tensor, compute_dtype

__all__ = [
    "check_routing_inputs", "gather_members", "key_members", "nearest_clusters", "routing_assignment",
]


def _check_routing(centroids, route_q, route_k, window: int, segment: int, query_clusters: int) -> None:
    """Shapes of ``route_q [B, H, Tq, D]``, ``route_k [B, G, Tk, D]``, ``centroids [H, C, D]`` and the ints."""
    device = route_q.device if isinstance(route_q, torch.Tensor) else None
    check_tensor("route_q", route_q, device)
    check_tensor("route_k", route_k, device)
    check_tensor("centroids", centroids, device, dims=3, layout="[H, C, D]")
    b, h, _, d = route_q.shape
    if route_k.shape[0] != b or route_k.shape[3] != d or route_k.shape[1] == 0 or h % route_k.shape[1]:
        raise ValueError(f"route_k has shape {tuple(route_k.shape)}; expected [{b}, G, Tk, {d}] with {h} heads a multiple of G")
    if centroids.shape[0] != h or centroids.shape[2] != d or centroids.shape[1] == 0:
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
    check_cached_qkv(q, k, v)
    h, d = q.shape[1], q.shape[3]
    if route_q.shape != q.shape:
        raise ValueError(f"route_q has shape {tuple(route_q.shape)}; expected q's {tuple(q.shape)}")
    if route_k.shape != k.shape:
        raise ValueError(f"route_k has shape {tuple(route_k.shape)}; expected k's {tuple(k.shape)}")
    _check_routing(centroids, route_q, route_k, window, segment, query_clusters)
    if (null_k is None) != (null_v is None):
        raise ValueError("give both null_k and null_v, or neither")
    if null_k is not None:
        c = centroids.shape[1]
        check_tensor("null_k", null_k, q.device, dims=3, layout="[H, C, D]")
        check_tensor("null_v", null_v, q.device, dims=3, layout="[H, C, Dv]")
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
