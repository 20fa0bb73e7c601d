"""Block-diffusion decoding against autoregressive decoding on a trained tiny model (issue 17's decode bar). Used by
``benchmarks/diffusion_lm.py``.

The task is digit-string reversal with an exact answer: the prompt ``d_1 .. d_n >`` (``n`` from ``lengths``), the
answer ``d_n .. d_1`` and an end token. A tiny Llama is trained from scratch as an ordinary causal LM on the answer
tokens (the autoregressive model), then converted into a block-diffusion LM as Fast-dLLM v2 converts one:
:class:`~vzoo.lm.block_diffusion.BlockDiffusionConfig` applied and trained with complementary masking and token
shift on the ``[x_t ; x_0]`` BD3 input (the answer, its end token and the end-token padding are the response).
Both are then decoded greedily on held-out prompts (a tenth of all strings, chosen by a hash, is never trained on):
the AR model with its KV cache (one forward for the prompt, one per further token), the converted model with
:func:`vzoo.lm.diffusion_generate` at several thresholds, on the same strings for every decoder. Forwards are
model calls, prompt included, counted per example (batch 1).
"""

from __future__ import annotations

import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["DecodeRow", "ReversalTask", "ar_generate", "check_decode_bar", "decode_rows", "format_decode", "smollm2_rows",
           "tiny_llama", "train_models"]

TINY_VOCAB = 16  # the tiny model's ids: 0..9 digits, 10 separator, 11 end, 12 mask


