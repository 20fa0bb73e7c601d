"""Block max-pooled attention map: the training target of SeerAttention's AttnGate (arXiv 2410.13276).

For each (query block, key block) pair, the largest softmax-normalised probability any query token
of the block gives any key token of the block. The ``torch`` backend walks query blocks in chunks and
keeps only ``chunk x Skv`` scores at a time (the ``Sq x Skv`` attention matrix is never formed); the
``reference`` backend materialises it.
"""

from __future__ import annotations

import torch

from .backends import resolve_backend
from .block_sparse import check_flag, check_int, check_key_mask, check_qkv, resolve_scale
from .reference import visible_at

__all__ = ["attention_block_max"]

_CHUNK_ELEMS = 1 << 24  # fp32 scores per chunk (64 MiB)


def _block_max_of_rows(scores: torch.Tensor, block: int) -> torch.Tensor:
    """``scores [B, H, R, Skv]`` (masked with -inf) -> ``[B, H, ceil(R / block), ceil(Skv / block)]``:
    per key block the max of ``exp(score - lse)``, then the max over each block of rows."""
    b, h, r, skv = scores.shape
    lse = torch.logsumexp(scores, -1, keepdim=True)
    lse = lse.masked_fill(torch.isneginf(lse), 0.0)  # rows that see no key: every entry stays exp(-inf) = 0
    pad = -skv % block
    if pad:
        scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
    peak = torch.exp(scores.view(b, h, r, -1, block).amax(-1) - lse)  # [B, H, R, NKB]
    rpad = -r % block
    if rpad:
        peak = torch.nn.functional.pad(peak, (0, 0, 0, rpad))
    return peak.view(b, h, -1, block, peak.shape[-1]).amax(3)


def attention_block_max(
    q: torch.Tensor,
    k: torch.Tensor,
    block: int,
    *,
    scale: float | None = None,
    causal: bool = True,
    key_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Block max-pooled attention probabilities.

    Args:
        q: ``[B, Hq, Sq, D]``, the last ``Sq`` positions of the keys (bottom-right causal).
        k: ``[B, Hkv, Skv, D]``; ``Hq`` a multiple of ``Hkv`` (GQA).
        block: query and key block size in tokens.
        scale: softmax scale, default ``1/sqrt(D)``.
        causal: mask keys after each query.
        key_mask: bool ``[B, Skv]``; keys marked False are hidden (padding).
        backend: ``"reference"`` or ``"torch"`` (default).

    Returns:
        fp32 ``[B, Hq, ceil(Sq / block), ceil(Skv / block)]`` with entries in ``[0, 1]`` (0 where no
        pair of the two blocks is visible; rows that see no key count as 0). Not differentiable (a
        training target).
    """
    check_qkv(q, k, k)
    check_key_mask(key_mask, k)
    check_int("block", block, 1)
    check_flag("causal", causal)
    scale = resolve_scale(scale, q.shape[-1])
    name = resolve_backend(backend, q.device, needs_grad=False, needs_lse=False, supports=("reference", "torch"))
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    if sq == 0 or skv == 0:
        raise ValueError(f"attention_block_max needs queries and keys, got Sq={sq}, Skv={skv}")
    if causal and sq > skv:
        raise ValueError(f"causal attention_block_max needs Sq <= Skv (queries are the last keys), got Sq={sq} > Skv={skv}")
    g = hq // hkv
    shift = skv - sq
    key_pos = torch.arange(skv, device=q.device)
    with torch.no_grad():
        kf = k.float()
        rows = sq if name == "reference" else max(block, _CHUNK_ELEMS // max(1, b * hq * skv) // block * block)
        parts = []
        for r0 in range(0, sq, rows):
            r1 = min(r0 + rows, sq)
            qc = q[:, :, r0:r1].float().reshape(b, hkv, g * (r1 - r0), d)
            s = (qc @ kf.transpose(-1, -2) * scale).view(b, hq, r1 - r0, skv)
            if causal:
                s = s.masked_fill(~visible_at(key_pos[r0:r1] + shift, key_pos, True), float("-inf"))
            if key_mask is not None:
                s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
            parts.append(_block_max_of_rows(s, block))
        return torch.cat(parts, 2)
