"""Landmark Attention for transformers causal LMs (Mohtashami & Jaggi, NeurIPS 2023, arXiv 2305.16300;
reference ``epfml/landmark-attention``).

A landmark token follows every ``block`` regular tokens, so token ``p`` is a landmark iff
``p % (block + 1) == block``. Attention is the grouped softmax of :func:`vzoo.kernels.landmark_attention`:
a query weighs each past block by the softmax of its landmark's score against the current block's
tokens, times the softmax inside that block. Training runs the exact op over every past block
(``top_k=None``); inference with ``top_k`` keeps, per head and query, the ``top_k`` past blocks with the
highest landmark scores from the KV cache, plus the ``local_blocks`` most recent ones and the current
block, in prefill and in decode.

Data side: :func:`add_landmark_token` adds ``<landmark>`` to the tokenizer and the embeddings,
:class:`LandmarkCollator` inserts landmarks into tokenised batches (their labels ignored), and
:func:`generate_with_landmarks` inserts them into a prompt, forces one at every landmark position while
``generate()`` runs (:class:`LandmarkLogitsProcessor`) and strips them from the result.

Positions are the plain token positions (landmarks included), as in the official LLaMA fine-tune; the
official inference code's re-numbering of retrieved blocks (for contexts past the trained length) is not
done. Padded batches are refused: the landmark grid is defined by positions.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from transformers import LogitsProcessor, LogitsProcessorList

from vzoo.kernels.landmark import landmark_attention as landmark_op, landmark_mask

from .convert import check_layers
from .layers import select_layers
from .registry import LMMethod, register_lm_method

__all__ = [
    "LANDMARK_TOKEN", "LandmarkCollator", "LandmarkConfig", "LandmarkLogitsProcessor", "add_landmark_token",
    "generate_with_landmarks", "insert_landmarks", "landmark_attention", "load_landmark_model", "save_landmark_model",
    "strip_landmarks",
]

LANDMARK_TOKEN = "<landmark>"


@dataclass(frozen=True)
class LandmarkConfig:
    """Landmark Attention settings.

    Args:
        block: regular tokens per block (the official ``mem_freq``; 50 in the paper's LM benchmark, 63 in
            its LLaMA fine-tune); a landmark follows each block.
        top_k: ``None``: every past block (the exact grouped softmax used in training); an int: per head
            and query only the ``top_k`` past blocks whose landmarks score highest (retrieval).
        local_blocks: with ``top_k``, the most recent past blocks that are always kept (the local window,
            beside the current block).
        layers: the layers that use it (``None``: all).
    """

    block: int = 50
    top_k: int | None = None
    local_blocks: int = 0
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"LandmarkConfig.block={self.block!r} must be a positive int")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"LandmarkConfig.top_k={self.top_k!r} must be None or a positive int")
        if isinstance(self.local_blocks, bool) or not isinstance(self.local_blocks, int) or self.local_blocks < 0:
            raise ValueError(f"LandmarkConfig.local_blocks={self.local_blocks!r} must be a non-negative int")
        check_layers("LandmarkConfig", self.layers)

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        """The layers that use Landmark Attention."""
        return select_layers("LandmarkConfig.layers", self.layers, num_layers)


def landmark_attention(config: LandmarkConfig, query, key, value, attention_mask, scale, module, **kwargs) -> torch.Tensor:
    """The attention function: ``query [B, H, q, D]`` (the last ``q`` positions of the ``kv`` cached
    ones), ``key, value [B, Hkv, kv, D]`` -> ``[B, H, q, D]``."""
    if attention_mask is not None:
        raise ValueError("Landmark Attention does not support padded batches (or extra attention masks): the landmark "
                         "grid is defined by token positions; run rows of different lengths separately")
    return landmark_op(query, key, value, config.block, top_k=config.top_k, local_blocks=config.local_blocks, scale=scale)


# --- data side -------------------------------------------------------------------------------------------


def insert_landmarks(input_ids: torch.Tensor, block: int, landmark_id: int) -> torch.Tensor:
    """``[B, T]`` regular token ids -> ``[B, T + (T - 1) // block]`` with ``landmark_id`` after every
    ``block`` tokens that more tokens follow (as the official ``add_mem_tokens``), so position ``p`` of
    the result is a landmark iff ``p % (block + 1) == block``."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    b, t = input_ids.shape
    if t == 0:
        return input_ids
    total = t + (t - 1) // block
    out = input_ids.new_full((b, total), landmark_id)
    out[:, ~landmark_mask(total, block, device=input_ids.device)] = input_ids
    return out


def strip_landmarks(input_ids: torch.Tensor, landmark_id: int) -> list[torch.Tensor]:
    """Each row of ``input_ids [B, T]`` without its landmark tokens (rows may differ in length)."""
    return [row[row != landmark_id] for row in input_ids]


class LandmarkCollator:
    """Batches tokenised examples for Landmark fine-tuning: each example (a list or 1-D tensor of ids, or
    a dict with ``input_ids``) gets landmarks inserted; ``labels`` are the ids with ``-100`` at the
    landmarks (their positions are fixed, so nothing learns to predict them). Examples must have one
    length (the attention refuses padding)."""

    def __init__(self, landmark_id: int, block: int) -> None:
        LandmarkConfig(block=block)  # validates block
        self.landmark_id, self.block = int(landmark_id), block

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        rows = [torch.as_tensor(e["input_ids"] if isinstance(e, dict) else e, dtype=torch.long) for e in examples]
        lengths = {len(r) for r in rows}
        if not rows or len(lengths) != 1 or any(r.dim() != 1 for r in rows):
            raise ValueError(f"LandmarkCollator needs a non-empty list of 1-D examples of one length, got lengths {sorted(lengths)}")
        ids = insert_landmarks(torch.stack(rows), self.block, self.landmark_id)
        labels = ids.masked_fill(landmark_mask(ids.shape[1], self.block, device=ids.device), -100)
        return {"input_ids": ids, "labels": labels}


def add_landmark_token(model: nn.Module, tokenizer, token: str = LANDMARK_TOKEN) -> int:
    """Add ``token`` to ``tokenizer`` as a special token with an embedding row (see
    :func:`vzoo.lm.finetune.add_special_token`); returns its id."""
    from .finetune import add_special_token

    return add_special_token(model, tokenizer, token)


class LandmarkLogitsProcessor(LogitsProcessor):
    """For ``generate()``: at every landmark position (``p % (block + 1) == block``) the only allowed
    next token is the landmark; elsewhere the landmark is forbidden."""

    def __init__(self, landmark_id: int, block: int) -> None:
        self.landmark_id, self.block = int(landmark_id), block

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] % (self.block + 1) == self.block:
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.landmark_id] = 0.0
            return forced
        return scores.index_fill(1, torch.tensor([self.landmark_id], device=scores.device), float("-inf"))


