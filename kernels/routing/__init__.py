"""Routing Transformer attention, causal by completed segments.

Roy, Saffar, Vaswani, Grangier, "Efficient Content-Based Sparse Attention with Routing Transformers", TACL 2021,
arXiv 2003.05997; semantics learned from ``lucidrains/routing-transformer``
(``routing_transformer/routing_transformer.py``: ``Kmeans``, ``KmeansAttention``, ``distribution``).

Routing vectors (``q`` and ``k`` by default, or separate ones, e.g. pre-RoPE) and the centroids ``[H, C, D]``
(shared by queries and keys) are L2-normalised. The rule:

- keys: the sequence is cut into segments of ``segment`` tokens; inside each *complete* segment, each centroid
  takes its top-``window`` keys by dot product (balanced; a key may join 0 or several clusters). Cluster ``c``
  thus holds ``window`` keys per complete segment.
- queries: each query joins its ``query_clusters`` nearest centroids.
- a query at position ``t`` (segment ``s = t // segment``) attends, separately for each cluster ``c`` it joined,
  over one learned null key/value of ``(head, c)`` plus the keys of ``c`` from segments strictly before ``s``;
  one softmax per cluster (scale ``1/sqrt(D)`` by default); the outputs over its clusters are averaged.

Why not lucidrains's rule: there each centroid takes its top-``window`` members over the *whole* sequence and a
causal mask is applied on positions inside the cluster. A later token can then push an earlier one out of a
cluster, so the output at ``t`` depends on tokens after ``t`` (not causal under perturbation) and cached decoding
cannot reproduce a full forward. Here the balanced top-``window`` choice is made per completed segment: once a
segment is complete its members never change, no key after ``t`` is visible, and decoding keeps the routed keys
of the complete segments plus the pending segment's keys. The price: a query sees no routed key of its own
segment (the Routing Transformer's local-attention heads cover it; :mod:`vzoo.lm.routing` mixes them in).

Backends: ``"reference"`` (dense masked, :mod:`.naive`), ``"torch"`` (cluster-grouped query tiles over the
gathered cluster rows, :mod:`.tiled`, differentiable; the default on every device).
"""

from __future__ import annotations

import torch

from ..backends import resolve_backend
from .assign import check_routing_inputs, gather_members, key_members, nearest_clusters, routing_assignment
from .naive import routing_naive
from .tiled import cluster_attention

__all__ = ["cluster_attention", "gather_members", "key_members", "nearest_clusters", "routing_assignment",
           "routing_attention"]


def routing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    centroids: torch.Tensor,
    *,
    window: int,
    segment: int,
    null_k: torch.Tensor | None = None,
    null_v: torch.Tensor | None = None,
    query_clusters: int = 1,
    route_q: torch.Tensor | None = None,
    route_k: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal Routing Transformer attention (rule in the module docstring).

    Args:
        q: ``[B, H, Tq, D]``, the last ``Tq`` positions of the keys (bottom-right aligned).
        k: ``[B, G, Tk, D]``, v: ``[B, G, Tk, Dv]``; head ``h`` reads group ``h // (H / G)`` (GQA).
        centroids: ``[H, C, D]``, normalised here.
        window: keys each centroid takes from each complete segment (``<= segment``).
        segment: tokens per segment.
        null_k, null_v: ``[H, C, D]`` / ``[H, C, Dv]`` learned null slot per (head, cluster), or both None (a query
            with no routed key, i.e. in the first segment, then outputs zeros).
        query_clusters: clusters each query joins (outputs averaged).
        route_q, route_k: routing vectors of ``q``'s / ``k``'s shape (default ``q`` / ``k``); no gradient flows
            through the routing.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"reference" | "torch"`` or None (the :func:`vzoo.kernels.use_backend` override, else torch).

    Returns:
        ``out [B, H, Tq, Dv]`` in ``q.dtype``.
    """
    route_q = q if route_q is None else route_q
    route_k = k if route_k is None else route_k
    scale = check_routing_inputs(q, k, v, centroids, null_k, null_v, route_q, route_k, window, segment,
                                 query_clusters, scale)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, null_k, null_v))
    name = resolve_backend(backend, q.device, needs_grad=needs_grad, needs_lse=False, supports=("reference", "torch"))
    if name == "reference":
        return routing_naive(q, k, v, centroids, window, segment, null_k, null_v, query_clusters, route_q, route_k, scale)
    tq, tk = q.shape[2], k.shape[2]
    key_idx = key_members(route_k, centroids, window, segment)
    q_cl = nearest_clusters(route_q, centroids, query_clusters)
    q_seg = (torch.arange(tq, device=q.device) + tk - tq) // segment
    return cluster_attention(q, q_cl, q_seg, gather_members(k, key_idx), gather_members(v, key_idx), window, scale,
                             null_k, null_v)
