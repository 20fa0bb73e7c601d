"""Block-diffusion decoding (Fast-dLLM v2 / Efficient-DLM) against recomputations written here: block-causal
forwards without a cache, a plain-Python replay of the unmasking policy on a hand-made logit model, and
position-coded logits for the token shift."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vzoo.lm.diffusion_decode import diffusion_generate

VOCAB, MASK = 50, 49


def tiny_lm(attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation(attn)
    return model


def visible_mask(q_len: int, kv_len: int, block: int) -> torch.Tensor:
    """Block-causal visibility, one entry at a time: query i at position kv_len - q_len + i sees key j iff j's
    block is not after the query's."""
    out = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for i in range(q_len):
        for j in range(kv_len):
            out[i, j] = j // block <= (kv_len - q_len + i) // block
    return out


def additive(visible: torch.Tensor) -> torch.Tensor:
    return torch.where(visible, 0.0, torch.finfo(torch.float32).min)[None, None]


class Recorder(torch.nn.Module):
    """Passes calls to ``lm`` and records (input ids, positions, cached tokens before the call, logits)."""

    def __init__(self, lm):
        super().__init__()
        self.lm, self.calls = lm, []

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None):
        before = cache.get_seq_length()
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                      use_cache=use_cache)
        self.calls.append((input_ids.clone(), position_ids.clone(), before, out.logits.clone()))
        return out


