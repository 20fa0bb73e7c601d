"""Block-diffusion decoding for transformers causal LMs: Fast-dLLM v2 (Wu et al., arXiv 2509.26328; the
``generation_functions.py`` of its ``v2/`` release) and Efficient-DLM (Fu et al., arXiv 2512.14067; the same loop
without token shift).

The answer is written block by block (``block`` tokens, aligned to absolute positions). The prompt cut to a
multiple of ``block`` is prefilled into a ``DynamicCache`` under the block-causal mask (causal across blocks,
bidirectional inside one); the rest of the prompt starts the current block, whose other positions are mask
tokens. The block is decoded in sub-blocks of ``sub_block`` positions, left to right: each iteration forwards the
whole block over the cached prefix (the cache is cropped back afterwards), predicts every position, and fills the
masked positions of the current sub-block whose confidence (the probability of the chosen token) is above
``threshold``, and always the single most confident one. A finished block is forwarded once more and kept in the
cache (an exact block-level cache), and with token shift its last logit gives the first token of the next block.

Token shift (Fast-dLLM v2, ``token_shift=True``): position ``j`` is predicted by the logit row of ``j - 1``, as
in the AR model it was converted from; the row before a block is the last row of the forward that cached the
previous block. Efficient-DLM (``token_shift=False``): position ``j`` reads its own row, and a new block starts
with all positions masked.

The mask token is never chosen (its probability is set to 0 before the choice), so the loop always ends and the
output never holds it; a trained model gives it no mass, so this changes nothing there. As in the reference, the
token that starts a block after a finished one (and after a block-aligned prompt) is the argmax of the last
logit, also when ``temperature > 0``.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from vzoo.kernels.block_diffusion import additive_mask, block_causal_mask

__all__ = ["cache_argument", "diffusion_generate"]


def cache_argument(model) -> str:
    """The name ``model.forward`` takes its KV cache by: ``cache`` (transformers 5.x) or ``past_key_values`` (4.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"diffusion_generate: {name}={value!r} must be an int >= {low}")


class _Runner:
    """Calls ``model`` on top of a ``DynamicCache`` with a 4-D additive mask and counts the calls."""

    def __init__(self, model, batch: int, device: torch.device):
        self.model, self.batch, self.device = model, batch, device
        self.dtype = getattr(model, "dtype", torch.float32)
        self.cache_arg = cache_argument(model)
        self.cache = DynamicCache()
        self.cached = 0  # tokens held in the cache
        self.forwards = 0

    def __call__(self, ids: torch.Tensor, start: int, visible: torch.Tensor, keep: bool) -> torch.Tensor:
        """``ids [B, q]`` at positions ``start ..`` over the ``kv - q`` cached tokens, ``visible`` bool ``[q, kv]``
        -> logits ``[B, q, V]`` (fp32); the new tokens stay in the cache only when ``keep``."""
        q = ids.shape[1]
        mask = additive_mask(visible, self.dtype).expand(self.batch, 1, -1, -1)
        positions = torch.arange(start, start + q, device=self.device).expand(self.batch, -1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self.cache_arg: self.cache})
        self.forwards += 1
        if keep:
            self.cached += q
        else:
            self.crop(self.cached)
        return out.logits.float()

    def crop(self, length: int) -> None:
        """Drop every cached token after the first ``length``."""
        extra = self.cache.get_seq_length() - length
        if extra > 0:
            self.cache.crop(-extra)  # negative: remove that many (transformers 4.x and 5.x)
        self.cached = length


def _choose(rows: torch.Tensor, mask_id: int, temperature: float, generator: torch.Generator | None):
    """Logit rows ``[B, n, V]`` -> (tokens ``[B, n]``, confidence ``[B, n]`` = probability of the chosen token):
    greedy at ``temperature == 0``, sampled from ``softmax(rows / temperature)`` otherwise; never ``mask_id``."""
    probs = torch.softmax(rows / temperature if temperature > 0 else rows, dim=-1)
    probs[..., mask_id] = 0
    if temperature > 0:
        tokens = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(probs.shape[:2])
    else:
        tokens = probs.argmax(-1)
    return tokens, probs.gather(-1, tokens[..., None])[..., 0]


