"""HiP: hierarchically pruned attention, training-free (Lee et al., arXiv 2406.09827, ICLR 2025).

Re-derived from the paper only (the reference code's FSL licence forbids copying it). Queries are cut
into blocks of ``block_q`` that share one mask, keys into blocks of ``block_k``. For each query block
the candidate key blocks (those that are neither sink nor local) are split into ``2 * topk`` equal
chunks; each chunk is scored by ONE representative key, its centre key, against the query block
("attention locality": neighbouring keys score alike); the ``topk`` best chunks are kept, each is
split into halves, scored and pruned to ``topk`` again, until every chunk is a single key block:
``topk`` key blocks in ``O(log(T / topk))`` rounds of ``2 * topk`` dot products per query, i.e.
``O(T log T)`` for a prompt. The sink blocks (the first) and the local blocks (the query block's
diagonal block and those just before it) are always added, and block-sparse attention runs causally
over the result. Decoding is the same with one query (one query block) over the cache.
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
    """HiP settings. Blocks of 64; ``topk=24`` pruned blocks plus 1 sink and 8 local blocks: at most 33
    of the 128 key blocks per query block at 8k tokens. Measured on SmolLM2-135M-Instruct, 8k tokens of
    ``pydoc_data.topics``, perplexity on the last half (dense 9.73), fp32 CPU, all layers, no dense
    fallback: ``topk=16, local=2`` gives +14.8% at causal density 0.27, ``topk=24, local=8`` +5.8% at
    0.44, ``topk=32, local=8`` +3.7% at 0.53. The local context matters most on real text; the sink
    and the best remote regions keep retrieval (passkey) working.

    Args:
        block_q: queries per block; they share one mask (the paper's ``b_q``). ``1`` gives every query
            its own mask, so a prompt's selection equals what decoding each token selects.
        block_k: keys per block, the unit of selection (the paper's ``b_k``).
        topk: key blocks the hierarchical pruning keeps per query block (sink and local blocks extra).
        sink: the first ``sink`` key blocks are always attended (the attention sink).
        local: the query block's diagonal key block (the one holding its last query) and the
            ``local - 1`` blocks before it are always attended; at least 1, so every query sees itself.
        query_score: how the query block scores a representative key ``k``: ``"max"``, the largest
            ``q . k`` over the block's queries (a key any of them needs is kept), or ``"mean"``,
            ``mean(q) . k``. The paper shares one mask per query block; which reduction the reference
            code uses was not checked (its code may not be read here), so both are offered and
            ``"max"`` is the default as the conservative choice for retrieval.
        layers: layer indices that use HiP (``None``: all); the others keep SDPA.
        dense_fallback: a call whose selection covers more of the causal (query, key) pairs than the
            break-even density of this device (:func:`vzoo.kernels.dense_is_faster`, op ``"hip"``)
            runs dense attention instead (HiP approximates it): never slower than dense. ``False``:
            always the selection, as the paper.
    """

    block_q: int = 64
    block_k: int = 64
    topk: int = 24
    sink: int = 1
    local: int = 8
    query_score: str = "max"
    layers: tuple[int, ...] | None = None
    dense_fallback: bool = True

    def __post_init__(self) -> None:
        for name, low in (("block_q", 1), ("block_k", 1), ("topk", 1), ("sink", 0), ("local", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"HiPConfig.{name}={value!r} must be an int >= {low}")
        if self.query_score not in QUERY_SCORES:
            raise ValueError(f"HiPConfig.query_score={self.query_score!r} must be one of {QUERY_SCORES}")
        if self.layers is not None and not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise ValueError(f"HiPConfig.layers={self.layers!r} must be None or non-negative layer indices")
        if not isinstance(self.dense_fallback, bool):
            raise ValueError(f"HiPConfig.dense_fallback={self.dense_fallback!r} must be a bool")

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
    return lo, torch.where(score > float("-inf"), hi, lo)


def _first_chunks(diag: torch.Tensor, config: HiPConfig):
    """``lo, hi [NQB, 2 * topk]``: the candidate key blocks of each query block (``sink`` up to its
    diagonal block ``diag [NQB]`` minus the local ones) cut into ``2 * topk`` near-equal chunks, chunk
    ``m`` of ``n`` candidates starting ``floor(m * n / (2 * topk))`` blocks in (empty when ``n < 2 * topk``)."""
    n = (diag - config.local + 1 - config.sink).clamp_min(0)
    m = torch.arange(2 * config.topk + 1, device=diag.device)
    bounds = config.sink + (m * n[:, None]) // (2 * config.topk)
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
    nkb = -(-skv // bk)
    diag = _diagonal_blocks(sq, skv, config.block_q, bk, query.device)  # [NQB]
    lo, hi = (x.expand(b, h, -1, -1) for x in _first_chunks(diag, config))
    n_max = max((skv - 1) // bk - config.local + 1 - config.sink, 0)
    rounds = (max(-(-n_max // (2 * k)), 1) - 1).bit_length()  # halvings until the largest chunk is one block
    valid_q = None if keys is None else keys[:, skv - sq :]
    q, q_ok = _query_reps(query, config.block_q, config.query_score, valid_q)
    for level in range(rounds + 1):
        lo, hi = _keep(lo, hi, _score(q, q_ok, key, keys, lo, hi, bk), k)
        if level < rounds:
            lo, hi = _split(lo, hi)
    chosen = torch.zeros(b, h, diag.shape[0], nkb + 1, dtype=torch.bool, device=query.device)
    chosen.scatter_(-1, torch.where(hi > lo, lo, nkb), True)  # dropped chunks land in the spare column
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