def prompt_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, MASK, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- the block cache is exact ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("prompt_len", [11, 16])
def test_block_cache_equals_recomputation(attn, prompt_len):
    lm = tiny_lm(attn)
    rec = Recorder(lm)
    block = 8
    out, forwards = diffusion_generate(rec, prompt_ids(2, prompt_len), block=block, sub_block=4, threshold=0.2,
                                       mask_id=MASK, max_new_tokens=21)
    assert forwards == len(rec.calls) and out.shape == (2, prompt_len + 21)
    blocks_seen = 0
    with torch.no_grad():
        for ids, pos, before, logits in rec.calls:
            q = ids.shape[1]
            assert q == block or before == 0  # every call is the prefill or a whole block over whole blocks
            assert before % block == 0 and torch.equal(pos[0], torch.arange(before, before + q))
            seq = torch.cat([out[:, :before], ids], 1)  # the cached blocks are final
            ref = lm(input_ids=seq, attention_mask=additive(visible_mask(seq.shape[1], seq.shape[1], block)),
                     position_ids=torch.arange(seq.shape[1])[None].expand(2, -1), use_cache=False).logits
            torch.testing.assert_close(logits, ref[:, before:], atol=2e-5, rtol=1e-5)
            blocks_seen = max(blocks_seen, before // block)
    assert blocks_seen >= 3


def test_sub_block_cache_matches_its_definition():
    """With the sub-block cache, a sub-block forward equals one no-cache forward of [prefix ; block as at the
    last whole-block forward ; sub-block now] where the sub-block sees the prefix, the old block except its own
    old slots, and itself."""
    lm = tiny_lm()
    rec = Recorder(lm)
    block, sub = 8, 4
    out, forwards = diffusion_generate(rec, prompt_ids(1, 9, seed=3), block=block, sub_block=sub, threshold=0.95,
                                       mask_id=MASK, max_new_tokens=30, sub_block_cache=True)
    assert forwards == len(rec.calls) and not (out == MASK).any()
    partial, old, first = 0, None, True
    with torch.no_grad():
        for ids, pos, before, logits in rec.calls[1:]:  # after the prefill
            if ids.shape[1] == block:
                masked = (ids[0] == MASK).nonzero().flatten().tolist()
                if masked and not first:  # a refresh inside a block: the sub-block's first position is masked
                    assert ids[0, masked[0] // sub * sub] == MASK
                first, old = not masked, ids  # after an append the next block starts
                continue
            assert ids[0, 0] != MASK  # a sub-block forward: its first position is known
            partial += 1
            start = before - block  # the cache held prefix + old block
            s = int(pos[0, 0]) - start
            n = start + block + sub
            seq = torch.cat([out[:, :start], old, ids], 1)
            positions = torch.cat([torch.arange(start + block), torch.arange(start + s, start + s + sub)])[None]
            vis = torch.zeros(n, n, dtype=torch.bool)
            vis[:start + block, :start + block] = visible_mask(start + block, start + block, block)
            vis[start + block:, :start + block] = True
            vis[start + block:, start + s:start + s + sub] = False
            vis[start + block:, start + block:] = True
            ref = lm(input_ids=seq, attention_mask=additive(vis), position_ids=positions, use_cache=False).logits
            torch.testing.assert_close(logits, ref[:, start + block:], atol=2e-5, rtol=1e-5)
    assert partial >= 5


# --- forward counts -------------------------------------------------------------------------------------------


def masks_in_block_calls(rec: Recorder, block: int) -> list[int]:
    """Masks in each call that forwards the current block (not the prefill)."""
    return [int((ids == MASK).sum()) for ids, _, before, _ in rec.calls if ids.shape[1] == block and before > 0]


def test_threshold_one_unmasks_one_token_per_forward():
    rec = Recorder(tiny_lm())
    # prompt 11, block 8, limit 32: masks at 11..15, 17..23, 25..31 (16 and 24 come from the last logit)
    out, forwards = diffusion_generate(rec, prompt_ids(1, 11), block=8, sub_block=4, threshold=1.0, mask_id=MASK,
                                       max_new_tokens=21)
    assert out.shape == (1, 32) and not (out == MASK).any()
    assert forwards == 1 + 19 + 2  # prefill, one per masked position, two appends (the last block ends at the limit)
    counts = masks_in_block_calls(rec, 8)
    assert counts == [5, 4, 3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 1]


def test_threshold_zero_unmasks_a_sub_block_per_forward():
    rec = Recorder(tiny_lm())
    # block-aligned prompt 8: token 8 from the prefill logit; blocks 8..15 and 16..23 with two sub-blocks each
    out, forwards = diffusion_generate(rec, prompt_ids(1, 8), block=8, sub_block=4, threshold=0.0, mask_id=MASK,
                                       max_new_tokens=24)
    assert out.shape == (1, 32) and not (out == MASK).any()
    assert forwards == 1 + 3 * (2 + 1) - 1  # per block: sub-blocks + the append (none after the last block)
    assert masks_in_block_calls(rec, 8) == [7, 4, 0, 7, 4, 0, 7, 4]


# --- outputs: no mask, stop, length ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_new", [0, 1, 3, 8, 13, 24])
@pytest.mark.parametrize("token_shift", [True, False])
def test_max_new_tokens_and_no_mask(max_new, token_shift):
    prompt = prompt_ids(2, 8)
    out, forwards = diffusion_generate(tiny_lm(), prompt, block=8, sub_block=4, threshold=0.5, mask_id=MASK,
                                       max_new_tokens=max_new, token_shift=token_shift)
    assert out.shape == (2, 8 + max_new) and torch.equal(out[:, :8], prompt)
    assert not (out == MASK).any()
    assert forwards <= 1 + max_new + max_new // 8 + 1 and (forwards == 0) == (max_new == 0)


def test_stop_truncates_and_pads():
    lm, prompt = tiny_lm(), prompt_ids(2, 11)
    kw = dict(block=8, sub_block=4, threshold=0.3, mask_id=MASK, max_new_tokens=29)
    full, n_full = diffusion_generate(lm, prompt, stop=None, **kw)
    stop = int(full[0, 11 + 9])  # a token of row 0's answer
    ends = []
    for row in full:
        hits = [j for j in range(11, full.shape[1]) if int(row[j]) == stop]
        ends.append(hits[0] + 1 if hits else full.shape[1])
    out, n_stop = diffusion_generate(lm, prompt, stop=stop, **kw)
    assert out.shape == (2, max(ends)) and n_stop <= n_full
    for r in range(2):
        assert torch.equal(out[r, :ends[r]], full[r, :ends[r]])
        assert (out[r, ends[r]:] == stop).all()
    # the tokenizer supplies both ids
    tok = SimpleNamespace(mask_token_id=MASK, eos_token_id=stop)
    del kw["mask_id"]
    assert torch.equal(diffusion_generate(lm, prompt, tokenizer=tok, **kw)[0], out)


def test_sampling_is_seeded_and_never_masks():
    lm, prompt = tiny_lm(), prompt_ids(2, 5)
    runs = [diffusion_generate(lm, prompt, block=8, sub_block=4, threshold=0.9, mask_id=MASK, max_new_tokens=20,
                               temperature=1.5, generator=torch.Generator().manual_seed(s))[0] for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert all(not (r == MASK).any() for r in runs)


# --- a hand-made logit model: token shift and the exact policy -------------------------------------------------


class Toy(torch.nn.Module):
    """Logits of a call: ``table[position] * (1 + 0.25 * known tokens in the call) * scales[row]`` (sharper as a
    block fills); records the length of each call."""

    def __init__(self, table: torch.Tensor, mask: int, scales: tuple[float, ...] = (1.0,)):
        super().__init__()
        self.table, self.mask, self.scales, self.lengths = table, mask, torch.tensor(scales, dtype=torch.float64), []

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None):
        self.lengths.append(input_ids.shape[1])
        known = (input_ids != self.mask).sum(-1)[:, None, None].double()
        logits = self.table[position_ids] * (1 + 0.25 * known) * self.scales[:, None, None]
        return SimpleNamespace(logits=logits.float())


def shift_table(n: int = 64, vocab: int = 12) -> torch.Tensor:
    """Row p peaks at token p % 7 + 1."""
    table = torch.zeros(n, vocab, dtype=torch.float64)
    for p in range(n):
        table[p, p % 7 + 1] = 8.0
    return table


@pytest.mark.parametrize("prompt_len", [5, 8])
@pytest.mark.parametrize("token_shift", [True, False])
@pytest.mark.parametrize("threshold,sub_block_cache", [(0.5, False), (1.0, False), (1.0, True)])
def test_token_shift_reads_the_row_before(prompt_len, token_shift, threshold, sub_block_cache):
    toy = Toy(shift_table(), mask=11)
    prompt = torch.zeros(1, prompt_len, dtype=torch.long)
    out, _ = diffusion_generate(toy, prompt, block=8, sub_block=4, threshold=threshold, mask_id=11, max_new_tokens=19,
                                token_shift=token_shift, sub_block_cache=sub_block_cache)
    got = [int(t) for t in out[0, prompt_len:]]
    rows = [j - 1 if token_shift else j for j in range(prompt_len, prompt_len + 19)]
    assert got == [r % 7 + 1 for r in rows]
    assert (4 in toy.lengths) == sub_block_cache  # sub-block forwards ran


def test_threshold_is_strict():
    """Uniform logits over 4 tokens: every confidence is exactly 0.25, so threshold 0.25 fills one position per
    forward and anything below fills the sub-block."""
    toy = Toy(torch.zeros(64, 4, dtype=torch.float64), mask=3)
    prompt = torch.zeros(1, 8, dtype=torch.long)
    kw = dict(block=8, sub_block=4, mask_id=3, max_new_tokens=16)
    assert diffusion_generate(toy, prompt, threshold=0.25, **kw)[1] == 1 + 14 + 1  # 7 + 7 masks, one append
    assert diffusion_generate(toy, prompt, threshold=0.2499, **kw)[1] == 1 + 4 + 1


def softmax(row: list[float]) -> list[float]:
    top = max(row)
    ex = [math.exp(v - top) for v in row]
    return [v / sum(ex) for v in ex]


def replay(table, prompts, *, block, sub, threshold, shift, max_new, stop, mask, scales=(1.0,)):
    """The decoding loop in plain Python on the Toy's logits, rows in lockstep -> (token rows, forwards)."""
    def call(tokens, first, b):
        known = sum(t != mask for t in tokens)
        return [[float(v) * (1 + 0.25 * known) * scales[b] for v in table[first + i]] for i in range(len(tokens))]

    def choose(row):
        probs = softmax(row)
        probs[mask] = 0.0
        tok = max(range(len(probs)), key=lambda v: probs[v])
        return tok, probs[tok]

    def finished(gen):
        return stop in gen and mask not in gen[:gen.index(stop)]

    rows_n, n = len(prompts), len(prompts[0])
    seqs, limit, forwards, before = [list(p) for p in prompts], n + max_new, 0, [None] * rows_n
    start = n // block * block
    if start:
        forwards += 1
        for b in range(rows_n):
            before[b] = call(seqs[b][:start], 0, b)[-1]
            if start == n and shift:
                seqs[b].append(choose(before[b])[0])
    done = [finished(q[n:]) for q in seqs]
    while not all(done):
        cur = [q[start:] + [mask] * (start + block - len(q)) for q in seqs]
        for s in range(0, block, sub):
            while not all(done):
                todo = [[] if done[b] else [j for j in range(s, s + sub) if cur[b][j] == mask and start + j < limit]
                        for b in range(rows_n)]
                if not any(todo):
                    break
                forwards += 1
                for b in range(rows_n):
                    if not todo[b]:
                        continue
                    rows = call(cur[b], start, b)
                    picks = {j: choose(rows[j] if not shift else (rows[j - 1] if j else before[b])) for j in todo[b]}
                    best = max(todo[b], key=lambda j: picks[j][1])
                    for j in todo[b]:
                        if picks[j][1] > threshold or j == best:
                            cur[b][j] = picks[j][0]
                    done[b] = finished((seqs[b][:start] + cur[b])[n:])
        seqs = [q[:start] + c for q, c in zip(seqs, cur)]
        if all(done) or start + block >= limit:
            break
        forwards += 1
        for b in range(rows_n):
            before[b] = call(cur[b], start, b)[-1]
        start += block
        if shift:
            for b in range(rows_n):
                seqs[b].append(choose(before[b])[0])
                done[b] = done[b] or finished(seqs[b][n:])
    seqs = [q[:limit] for q in seqs]
    ends = [n + q[n:].index(stop) + 1 if stop in q[n:] else len(q) for q in seqs]
    return [q[:e] + [stop] * (max(ends) - e) for q, e in zip(seqs, ends)], forwards


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("token_shift", [True, False])
@pytest.mark.parametrize("prompt_len,max_new", [(3, 21), (8, 30), (13, 17)])
def test_policy_matches_replay(threshold, token_shift, prompt_len, max_new):
    vocab, mask, stop = 12, 11, 10
    table = torch.randn(64, vocab, generator=torch.Generator().manual_seed(prompt_len), dtype=torch.float64)
    table[:, stop] -= 1.5  # rare but reachable stop
    table[::5, mask] += 4.0  # the mask token is often the argmax: it must never be chosen
    prompt = [int(t) for t in torch.randint(0, 10, (prompt_len,), generator=torch.Generator().manual_seed(9))]
    ref, ref_forwards = replay(table, [prompt], block=8, sub=4, threshold=threshold, shift=token_shift,
                               max_new=max_new, stop=stop, mask=mask)
    out, forwards = diffusion_generate(Toy(table, mask), torch.tensor([prompt]), block=8, sub_block=4,
                                       threshold=threshold, token_shift=token_shift, max_new_tokens=max_new,
                                       stop=stop, mask_id=mask)
    assert out.tolist() == ref and forwards == ref_forwards


def test_policy_replay_hits_stop():
    """The replay case above with a stop token that does occur (the test would pass vacuously otherwise)."""
    vocab, mask = 12, 11
    table = torch.randn(64, vocab, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    prompt = [1, 2, 3, 4, 5]
    full, _ = replay(table, [prompt], block=8, sub=4, threshold=0.5, shift=True, max_new=30, stop=None, mask=mask)
    stop = full[0][5 + 12]
    ref, ref_forwards = replay(table, [prompt], block=8, sub=4, threshold=0.5, shift=True, max_new=30, stop=stop,
                               mask=mask)
    assert len(ref[0]) <= 5 + 13 and ref[0][-1] == stop
    out, forwards = diffusion_generate(Toy(table, mask), torch.tensor([prompt]), block=8, sub_block=4, threshold=0.5,
                                       max_new_tokens=30, stop=stop, mask_id=mask)
    assert out.tolist() == ref and forwards == ref_forwards


def test_batch_rows_finish_separately():
    """Two rows in lockstep: row 0 (flat logits, many forwards per sub-block) stops early; once finished it must
    no longer drive forwards, and its tail is padded with the stop id."""
    vocab, mask = 12, 11
    table = torch.randn(64, vocab, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    prompts, scales = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]], (0.3, -3.0)  # row 1 sharp, on other tokens
    full, _ = replay(table, prompts, block=8, sub=4, threshold=0.6, shift=True, max_new=30, stop=None, mask=mask,
                     scales=scales)
    stop = full[0][5 + 5]
    assert stop not in full[1][5:]
    ref, ref_forwards = replay(table, prompts, block=8, sub=4, threshold=0.6, shift=True, max_new=30, stop=stop,
                               mask=mask, scales=scales)
    assert len(ref[0]) == 35 and ref[0][-1] == stop  # row 0 padded
    out, forwards = diffusion_generate(Toy(table, mask, scales), torch.tensor(prompts), block=8, sub_block=4,
                                       threshold=0.6, max_new_tokens=30, stop=stop, mask_id=mask)
    assert out.tolist() == ref and forwards == ref_forwards


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "mask token id"),
    (dict(mask_id=MASK, sub_block=3), "sub_block=3 must divide block=8"),
    (dict(mask_id=MASK, block=0), "block=0"),
    (dict(mask_id=MASK, max_new_tokens=-1), "max_new_tokens"),
    (dict(mask_id=MASK, temperature=-1.0), "temperature"),
    (dict(mask_id=3), "prompt holds the mask token id 3"),
    (dict(tokenizer=SimpleNamespace(mask_token_id=None, eos_token_id=2)), "mask token id"),
])
def test_bad_arguments(kwargs, match):
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=match):
        diffusion_generate(tiny_lm(), prompt, **{"block": 8, "sub_block": 4, **kwargs})


@pytest.mark.parametrize("prompt", [torch.tensor([1, 2, 3]), torch.zeros(1, 0, dtype=torch.long),
                                    torch.ones(1, 3)])
def test_bad_prompt(prompt):
    with pytest.raises(ValueError, match="input_ids"):
        diffusion_generate(tiny_lm(), prompt, mask_id=MASK)
