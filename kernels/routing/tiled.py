"""Routing attention, ``torch`` backend: per query segment, one fused SDPA call over every cluster.

The keys of cluster ``c`` sit in one row ``[n * W]`` ordered by segment (cluster-major, segment-minor), with
the null slot prepended, so every query of segment ``s`` in cluster ``c`` attends to the same dense prefix of
``1 + s * W`` slots: no mask at all. For each segment the (query, cluster) pairs are packed per cluster row
(padded to the largest count of that segment) and one ``scaled_dot_product_attention`` call (the CPU flash
kernel, differentiable) covers all rows; results are scattered back and averaged over the query's clusters.
Work ``~ sum_s (B H C pad_s) (1 + s W) D``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import compute_dtype

__all__ = ["cluster_attention"]


def cluster_attention(
    q: torch.Tensor,
    q_clusters: torch.Tensor,
    q_segments: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    window: int,
    scale: float,
    null_k: torch.Tensor | None = None,
    null_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each query attends, per cluster it joined, over the null slot plus its cluster row's first
    ``q_segments * window`` keys; outputs averaged over its clusters.

    Args:
        q: ``[B, H, Tq, D]``; q_clusters: int64 ``[B, H, Tq, Q]``; q_segments: int64 ``[Tq]``, the segment of each
            query (it sees the key segments before it).
        keys, values: cluster rows ``[B, H, C, L, D]`` / ``[B, H, C, L, Dv]``, ``L`` a multiple of ``window``, key
            ``j`` of a row from segment ``j // window``; ``q_segments * window <= L``.
        null_k, null_v: ``[H, C, D]`` / ``[H, C, Dv]`` or None (a query with no key then gets zeros).

    Returns:
        ``[B, H, Tq, Dv]`` in ``q.dtype`` (math in float32, float64 for float64 inputs).
    """
    b, h, tq, d = q.shape
    c, dv, nq = keys.shape[2], values.shape[-1], q_clusters.shape[-1]
    dt, dev = compute_dtype(q.dtype), q.device
    rows = b * h * c
    if tq == 0:
        return q.new_zeros(b, h, 0, dv)
    k_rows, v_rows = keys.to(dt).reshape(rows, -1, d), values.to(dt).reshape(rows, -1, dv)
    lead = 0
    if null_k is not None:  # the null slot first: every key set is then a prefix of its row
        k_rows = torch.cat([null_k.to(dt)[None].expand(b, h, c, d).reshape(rows, 1, d), k_rows], 1)
        v_rows = torch.cat([null_v.to(dt)[None].expand(b, h, c, dv).reshape(rows, 1, dv), v_rows], 1)
        lead = 1
    # pairs (query, cluster): row = (b h, cluster), their segment, their source query; grouped by (segment, row)
    bh = torch.arange(b * h, device=dev).view(b * h, 1, 1)
    row = (bh * c + q_clusters.reshape(b * h, tq, nq)).reshape(-1)
    seg = q_segments.to(dev).view(1, tq, 1).expand(b * h, tq, nq).reshape(-1)
    source = (bh * tq + torch.arange(tq, device=dev).view(1, tq, 1)).expand(b * h, tq, nq).reshape(-1)
    group = seg * rows + row
    # sort unique keys (torch's CPU sort is slow on many repeats); pairs of one group stay in position order
    order = torch.sort(group * group.numel() + torch.arange(group.numel(), device=dev)).indices
    group = group[order]
    counts = torch.bincount(group)
    rank = torch.arange(group.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[group]
    qf = q.reshape(b * h * tq, d).to(dt)
    pieces = []  # per segment, its pairs' outputs in sorted order
    bounds = torch.cumsum(torch.bincount(seg[order], minlength=int(seg.max()) + 1), 0).tolist()
    start = 0
    for s, end in enumerate(bounds):
        width = lead + s * window
        if end == start:
            continue
        if not width:  # a first-segment query without a null slot sees nothing: zeros
            pieces.append(qf.new_zeros(end - start, dv))
            start = end
            continue
        g, r = group[start:end] - s * rows, rank[start:end]
        pad = int(r.max()) + 1
        used = torch.unique(g)  # the rows this segment's queries use; all of them: slice views, no gather
        ks, vs = (k_rows[:, :width], v_rows[:, :width]) if used.numel() == rows else (k_rows[used, :width], v_rows[used, :width])
        where = (g if used.numel() == rows else torch.searchsorted(used, g)) * pad + r
        qs = qf.new_zeros(used.numel() * pad, d).index_copy(0, where, qf.index_select(0, source[order[start:end]]))
        att = F.scaled_dot_product_attention(qs.view(-1, pad, d), ks, vs, scale=scale)
        pieces.append(att.reshape(-1, dv).index_select(0, where))
        start = end
    out = torch.cat(pieces)
    res = out.new_zeros(group.numel(), dv).index_copy(0, order, out)  # back to (b h, t, cluster slot) order
    return res.view(b, h, tq, nq, dv).mean(3).to(q.dtype)
