"""Fine-tuning a saved causal LM on a plain-text file with :func:`vzoo.tasks.trainer.train` (progress bar, atomic
checkpoints, exact ``--resume``, held-out loss), and saving the result atomically. Shared by
``vzoo train lm-landmark`` and ``vzoo train lm-diffusion``."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["add_special_token", "init_token_row", "save_pretrained_atomic", "text_task_run"]


def text_task_run(model: nn.Module, sequences: torch.Tensor, loss: Callable[[nn.Module, torch.Tensor, torch.device, int],
                  torch.Tensor], *, steps: int, batch_size: int, seed: int = 0, meta: dict | None = None):
    """A :class:`vzoo.tasks.trainer.TaskRun` of ``steps`` batches (one epoch) over token ``sequences [N, S]``;
    ``loss(model, rows [b, S], device, key)`` with ``key`` a per-batch integer (seed for any noise, so a resumed
    run repeats it). The last ``max(1, N // 10)`` sequences are held out (``val_loss``) when ``N > 1``."""
    from vzoo.tasks.trainer import TaskRun, split_batches

    n = sequences.shape[0]
    held = max(1, n // 10) if n > 1 else 0
    train_rows, val_rows = list(range(n - held)), list(range(n - held, n))
    if len(train_rows) < batch_size:
        raise ValueError(f"{len(train_rows)} training sequences, fewer than --batch-size {batch_size}; use more text or a "
                         "shorter --seq-len")

    def batches(epoch: int) -> list[list[int]]:
        out, round_ = [], 0
        while len(out) < steps:
            out += split_batches(train_rows, batch_size, seed, round_)
            round_ += 1
        return out[:steps]

    def key(rows: list[int]) -> int:
        return (seed * 1_000_003 + sum((i + 1) * 7919 ** j for j, i in enumerate(rows))) % (2**31)

    @torch.no_grad()
    def evaluate(m: nn.Module, device: torch.device) -> dict[str, float]:
        if not val_rows:
            return {}
        m.eval()
        value = sum(loss(m, sequences[[i]], device, i).item() for i in val_rows) / len(val_rows)
        m.train()
        return {"val_loss": value, "val_ppl": math.exp(min(value, 50.0))}

    return TaskRun(model=model, batches=batches, load=lambda rows: (sequences[rows], key(rows)),
                   loss=lambda m, batch, device: loss(m, batch[0], device, batch[1]), evaluate=evaluate,
                   meta=dict(meta or {}))


def save_pretrained_atomic(model: nn.Module, tokenizer, path: str | os.PathLike) -> Path:
    """``save_pretrained`` of ``model`` (and ``tokenizer``) into a temporary folder next to ``path``, renamed into
    place: never a half-written model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


@torch.no_grad()
def add_special_token(model: nn.Module, tokenizer, token: str, role: str = "additional_special_tokens") -> int:
    """Add ``token`` to ``tokenizer`` as a special token (``role``: ``"mask_token"``, ... or the additional ones;
    ``model``'s embeddings grow if its id has no row) and set its input (and untied output) embedding row to the
    mean of the rows of the ids before it; returns its id. A token already in the tokenizer is returned unchanged."""
    if token in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(token)
    tokenizer.add_special_tokens({role: [token] if role == "additional_special_tokens" else token})
    new_id = tokenizer.convert_tokens_to_ids(token)
    if new_id >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(new_id + 1, mean_resizing=False)
    init_token_row(model, new_id)
    return new_id


@torch.no_grad()
def init_token_row(model: nn.Module, token_id: int) -> None:
    """Set ``token_id``'s input (and untied output) embedding row to the mean of the rows of the ids before it."""
    for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None}.values():
        emb.weight[token_id] = emb.weight[:token_id].mean(0)
