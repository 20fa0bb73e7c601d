"""Training DHSA's boundary predictors on a frozen causal LM. Behind
``vzoo train lm-boundaries --model DIR --data FILE.txt``.

Each chosen layer gets its own :class:`~vzoo.lm.dhsa.BoundaryPredictor`, fed that layer's pre-RoPE
keys (heads concatenated). Labels mark key-similarity shifts: the gaps the training-free rule of
:mod:`vzoo.lm.dhsa` picks (:func:`~vzoo.lm.dhsa.similarity_scores` between the ``boundary_window``
keys before and after a gap, then :func:`~vzoo.lm.dhsa.pick_boundaries` with the config's
``max_similarity`` and ``min_chunk``; the forced splits of over-long chunks are no labels). Loss:
binary cross-entropy, positives weighted by the negatives-to-positives ratio of the batch (boundaries
are rare). The official labels come from attention-mass ratios around each gap (legacy
``label_boundaries``); this label needs no attention map.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dhsa import (
    BoundaryPredictor, DHSAConfig, new_predictor, pick_boundaries, pre_rope_keys, save_boundary_predictors, similarity_scores,
)
from .train_gates import saved_model_and_text

__all__ = ["boundary_labels", "capture_keys", "train_boundaries", "train_boundaries_from_files"]


def boundary_labels(keys: torch.Tensor, config: DHSAConfig) -> torch.Tensor:
    """float ``[B, S]`` labels (1: boundary at the gap before the token) of pre-RoPE ``keys [B, S, C]``."""
    sim = similarity_scores(keys[:, None], config.boundary_window)
    return pick_boundaries(-sim, -config.max_similarity, config.min_chunk).float()


def _attention_modules(model: nn.Module, layers: tuple[int, ...] | None) -> list[nn.Module]:
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")]
    if not mods:
        raise ValueError(f"{type(model).__name__}: no attention modules with layer_idx and k_proj found")
    chosen = DHSAConfig(layers=layers).layer_ids(max(m.layer_idx for m in mods) + 1)
    return [m for m in mods if m.layer_idx in chosen]


def capture_keys(model: nn.Module, modules: list[nn.Module], input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Pre-RoPE keys ``{layer: [B, S, Hkv * D]}`` (after ``k_norm`` where the model has one) of the
    attention ``modules`` for one no-grad forward pass of ``model`` over ``input_ids``."""
    hooks = [h for m in modules for h in pre_rope_keys(m)]
    try:
        with torch.no_grad():
            model(input_ids, logits_to_keep=1)
        return {m.layer_idx: m.__dict__.pop("vzoo_pending_keys").float() for m in modules}
    finally:
        for h in hooks:
            h.remove()


def train_boundaries(
    model: nn.Module,
    sequences: torch.Tensor,
    steps: int,
    *,
    config: DHSAConfig | None = None,
    lr: float = 1e-3,
    batch_size: int = 1,
    progress: bool = True,
) -> tuple[dict[int, BoundaryPredictor], list[float]]:
    """Train one boundary predictor per layer of ``config.layers`` (default: all) of the frozen
    ``model`` (AdamW, constant ``lr``), cycling through token ids ``sequences [N, S]``. Returns the
    predictors ``{layer: predictor}`` (eval mode) and the loss of every step (summed over layers)."""
    from tqdm.auto import tqdm

    config = config or DHSAConfig(boundaries="predictor")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be positive")
    modules = _attention_modules(model, config.layers)
    device = next(model.parameters()).device
    predictors = {m.layer_idx: new_predictor(m, config).to(device) for m in modules}
    opt = torch.optim.AdamW([p for pred in predictors.values() for p in pred.parameters()], lr=lr)
    losses = []
    was = model.training
    model.eval()
    try:
        bar = tqdm(range(steps), desc="boundaries", disable=not progress)
        for step in bar:
            rows = torch.arange(step * batch_size, (step + 1) * batch_size) % sequences.shape[0]
            keys = capture_keys(model, modules, sequences[rows].to(device))
            loss = sum(_loss(predictors[i], k, config) for i, k in keys.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    finally:
        model.train(was)
    for pred in predictors.values():
        pred.eval()
    return predictors, losses


def _loss(predictor: BoundaryPredictor, keys: torch.Tensor, config: DHSAConfig) -> torch.Tensor:
    labels = boundary_labels(keys, config)
    pos = labels.sum()
    weight = ((labels.numel() - pos) / pos.clamp_min(1)).clamp(1.0, 1e3)
    return F.binary_cross_entropy_with_logits(predictor(keys), labels, pos_weight=weight)


def train_boundaries_from_files(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    *,
    steps: int = 100,
    seq_len: int = 1024,
    lr: float = 1e-3,
    batch_size: int = 1,
    progress: bool = True,
) -> Path:
    """Load a saved causal LM and its tokenizer from ``model_dir``, train boundary predictors for every
    layer on ``data`` (plain text) with the default :class:`DHSAConfig` labels and save them (default
    ``model_dir/dhsa_boundaries.safetensors``); use them with ``DHSAConfig(boundaries="predictor",
    predictor=path)``."""
    model, sequences = saved_model_and_text(model_dir, data, seq_len)
    predictors, losses = train_boundaries(model, sequences, steps, lr=lr, batch_size=batch_size, progress=progress)
    path = save_boundary_predictors(predictors, out or Path(model_dir) / "dhsa_boundaries.safetensors")
    print(f"boundary loss {losses[0]:.4g} -> {losses[-1]:.4g}; predictors saved to {path}")
    return path
