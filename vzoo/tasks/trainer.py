"""One training loop for every task: progress bar, periodic evaluation, atomic checkpoints, exact
resume (mid-epoch included), metrics JSON and a PNG of the curves, DistributedDataParallel under
``torchrun`` (gloo on CPU, nccl on GPU).

A task supplies a :class:`TaskRun`: the model, a deterministic list of index batches per epoch, how to
turn a batch into a loss, and how to evaluate. Batches are split across ranks (every ``world``-th
batch), so a step of a 2-process run covers two batches.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from vzoo.atomic import save_figure, write_atomic, write_json_atomic

__all__ = ["TaskRun", "TrainSettings", "train", "save_atomic", "load_checkpoint", "describe_changes", "split_batches", "check_batch_size"]


@dataclass
class TaskRun:
    """What :func:`train` needs from a task."""

    model: nn.Module
    batches: Callable[[int], list[list[int]]]  # epoch -> index batches (the same on every rank)
    load: Callable[[list[int]], object]  # indices -> a batch (tensors on CPU)
    loss: Callable[[nn.Module, object, torch.device], torch.Tensor]
    evaluate: Callable[[nn.Module, torch.device], dict[str, float]]
    meta: dict = field(default_factory=dict)  # what `vzoo eval` needs to rebuild the model


@dataclass
class TrainSettings:
    epochs: int
    out: Path
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    resume: bool = False
    amp: bool = False
    eval_every: int = 1
    ckpt_every: int = 0  # steps between mid-epoch checkpoints (0: at epoch ends only)
    stop_after: int = 0  # testing aid: stop (as if killed) after this many steps of this run

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be at least 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if self.eval_every < 1:
            raise ValueError(f"eval_every={self.eval_every} must be at least 1 (epochs between evaluations)")
        if self.ckpt_every < 0 or self.stop_after < 0:
            raise ValueError(f"ckpt_every={self.ckpt_every} and stop_after={self.stop_after} must not be negative")


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` that never leaves a half-written file."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001  (any unpickling failure means a bad file)
        raise ValueError(f"{path}: not a readable vzoo checkpoint ({err})") from err


def describe_changes(old: dict, new: dict, skip: Sequence[str] = ()) -> str:
    """``"epochs 6 -> 8, batch_size 16 -> 32"`` for the keys present in both dicts whose values differ
    (long lists and dicts by their length); ``""`` when none does."""

    def show(value) -> str:
        return f"{len(value)} entries" if isinstance(value, (list, tuple, dict)) and len(value) > 4 else repr(value)

    return ", ".join(
        f"{key} {show(old[key])} -> {show(new[key])}" if show(old[key]) != show(new[key]) else f"{key} differ"
        for key in old if key in new and key not in skip and old[key] != new[key]
    )


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")


def _plot(history: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no training-curve PNG", stacklevel=2)
        return
    keys = sorted({k for h in history for k in h if k not in ("epoch", "step")})
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(h["step"], h[key]) for h in history if key in h]
        ax.plot(*zip(*pts), marker="o")
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    save_figure(fig, path)


def _setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def train(run: TaskRun, settings: TrainSettings) -> dict:
    """Train ``run.model``; returns the final metrics. Writes ``out/last.pt`` (checkpoint),
    ``out/metrics.json`` (history and final metrics) and ``out/curves.png``."""
    from tqdm.auto import tqdm

    rank, world, device = _setup_distributed()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    model = run.model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    per_epoch = len(run.batches(0)) // world
    if per_epoch < 1:
        raise ValueError(f"the training data gives {len(run.batches(0))} batches, fewer than the {world} processes")
    total = settings.epochs * per_epoch
    warm = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    step, history = 0, []
    ckpt_path = out / "last.pt"
    if settings.resume:
        state = load_checkpoint(ckpt_path)
        changes = describe_changes(dict(state.get("meta", {}), epochs=state.get("epochs")), dict(run.meta, epochs=settings.epochs))
        if changes:
            raise ValueError(f"--resume: {ckpt_path} was written with other settings ({changes}); use them again or a new --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, history = state["step"], state["history"]
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    use_amp = settings.amp
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and device.type == "cuda")

    def checkpoint() -> None:
        if rank == 0:
            state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), schedule=schedule.state_dict(),
                         step=step, history=history, meta=run.meta, epochs=settings.epochs)
            save_atomic(state, ckpt_path)

    def evaluate(epoch: int) -> None:
        if rank == 0:
            metrics = run.evaluate(model, device)
            history.append(dict(epoch=epoch, step=step, **metrics))
            write_json_atomic(dict(history=history, final=metrics, steps=step, world_size=world), out / "metrics.json")
            _plot(history, out / "curves.png")
        if world > 1:
            dist.barrier()

    started = step
    bar = tqdm(total=total, initial=step, desc="train", disable=rank != 0)
    for epoch in range(step // per_epoch, settings.epochs):
        batches = run.batches(epoch)[rank::world][:per_epoch]
        model.train()
        for batch in batches[step - epoch * per_epoch :]:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                loss = run.loss(ddp, run.load(batch), device)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            step += 1
            bar.update()
            if rank == 0 and step % 10 == 0:  # one host sync every 10 steps, not two every step
                value = loss.item()
                bar.set_postfix(loss=f"{value:.3f}")
                history.append(dict(epoch=epoch, step=step, loss=value))
            if settings.ckpt_every and step % settings.ckpt_every == 0:
                checkpoint()
            if settings.stop_after and step - started >= settings.stop_after:
                checkpoint()
                bar.close()
                raise KeyboardInterrupt(f"stopped after {settings.stop_after} steps (as requested)")
        if (epoch + 1) % settings.eval_every == 0 or epoch + 1 == settings.epochs:
            evaluate(epoch)
        checkpoint()
    bar.close()
    final = history[-1] if history else {}
    if world > 1:
        dist.barrier()
    return {k: v for k, v in final.items() if k not in ("epoch", "step")}


def split_batches(items: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled (seed + epoch) full batches of ``items``."""
    check_batch_size(batch_size)
    if batch_size > len(items):
        raise ValueError(f"batch_size={batch_size} is larger than the {len(items)} training items")
    gen = torch.Generator().manual_seed(seed + epoch)
    order = [items[i] for i in torch.randperm(len(items), generator=gen).tolist()]
    return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
