"""Multi-query associative recall (MQAR) on tiny two-layer language models trained from scratch: the
recall-quality part of the linear-attention benchmark (``benchmarks/linear.py --only mqar``, ``vzoo bench``).

MQAR is from Zoology (Arora et al., "Zoology: Measuring and Improving Recall in Efficient Language
Models", arXiv 2312.04927). The data follows ``zoology/data/multiquery_ar.py`` of HazyResearch/zoology:
a sequence opens with ``num_kv_pairs`` key-value pairs (keys from ``[1, vocab/2)``, values from
``[vocab/2, vocab)``, both without repetition inside a sequence); every key is then queried once, at even
offsets of the rest of the sequence drawn from a power law that favours short gaps; the label at a query
key's position is its value, every other label is -100 (not scored); the other positions hold random
tokens. Accuracy is the share of queries whose greedy prediction is the value.

The softmax baseline is a ``transformers.LlamaForCausalLM`` built from a ``LlamaConfig``; the other rows
are the same model passed through a converter (``lambda m: vzoo.lm.convert(m, LightningConfig())``) and
trained from scratch with the same seed, data and schedule. torch and transformers are imported inside
the functions, so ``import vzoo.mqar`` stays light.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "MQARModel", "MQARResult", "MQARTask", "MQARTrain", "SOFTMAX", "accuracy", "build_model", "converters", "describe",
    "format_table", "mqar_batch", "mqar_rows", "plot_curves", "quick_settings", "full_settings", "train_mqar",
]

SOFTMAX = "softmax (Llama SDPA)"
# config fields a row sets for the MQAR sequence length (the rest are the method's defaults): Titans' sliding
# window must not cover the whole 64-token sequence, else the row is softmax attention plus a memory; the
# Routing Transformer's segments (default 512) must be shorter than it, else nothing is ever routed.
ROW_CONFIG = {"titans": {"window": 16}, "routing": {"clusters": 4, "window": 8, "segment": 16, "local_window": 16}}


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class MQARTask:
    """One MQAR setting (the fields of Zoology's ``MQARConfig``)."""

    vocab_size: int = 128
    seq_len: int = 64
    num_kv_pairs: int = 8
    power_a: float = 0.01  # gap distribution p(g) ~ g**(power_a - 1), g = 1..space; 1.0 is uniform
    random_non_queries: bool = True  # fill the non-key/value/query positions with random tokens (else 0)

    def __post_init__(self) -> None:
        _check(self.seq_len >= 4 and self.seq_len % 2 == 0, "seq_len", self.seq_len, "an even integer >= 4")
        _check(self.num_kv_pairs >= 1 and 4 * self.num_kv_pairs <= self.seq_len, "num_kv_pairs", self.num_kv_pairs,
               f"1 .. seq_len/4 = {self.seq_len // 4} (pairs plus one query per key at even offsets)")
        _check(self.vocab_size // 2 - 1 >= self.num_kv_pairs, "vocab_size", self.vocab_size,
               f">= 2 * (num_kv_pairs + 1) = {2 * (self.num_kv_pairs + 1)} (distinct keys in [1, vocab/2))")
        _check(0.0 < self.power_a <= 1.0, "power_a", self.power_a, "0 < power_a <= 1")


@dataclass(frozen=True)
class MQARModel:
    """The tiny Llama every row starts from."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int | None = None  # None: num_heads
    intermediate_size: int = 128

    def __post_init__(self) -> None:
        _check(self.hidden_size >= 8, "hidden_size", self.hidden_size, ">= 8")
        _check(self.num_layers >= 1, "num_layers", self.num_layers, ">= 1")
        _check(self.num_heads >= 1 and self.hidden_size % self.num_heads == 0, "num_heads", self.num_heads,
               f"a divisor of hidden_size={self.hidden_size}")
        kv = self.num_kv_heads
        _check(kv is None or (kv >= 1 and self.num_heads % kv == 0), "num_kv_heads", kv,
               f"None or a divisor of num_heads={self.num_heads}")
        _check(self.intermediate_size >= 1, "intermediate_size", self.intermediate_size, ">= 1")


@dataclass(frozen=True)
class MQARTrain:
    """AdamW on fresh batches every step, linear warm-up then cosine (or constant) learning rate."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine" | "constant"
    eval_every: int = 100
    eval_examples: int = 512
    seed: int = 0
    time_limit_s: float | None = None  # stop training (then evaluate) once this much wall time has passed
    threads: int | None = 1  # torch.set_num_threads during the run (None: leave as is)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_examples"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        _check(self.lr > 0, "lr", self.lr, "> 0")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        _check(self.schedule in ("cosine", "constant"), "schedule", self.schedule, '"cosine" or "constant"')
        _check(self.time_limit_s is None or self.time_limit_s > 0, "time_limit_s", self.time_limit_s, "None or > 0")
        _check(self.threads is None or self.threads >= 1, "threads", self.threads, "None or >= 1")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        done = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


@dataclass
class MQARResult:
    """One row of the table. ``curve``: (step, held-out accuracy, mean training loss since the last point)."""

    label: str
    accuracy: float | None  # final held-out accuracy; None when the row failed
    steps: int  # optimiser steps done (when it failed: the step that failed)
    seconds: float  # training wall time, evaluations excluded
    params: int = 0
    curve: list[tuple[int, float, float]] = field(default_factory=list)
    error: str | None = None


def mqar_batch(task: MQARTask, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` MQAR sequences: ``(inputs, labels)``, both int64 ``[batch, seq_len]``; ``labels[b, t]`` is the
    value of the key at ``inputs[b, t]`` where that key is queried, else -100 (the prediction at position
    ``t`` is scored against ``labels[b, t]``: labels are already shifted, unlike transformers' ``labels=``)."""
    import torch

    _check(batch >= 1, "batch", batch, ">= 1")
    n, t, v = task.num_kv_pairs, task.seq_len, task.vocab_size
    half, context = v // 2, 2 * task.num_kv_pairs
    keys = torch.rand(batch, half - 1, generator=generator).argsort(-1)[:, :n] + 1
    values = torch.rand(batch, v - half, generator=generator).argsort(-1)[:, :n] + half
    space = (t - context) // 2  # query slots: even offsets after the pairs
    gap = torch.arange(1, space + 1, dtype=torch.float64)
    weights = (task.power_a * gap ** (task.power_a - 1)).expand(batch, space)
    slots = torch.multinomial(weights, n, replacement=False, generator=generator)
    where = context + 2 * slots
    inputs = torch.zeros(batch, t, dtype=torch.long)
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    inputs.scatter_(1, where, keys)
    labels = torch.full((batch, t), -100, dtype=torch.long).scatter_(1, where, values)
    if task.random_non_queries:
        filler = torch.randint(v, (batch, t), generator=generator)
        inputs = torch.where(inputs == 0, filler, inputs)
    return inputs, labels


def build_model(task: MQARTask, model: MQARModel, seed: int = 0):
    """A freshly initialised ``LlamaForCausalLM`` (fp32, SDPA attention, RoPE) for ``task``'s vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=task.vocab_size, hidden_size=model.hidden_size, intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads or model.num_heads, max_position_embeddings=task.seq_len,
        tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _loss_and_hits(model, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import torch.nn.functional as F

    logits = model(input_ids=inputs, use_cache=False).logits
    finite = logits.isfinite().all(-1)
    if not finite.all():  # also unscored positions: their NaN would reach every gradient through the weights
        raise FloatingPointError(f"non-finite logits at {int((~finite).sum())} of {finite.numel()} positions")
    scored = labels != -100
    loss = F.cross_entropy(logits[scored].float(), labels[scored])
    return loss, logits[scored].argmax(-1) == labels[scored]


def accuracy(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Share of the scored positions (``labels != -100``) whose argmax prediction equals the label."""
    import torch

    was_training = model.training
    model.eval()
    hits = total = 0
    with torch.no_grad():
        for i in range(0, inputs.shape[0], batch_size):
            _, ok = _loss_and_hits(model, inputs[i:i + batch_size], labels[i:i + batch_size])
            hits, total = hits + int(ok.sum()), total + ok.numel()
    model.train(was_training)
    return hits / total


def train_mqar(
    label: str,
    convert: Callable[[Any], Any],
    task: MQARTask,
    model: MQARModel,
    train: MQARTrain,
    progress: Callable[[str, int, float, float], None] | None = None,
    transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    aux_loss: Callable[[Any], torch.Tensor] | None = None,
) -> MQARResult:
    """Build the tiny Llama, ``convert`` it, train it on fresh MQAR batches and evaluate it on a held-out
    set (same for every row: drawn from a generator seeded apart from the training one) every
    ``train.eval_every`` steps and at the end. ``progress(label, step, accuracy, loss)`` after each evaluation.
    ``transform(inputs, labels)`` rewrites every batch, held-out set included (e.g. inserts landmark tokens);
    ``aux_loss(model)`` is added to each training loss (e.g. the Routing Transformer's commitment loss).
    A training step that raises (e.g. non-finite logits, at any position) ends the run: the result has
    ``accuracy=None``, the curve so far and the error with its step."""
    import torch

    threads = torch.get_num_threads()
    if train.threads is not None:
        torch.set_num_threads(train.threads)
    try:
        def batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            inputs, labels = mqar_batch(task, n, generator)
            return (inputs, labels) if transform is None else transform(inputs, labels)

        test = batch(train.eval_examples, torch.Generator().manual_seed(10_000 + train.seed))
        data = torch.Generator().manual_seed(train.seed)
        net = convert(build_model(task, model, train.seed))
        net.train()
        params = sum(p.numel() for p in net.parameters() if p.requires_grad)
        decay = [p for p in net.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in net.parameters() if p.requires_grad and p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=train.lr)
        curve: list[tuple[int, float, float]] = []
        losses: list[float] = []
        seconds, step = 0.0, 0
        while step < train.steps and (train.time_limit_s is None or seconds < train.time_limit_s):
            begin = time.perf_counter()
            inputs, labels = batch(train.batch_size, data)
            for group in opt.param_groups:
                group["lr"] = train.lr_at(step)
            try:
                loss, _ = _loss_and_hits(net, inputs, labels)
                if aux_loss is not None:
                    loss = loss + aux_loss(net)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss is {loss.item()}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
            except Exception as e:  # divergence: keep the curve so far and say where it failed
                error = f"{type(e).__name__} at step {step}: {e}"[:300]
                return MQARResult(label, None, step, seconds, params, curve, error)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            seconds += time.perf_counter() - begin
            losses.append(loss.item())
            step += 1
            if step % train.eval_every == 0 or step == train.steps:
                curve.append((step, accuracy(net, *test), sum(losses) / len(losses)))
                losses.clear()
                if progress is not None:
                    progress(label, *curve[-1])
        if not curve or curve[-1][0] != step:  # stopped by the time limit between evaluations
            curve.append((step, accuracy(net, *test), sum(losses) / max(1, len(losses))))
            if progress is not None:
                progress(label, *curve[-1])
        return MQARResult(label, curve[-1][1], step, seconds, params, curve)
    finally:
        torch.set_num_threads(threads)


def converters() -> dict[str, Callable[[Any], Any]]:
    """Row label -> converter: the softmax baseline (identity), then every module-swap layer registered
    with :mod:`vzoo.lm.convert` (all decoder layers converted, the method's defaults updated by
    :data:`ROW_CONFIG`), then two hybrids. Add a row with one entry ``label: lambda m: convert(m, FooConfig(...))``."""
    from vzoo.lm import LightningConfig, RATConfig, convert, lm_layers  # vzoo.lm registers every method file

    rows: dict[str, Callable[[Any], Any]] = {SOFTMAX: lambda m: m}
    for entry in lm_layers():
        config = entry.config(**ROW_CONFIG.get(entry.name, {}))
        rows[entry.label] = lambda m, c=config: convert(m, c)
    # the papers' hybrids at two layers: softmax or local attention first, the new layer second
    rows["hybrid: softmax + Lightning"] = lambda m: convert(m, LightningConfig(layers=(1,)))
    rows["hybrid: local attention (window 16) + RAT"] = lambda m: convert(m, RATConfig(layers=(1,)), local_window=16)
    return rows


def full_settings() -> tuple[MQARTask, MQARModel, MQARTrain]:
    """The reported setting (Zoology's smallest, at a small vocabulary): the softmax baseline passes 0.95
    held-out accuracy after ~400 steps and ends at ~0.998 after 1500 (about 2 min on one loaded core)."""
    return MQARTask(), MQARModel(), MQARTrain()


def quick_settings() -> tuple[MQARTask, MQARModel, MQARTrain]:
    """A smoke-test budget (a few seconds per row): the same task, far too few steps to converge."""
    return MQARTask(), MQARModel(), MQARTrain(steps=60, batch_size=32, warmup_steps=10, eval_every=20,
                                              eval_examples=128)


def mqar_rows(
    quick: bool,
    rows: Mapping[str, Callable[[Any], Any]] | None = None,
    progress: Callable[[str, int, float, float], None] | None = None,
) -> list[dict]:
    """Train and evaluate every row (default: :func:`converters`) at the quick or full setting; a row that
    fails is kept with its error. Each dict: label, accuracy, steps, seconds, params, curve, error, and
    the task / model / train settings."""
    task, model, train = quick_settings() if quick else full_settings()
    settings = {"task": asdict(task), "model": asdict(model), "train": asdict(train), "quick": quick}
    out = []
    for label, convert in (converters() if rows is None else rows).items():
        try:
            result = train_mqar(label, convert, task, model, train, progress)
        except Exception as e:  # one broken layer must not lose the other rows
            result = MQARResult(label, None, 0, 0.0, error=f"{type(e).__name__}: {e}"[:300])
        out.append({**asdict(result), **settings})
    return out


def describe(task: MQARTask, model: MQARModel, train: MQARTrain) -> str:
    """One line naming the setting: task, model, optimiser, budget and held-out set."""
    return (f"vocab {task.vocab_size}, length {task.seq_len}, {task.num_kv_pairs} key-value pairs, power_a "
            f"{task.power_a}; Llama {model.num_layers} layers, hidden {model.hidden_size}, {model.num_heads} heads; "
            f"AdamW lr {train.lr} ({train.schedule}, {train.warmup_steps} warm-up), batch {train.batch_size}, "
            f"{train.steps} steps, {train.threads} thread(s); accuracy on {train.eval_examples} held-out sequences "
            f"({train.eval_examples * task.num_kv_pairs} queries)")


def format_table(rows: list[dict], title: str = "") -> str:
    """Markdown table of :func:`mqar_rows` output, under ``title`` and the setting of the first row."""
    lines = [title] if title else []
    if rows and "task" in rows[0]:
        r = rows[0]
        setting = describe(MQARTask(**r["task"]), MQARModel(**r["model"]), MQARTrain(**r["train"]))
        lines.append(f"Setting{' (quick: too few steps to converge)' if r.get('quick') else ''}: {setting}.")
    lines += [""] if lines else []
    lines += ["| row | accuracy | steps | train s | ms/step | params | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["accuracy"] is None:
            last = f"; last held-out accuracy {r['curve'][-1][1]:.3f} at step {r['curve'][-1][0]}" if r["curve"] else ""
            lines.append(f"| {r['label']} | - | {r['steps']} | {r['seconds']:.1f} | - | {r['params']:,} | "
                         f"failed: {r['error']}{last} |")
            continue
        ms = 1e3 * r["seconds"] / max(1, r["steps"])
        note = "reaches 0.95" if r["accuracy"] >= 0.95 else "below 0.95"
        lines.append(f"| {r['label']} | {r['accuracy']:.3f} | {r['steps']} | {r['seconds']:.1f} | {ms:.1f} | "
                     f"{r['params']:,} | {note} |")
    return "\n".join(lines)


def plot_curves(rows: list[dict], path, title: str = "") -> None:
    """Held-out accuracy against step for every row, as a PNG at ``path`` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vzoo.atomic import save_figure

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in rows:
        if r["curve"]:
            steps, acc = [c[0] for c in r["curve"]], [c[1] for c in r["curve"]]
            final = "failed" if r["accuracy"] is None else f"{r['accuracy']:.2f}"
            ax.plot(steps, acc, marker=".", label=f"{r['label']} ({final})")
    ax.axhline(0.95, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="training step", ylabel="held-out MQAR accuracy", ylim=(0, 1.02), title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
