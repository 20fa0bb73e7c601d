"""Converting a causal LM into a block-diffusion LM. Behind ``vzoo train lm-diffusion --model DIR --data FILE.txt
--block 32 --out OUT [--objective fast-dllm|efficient-dlm] [--resume]``.

The text is tokenised and cut into sequences of ``--seq-len`` tokens (a multiple of ``block``), all treated as
response (a plain-text file has no prompt). A mask token is added when the tokenizer has none (``<|mask|>``, its
embedding the mean of the others). Each step noises a batch and trains on ``[x_t ; x_0]`` under the BD3 mask
(:func:`vzoo.lm.block_diffusion.bd3_forward`, block-sparse):

- ``fast-dllm`` (Fast-dLLM v2): complementary masking (both copies, each token supervised once), token shift;
- ``efficient-dlm`` (Efficient-DLM): position-dependent masking (later in-block positions masked more; the
  schedule of :func:`vzoo.lm.diffusion_objectives.position_dependent_mask_probs`), no token shift.

The loop is :func:`vzoo.tasks.trainer.train` (progress bar, atomic ``OUT/last.pt``, exact ``--resume``, held-out
diffusion loss); the model and tokenizer go to ``OUT/model`` with ``vzoo_block_diffusion`` (block, objective,
mask id, token shift) in its ``config.json`` for :func:`vzoo.lm.diffusion_decode.diffusion_generate`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .apply import apply_sparse_attention
from .block_diffusion import BlockDiffusionConfig, bd3_forward
from .diffusion_objectives import complementary_masking, diffusion_loss, position_dependent_masking
from .finetune import add_special_token, save_pretrained_atomic, text_task_run
from .train_gates import text_sequences

__all__ = ["OBJECTIVES", "diffusion_step_loss", "train_diffusion_from_files"]

OBJECTIVES = {"fast-dllm": True, "efficient-dlm": False}  # objective -> token shift


def diffusion_step_loss(model, ids: torch.Tensor, block: int, mask_id: int, objective: str,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """The training loss of one batch ``ids [B, T]`` (every token a response token) for ``objective``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} must be one of {sorted(OBJECTIVES)}")
    response = torch.ones_like(ids, dtype=torch.bool)
    if objective == "fast-dllm":
        noisy, labels = complementary_masking(ids, response, block, mask_id, generator)
        clean = ids.repeat(2, 1)
    else:
        noisy, labels = position_dependent_masking(ids, response, block, mask_id, generator)
        clean = ids
    logits = bd3_forward(model, noisy, clean).logits[:, : ids.shape[1]]
    return diffusion_loss(logits, labels, token_shift=OBJECTIVES[objective])


def train_diffusion_from_files(
    model_dir: str | Path, data: str | Path, out: str | Path, *, block: int = 32, objective: str = "fast-dllm",
    steps: int = 100, seq_len: int = 1024, lr: float = 1e-4, batch_size: int = 1, resume: bool = False,
    ckpt_every: int = 0, seed: int = 0, stop_after: int = 0,
) -> dict:
    """Convert the causal LM saved in ``model_dir`` into a block-diffusion LM by training on ``data``; returns the
    final metrics (the model is in ``out/model``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vzoo.tasks.trainer import TrainSettings, train

    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a saved transformers model (no config.json)")
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective {objective!r} must be one of {sorted(OBJECTIVES)}")
    if seq_len % block:
        raise ValueError(f"--seq-len {seq_len} must be a multiple of --block {block}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sequences = text_sequences(tokenizer, data, seq_len)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.attention_dropout = 0.0
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        mask_id = add_special_token(model, tokenizer, "<|mask|>", role="mask_token")
    apply_sparse_attention(model, BlockDiffusionConfig(block=block))

    def loss(m, rows, device, key):
        return diffusion_step_loss(m, rows.to(device), block, mask_id, objective, torch.Generator().manual_seed(key))

    meta = dict(model=str(model_dir.resolve()), data=str(Path(data).resolve()), block=block, objective=objective,
                seq_len=seq_len, steps=steps, batch_size=batch_size, seed=seed)
    run = text_task_run(model, sequences, loss, steps=steps, batch_size=batch_size, seed=seed, meta=meta)
    settings = TrainSettings(epochs=1, out=out, lr=lr, weight_decay=0.0, resume=resume, ckpt_every=ckpt_every,
                             stop_after=stop_after)
    metrics = train(run, settings)
    model.config.vzoo_block_diffusion = {"block": block, "objective": objective, "mask_id": int(mask_id),
                                         "token_shift": OBJECTIVES[objective]}
    path = save_pretrained_atomic(model, tokenizer, out / "model")
    print(f"block-diffusion model saved to {path}")
    return metrics
