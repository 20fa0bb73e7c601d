"""Fine-tuning a causal LM for Landmark Attention. Behind
``vzoo train lm-landmark --model DIR --data FILE.txt --block 50 --out DIR [--resume]``.

The text is tokenised and cut into sequences of ``--seq-len`` regular tokens; a ``<landmark>`` token is
added to the tokenizer and embeddings, inserted after every ``block`` tokens (labels ignored there) and
the whole model trains with the exact grouped softmax (:mod:`vzoo.lm.landmark`). The loop is
:func:`vzoo.tasks.trainer.train`: progress bar, atomic checkpoints (``OUT/last.pt``, every
``--ckpt-every`` steps and at the end), exact ``--resume``, held-out loss in ``OUT/metrics.json`` and
``OUT/curves.png``; the fine-tuned model and tokenizer go to ``OUT/model`` (written atomically), ready for
:func:`vzoo.lm.landmark.load_landmark_model`.
"""

from __future__ import annotations

from pathlib import Path

from .apply import apply_sparse_attention
from .finetune import text_task_run
from .landmark import LandmarkCollator, LandmarkConfig, add_landmark_token, save_landmark_model
from .train_gates import text_sequences

__all__ = ["train_landmark_from_files"]


def train_landmark_from_files(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    block: int = 50,
    steps: int = 100,
    seq_len: int = 1024,
    lr: float = 1e-4,
    batch_size: int = 1,
    resume: bool = False,
    ckpt_every: int = 0,
    seed: int = 0,
    stop_after: int = 0,
) -> dict:
    """Fine-tune the causal LM saved in ``model_dir`` on the plain-text ``data`` for Landmark Attention
    with blocks of ``block`` tokens; returns the final metrics (the model is in ``out/model``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vzoo.tasks.trainer import TrainSettings, train

    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a saved transformers model (no config.json)")
    config = LandmarkConfig(block=block)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sequences = text_sequences(tokenizer, data, seq_len)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.attention_dropout = 0.0
    landmark_id = add_landmark_token(model, tokenizer)
    apply_sparse_attention(model, config)
    meta = dict(model=str(model_dir.resolve()), data=str(Path(data).resolve()), block=block, seq_len=seq_len,
                steps=steps, batch_size=batch_size, seed=seed)
    collate = LandmarkCollator(landmark_id, block)

    def loss(m, rows, device, key):
        batch = collate(list(rows))
        return m(input_ids=batch["input_ids"].to(device), labels=batch["labels"].to(device)).loss

    run = text_task_run(model, sequences, loss, steps=steps, batch_size=batch_size, seed=seed, meta=meta)
    settings = TrainSettings(epochs=1, out=out, lr=lr, weight_decay=0.0, resume=resume, ckpt_every=ckpt_every,
                             stop_after=stop_after)
    metrics = train(run, settings)
    path = save_landmark_model(model, tokenizer, out / "model", config, landmark_id)
    print(f"landmark model saved to {path}")
    return metrics