def generate_with_landmarks(model: nn.Module, input_ids: torch.Tensor, landmark_id: int, block: int, **kwargs) -> list[torch.Tensor]:
    """``model.generate`` on a prompt of regular tokens ``[B, T]``: landmarks inserted into the prompt and
    forced at every landmark position; returns each row's prompt and continuation without landmarks.
    ``max_new_tokens`` counts landmarks too."""
    ids = insert_landmarks(input_ids, block, landmark_id)
    processors = LogitsProcessorList([LandmarkLogitsProcessor(landmark_id, block), *kwargs.pop("logits_processor", [])])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), logits_processor=processors, **kwargs)
    return strip_landmarks(out, landmark_id)


# --- saving ----------------------------------------------------------------------------------------------

_RECORD = "vzoo_landmark"


def save_landmark_model(model: nn.Module, tokenizer, path: str | os.PathLike, config: LandmarkConfig, landmark_id: int) -> Path:
    """``save_pretrained`` of model and tokenizer with the Landmark settings recorded in ``config.json``,
    written to a temporary folder renamed into place (never a half-written model)."""
    from .finetune import save_pretrained_atomic

    setattr(model.config, _RECORD, {"config": asdict(config), "landmark_id": int(landmark_id)})
    return save_pretrained_atomic(model, tokenizer, path)


def load_landmark_model(path: str | os.PathLike, top_k: int | None = None, local_blocks: int | None = None):
    """``(model, tokenizer, config, landmark_id)`` from a folder :func:`save_landmark_model` wrote, with
    Landmark Attention applied (``top_k`` / ``local_blocks`` override the saved ones, e.g. for retrieval)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .apply import apply_sparse_attention

    path = Path(path)
    with open(path / "config.json") as f:
        record = json.load(f).get(_RECORD)
    if record is None:
        raise ValueError(f"{path}/config.json has no {_RECORD}: not a model saved by save_landmark_model")
    saved = dict(record["config"], layers=tuple(record["config"]["layers"]) if record["config"]["layers"] else None)
    if top_k is not None:
        saved["top_k"] = top_k
    if local_blocks is not None:
        saved["local_blocks"] = local_blocks
    config = LandmarkConfig(**saved)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    apply_sparse_attention(model, config)
    return model, tokenizer, config, record["landmark_id"]


register_lm_method(LMMethod(
    config=LandmarkConfig, attn_implementation="vzoo_landmark", label="Landmark Attention", attention=landmark_attention,
    paper="Landmark Attention: Random-Access Infinite Context Length for Transformers (NeurIPS 2023)", arxiv="2305.16300",
    ops=("landmark_attention",),
    status="exact grouped softmax (training, fwd+bwd) and per-head top-k block retrieval from the KV cache (prefill "
           "and decode); needs the <landmark> token and fine-tuning (vzoo train lm-landmark); padding refused",
    window_error=lambda config, window: "its landmark blocks span the whole context",
    bench=lambda tokens: {"landmark (block 50, top-4 + 1 local)": LandmarkConfig(top_k=4, local_blocks=1)},
    contract=lambda: {"landmark (one block)": LandmarkConfig(block=64)},  # prompts <= 64 tokens: one block == softmax
))