def _argmax(row: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The AR token of a logit row ``[B, V]`` -> ``[B, 1]`` (never ``mask_id``)."""
    row = row.clone()
    row[:, mask_id] = float("-inf")
    return row.argmax(-1, keepdim=True)


def _finished(gen: torch.Tensor, stop: int | None, mask_id: int) -> torch.Tensor:
    """bool ``[B]``: the generated tokens ``gen [B, n]`` hold ``stop`` with no mask before its first occurrence."""
    if stop is None:
        return torch.zeros(gen.shape[0], dtype=torch.bool, device=gen.device)
    is_stop = gen == stop
    before = torch.cumsum(is_stop.int(), 1) == 0  # positions before the first stop
    return is_stop.any(1) & ~((gen == mask_id) & before).any(1)


@torch.no_grad()
def diffusion_generate(model, input_ids: torch.Tensor, *, block: int = 32, sub_block: int = 8, threshold: float = 0.9,
                       token_shift: bool = True, max_new_tokens: int = 128, stop: int | None = None,
                       mask_id: int | None = None, tokenizer=None, sub_block_cache: bool = False,
                       temperature: float = 0.0, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """Block-diffusion decoding with a block-level KV cache (module docstring).

    Args:
        model: a transformers causal LM trained for block diffusion (in eval mode); called as
            ``model(input_ids=, attention_mask=[B, 1, q, kv] float, position_ids=, cache= / past_key_values=,
            use_cache=True)`` and read through ``.logits``.
        input_ids: ``[B, L]`` prompt, ``L >= 1``, no mask tokens; the rows share the length (no padding).
        block: diffusion block size (32 in both papers); ``sub_block`` divides it (Fast-dLLM v2: 8).
        threshold: positions with confidence ``> threshold`` are filled (strict: ``>= 1`` fills one per forward).
        token_shift: read position ``j`` from logit row ``j - 1`` (Fast-dLLM v2) or ``j`` (Efficient-DLM).
        max_new_tokens: at most this many tokens are generated.
        stop, mask_id: token ids; default ``tokenizer.eos_token_id`` and ``tokenizer.mask_token_id``
            (no stop id: decode ``max_new_tokens``).
        sub_block_cache: the reference's approximate sub-block cache (``use_block_cache``): the whole block is
            forwarded, and its keys and values kept, at the block's first iteration and whenever the first
            position of the current sub-block is still masked; other iterations forward only the sub-block over
            the prefix and those stale block entries (its own hidden). Not exact: the rest of the block is seen
            as it was at the last whole-block forward.
        temperature: 0 is greedy; otherwise sampling (with ``generator``).

    Returns:
        ``tokens [B, L + n]`` (prompt and answer; a row ends after its first stop id, shorter rows are padded
        with the stop id) and the number of model forwards.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1 \
            or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"diffusion_generate: input_ids must be an int64 or int32 [B, L] tensor with L >= 1, got "
                         f"{getattr(input_ids, 'dtype', type(input_ids))} {tuple(getattr(input_ids, 'shape', ()))}")
    _check_int("block", block, 1)
    _check_int("sub_block", sub_block, 1)
    _check_int("max_new_tokens", max_new_tokens, 0)
    if block % sub_block:
        raise ValueError(f"diffusion_generate: sub_block={sub_block} must divide block={block}")
    if not temperature >= 0:
        raise ValueError(f"diffusion_generate: temperature={temperature!r} must be >= 0")
    if mask_id is None:
        mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise ValueError("diffusion_generate: no mask token id; pass mask_id= or a tokenizer with a mask_token_id")
    if stop is None:
        stop = getattr(tokenizer, "eos_token_id", None)
    if (input_ids == mask_id).any():
        raise ValueError(f"diffusion_generate: the prompt holds the mask token id {mask_id}")

    x = input_ids.long()
    if max_new_tokens == 0:
        return x, 0
    batch, prompt = x.shape
    limit = prompt + max_new_tokens  # no token at or after this position
    device = x.device
    run = _Runner(model, batch, device)
    last = None  # logit row [B, V] before the current block (token shift)
    done = torch.zeros(batch, dtype=torch.bool, device=device)

    start = prompt // block * block
    if start:
        last = run(x[:, :start], 0, block_causal_mask(start, start, block, device), keep=True)[:, -1]
        if start == prompt and token_shift:
            x = torch.cat([x, _argmax(last, mask_id)], 1)
            done = _finished(x[:, prompt:], stop, mask_id)

    while not done.all():
        # the current block: positions start .. start + block, the known ones then masks
        blk = torch.cat([x[:, start:], x.new_full((batch, start + block - x.shape[1]), mask_id)], 1)
        live = (torch.arange(start, start + block, device=device) < limit)[None] & ~done[:, None]
        full_mask = block_causal_mask(block, start + block, block, device)
        rows = None  # logit row read by each block position [B, block, V]
        for s in range(0, block, sub_block):
            e = s + sub_block
            while True:
                todo = (blk == mask_id) & live
                if not todo[:, s:e].any():
                    break
                if not sub_block_cache or rows is None or todo[:, s].any():
                    run.crop(start)  # drop a cached copy of the block (sub-block cache)
                    logits = run(blk, start, full_mask, keep=sub_block_cache)
                    if token_shift:
                        head = logits[:, :1] if last is None else last[:, None]  # position 0 is then a prompt token
                        logits = torch.cat([head, logits[:, :-1]], 1)
                    rows = logits
                else:  # the sub-block over the prefix and the cached block, whose entries for it are hidden
                    visible = torch.ones(e - s, start + block + e - s, dtype=torch.bool, device=device)
                    visible[:, start + s:start + e] = False
                    logits = run(blk[:, s:e], start + s, visible, keep=False)
                    shift = int(token_shift)  # position s keeps its row: it is known when this path runs
                    rows[:, s + shift:e] = logits[:, :e - s - shift]
                tokens, conf = _choose(rows[:, s:e], mask_id, temperature, generator)
                conf = conf.masked_fill(~todo[:, s:e], float("-inf"))
                fill = conf > threshold
                fill[torch.arange(batch, device=device), conf.argmax(-1)] = True
                fill &= todo[:, s:e]
                blk[:, s:e][fill] = tokens[fill]
                done |= _finished(torch.cat([x[:, prompt:start], blk], 1)[:, max(prompt - start, 0):], stop, mask_id)
                live &= ~done[:, None]
                if done.all():
                    break
            if done.all():
                break
        x = torch.cat([x[:, :start], blk], 1)
        if done.all() or start + block >= limit:
            break
        run.crop(start)
        last = run(blk, start, full_mask, keep=True)[:, -1]
        start += block
        if token_shift:
            x = torch.cat([x, _argmax(last, mask_id)], 1)
            done |= _finished(x[:, prompt:], stop, mask_id)

    return _trim(x, prompt, limit, stop), run.forwards


def _trim(x: torch.Tensor, prompt: int, limit: int, stop: int | None) -> torch.Tensor:
    """Cut each row after its first generated stop id (else at ``limit``), pad with ``stop``."""
    x = x[:, :limit]
    if stop is None:
        return x
    ends = []
    for row in x:
        hits = (row[prompt:] == stop).nonzero()
        ends.append(prompt + int(hits[0]) + 1 if len(hits) else row.shape[0])
    out = x[:, :max(ends)].clone()
    for i, end in enumerate(ends):
        out[i, end:] = stop
    return out
