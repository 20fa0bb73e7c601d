"""LaDiR (arXiv 2510.04573) trained end to end on a small synthetic reasoning task, against the autoregressive
baseline. Used by ``benchmarks/diffusion_lm.py``.

Task: chained addition of ``numbers`` digits. Question ``"7359?"``; reasoning sentences (LaDiR's blocks)
``"7+3=10"``, ``"10+5=15"``, ``"15+9=24"``; answer ``"24"``. Character tokenizer, no download. The AR text is
``"7359?7+3=10;10+5=15;15+9=24;#24."`` (``;`` ends a sentence, ``.`` the answer).

Training (tiny Llama models from scratch, CPU): stage 1 an LM on the AR texts (also the AR baseline); stage 2 the
block VAE (encoder initialised from the stage-1 LM, trainable; decoder the frozen stage-1 LM, a sentence ended by
``;``); stage 3 the denoiser (initialised from the stage-1 LM plus ``<bot> <eot> <soa>``) on the VAE means of the
training sentences. Evaluation on held-out questions: answer exact match of greedy AR decoding, and of LaDiR at
several Euler step counts with and without diversity guidance (``trajectories`` samples per question: mean accuracy
per sample, pass@k, and the mean number of distinct reasoning texts among a question's samples).
"""

from __future__ import annotations

import copy
import itertools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vzoo.lm.ladir import LaDiRConfig, LatentBlockVAE, LatentDenoiser, add_ladir_tokens, ladir_generate

__all__ = ["CharTokenizer", "LaDiRRow", "addition_problems", "format_ladir", "ladir_rows"]

CHARS = "0123456789+=;?#."


class CharTokenizer:
    """One id per character of ``chars`` after ``<pad>`` (id 0); supports what
    :func:`vzoo.lm.finetune.add_special_token` needs (special tokens get ids after the characters)."""

    def __init__(self, chars: str = CHARS):
        self.vocab = {"<pad>": 0, **{c: i + 1 for i, c in enumerate(chars)}}

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def add_special_tokens(self, tokens: dict) -> int:
        added = 0
        for value in tokens.values():
            for tok in [value] if isinstance(value, str) else value:
                if tok not in self.vocab:
                    self.vocab[tok] = len(self.vocab)
                    added += 1
        return added

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.vocab[token]

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.vocab[c] for c in text], dtype=torch.long)

    def decode(self, ids: Sequence[int]) -> str:
        inv = {i: t for t, i in self.vocab.items()}
        return "".join(inv[i] for i in ids if i in inv and len(inv[i]) == 1)


@dataclass(frozen=True)
class Problem:
    question: str  # "7359?"
    blocks: tuple[str, ...]  # ("7+3=10", "10+5=15", "15+9=24")
    answer: str  # "24"

    @property
    def text(self) -> str:
        """The AR training text."""
        return self.question + "".join(b + ";" for b in self.blocks) + "#" + self.answer + "."


def addition_problems(numbers: int = 4) -> list[Problem]:
    """Every chained addition of ``numbers`` digits (``10 ** numbers`` problems)."""
    if isinstance(numbers, bool) or not isinstance(numbers, int) or not 2 <= numbers <= 6:
        raise ValueError(f"numbers={numbers!r} must be an int in 2..6")
    out = []
    for digits in itertools.product(range(10), repeat=numbers):
        acc, blocks = digits[0], []
        for d in digits[1:]:
            blocks.append(f"{acc}+{d}={acc + d}")
            acc += d
        out.append(Problem("".join(map(str, digits)) + "?", tuple(blocks), str(acc)))
    return out


@dataclass
class LaDiRRow:
    method: str  # "AR baseline" | "LaDiR"
    steps: int  # Euler steps per block (0 for AR)
    diversity: float  # guidance scale
    trajectories: int  # samples per question
    accuracy: float  # answer exact match, mean over samples
    reasoning: float  # decoded reasoning sentences all exact, mean over samples
    pass_at_k: float  # a question counts if any of its samples is right
    distinct: float  # distinct reasoning texts among a question's samples (mean)
    seconds: float  # evaluation wall time


