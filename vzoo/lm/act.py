"""ACT, the attention calibration technique: "Unveiling and Harnessing Hidden Attention Sinks: Enhancing
Large Language Models without Training through Attention Calibration" (Yu, Wang, Fu, Shi, Shaikh, Lin;
ICML 2024, arXiv 2406.15765). Reference implementation: GATECH-EIC/ACT (``models/llama_modelling_aug.py``,
``atten_process_eval`` / ``atten_process_cal``; ``mt-bench/gen_model_answer.py``).

The rule, as the official code applies it to the post-softmax map ``A [q, kv]`` of a chosen head:

1. Sink detection, per input and per head: ``r_j = sum_i A[i, j] / n_j`` with ``n_j`` the number of
   queries that can see key ``j`` (the official ``T - j`` of a causal prompt); keys with ``r_j > tau``
   (strict) are sinks. The first (lowest-position) sink is left alone, whichever position it is.
2. Calibration of every query row: the remaining sinks are scaled by ``beta``; the removed mass
   ``(1 - beta) * sum_sinks A[i, s]`` is given to the other visible entries (the kept first sink
   included) in proportion to their values, so rows still sum to one and ratios between the
   uncalibrated entries are unchanged.
3. Head selection is offline: each (layer, head) alone is calibrated on a calibration set and kept
   when it beats the uncalibrated model (official ``scripts/calibration.sh``: one head per run,
   each against the same baseline; the kept heads are then used together). :func:`search_heads`.

Defaults ``beta=0.4, tau=0.1`` are those of ``scripts/evaluation.sh`` (MT-Bench used ``tau=0.15``).

Where this differs from the official code, and why:

- The official ``A[0, 0] = 1`` is a no-op on a causal prompt map (query 0 sees only key 0); on a decode
  row it would add mass to the first key (row sum above one). Here a row keeps its values when it has
  no uncalibrated visible entry to receive the mass (the official code divides by zero there).
- Calibration runs in float32 at least (the official code works in the model dtype, fp16).
- Calls with a KV cache (decode steps, chunked prefill): the statistic is taken over the queries of the
  call, as the official MT-Bench script does (it applies the same function to the single decode row,
  so a key is a sink when that row gives it more than ``tau``). A prompt prefilled in one call gets
  the paper's rule exactly; with ``decode=False`` calls with a cache prefix use the model's attention.
- Batches: detection is per batch element (the official code is batch-1); padding and the model's
  sliding window come from the caller's mask.

A property of the official rule worth knowing: keys near the end are seen by few queries, so in heads
with local attention they pass ``tau`` easily (on SmolLM2-135M, 512 tokens of text: 358 of the 529
sinks besides position 0 lie in the last 16 positions; ``benchmarks/act_sinks.py``).

Heads are query heads (GQA: key/value heads are shared as in the model). Only the chosen heads are
computed with explicit probabilities (in query chunks, two passes: column statistics, then
calibration), the other heads of a patched layer run the model's SDPA attention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from vzoo.kernels.reference import visible_keys

from .analysis import attention_maps
from .layers import dense_attention, masked_softmax, select_layers, visible_mask
from .registry import LMMethod, register_lm_method

__all__ = [
    "ACTConfig", "act_attention", "calibrate_attention", "detect_sinks", "received_attention", "search_heads", "sink_map",
]

_CHUNK_ELEMENTS = 1 << 24  # probabilities held at once per call (batch x heads x query rows x keys)


def _heads_normal(heads) -> tuple[tuple[int, tuple[int, ...]], ...] | None:
    """``heads`` (mapping ``{layer: heads}`` or iterable of ``(layer, head)`` / ``(layer, heads)``) as
    sorted ``((layer, (head, ...)), ...)`` without empty layers."""
    if heads is None:
        return None
    items = heads.items() if isinstance(heads, Mapping) else heads
    merged: dict[int, set[int]] = {}
    try:
        for layer, hs in items:
            hs = (hs,) if isinstance(hs, int) else tuple(hs)
            for i in (layer, *hs):
                if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                    raise TypeError
            merged.setdefault(layer, set()).update(hs)
    except (TypeError, ValueError):
        raise ValueError(
            f"ACTConfig.heads={heads!r} must be None, a mapping {{layer: [heads]}} or (layer, head) pairs of "
            "non-negative ints"
        ) from None
    return tuple((layer, tuple(sorted(hs))) for layer, hs in sorted(merged.items()) if hs)


@dataclass(frozen=True)
class ACTConfig:
    """ACT settings.

    Args:
        heads: the query heads to calibrate, ``{layer: [heads]}`` or ``(layer, head)`` pairs (stored as
            sorted ``((layer, (heads...)), ...)``); ``None``: every head of every layer (the paper
            chooses a few per task with :func:`search_heads`).
        beta: factor on the attention of the calibrated sinks, in ``[0, 1]`` (1: no change).
        tau: a key is a sink when the mean attention it receives from the queries that see it is above ``tau``.
        keep_first: leave the first sink of each head (normally the first token) uncalibrated.
        decode: calibrate calls with a KV cache prefix too (statistic over the call's queries); ``False``:
            those calls run the model's attention.
    """

    heads: Mapping[int, Iterable[int]] | tuple | None = None
    beta: float = 0.4
    tau: float = 0.1
    keep_first: bool = True
    decode: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", _heads_normal(self.heads))
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"ACTConfig.beta={self.beta!r} must be a number in [0, 1]")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not self.tau >= 0.0:
            raise ValueError(f"ACTConfig.tau={self.tau!r} must be a number >= 0")
        for name in ("keep_first", "decode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ACTConfig.{name}={getattr(self, name)!r} must be a bool")

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        """The layers with heads to calibrate."""
        if self.heads is None:
            return tuple(range(num_layers))
        return select_layers("ACTConfig.heads layers", tuple(layer for layer, _ in self.heads), num_layers)

    def heads_of(self, layer: int, num_heads: int) -> tuple[int, ...]:
        """The heads of ``layer`` to calibrate (checked against ``num_heads``)."""
        heads = tuple(range(num_heads)) if self.heads is None else dict(self.heads).get(layer, ())
        if heads and heads[-1] >= num_heads:
            raise ValueError(f"ACTConfig.heads: layer {layer} has head {heads[-1]} >= num_attention_heads={num_heads}")
        return heads


# ------------------------------------------------------------------------------------- pure functions


def _check(probs: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """``visible`` checked (default: causal, queries the last ``q`` of ``kv`` positions), as bool
    broadcastable to ``probs [B, H, q, kv]``."""
    if probs.dim() != 4 or not probs.is_floating_point():
        raise ValueError(f"probs must be a float [B, H, q, kv] tensor, got {probs.dtype} {tuple(probs.shape)}")
    q, kv = probs.shape[-2:]
    if q > kv:
        raise ValueError(f"probs has q={q} > kv={kv} rows: queries must be the last q of the kv positions")
    if visible is None:
        return visible_keys(q, kv, True, device=probs.device)
    if visible.dtype != torch.bool:
        raise ValueError(f"visible must be bool, got {visible.dtype}")
    try:
        if torch.broadcast_shapes(visible.shape, probs.shape) != probs.shape:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"visible {tuple(visible.shape)} does not broadcast to probs {tuple(probs.shape)}") from None
    return visible


def _received(colsum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return colsum / count.clamp_min(1)  # keys no query sees: colsum 0, r 0


def received_attention(probs: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, H, kv]``: per key, the mean attention it receives from the queries that can see it
    (``visible``, bool broadcastable to ``probs [B, H, q, kv]``; default causal); 0 for keys none see."""
    visible = _check(probs, visible)
    count = visible.expand_as(probs).sum(-2)
    return _received(probs.masked_fill(~visible, 0).sum(-2), count)


def detect_sinks(probs: torch.Tensor, tau: float = 0.1, visible: torch.Tensor | None = None) -> torch.Tensor:
    """bool ``[B, H, kv]``: the keys whose :func:`received_attention` is above ``tau``, per batch element
    and head (the first sink included)."""
    return received_attention(probs, visible) > tau


def _drop_first(sinks: torch.Tensor) -> torch.Tensor:
    """``sinks [..., kv]`` without the lowest-position sink of each row."""
    return sinks & (sinks.cumsum(-1) > 1)


def _rescale(probs: torch.Tensor, calibrated: torch.Tensor, beta: float) -> torch.Tensor:
    """``probs [B, H, q, kv]`` with the ``calibrated [B, H, kv]`` keys scaled by ``beta`` and the removed
    mass spread over the other entries in proportion; rows with no other mass stay as they are."""
    cal = calibrated.unsqueeze(-2)
    sink_mass = probs.masked_fill(~cal, 0).sum(-1, keepdim=True)
    rest = probs.masked_fill(cal, 0).sum(-1, keepdim=True)
    ok, one = rest > 0, torch.ones_like(rest)
    grow = torch.where(ok, 1 + (1 - beta) * sink_mass / rest.clamp_min(torch.finfo(probs.dtype).tiny), one)
    shrink = torch.where(ok, beta * one, one)
    return probs * torch.where(cal, shrink, grow)


def calibrate_attention(
    probs: torch.Tensor, beta: float = 0.4, tau: float = 0.1, keep_first: bool = True, visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """ACT on attention probabilities ``probs [B, H, q, kv]`` (queries the last ``q`` of the ``kv``
    positions; ``visible``: the allowed pairs, bool broadcastable to ``probs``, default causal): the sinks
    of :func:`detect_sinks` (without the first of each head when ``keep_first``) scaled by ``beta`` in
    every row, their removed mass added to the row's other entries in proportion. Returns a new tensor."""
    sinks = detect_sinks(probs, tau, visible)
    return _rescale(probs, _drop_first(sinks) if keep_first else sinks, beta)


# --------------------------------------------------------------------------------- attention function


def _probs(q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax (float32 at least) of ``q @ k^T * scale`` over the ``visible`` keys; rows that see none are zeros."""
    return masked_softmax((q @ k.transpose(-1, -2) * scale).to(torch.promote_types(q.dtype, torch.float32)), visible)


def _calibrated_heads(
    config: ACTConfig, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
    scale: float, window: int | None,
) -> torch.Tensor:
    """ACT attention of ``query [B, h, q, D]`` over ``key, value [B, h, kv, D]`` (heads already matched):
    statistics over all query rows first, then the calibrated rows times ``value``, in query chunks."""
    b, h, sq, _ = query.shape
    skv = key.shape[2]
    rows = max(1, _CHUNK_ELEMENTS // (b * h * skv))
    spans = [(i, min(i + rows, sq)) for i in range(0, sq, rows)]

    def chunk(i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        vis = visible_mask(attention_mask, sq, skv, window, query.device, rows=(i, j))
        return _probs(query[:, :, i:j], key, vis, scale), vis

    colsum = query.new_zeros(b, h, skv, dtype=torch.promote_types(query.dtype, torch.float32))
    count = torch.zeros(1, 1, skv, dtype=torch.long, device=query.device)
    kept = None
    for i, j in spans:
        p, vis = chunk(i, j)
        colsum += p.sum(-2)
        count = count + vis.sum(-2)
        kept = p if len(spans) == 1 else None
    sinks = _received(colsum, count) > config.tau
    calibrated = _drop_first(sinks) if config.keep_first else sinks
    outs = []
    for i, j in spans:
        p = kept if kept is not None else chunk(i, j)[0]
        outs.append(_rescale(p, calibrated, config.beta).to(value.dtype) @ value)
    return torch.cat(outs, 2)


def act_attention(
    config: ACTConfig, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
    scale: float, module: nn.Module, sliding_window: int | None = None, **_,
) -> torch.Tensor:
    """ACT on the heads ``config`` names for ``module.layer_idx``: ``query [B, H, q, D]`` (after RoPE, the
    last ``q`` positions), ``key, value [B, Hkv, kv, D]`` (after the cache update), transformers' mask
    (bool or additive ``[B, 1, q, kv]``; ``None``: causal only) and the layer's ``sliding_window``.
    The other heads run the model's attention. Returns ``[B, H, q, D]``."""
    nh, sq, skv = query.shape[1], query.shape[2], key.shape[2]
    heads = config.heads_of(module.layer_idx, nh)
    if not heads or (sq < skv and not config.decode):
        return dense_attention(query, key, value, attention_mask, scale, sliding_window)
    groups = nh // key.shape[1]
    idx = torch.tensor(heads, device=query.device)
    out = _calibrated_heads(config, query[:, idx], key[:, idx // groups], value[:, idx // groups], attention_mask,
                            scale, sliding_window)
    if len(heads) == nh:
        return out
    rest = torch.tensor(sorted(set(range(nh)) - set(heads)), device=query.device)  # only these run plain attention
    plain = dense_attention(query[:, rest], key[:, rest // groups], value[:, rest // groups], attention_mask, scale,
                            sliding_window)
    return out.new_empty(query.shape[0], nh, sq, value.shape[-1]).index_copy(1, idx, out).index_copy(1, rest, plain)


def _check_heads(model: nn.Module, module: nn.Module, config: ACTConfig) -> None:
    """At ``apply_sparse_attention`` time: the configured heads exist in this layer."""
    config.heads_of(module.layer_idx, module.config.num_attention_heads)


# ------------------------------------------------------------------------------------------ analysis


def sink_map(model: nn.Module, input_ids: torch.Tensor, tau: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Received attention of every key in every layer and head of ``model`` on one sequence
    ``input_ids [T]`` or ``[1, T]``, from eager attention maps (the model's attention implementation is
    restored afterwards). Returns ``(received [layers, heads, T]`` float32 (:func:`received_attention`),
    ``sinks [layers, heads, T]`` bool, ``received > tau``)."""
    received = received_attention(attention_maps(model, input_ids))
    return received, received > tau


def search_heads(
    model: nn.Module, eval_fn: Callable[[nn.Module], float], candidates: Iterable[tuple[int, int]] | None = None,
    beta: float = 0.4, tau: float = 0.1, progress: bool = True,
) -> list[tuple[int, int]]:
    """ACT's offline head search: ``eval_fn(model)`` (higher is better, e.g. accuracy on a calibration
    set) without calibration, then with each ``(layer, head)`` of ``candidates`` (``None``: every head of
    every layer) calibrated alone; returns the candidates that score strictly above the uncalibrated
    model, in candidate order. Use them together with ``ACTConfig(heads=found, beta=beta, tau=tau)``."""
    from tqdm.auto import tqdm

    from .apply import apply_sparse_attention

    if candidates is None:
        cfg = model.config
        candidates = [(i, h) for i in range(cfg.num_hidden_layers) for h in range(cfg.num_attention_heads)]
    candidates = list(candidates)
    for pair in candidates:
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(i, int) and i >= 0 for i in pair)):
            raise ValueError(f"candidates must be (layer, head) pairs of non-negative ints, got {pair!r}")
    base = eval_fn(model)
    found = []
    for layer, head in tqdm(candidates, desc="ACT head search", disable=not progress):
        with apply_sparse_attention(model, ACTConfig(heads={layer: (head,)}, beta=beta, tau=tau)):
            if eval_fn(model) > base:
                found.append((layer, head))
    return found


def _bench(tokens: int) -> dict:
    # layers 1-3, heads 0-3: rows that fit both the 4-layer, 4-head benchmark Llama and SmolLM2 (30 x 9)
    few = ACTConfig(heads={1: (0, 3), 2: (1, 2), 3: (0, 2)})
    return {"ACT every head beta 0.4 tau 0.1": ACTConfig(), "ACT six heads in layers 1 to 3": few}


register_lm_method(LMMethod(
    config=ACTConfig, attn_implementation="vzoo_act", label="ACT", attention=act_attention,
    paper="Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models without Training "
          "through Attention Calibration (ICML 2024)",
    arxiv="2406.15765", ops=(), status="exact to the official calibration rule; explicit probabilities on calibrated heads",
    attach=_check_heads, bench=_bench,
    contract=lambda: {"act-beta-1-every-head": ACTConfig(beta=1.0)},
    bench_tokens=8192,
))
