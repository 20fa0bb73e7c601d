"""HiP: hierarchically pruned attention, training-free (Lee et al., arXiv 2406.09827, ICLR 2025).

Re-derived from the paper only (the reference code's FSL licence forbids copying it). Queries are cut
into blocks of ``block_q`` that share one mask, keys into blocks of ``block_k`` (the unit of the
block-sparse attention). The pruning runs on finer key units of ``unit`` keys (the paper's ``b_k``,
2 in its main configurations): for each query block the candidate keys (those in neither sink nor
local blocks) are split into ``2 * K`` equal chunks of units, ``K = topk * block_k / unit`` (the
same number of keys as ``topk`` blocks; the paper's ``k`` counts keys); each chunk is scored by ONE
representative key, its centre key, against the query block ("attention locality": neighbouring
keys score alike); the ``K`` best chunks are kept, each is split into halves, scored and pruned to
``K`` again, until every chunk is a single unit: ``O(log(T / K))`` rounds of ``2 * K`` dot products
per query, i.e. ``O(T log T)`` for a prompt. Each key block then scores as its best kept unit and
the ``topk`` best blocks are selected. The sink blocks (the first) and the local blocks (the query
block's diagonal block and those just before it) are always added, and block-sparse attention runs
causally over the result. Decoding is the same with one query (one query block) over the cache.

Why units finer than the attention blocks: with ``unit = block_k = 64`` a block (and at 8k, a first
chunk of ~2.5 blocks) is represented by one key of 64+, so a passkey needle (~20 tokens) is never
sampled: on SmolLM2-135M the retrieval heads (layer 18, heads 7-8, 60-90 % of their attention on
the needle) never got the needle's block, and passkey retrieval failed (0/5 at 8k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layers import attend_blocks, key_validity, select_layers
from .registry import LMMethod, register_lm_method

__all__ = ["HiPConfig", "hip_attention", "hip_select"]

QUERY_SCORES = ("max", "mean")


@dataclass(frozen=True)
class HiPConfig:
    """HiP settings. Key blocks of 64; ``topk=24`` pruned blocks plus 1 sink and 8 local blocks: at most
    33 of the 128 key blocks per query block at 8k tokens (causal density 0.44). The pruning runs on
    units of 8 keys (``K = 192`` units kept, 384 chunks scored per round) for query blocks of 16
    sharing one mask. Measured on SmolLM2-135M-Instruct, fp32 CPU, all layers, no dense fallback;
    perplexity on the last half of 8k tokens of ``pydoc_data.topics`` (dense 9.73), passkey at 4k
    (8 plain-text probes, dense 8/8):

    ============================================== ======== ======= =======
    config                                         ppl      density passkey
    ============================================== ======== ======= =======
    defaults (``block_q=16, unit=8``, ``"max"``)   -0.2%    0.44    7/8
    ``block_q=64, unit=8``                         +0.3%    0.44    4/8
    ``block_q=64, unit=8, query_score="mean"``     +11.3%   0.44    8/8
    ``block_q=64, unit=64`` (the old defaults)     +5.8%    0.44    0/5 at 8k
    ``block_q=64, unit=64, topk=32``               +3.7%    0.53
    ============================================== ======== ======= =======

    With ``unit = block_k`` one centre key stands for a block (for a chunk of ~2.5 blocks in the first
    round at 8k), so a ~20-token passkey needle is never sampled; with 64 queries sharing a ``"max"``
    score the filler queries' favourite blocks crowd the question's needle out of the top 24 (layer 18's
    retrieval heads ranked it 36th-53rd by the block max, 1st by the last query); 16 queries do not.
    The finer selection costs time: ``hip_select`` over 8k tokens takes about 2 s per layer of 9 query
    heads on one CPU thread with the defaults (0.9 s with ``block_q=64``, 0.1 s with ``unit=64``),
    comparable to the dense attention it replaces on CPU; measured, not yet optimised.

    Args:
        block_q: queries per block; they share one mask (the paper's ``b_q``; 16: see above). ``1`` gives every query
            its own mask, so a prompt's selection equals what decoding each token selects.
        block_k: keys per block, the unit of the selected layout (the block-sparse attention's tile).
        topk: key blocks selected per query block (sink and local blocks extra).
        unit: keys per pruning unit (the paper's ``b_k``, 2 in its main runs), a divisor of ``block_k``
            (a value above it means ``block_k``): the hierarchy keeps ``topk * block_k / unit`` units
            (as many keys as ``topk`` blocks), each block then scores as its best kept unit. ``unit =
            block_k`` prunes whole blocks by one centre key each (misses needles: see above).
        sink: the first ``sink`` key blocks are always attended (the attention sink).
        local: the query block's diagonal key block (the one holding its last query) and the
            ``local - 1`` blocks before it are always attended; at least 1, so every query sees itself.
        query_score: how the query block scores a representative key ``k``: ``"max"``, the largest
            ``q . k`` over the block's queries (a key any of them needs is kept), or ``"mean"``,
            ``mean(q) . k``. The paper shares one mask per query block; which reduction the reference
            code uses was not checked (its code may not be read here), so both are offered. ``"max"``
            is the default (perplexity +0.3% against +11% for ``"mean"`` at ``block_q=64``); with
            ``block_q=64`` it lost the passkey for early needles (4/8), with 16 it keeps it.
        layers: layer indices that use HiP (``None``: all); the others keep SDPA.
        dense_fallback: a call whose selection covers more of the causal (query, key) pairs than the
            break-even density of this device (:func:`vzoo.kernels.dense_is_faster`, op ``"hip"``)
            runs dense attention instead (HiP approximates it): never slower than dense. ``False``:
            always the selection, as the paper.
    """

    block_q: int = 16
    block_k: int = 64
    topk: int = 24
    sink: int = 1
    local: int = 8
    query_score: str = "max"
    unit: int = 8
    layers: tuple[int, ...] | None = None
    dense_fallback: bool = True

    def __post_init__(self) -> None:
        for name, low in (("block_q", 1), ("block_k", 1), ("topk", 1), ("sink", 0), ("local", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"HiPConfig.{name}={value!r} must be an int >= {low}")
        if not isinstance(self.unit, int) or isinstance(self.unit, bool) or self.unit < 1 or self.block_k % self.unit_size():
            raise ValueError(f"HiPConfig.unit={self.unit!r} must be an int >= 1 that divides block_k={self.block_k} "
                             "(or is at least block_k)")
        if self.query_score not in QUERY_SCORES:
            raise ValueError(f"HiPConfig.query_score={self.query_score!r} must be one of {QUERY_SCORES}")
        if self.layers is not None and not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise ValueError(f"HiPConfig.layers={self.layers!r} must be None or non-negative layer indices")
        if not isinstance(self.dense_fallback, bool):
            raise ValueError(f"HiPConfig.dense_fallback={self.dense_fallback!r} must be a bool")

    def unit_size(self) -> int:
        """Keys per pruning unit: ``unit``, at most ``block_k``."""
        return min(self.unit, self.block_k)

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        """The layers that use HiP."""
        return select_layers("HiPConfig.layers", self.layers, num_layers)


def _diagonal_blocks(sq: int, skv: int, block_q: int, block_k: int, device: torch.device) -> torch.Tensor:
    """long ``[NQB]``: the key block holding each query block's last query (bottom-right aligned)."""
    last = (torch.arange(1, -(-sq // block_q) + 1, device=device) * block_q).clamp_max(sq) - 1 + skv - sq
    return last // block_k


def _query_reps(query: torch.Tensor, block_q: int, how: str, valid: torch.Tensor | None):
    """Query blocks of ``query [B, H, Sq, D]`` as ``([B, H, NQB, R, D] fp32, bool [B|1, 1, NQB, R])``: the
    block's queries (``"max"``, ``R = block_q``) or their mean (``"mean"``, ``R = 1``) and which rows
    count. ``valid [B, Sq]`` marks real (unpadded) queries."""
    b, h, sq, d = query.shape
    nqb = -(-sq // block_q)
    pad = nqb * block_q - sq
    q = F.pad(query.float(), (0, 0, 0, pad)).view(b, h, nqb, block_q, d)
    ok = torch.ones(1, sq, dtype=torch.bool, device=query.device) if valid is None else valid
    ok = F.pad(ok, (0, pad), value=False).view(-1, 1, nqb, block_q)
    if how == "max":
        return q, ok
    count = ok.sum(-1, keepdim=True).clamp_min(1)[..., None]
    mean = (q * ok[..., None]).sum(3, keepdim=True) / count
    return mean, ok.any(-1, keepdim=True)


def _score(q: torch.Tensor, q_ok: torch.Tensor, key: torch.Tensor, keys: torch.Tensor | None,
           lo: torch.Tensor, hi: torch.Tensor, block_k: int) -> torch.Tensor:
    """fp32 ``[B, H, NQB, C]``: each chunk of key blocks ``[lo, hi)`` (``[B, H, NQB, C]``) scored by its
    representative key against the query block's reps. The representative is the chunk's centre key,
    moved up to the row's first unpadded key when it lies in the left padding (``keys [B, Skv]``).
    Empty chunks, chunks with no unpadded key there, padded representatives (other padding) and query
    blocks without a real query score ``-inf``."""
    b, h, nqb, c = lo.shape
    hkv, skv = key.shape[1], key.shape[2]
    rep = (lo + hi) * block_k // 2
    bad = hi <= lo
    if keys is not None:
        rep = torch.maximum(rep, keys.int().argmax(1).view(b, 1, 1, 1))  # argmax: the first True
        bad = bad | (rep >= hi * block_k)
    rep = rep.clamp(0, skv - 1)
    idx = rep.reshape(b, hkv, -1)  # query heads of one key head are adjacent (GQA)
    kc = key.gather(2, idx[..., None].expand(-1, -1, -1, key.shape[3])).view(b, h, nqb, c, -1).float()
    s = (q @ kc.transpose(-1, -2)).masked_fill(~q_ok[..., None], float("-inf")).amax(3)
    if keys is not None:
        bad = bad | ~keys.gather(1, rep.reshape(b, -1)).view(b, h, nqb, c)
    return s.masked_fill(bad, float("-inf"))


def _keep(lo: torch.Tensor, hi: torch.Tensor, score: torch.Tensor, topk: int):
    """The ``topk`` best chunks per row, in position order; ties go to the earlier chunk (rows are in
    position order and the sort is stable). Chunks scored ``-inf`` are emptied (``hi = lo``)."""
    best = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :topk].sort(-1).values
    lo, hi, score = lo.gather(-1, best), hi.gather(-1, best), score.gather(-1, best)
    return lo, torch.where(score > float("-inf"), hi, lo), score


def _first_chunks(diag: torch.Tensor, config: HiPConfig, per: int, kept: int):
    """``lo, hi [NQB, 2 * kept]`` in units of ``block_k / per`` keys: the candidate key blocks of each
    query block (``sink`` up to its diagonal block ``diag [NQB]`` minus the local ones, ``n`` units) cut
    into ``2 * kept`` near-equal chunks, chunk ``m`` starting ``floor(m * n / (2 * kept))`` units in
    (empty when ``n < 2 * kept``)."""
    n = (diag - config.local + 1 - config.sink).clamp_min(0) * per
    m = torch.arange(2 * kept + 1, device=diag.device)
    bounds = config.sink * per + (m * n[:, None]) // (2 * kept)
    return bounds[:, :-1], bounds[:, 1:]


def _split(lo: torch.Tensor, hi: torch.Tensor):
    """Each chunk ``[lo, hi)`` into halves ``[lo, mid), [mid, hi)`` (the left one takes the odd block), in
    position order."""
    mid = (lo + hi + 1) // 2
    return torch.stack([lo, mid], -1).flatten(-2), torch.stack([mid, hi], -1).flatten(-2)


@torch.no_grad()
def hip_select(
    query: torch.Tensor, key: torch.Tensor, config: HiPConfig, keys: torch.Tensor | None = None
) -> torch.Tensor:
    """bool ``[B, H, NQB, NKB]``: the key blocks each query block of ``query [B, H, Sq, D]`` (after RoPE,
    the last ``Sq`` of the ``Skv`` positions of ``key [B, Hkv, Skv, D]``) attends: sink, local and the
    ``topk`` blocks HiP's hierarchical pruning finds among the rest. ``keys [B, Skv]`` (bool) marks
    unpadded keys: a chunk in the left padding is scored by its first unpadded key, a chunk without
    one (a block made only of padding) is never kept; padded queries do not take part in scoring."""
    b, h, sq, _ = query.shape
    skv, bk, k = key.shape[2], config.block_k, config.topk
    unit = config.unit_size()
    per = bk // unit  # pruning units per key block
    kept = k * per  # units the pruning keeps: the same number of keys as ``topk`` blocks
    nkb = -(-skv // bk)
    diag = _diagonal_blocks(sq, skv, config.block_q, bk, query.device)  # [NQB]
    lo, hi = (x.expand(b, h, -1, -1) for x in _first_chunks(diag, config, per, kept))
    n_max = max((skv - 1) // bk - config.local + 1 - config.sink, 0) * per
    rounds = (max(-(-n_max // (2 * kept)), 1) - 1).bit_length()  # halvings until the largest chunk is one unit
    valid_q = None if keys is None else keys[:, skv - sq :]
    q, q_ok = _query_reps(query, config.block_q, config.query_score, valid_q)
    for level in range(rounds + 1):
        lo, hi, score = _keep(lo, hi, _score(q, q_ok, key, keys, lo, hi, unit), kept)
        if level < rounds:
            lo, hi = _split(lo, hi)
    # each key block scores as its best kept unit; the ``topk`` best blocks are selected (with ``unit ==
    # block_k`` the kept units are the blocks themselves)
    block = torch.where(hi > lo, lo // per, nkb)  # dropped chunks land in the spare column
    best = torch.full((b, h, diag.shape[0], nkb + 1), float("-inf"), device=query.device)
    best.scatter_reduce_(-1, block, score.masked_fill(hi <= lo, float("-inf")), "amax")
    best = best[..., :nkb]
    top = torch.sort(best, dim=-1, descending=True, stable=True).indices[..., :k]
    top = torch.where(best.gather(-1, top) > float("-inf"), top, nkb)
    chosen = torch.zeros(b, h, diag.shape[0], nkb + 1, dtype=torch.bool, device=query.device)
    chosen.scatter_(-1, top, True)
    j = torch.arange(nkb, device=query.device)
    fixed = ((j < config.sink) | (j > diag[:, None] - config.local)) & (j <= diag[:, None])  # [NQB, NKB]
    return chosen[..., :nkb] | fixed


def hip_attention(
    config: HiPConfig, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scale: float, module=None, sliding_window: int | None = None, **_,
) -> torch.Tensor:
    """HiP over ``query [B, H, q, D]`` (after RoPE), the last ``q`` of ``key, value [B, Hkv, kv, D]``;
    ``attention_mask`` is transformers' (``None``: causal only, else bool / additive ``[B, 1, q, kv]``),
    whose padded keys are never attended. Returns ``[B, H, q, D]``. On a model's sliding-window layer
    each query also keeps only the last ``sliding_window`` keys."""
    keys = None if attention_mask is None else key_validity(attention_mask, sliding_window is not None)[:, : key.shape[2]]
    chosen = hip_select(query, key, config, keys)
    return attend_blocks(chosen, config.block_q, config.block_k, "hip", config.dense_fallback, query, key, value,
                         attention_mask, scale, module, keys, sliding_window)


register_lm_method(LMMethod(
    config=HiPConfig, attn_implementation="vzoo_hip", label="HiP", attention=hip_attention,
    paper="A Training-Free Sub-quadratic Cost Transformer Model Serving Framework with Hierarchically Pruned "
          "Attention (HiP, 2024)",
    arxiv="2406.09827", ops=("block_sparse_attention",),
    status="training-free hierarchical top-k block pruning, from the paper (reference code unread: FSL licence)",
    full_cache=lambda config: True,
    bench=lambda tokens: {"hip (defaults)": HiPConfig()},
    contract=lambda: {"hip": HiPConfig(block_q=4, block_k=4, topk=64, dense_fallback=False)},
))
