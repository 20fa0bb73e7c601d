"""Trained routing (Landmark Attention, Routing Transformer): speed against the baselines a user would
pick, same process, and a tiny long-range retrieval fine-tune. Used by ``benchmarks/routing.py``.

Speed (B=1, H=4, D=64, fp32 CPU as in issue 16's bar): Landmark's grouped-softmax training op (forward +
backward, blocks of 50) against its dense masked reference and against causal SDPA; Routing attention's
forward (the layer's default clusters, window and segment) against causal SDPA.

Retrieval: multi-query associative recall (:mod:`vzoo.mqar`) at a long sequence with uniform query gaps.
A tiny softmax Llama is trained on it first; each method then starts from those weights (Landmark: a
``<landmark>`` token added, grouped softmax; Routing: ``vzoo.lm.convert`` with its q/k/v/o copied) and
is fine-tuned on the same task; held-out accuracy over steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vzoo.bench import mode_ms

__all__ = ["BAR", "SpeedRow", "check_routing_bar", "format_speed", "retrieval_rows", "speed_rows"]

B, H, D = 1, 4, 64
LANDMARK_BLOCK = 50


@dataclass
class SpeedRow:
    op: str
    mode: str  # "fwd" | "fwd+bwd"
    tokens: int
    ms: float
    baseline: str
    baseline_ms: float

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.ms


def _qkv(t: int, grad: bool) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(B, H, t, D, requires_grad=grad) for _ in range(3))


def _landmark(backend: str) -> Callable[[int, bool], Callable[[], torch.Tensor]]:
    def make(t: int, grad: bool) -> Callable[[], torch.Tensor]:
        from vzoo.kernels.landmark import landmark_attention

        q, k, v = _qkv(t, grad)
        return lambda: landmark_attention(q, k, v, LANDMARK_BLOCK, backend=backend)

    return make


def _routing(backend: str | None) -> Callable[[int, bool], Callable[[], torch.Tensor]]:
    """Routing attention on every head with :class:`vzoo.lm.RoutingConfig`'s defaults (clusters, window,
    segment, one query cluster) and a null key/value."""

    def make(t: int, grad: bool) -> Callable[[], torch.Tensor]:
        from vzoo.kernels import routing_attention
        from vzoo.lm import RoutingConfig

        cfg = RoutingConfig()
        q, k, v = _qkv(t, grad)
        centroids = F.normalize(torch.randn(H, cfg.clusters, D), dim=-1)
        null_k, null_v = (torch.randn(H, cfg.clusters, D, requires_grad=grad) for _ in range(2))
        return lambda: routing_attention(q, k, v, centroids, window=cfg.window, segment=cfg.segment, null_k=null_k,
                                         null_v=null_v, query_clusters=cfg.query_clusters, backend=backend)

    return make


def _sdpa(t: int, grad: bool) -> Callable[[], torch.Tensor]:
    q, k, v = _qkv(t, grad)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _time(make: Callable[[int, bool], Callable[[], torch.Tensor]], t: int, mode: str, repeats: int) -> float:
    return mode_ms(make(t, mode == "fwd+bwd"), mode, torch.device("cpu"), repeats)


# (op, mode, baseline) -> (op maker, baseline maker, longest prompt timed)
CASES: dict[tuple[str, str, str], tuple[Callable, Callable, int]] = {
    ("landmark grouped softmax", "fwd+bwd", "dense masked reference"): (_landmark("torch"), _landmark("reference"), 8192),
    ("landmark grouped softmax", "fwd+bwd", "causal sdpa"): (_landmark("torch"), _sdpa, 16384),
    ("routing attention", "fwd", "causal sdpa"): (_routing(None), _sdpa, 16384),
    ("routing attention", "fwd+bwd", "causal sdpa"): (_routing(None), _sdpa, 16384),
    ("routing attention", "fwd", "dense masked reference"): (_routing(None), _routing("reference"), 4096),
}


def speed_rows(tokens: Sequence[int] = (4096, 8192, 16384), repeats: int = 3, progress: bool = True) -> list[SpeedRow]:
    """Every case of :data:`CASES` at each of ``tokens`` up to its longest prompt, op and baseline timed
    back to back (medians of ``repeats``)."""
    import sys

    rows = []
    for (op, mode, base), (make, make_base, longest) in CASES.items():
        for t in tokens:
            if t > longest:
                continue
            ms, base_ms = _time(make, t, mode, repeats), _time(make_base, t, mode, repeats)
            rows.append(SpeedRow(op, mode, t, ms, base, base_ms))
            if progress:
                print(f"{op} {mode} {t}: {ms:.1f} ms, {base} {base_ms:.1f} ms", file=sys.stderr, flush=True)
    return rows


def format_speed(rows: Sequence[SpeedRow]) -> str:
    head = f"{'op':<26} {'mode':>8} {'tokens':>7} {'ms':>9} {'baseline':<24} {'base ms':>9} {'speedup':>8}"
    lines = [head, "-" * len(head)]
    lines += [f"{r.op:<26} {r.mode:>8} {r.tokens:>7} {r.ms:>9.1f} {r.baseline:<24} {r.baseline_ms:>9.1f} "
              f"{r.speedup:>7.2f}x" for r in rows]
    return "\n".join(lines)


BAR = {
    "landmark fwd+bwd vs dense masked reference @8k": 3.0,
    "routing fwd vs causal sdpa @16k": 3.0,
    "retrieval accuracy (each method, at least)": 0.9,
}


def check_routing_bar(speed: Sequence[SpeedRow], retrieval: Sequence[dict] = ()) -> list[str]:
    """``PASS|FAIL item: measured (bar)`` for each bar item that was measured."""
    get = {(r.op, r.mode, r.baseline, r.tokens): r.speedup for r in speed}
    measured = {}
    if (x := get.get(("landmark grouped softmax", "fwd+bwd", "dense masked reference", 8192))) is not None:
        measured["landmark fwd+bwd vs dense masked reference @8k"] = x
    if (x := get.get(("routing attention", "fwd", "causal sdpa", 16384))) is not None:
        measured["routing fwd vs causal sdpa @16k"] = x
    lines = [f"{'PASS' if v >= BAR[k] else 'FAIL'} {k}: {v:.2f}x (bar {BAR[k]}x)" for k, v in measured.items()]
    for r in retrieval[1:]:  # the first row is the softmax model the methods start from
        acc = r["accuracy"]
        ok = acc is not None and acc >= BAR["retrieval accuracy (each method, at least)"]
        lines.append(f"{'PASS' if ok else 'FAIL'} retrieval accuracy {r['label']}: "
                     f"{'failed' if acc is None else f'{acc:.3f}'} (bar 0.9)")
    return lines


# --- retrieval fine-tune ---------------------------------------------------------------------------------

# The methods' settings for the 64-token task: Landmark blocks of 8 tokens (7 blocks); Routing segments of 16
# (4 of them), 4 clusters taking 8 keys of each segment (a query sees half of every earlier segment), one
# routing and one local head (window 16) per layer, centroid EMA decay 0.99 for the short run.
RETRIEVAL_LANDMARK_BLOCK = 8


def retrieval_routing_config():
    from vzoo.lm import RoutingConfig

    return RoutingConfig(clusters=4, window=8, segment=16, routing_heads=1, local_window=16, ema_decay=0.99)


def retrieval_settings(quick: bool):
    """``(task, model, pretrain, finetune)``: Zoology's MQAR at 64 tokens (:func:`vzoo.mqar.full_settings`);
    the softmax model is trained to convergence, each method fine-tuned from it."""
    from vzoo.mqar import MQARTrain, full_settings

    task, model, pretrain = full_settings()
    if quick:
        return (task, model, MQARTrain(steps=40, batch_size=16, warmup_steps=5, eval_every=20, eval_examples=64),
                MQARTrain(steps=20, batch_size=16, warmup_steps=5, eval_every=10, eval_examples=64))
    return task, model, pretrain, MQARTrain(steps=500, lr=1e-3, warmup_steps=20, schedule="constant", eval_every=50)


def _landmark_row(vocab: int, block: int):
    """``(convert, transform)``: the landmark token is id ``vocab`` (a new embedding row, initialised to the
    mean), landmarks are inserted into every batch."""
    from vzoo.lm import LandmarkConfig, apply_sparse_attention
    from vzoo.lm.finetune import init_token_row
    from vzoo.lm.landmark import insert_landmarks

    def convert(model):
        model.resize_token_embeddings(vocab + 1, mean_resizing=False)
        init_token_row(model, vocab)
        apply_sparse_attention(model, LandmarkConfig(block=block))
        return model

    def transform(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return insert_landmarks(inputs, block, vocab), insert_landmarks(labels, block, -100)  # landmarks unscored

    return convert, transform


def retrieval_rows(quick: bool, progress: Callable | None = None) -> list[dict]:
    """The softmax pre-training row, then one fine-tuning row per method starting from its weights (same
    data stream, held-out set and schedule)."""
    from dataclasses import asdict

    from vzoo.lm import convert as convert_layers
    from vzoo.lm.routing import routing_aux_loss
    from vzoo.mqar import train_mqar

    task, model, pretrain, finetune = retrieval_settings(quick)
    trained: dict = {}

    def keep(m):
        trained["model"] = m
        return m

    rows = [train_mqar("softmax (pre-training)", keep, task, model, pretrain, progress)]
    state = copy.deepcopy(trained.pop("model").state_dict())

    def from_softmax(convert):
        def run(m):
            m.load_state_dict(state)
            return convert(m)
        return run

    to_landmark, insert = _landmark_row(task.vocab_size, RETRIEVAL_LANDMARK_BLOCK)
    rows.append(train_mqar(f"landmark (block {RETRIEVAL_LANDMARK_BLOCK})", from_softmax(to_landmark), task, model,
                           finetune, progress, transform=insert))
    routing = retrieval_routing_config()
    rows.append(train_mqar(f"routing ({routing.clusters} clusters, segment {routing.segment})",
                           from_softmax(lambda m: convert_layers(m, routing)), task, model, finetune, progress,
                           aux_loss=routing_aux_loss))
    return [dict(asdict(r), task=asdict(task), model=asdict(model), train=asdict(pretrain if i == 0 else finetune))
            for i, r in enumerate(rows)]