def _tiny_llama(vocab: int, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(range(total), desc=desc, disable=not progress, mininterval=1.0)


def _train(model: torch.nn.Module, steps: int, lr: float, desc: str, progress: bool, loss_fn) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / steps))
    model.train()
    ema = None
    bar = _bar(steps, desc, progress)
    for step in bar:
        losses = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        value = float(losses["loss"].detach())
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if progress and step % 20 == 0:
            bar.set_postfix({k: f"{float(v.detach()):.3f}" for k, v in losses.items()})
    model.eval()
    return ema


@torch.no_grad()
def _ar_outputs(lm, tok: CharTokenizer, problems: Sequence[Problem], max_new: int) -> list[tuple[tuple[str, ...],
                                                                                                 str]]:
    """Greedy AR decoding: per problem the reasoning sentences and the answer."""
    ids = torch.stack([tok.encode(p.question) for p in problems])
    out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                      pad_token_id=0, eos_token_id=tok.convert_tokens_to_ids("."))
    outputs = []
    for row in out[:, ids.shape[1]:].tolist():
        reasoning, _, rest = tok.decode(row).partition("#")
        outputs.append((tuple(reasoning.split(";")[:-1]), rest.split(".", 1)[0]))
    return outputs


def ladir_rows(steps: Sequence[int] = (1, 4, 16), train_steps: int | Sequence[int] = (800, 2500, 4000), seed: int = 0,
               progress: bool = True, *,
               numbers: int = 4, eval_questions: int = 100, trajectories: int = 4,
               diversity: Sequence[float] = (0.0, 10.0),
               hidden: int = 64, layers: int = 2, batch_size: int = 64,
               config: LaDiRConfig | None = None) -> list[LaDiRRow]:
    """Train stages 1-3 (``train_steps``: optimiser steps of each stage, or one count for all three; batches of
    ``batch_size``) on the chained-addition task and evaluate on ``eval_questions`` held-out questions: the AR
    baseline, then LaDiR for each step count and each diversity-guidance scale (0 = none)."""
    stage_steps = (train_steps,) * 3 if isinstance(train_steps, int) and not isinstance(train_steps, bool) \
        else tuple(train_steps)
    if len(stage_steps) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in stage_steps):
        raise ValueError(f"train_steps={train_steps!r} must be an int >= 1 or three of them")
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
        raise ValueError(f"steps={steps!r} must be a non-empty list of ints >= 1")
    if isinstance(eval_questions, bool) or not isinstance(eval_questions, int) or eval_questions < 1:
        raise ValueError(f"eval_questions={eval_questions!r} must be an int >= 1")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    problems = addition_problems(numbers)
    rng.shuffle(problems)
    if eval_questions >= len(problems) // 2:
        raise ValueError(f"eval_questions={eval_questions} must be under half of the {len(problems)} problems")
    test, train = problems[:eval_questions], problems[eval_questions:]
    tok = CharTokenizer()
    gen = torch.Generator().manual_seed(seed)

    def batch(step: int) -> list[Problem]:
        r = random.Random(seed * 1_000_003 + step)
        return [train[r.randrange(len(train))] for _ in range(batch_size)]

    # stage 1: the AR LM on the task text
    lm = _tiny_llama(len(tok), hidden, layers)

    def lm_loss(step: int) -> dict[str, torch.Tensor]:
        ids = torch.nn.utils.rnn.pad_sequence([tok.encode(p.text) for p in batch(step)], batch_first=True)
        labels = ids.masked_fill(ids == 0, -100)
        return {"loss": lm(ids, attention_mask=(ids != 0).long(), labels=labels).loss}

    _train(lm, stage_steps[0], 3e-3, "ladir stage 1 (AR LM)", progress, lm_loss)

    # stage 2: the block VAE, decoder = the frozen stage-1 LM
    config = config or LaDiRConfig(latent_tokens=4, latent_dim=8, kl_weight=1e-3, latent_noise_std=1.0)
    vae = LatentBlockVAE(copy.deepcopy(lm), lm, config, eos_id=tok.convert_tokens_to_ids(";"))

    def vae_loss(step: int) -> dict[str, torch.Tensor]:
        r = random.Random(seed * 7919 + step)
        blocks = [tok.encode(r.choice(p.blocks)) for p in batch(step)]
        return vae(blocks, generator=gen)

    _train(vae, stage_steps[1], 2e-3, "ladir stage 2 (VAE)", progress, vae_loss)
    lm.requires_grad_(False)

    # stage 3: the denoiser on the VAE means of the training sentences
    den_tok = CharTokenizer()
    den_lm = copy.deepcopy(lm).requires_grad_(True)
    denoiser = LatentDenoiser(den_lm, config, add_ladir_tokens(den_lm, den_tok, eos="."))
    with torch.no_grad():
        distinct_blocks = sorted({b for p in train for b in p.blocks})
        mu, _ = vae.encode([tok.encode(b) for b in distinct_blocks])
        latent_of = dict(zip(distinct_blocks, mu))
    denoiser.set_latent_stats(mu)

    def den_loss(step: int) -> dict[str, torch.Tensor]:
        probs = batch(step)
        return denoiser.loss([tok.encode(p.question) for p in probs],
                             [torch.stack([latent_of[b] for b in p.blocks]) for p in probs],
                             [tok.encode(p.answer + ".") for p in probs], generator=gen)

    _train(denoiser, stage_steps[2], 2e-3, "ladir stage 3 (denoiser)", progress, den_loss)

    # evaluation
    rows = []
    start = time.perf_counter()
    ar = _ar_outputs(lm, tok, test, max_new=8 * numbers + 8)
    acc = sum(a == p.answer for (_, a), p in zip(ar, test)) / len(test)
    reasoning = sum(r == p.blocks for (r, _), p in zip(ar, test)) / len(test)
    rows.append(LaDiRRow("AR baseline", 0, 0.0, 1, acc, reasoning, acc, 1.0, time.perf_counter() - start))
    questions = [tok.encode(p.question) for p in test]
    for n_steps in steps:
        for scale in diversity:
            start = time.perf_counter()
            out = ladir_generate(denoiser, vae, questions, steps=n_steps, trajectories=trajectories, diversity=scale,
                                 max_blocks=numbers + 1, max_block_tokens=10, max_answer_tokens=4,
                                 generator=torch.Generator().manual_seed(seed + 1))
            right = [[tok.decode(a) == p.answer for a in ans] for ans, p in zip(out.answers, test)]
            exact = [[tuple(tok.decode(b) for b in blocks) == p.blocks for blocks in q_blocks]
                     for q_blocks, p in zip(out.blocks, test)]
            distinct = [len({tuple(tok.decode(b) for b in blocks) for blocks in q_blocks}) for q_blocks in out.blocks]
            rows.append(LaDiRRow("LaDiR", n_steps, float(scale), trajectories,
                                 sum(map(sum, right)) / (len(test) * trajectories),
                                 sum(map(sum, exact)) / (len(test) * trajectories),
                                 sum(map(any, right)) / len(test), sum(distinct) / len(test),
                                 time.perf_counter() - start))
    return rows


def format_ladir(rows: Sequence[LaDiRRow]) -> str:
    head = f"{'method':<12} {'steps':>5} {'diversity':>9} {'samples':>7} {'accuracy':>8} {'reasoning':>9} " \
           f"{'pass@k':>7} {'distinct':>8} {'eval s':>7}"
    return "\n".join([head, "-" * len(head)] + [
        f"{r.method:<12} {r.steps if r.steps else '-':>5} {r.diversity:>9.2f} {r.trajectories:>7} {r.accuracy:>8.3f} "
        f"{r.reasoning:>9.3f} {r.pass_at_k:>7.3f} {r.distinct:>8.2f} {r.seconds:>7.1f}" for r in rows])
