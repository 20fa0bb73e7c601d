"""Self-distillation of SeerAttention gates on a frozen causal LM (the official "post-training" stage:
AdamW, lr 1e-3, cosine schedule with 20 warm-up steps, loss scale 10). Behind
``vzoo train lm-gates --model DIR --data FILE.txt``."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from .apply import apply_sparse_attention
from .seer import SeerAttentionConfig, gate_parameters, save_gates, seer_distill_loss

__all__ = ["saved_model_and_text", "text_sequences", "train_gates", "train_gates_from_files"]

LOSS_SCALE = 10.0  # the official gate_loss_scale


def text_sequences(tokenizer, path: str | Path, seq_len: int) -> torch.Tensor:
    """Token ids ``[N, seq_len]``: the text file tokenised as one stream and cut into full sequences."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {path}")
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"{path}: {ids.numel()} tokens, fewer than one sequence of --seq-len {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def train_gates(
    model: nn.Module,
    sequences: torch.Tensor,
    steps: int,
    *,
    lr: float = 1e-3,
    warmup: int = 20,
    batch_size: int = 1,
    progress: bool = True,
) -> list[float]:
    """Train only the gates of a model SeerAttention is applied to, cycling through ``sequences
    [N, S]``. Returns the (scaled) loss of every step. The model is left in eval mode."""
    from tqdm.auto import tqdm

    params = list(gate_parameters(model).values())
    if not params:
        raise ValueError("the model has no SeerAttention gates; apply_sparse_attention(model, SeerAttentionConfig()) first")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be positive")
    frozen = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
    )
    device = params[0].device
    losses = []
    model.train()
    try:
        bar = tqdm(range(steps), desc="gates", disable=not progress)
        for step in bar:
            rows = torch.arange(step * batch_size, (step + 1) * batch_size) % sequences.shape[0]
            model(sequences[rows].to(device), logits_to_keep=1)
            loss = seer_distill_loss(model) * LOSS_SCALE
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    finally:
        model.eval()
        for p in frozen:
            p.requires_grad_(True)
    return losses


def saved_model_and_text(model_dir: str | Path, data: str | Path, seq_len: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The causal LM saved in ``model_dir`` (on CUDA when available) and the plain-text file ``data``
    cut by its tokenizer into sequences ``[N, seq_len]`` (:func:`text_sequences`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a saved transformers model (no config.json)")
    sequences = text_sequences(AutoTokenizer.from_pretrained(model_dir), data, seq_len)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(model_dir).to(device), sequences


def train_gates_from_files(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    *,
    steps: int = 100,
    seq_len: int = 1024,
    block_size: int = 64,
    lr: float = 1e-3,
) -> Path:
    """Load a saved causal LM and its tokenizer from ``model_dir``, train gates on ``data`` (plain text)
    and save them (default ``model_dir/seer_gates.safetensors``)."""
    model, sequences = saved_model_and_text(model_dir, data, seq_len)
    apply_sparse_attention(model, SeerAttentionConfig(block_size=block_size))
    losses = train_gates(model, sequences, steps, lr=lr)
    path = save_gates(model, out or Path(model_dir) / "seer_gates.safetensors")
    print(f"gate loss {losses[0]:.4g} -> {losses[-1]:.4g}; gates saved to {path}")
    return path
