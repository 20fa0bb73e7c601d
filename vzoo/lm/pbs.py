"""PBS-Attn: permuted block-sparse attention for long-context prefill (Wang et al., arXiv 2510.21270;
xinghaow99/pbs-attn).

Attention is invariant to reordering keys and values together. PBS-Attn reorders the keys *within
segments* of ``segment_size`` tokens so that the keys the prompt's last query block attends most sit
first in their segment, which packs the important keys into fewer blocks while keeping
segment-level causality: every key of an earlier segment precedes every query of a later one,
whatever the order inside the segment.

1. Permutation (per key/value head): softmax ``(q_last K^T) * scale`` in fp32 of the last
   ``block_size`` queries over the keys of the complete segments (no causal mask, as the official
   code), averaged over those queries (and, with GQA, over the group's query heads) gives one
   importance per key; each complete segment is sorted by it, descending; the tail remainder stays.
2. Selection (per query head): mean-pooled query blocks against mean-pooled *permuted* key blocks,
   softmax over the allowed blocks (those of earlier segments); each row keeps the smallest set of
   blocks holding ``threshold`` of that mass, plus the block holding original token 0 (the sink).
3. Attention: the query's own (diagonal) segment is always computed whole, with the causal mask on
   *original* positions. Since attention does not depend on the order of the keys, that part runs on
   the unpermuted keys (:func:`vzoo.kernels.block_sparse_attention`, ``causal=True``, one block per
   segment), the selected blocks of earlier segments on the permuted keys without any token mask
   (all their keys precede the queries), and :func:`vzoo.kernels.merge_attention_states` merges the
   two by log-sum-exp: exactly the official kernel's softmax over the union of both key sets.

Queries are not permuted (as the released code), so the output needs no inverse scatter. Prompts of
at most ``segment_size`` tokens, decoding and chunked prefill (``q_len < kv_len``) run the model's
dense attention, as the official Hugging Face patch.

``scale`` (the model's softmax scale) also scales the importance and block scores, where the official
code uses ``1/sqrt(D)``: the same on Llama and Qwen2. Beyond the official code (no padding; its kernel
asserts ``Hq == Hkv`` and its Hugging Face patch repeats K/V, so each query head gets its own
permutation): GQA permutes K and V once per kv head (importance averaged over the group's query
heads, so ``Hq / Hkv`` times fewer gathers) while the block selection stays per query head;
padded keys (transformers' mask) are hidden from the attention, the importance and the key means,
and padded queries leave the importance average. Models' sliding windows are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vzoo.kernels import BlockSparseLayout, block_sparse_attention, merge_attention_states
from vzoo.kernels.flash_pieces import segment_causal_attention

from .layers import dense_attention, key_validity, run_dense, select_layers
from .registry import LMMethod, register_lm_method

__all__ = ["PBSConfig", "pbs_attention", "pbs_block_selection", "pbs_density", "pbs_permutation"]


@dataclass(frozen=True)
class PBSConfig:
    """PBS-Attn settings (the official Hugging Face patch: blocks of 128, segments of 256, mass 0.9).

    ``threshold`` defaults to 0.97, not the official 0.9. Measured on SmolLM2-135M-Instruct, 8k tokens of ``pydoc_data.topics``, perplexity on the last half (dense 9.73), fp32 CPU, all layers, no dense fallback: 0.9 gives perplexity +15.7% at density
    0.31, 0.97 gives +3.8% at 0.46, 0.98 +3.3% at 0.51. The other defaults are the paper's: the own segment costs only ``segment_size / T`` of the causal work
    (3% at 8k tokens) and the selection is cheap (one ``block_size x T`` score pass for the
    permutation, a ``T/block_size``-square block score matrix), so the density is the share of the
    earlier-segment blocks needed for ``threshold`` of the pooled block mass.

    Args:
        block_size: tokens per query and key block (selection granularity).
        segment_size: tokens per permutation segment, a multiple of ``block_size``.
        threshold: cumulative softmax mass of the pooled block scores each query-block row keeps,
            in ``(0, 1]``. ``1.0`` keeps every block (the official code needs the int ``1`` for that:
            its float cumulative sum may stop short of 1.0 and then keeps nothing; likewise a row whose
            mass never reaches ``threshold`` by rounding keeps all its blocks here).
        sink: always keep the block holding original token 0 (``force_select_first_block``, on in the
            official code). With padding, the first unpadded token.
        layers: layer indices that use PBS-Attn (``None``: all); the others keep SDPA.
        dense_fallback: a prompt whose selection is denser than the break-even density of this
            device (:func:`vzoo.kernels.dense_is_faster`, op ``"pbs"``) runs dense attention instead
            (PBS approximates dense attention by design): never slower than dense. ``False``: always
            the selection, as the official code.
    """

    block_size: int = 128
    segment_size: int = 256
    threshold: float = 0.97
    sink: bool = True
    layers: tuple[int, ...] | None = None
    dense_fallback: bool = True

    def __post_init__(self) -> None:
        for name in ("block_size", "segment_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PBSConfig.{name}={value!r} must be a positive int")
        if self.segment_size % self.block_size:
            raise ValueError(
                f"PBSConfig.segment_size={self.segment_size} must be a multiple of block_size={self.block_size}"
            )
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"PBSConfig.threshold={self.threshold!r} must be a number in (0, 1]")
        if self.layers is not None and not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise ValueError(f"PBSConfig.layers={self.layers!r} must be None or non-negative layer indices")
        for name in ("sink", "dense_fallback"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PBSConfig.{name}={getattr(self, name)!r} must be a bool")

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        """The layers that use PBS-Attn."""
        return select_layers("PBSConfig.layers", self.layers, num_layers)


@torch.no_grad()
def pbs_permutation(
    query: torch.Tensor, key: torch.Tensor, block_size: int, segment_size: int, scale: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Segment-wise key order ``perm [B, Hkv, T]`` (int64 original positions; ``key.gather(2, perm)``
    permutes) for a prompt ``query [B, Hq, T, D]``, ``key [B, Hkv, T, D]``, ``T >= segment_size``.

    Importance of a key: the fp32 softmax of the last ``block_size`` queries over the keys of the
    complete segments, averaged over those queries and the kv head's group of query heads. ``valid
    [B, T]`` (bool, padding) hides padded keys and leaves padded queries out of the average."""
    b, hq, t, d = query.shape
    hkv, rows = key.shape[1], min(block_size, t)
    n = t // segment_size * segment_size
    q_last = query[:, :, -rows:].float().reshape(b, hkv, -1, d)  # [B, Hkv, G * rows, D]: a group's queries
    scores = (q_last @ key[:, :, :n].float().transpose(-1, -2)).mul_(scale)  # [B, Hkv, G * rows, n]
    weight = torch.ones(b, 1, q_last.shape[2], device=query.device)  # [B, 1, G * rows]: the queries averaged
    if valid is not None:  # padded keys get no weight, padded queries no say
        scores.masked_fill_(~valid[:, None, None, :n], float("-inf"))
        weight = valid[:, None, -rows:].float().repeat(1, 1, hq // hkv)
    # softmax rows averaged without materialising them twice: exp in place, one weighted sum over rows
    peak = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)  # rows of only padding: 0
    exps = scores.sub_(peak).exp_()
    row_weight = weight / exps.sum(-1).clamp_min(1)  # a non-empty row sums to >= 1 (its peak gives 1)
    importance = (row_weight[:, :, None] @ exps)[:, :, 0] / weight.sum(-1, keepdim=True).clamp_min(1)
    order = importance.unflatten(-1, (-1, segment_size)).argsort(dim=-1, descending=True, stable=True)
    starts = torch.arange(0, n, segment_size, device=query.device)[:, None]
    tail = torch.arange(n, t, device=query.device).expand(b, hkv, -1)
    return torch.cat([(order + starts).flatten(2), tail], -1)


