"""Landmark Attention, dense masked reference (the ground truth; ``[Tq, Tk]`` scores, small inputs).

Mohtashami & Jaggi, arXiv 2305.16300; the semantics of ``epfml/landmark-attention``
``lm_benchmark/models/landmark.py`` (``landmark_grouped_softmax`` and the masks of ``CausalSelfAttention``) and,
with ``top_k``, of the cache retrieval in ``llama/llama_mem.py``. Every mask is built by broadcasting token
positions; stage 2 is a softmax over the keys reshaped to ``[groups, block + 1]``. Differentiable by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import compute_dtype

__all__ = ["landmark_naive"]


def landmark_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, top_k: int | None, local_blocks: int, scale: float,
) -> torch.Tensor:
    """Dense grouped softmax; arguments as :func:`vzoo.kernels.landmark_attention` (already checked).

    Returns ``out [B, H, Tq, Dv]`` in the compute dtype (fp32, fp64 for fp64 inputs).
    """
    dt = compute_dtype(q.dtype)
    b, h, tq, d = q.shape
    g, tk = k.shape[1], k.shape[2]
    period = block + 1
    dev = q.device
    s = torch.matmul(q.to(dt).reshape(b, g, h // g * tq, d), k.to(dt).transpose(-1, -2)).mul(scale)
    s = s.reshape(b, h, tq, tk)

    i = torch.arange(tk - tq, tk, device=dev)[:, None]  # query positions [Tq, 1]
    p = torch.arange(tk, device=dev)  # key positions [Tk]
    c, grp, is_lm = i // period, p // period, p % period == block
    current = (grp == c) & ~is_lm & (p <= i)  # [Tq, Tk]
    kept = grp < c  # past blocks
    n_lm = int(is_lm.sum())
    if top_k is not None and n_lm:
        lm_s = s[..., is_lm].detach()  # [B, H, Tq, n_lm]
        gl = torch.arange(n_lm, device=dev)
        far = gl < c - local_blocks  # [Tq, n_lm]
        vals, idx = lm_s.masked_fill(~far, float("-inf")).topk(min(top_k, n_lm), dim=-1)
        chosen = torch.zeros_like(lm_s, dtype=torch.bool).scatter_(-1, idx, vals > float("-inf"))
        keep_g = chosen | (~far & (gl < c))  # [B, H, Tq, n_lm]
        keep_g = F.pad(keep_g, (0, 1))  # column n_lm: the incomplete last group, never a past block
        kept = kept & keep_g[..., grp.clamp(max=n_lm)]  # [B, H, Tq, Tk]

    p1 = torch.softmax(s.masked_fill(~(current | (kept & is_lm)), float("-inf")), dim=-1)
    ng = -(-tk // period)
    s2 = F.pad(s, (0, ng * period - tk)).reshape(b, h, tq, ng, period)
    s2 = s2.masked_fill(torch.arange(period, device=dev) == block, float("-inf"))
    p2 = torch.softmax(s2, dim=-1).reshape(b, h, tq, ng * period)[..., :tk]  # every group has a regular key
    p1_lm = F.pad(p1[..., is_lm], (0, 1))[..., grp.clamp(max=n_lm)]  # P1 of each key's landmark, [B, H, Tq, Tk]
    w = p1 * current + p2 * p1_lm * (kept & ~is_lm)
    out = torch.matmul(w.reshape(b, g, h // g * tq, tk), v.to(dt))
    return out.reshape(b, h, tq, v.shape[-1])