@dataclass(frozen=True)
class ReversalTask:
    """Digit-string reversal; every sequence padded with the end token to ``seq_len`` (a multiple of ``block``).
    The token ids default to the tiny model's vocabulary; :meth:`for_tokenizer` maps them to a real one."""

    lengths: tuple[int, int] = (4, 12)  # inclusive range of the string length
    block: int = 16
    seq_len: int = 32
    digit_ids: tuple[int, ...] = tuple(range(10))
    sep_id: int = 10
    end_id: int = 11
    mask_id: int = 12

    def __post_init__(self) -> None:
        lo, hi = self.lengths
        if not 1 <= lo <= hi or 2 * hi + 2 > self.seq_len or self.seq_len % self.block:
            raise ValueError(f"ReversalTask: lengths={self.lengths} must satisfy 1 <= lo <= hi with 2 * hi + 2 <= "
                             f"seq_len={self.seq_len}, a multiple of block={self.block}")
        if len(set(self.digit_ids) | {self.sep_id, self.end_id, self.mask_id}) != len(self.digit_ids) + 3:
            raise ValueError("ReversalTask: digit, separator, end and mask ids must all differ")

    @classmethod
    def for_tokenizer(cls, tokenizer, mask_id: int, **kwargs) -> ReversalTask:
        """The task in ``tokenizer``'s ids: each digit one token, ``"="`` as separator, EOS as end."""
        digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
        sep = tokenizer("=", add_special_tokens=False).input_ids
        if len(sep) != 1 or tokenizer.unk_token_id in digits:
            raise ValueError("ReversalTask.for_tokenizer: the tokenizer must hold each digit and '=' as one token")
        return cls(digit_ids=tuple(digits), sep_id=sep[0], end_id=tokenizer.eos_token_id, mask_id=mask_id, **kwargs)

    def sample(self, count: int, generator: torch.Generator, held_out: bool = False) -> list[torch.Tensor]:
        """``count`` strings of token ids (int64 ``[n]`` each), from the training split or (``held_out``) from the
        held-out one: the strings whose :func:`held_out_string` is True, about one in ten, never drawn in training."""
        lo, hi = self.lengths
        ids = torch.tensor(self.digit_ids)
        out = []
        while len(out) < count:
            digits = torch.randint(0, 10, (int(torch.randint(lo, hi + 1, (), generator=generator)),), generator=generator)
            if held_out_string(digits) == held_out:
                out.append(ids[digits])
        return out

    def batch(self, strings: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids ``[B, seq_len]``, response mask bool ``[B, seq_len]``: answer, end token and padding)."""
        ids = torch.full((len(strings), self.seq_len), self.end_id, dtype=torch.long)
        response = torch.ones_like(ids, dtype=torch.bool)
        for i, s in enumerate(strings):
            n = s.numel()
            ids[i, :n], ids[i, n], ids[i, n + 1:2 * n + 1] = s, self.sep_id, s.flip(0)
            response[i, :n + 1] = False
        return ids, response

    def prompt(self, s: torch.Tensor) -> torch.Tensor:
        return torch.cat([s, s.new_tensor([self.sep_id])])[None]

    def answer(self, s: torch.Tensor) -> torch.Tensor:
        return torch.cat([s.flip(0), s.new_tensor([self.end_id])])


def held_out_string(digits: torch.Tensor) -> bool:
    """Whether a digit string ``[n]`` (values 0..9) belongs to the evaluation split: a CRC of its digits is 0 mod 10."""
    return zlib.crc32(bytes(digits.tolist())) % 10 == 0


def tiny_llama(seed: int, hidden: int = 64, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    task = ReversalTask()
    cfg = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, eos_token_id=task.end_id,
                      bos_token_id=None, pad_token_id=task.end_id, attention_dropout=0.0)
    return LlamaForCausalLM(cfg)


def _train(model, loss_fn, steps: int, lr: float, desc: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, file=sys.stderr)
    for step in bar:
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()


def train_models(task: ReversalTask, model=None, pretrain_steps: int = 600, tune_steps: int = 1200, batch: int = 32,
                 lr: float = 2e-3, seed: int = 0, progress: bool = True):
    """(AR model, block-diffusion model), both in eval mode: ``model`` (default: a fresh :func:`tiny_llama`) is
    trained ``pretrain_steps`` as a causal LM on the task; then one copy goes on ``tune_steps`` as a causal LM (the
    AR baseline) and another is converted to block diffusion in ``tune_steps`` on the same batches, so both have
    seen the same data for the same number of steps."""
    import copy

    from vzoo.lm import BlockDiffusionConfig, apply_sparse_attention
    from vzoo.lm.block_diffusion import bd3_forward
    from vzoo.lm.diffusion_objectives import complementary_masking, diffusion_loss

    ar = tiny_llama(seed) if model is None else model

    def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return task.batch(task.sample(batch, torch.Generator().manual_seed(seed * 100_003 + step)))

    def ar_loss(model, step: int) -> torch.Tensor:
        ids, response = data(step)
        return model(input_ids=ids, labels=ids.masked_fill(~response, -100)).loss

    if pretrain_steps:
        _train(ar, lambda step: ar_loss(ar, step), pretrain_steps, lr, "AR pre-training", progress)
    dlm = copy.deepcopy(ar)
    _train(ar, lambda step: ar_loss(ar, pretrain_steps + step), tune_steps, lr / 2, "AR baseline", progress)
    apply_sparse_attention(dlm, BlockDiffusionConfig(block=task.block))

    def dlm_loss(step: int) -> torch.Tensor:
        ids, response = data(pretrain_steps + step)
        noisy, labels = complementary_masking(ids, response, task.block, task.mask_id,
                                              torch.Generator().manual_seed(seed * 7 + step))
        logits = bd3_forward(dlm, noisy, ids.repeat(2, 1)).logits[:, :ids.shape[1]]
        return diffusion_loss(logits, labels, token_shift=True)

    _train(dlm, dlm_loss, tune_steps, lr / 2, "block-diffusion conversion", progress)
    return ar, dlm


@torch.no_grad()
def ar_generate(model, prompt: torch.Tensor, max_new_tokens: int, stop: int, mask_id: int) -> tuple[torch.Tensor, int]:
    """Greedy decoding with the KV cache: (generated ids ``[n]``, forwards)."""
    from transformers import DynamicCache

    from vzoo.lm.diffusion_decode import cache_argument

    cache, ids, out = {cache_argument(model): DynamicCache()}, prompt, []
    for forwards in range(1, max_new_tokens + 1):
        logits = model(input_ids=ids, use_cache=True, **cache).logits[:, -1]
        logits[:, mask_id] = float("-inf")
        ids = logits.argmax(-1, keepdim=True)
        out.append(int(ids))
        if out[-1] == stop:
            break
    return torch.tensor(out), forwards


@dataclass
class DecodeRow:
    decoder: str  # "AR" | "block t=0.9" ...
    threshold: float | None
    exact_match: float  # share of answers (end token included) reproduced exactly
    forwards_per_token: float  # model calls / answer tokens (end token included), over all examples
    ms_per_example: float


def decode_rows(ar, dlm, task: ReversalTask, examples: int = 200, thresholds: Sequence[float] = (0.5, 0.6, 0.7, 0.8,
                0.9, 1.0), sub_block: int = 4, seed: int = 1, progress: bool = True) -> list[DecodeRow]:
    """AR decoding of ``ar`` and block decoding of ``dlm`` at each threshold on the same held-out strings."""
    from tqdm.auto import tqdm

    from vzoo.lm import diffusion_generate

    strings = task.sample(examples, torch.Generator().manual_seed(10_000 + seed), held_out=True)
    budget = task.lengths[1] + 1
    decoders = [("AR", None)] + [(f"block t={t:g}", t) for t in thresholds]
    rows = []
    for name, t in decoders:
        right = forwards = tokens = 0
        start = time.perf_counter()
        for s in tqdm(strings, desc=name, disable=not progress, file=sys.stderr):
            prompt, want = task.prompt(s), task.answer(s)
            if t is None:
                got, n = ar_generate(ar, prompt, budget, task.end_id, task.mask_id)
            else:
                out, n = diffusion_generate(dlm, prompt, block=task.block, sub_block=sub_block, threshold=t,
                                            max_new_tokens=budget, stop=task.end_id, mask_id=task.mask_id)
                got = out[0, prompt.shape[1]:]
            right += int(torch.equal(got, want))
            forwards += n
            tokens += want.numel()
        ms = (time.perf_counter() - start) * 1e3 / examples
        rows.append(DecodeRow(name, t, right / examples, forwards / tokens, ms))
    return rows


def format_decode(rows: Sequence[DecodeRow]) -> str:
    head = f"{'decoder':<14} {'exact match':>12} {'forwards/token':>15} {'ms/example':>11}"
    return "\n".join([head, "-" * len(head)] + [
        f"{r.decoder:<14} {100 * r.exact_match:>11.1f}% {r.forwards_per_token:>15.3f} {r.ms_per_example:>11.2f}"
        for r in rows])


def check_decode_bar(rows: Sequence[DecodeRow], threshold: float = 0.9) -> list[str]:
    """Issue 17: block decoding at ``threshold`` needs at most half the forwards of AR decoding at an exact-match
    accuracy no more than 2 points below AR."""
    ar = next(r for r in rows if r.threshold is None)
    blk = next(r for r in rows if r.threshold == threshold)
    ratio = blk.forwards_per_token / ar.forwards_per_token
    drop = 100 * (ar.exact_match - blk.exact_match)
    return [f"{'PASS' if ratio <= 0.5 else 'FAIL'} block decoding t={threshold:g} forwards vs AR: {ratio:.3f}x (bar 0.5x)",
            f"{'PASS' if drop <= 2 else 'FAIL'} exact-match drop vs AR: {drop:.1f} points (bar 2)"]


def smollm2_rows(tune_steps: int = 100, examples: int = 50, batch: int = 8, lr: float = 1e-4,
                 thresholds: Sequence[float] = (0.5, 0.7, 0.9, 1.0), progress: bool = True) -> list[DecodeRow]:
    """The same comparison on SmolLM2-135M-Instruct (:func:`vzoo.lm_quality.load_smollm2`): fine-tuned on the task
    in its own token ids as a causal LM and, from the same weights, converted with ``<|mask|>`` added (a short run,
    not a recovered model)."""
    from vzoo.lm.finetune import add_special_token
    from vzoo.lm_quality import load_smollm2

    model, tokenizer = load_smollm2()
    model.config.attention_dropout = 0.0
    mask_id = add_special_token(model, tokenizer, "<|mask|>", role="mask_token")
    task = ReversalTask.for_tokenizer(tokenizer, mask_id)
    ar, dlm = train_models(task, model, pretrain_steps=0, tune_steps=tune_steps, batch=batch, lr=2 * lr,
                           progress=progress)
    return decode_rows(ar, dlm, task, examples=examples, thresholds=thresholds, progress=progress)