def _segment_allowed(nqb: int, nkb: int, block_size: int, segment_size: int, device: torch.device) -> torch.Tensor:
    """bool ``[nqb, nkb]``: key blocks of segments strictly before the query block's segment."""
    per = segment_size // block_size
    return (torch.arange(nkb, device=device) // per)[None, :] < (torch.arange(nqb, device=device) // per)[:, None]


def _pool(
    x: torch.Tensor, block_size: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean over blocks of ``x [B, H, T, D]`` -> fp32 ``[B, H, nb, D]``: zero-padded tail, divided by
    ``block_size`` (the official padding). With ``valid [B, H, T]`` the mean of the valid tokens only,
    and the bool ``[B, H, nb]`` of blocks holding one."""
    pad = -x.shape[2] % block_size
    xb = F.pad(x.float(), (0, 0, 0, pad)).unflatten(2, (-1, block_size))
    if valid is None:
        return xb.mean(3), None
    vb = F.pad(valid, (0, pad)).unflatten(2, (-1, block_size)).float()
    count = vb.sum(-1)
    return (xb * vb[..., None]).sum(3) / count.clamp_min(1)[..., None], count > 0


@torch.no_grad()
def pbs_block_selection(
    query: torch.Tensor, key_perm: torch.Tensor, perm: torch.Tensor, config: PBSConfig, scale: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The selected blocks of earlier segments, bool ``[B, Hq, nqb, nkb]`` (query blocks of the
    prompt ``query [B, Hq, T, D]`` x blocks of the permuted keys ``key_perm [B, Hkv, T, D]``, whose
    order is ``perm [B, Hkv, T]``). The official block mask is this OR the own-segment causal blocks.
    ``valid [B, T]`` (bool) marks unpadded tokens: padded keys leave the key means, key blocks
    without an unpadded key are never selected, and the sink is the first unpadded token."""
    b, hq, t, _ = query.shape
    hkv, bs = key_perm.shape[1], config.block_size
    valid_perm = None if valid is None else valid[:, None].expand(b, hkv, t).gather(2, perm)
    q_bar, _ = _pool(query, bs)
    k_bar, k_any = _pool(key_perm, bs, valid_perm)
    nqb, nkb = q_bar.shape[2], k_bar.shape[2]
    scores = (q_bar.unflatten(1, (hkv, -1)) @ k_bar[:, :, None].transpose(-1, -2)).flatten(1, 2) * scale
    allowed = _segment_allowed(nqb, nkb, bs, config.segment_size, query.device).expand(b, hq, nqb, nkb)
    if k_any is not None:
        allowed = allowed & k_any.repeat_interleave(hq // hkv, 1)[:, :, None]
    if config.threshold >= 1:
        chosen = allowed.clone()
    else:
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        ranked, order = probs.sort(-1, descending=True)
        keep = (ranked.cumsum(-1) - ranked) < config.threshold  # the mass before it is short of the threshold
        chosen = torch.zeros_like(allowed).scatter(-1, order, keep) & allowed
    if config.sink:
        first = torch.zeros(b, dtype=torch.long, device=query.device) if valid is None else valid.int().argmax(-1)
        where = (perm == first[:, None, None]).int().argmax(-1) // bs  # [B, Hkv]: the sink's permuted block
        sink = F.one_hot(where, nkb).bool().repeat_interleave(hq // hkv, 1)[:, :, None]
        chosen |= sink & _segment_allowed(nqb, nkb, bs, config.segment_size, query.device)
    return chosen


def pbs_density(chosen: torch.Tensor, t: int, block_size: int, segment_size: int) -> float:
    """Share of the causal (query, key) pairs of a ``t``-token prompt that PBS computes: the own
    segments (causal) plus the ``chosen [B, Hq, nqb, nkb]`` blocks of earlier segments (padding aside)."""
    full, tail = divmod(t, segment_size)
    own = full * segment_size * (segment_size + 1) // 2 + tail * (tail + 1) // 2
    rows = torch.full((chosen.shape[2],), float(block_size), dtype=torch.float64, device=chosen.device)
    rows[-1] = t - block_size * (chosen.shape[2] - 1)  # queries in the last (maybe short) block
    heads = chosen.shape[0] * chosen.shape[1]
    off = (chosen.sum((0, 1, 3)).double() @ rows).item() * block_size
    return (heads * own + off) / (heads * t * (t + 1) / 2)


def _own_segments(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segment_size: int, scale: float,
    valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each query over its own segment (unpermuted keys): out, lse."""
    return segment_causal_attention(query, key, value, segment_size, scale, key_mask=valid)


def _earlier_segments(
    query: torch.Tensor, key_perm: torch.Tensor, value_perm: torch.Tensor, chosen: torch.Tensor, block_size: int,
    scale: float, valid_perm: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the ``chosen`` blocks of the permuted keys, no token mask: out, lse. Each kv head
    is its own batch row, so the padding mask can follow its permutation."""
    b, hq, t, d = query.shape
    hkv = key_perm.shape[1]
    layout = BlockSparseLayout.from_block_mask(_fold_heads(chosen, hkv), block_size, block_size, t, t)
    keys = None if valid_perm is None else valid_perm.reshape(b * hkv, t)
    q, k, v = (_fold_heads(x, hkv) for x in (query, key_perm, value_perm))
    out, lse = block_sparse_attention(q, k, v, layout, scale=scale, return_lse=True, key_mask=keys)
    return out.view(b, hq, t, d), lse.view(b, hq, t)


def _fold_heads(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """``[B, H, ...] -> [B * Hkv, H / Hkv, ...]``: each kv head (with its query heads) a batch row."""
    return x.reshape(x.shape[0] * hkv, x.shape[1] // hkv, *x.shape[2:])


def pbs_attention(
    config: PBSConfig, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scale: float, module=None, **_,
) -> torch.Tensor:
    """PBS-Attn over ``query [B, H, q, D]`` (after RoPE), the last ``q`` of ``key, value [B, Hkv, kv, D]``;
    ``attention_mask`` is transformers' (``None``: causal only, else bool / additive ``[B, 1, q, kv]``).
    Returns ``[B, H, q, D]``. A prompt (``q == kv``) longer than one segment runs the permuted block
    selection; padded keys (from the mask) are hidden and ignored by the permutation and the key
    means. Anything else runs dense attention."""
    sq, skv = query.shape[2], key.shape[2]
    if sq != skv or skv <= config.segment_size:
        return dense_attention(query, key, value, attention_mask, scale)
    valid = None if attention_mask is None else key_validity(attention_mask)[:, :skv]
    valid = None if valid is None or bool(valid.all()) else valid
    perm = pbs_permutation(query, key, config.block_size, config.segment_size, scale, valid)
    index = perm[..., None].expand(-1, -1, -1, key.shape[-1])  # K and V are gathered once per kv head
    key_perm = key.gather(2, index)
    chosen = pbs_block_selection(query, key_perm, perm, config, scale, valid)
    density = pbs_density(chosen, skv, config.block_size, config.segment_size)
    if run_dense(module, config.dense_fallback, density, query.device, "pbs"):
        return dense_attention(query, key, value, attention_mask, scale)
    value_perm = value.gather(2, index)
    own, lse_own = _own_segments(query, key, value, config.segment_size, scale, valid)
    valid_perm = None if valid is None else valid[:, None].expand_as(perm).gather(2, perm)
    past, lse_past = _earlier_segments(query, key_perm, value_perm, chosen, config.block_size, scale, valid_perm)
    return merge_attention_states([own, past], [lse_own, lse_past])[0]


register_lm_method(LMMethod(
    config=PBSConfig, attn_implementation="vzoo_pbs", label="PBS-Attn", attention=pbs_attention,
    paper="Sparser Block-Sparse Attention via Token Permutation (2025)", arxiv="2510.21270",
    ops=("block_sparse_attention", "merge_attention_states"),
    status="exact to the official selection rules (loop oracle); prefill only, decode dense",
    window_error=lambda config, window: "its segment permutation has no sliding-window rule",
    bench=lambda tokens: {"pbs (128/256, mass 0.97)": PBSConfig(), "pbs (official mass 0.9)": PBSConfig(threshold=0.9)},
    contract=lambda: {"pbs": PBSConfig(block_size=8, segment_size=16, threshold=1.0, dense_fallback=False)},
))
