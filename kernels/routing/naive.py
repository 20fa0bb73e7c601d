"""Routing attention, ``reference`` backend: dense scores with a membership mask (slow, for checking).

The membership of every key is a dense bool ``[B, H, C, Tk]`` built segment by segment (top-``window`` keys of
each complete segment per centroid); query ``i`` at segment ``s`` attends, for each cluster ``c`` it joined, over
the null slot of ``(head, c)`` and the keys ``j`` with ``member[c, j]`` and ``j // segment < s``; one softmax per
cluster, outputs averaged over its clusters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import compute_dtype

__all__ = ["routing_naive"]


def routing_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, centroids: torch.Tensor, window: int, segment: int,
    null_k: torch.Tensor | None, null_v: torch.Tensor | None, query_clusters: int, route_q: torch.Tensor,
    route_k: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Dense masked routing attention; arguments as :func:`vzoo.kernels.routing_attention` (already checked).
    Returns ``out [B, H, Tq, Dv]`` in ``q.dtype``."""
    b, h, tq, _ = q.shape
    tk = k.shape[2]
    c = centroids.shape[1]
    dt = compute_dtype(q.dtype)
    per = h // k.shape[1]
    kh, vh = k.to(dt).repeat_interleave(per, 1), v.to(dt).repeat_interleave(per, 1)
    mu = F.normalize(centroids.to(dt), dim=-1)
    rk = F.normalize(route_k.to(dt).repeat_interleave(per, 1), dim=-1)
    rq = F.normalize(route_q.to(dt), dim=-1)
    member = torch.zeros(b, h, c, tk, dtype=torch.bool, device=q.device)
    for s in range(tk // segment):
        lo = s * segment
        score = torch.einsum("bhjd,hcd->bhcj", rk[:, :, lo : lo + segment], mu)
        member[..., lo : lo + segment].scatter_(-1, score.topk(window, dim=-1).indices, True)
    chosen = torch.einsum("bhtd,hcd->bhtc", rq, mu).topk(query_clusters, dim=-1).indices  # [B, H, Tq, Q]
    q_seg = (torch.arange(tq, device=q.device) + tk - tq) // segment
    earlier = (torch.arange(tk, device=q.device) // segment)[None, :] < q_seg[:, None]  # [Tq, Tk]
    scores = torch.einsum("bhtd,bhjd->bhtj", q.to(dt), kh) * scale
    out = 0.0
    for slot in range(query_clusters):
        cl = chosen[..., slot]  # [B, H, Tq]
        allowed = torch.gather(member, 2, cl[..., None].expand(b, h, tq, tk)) & earlier
        logits = scores.masked_fill(~allowed, float("-inf"))
        if null_k is not None:
            heads = torch.arange(h, device=q.device)[None, :, None]
            nk, nv = null_k.to(dt)[heads, cl], null_v.to(dt)[heads, cl]  # [B, H, Tq, D], [B, H, Tq, Dv]
            logits = torch.cat([(q.to(dt) * nk).sum(-1, keepdim=True) * scale, logits], -1)
            p = torch.softmax(logits, -1)
            out = out + p[..., :1] * nv + p[..., 1:] @ vh
        else:
            any_key = allowed.any(-1, keepdim=True)
            p = torch.softmax(logits.masked_fill(~any_key, 0.0), -1) * any_key
            out = out + p @ vh
    return (out / query_clusters).to(q.dtype)
