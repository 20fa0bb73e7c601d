"""ProxyAttn in transformers: proxy scores, block aggregation, budgets and selection against loop oracles,
attention exact to the selection, equality with eager attention at full budget (padding included), GQA
groupings, dense cached decoding after a sparse prompt, bad configs."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from vzoo.lm import ProxyAttnConfig, apply_sparse_attention
from vzoo.lm.proxy_attn import block_scores, proxy_attention, proxy_selection, select_blocks, window_rows


def _row_scores(qv, kmat, p, valid, block, nb, scale):
    """One query row at position ``p``: softmax over its causal unpadded keys, summed per key block (and
    the per-block maximum)."""
    ts = [t for t in range(p + 1) if valid[t]]
    w = torch.softmax(torch.stack([qv @ kmat[t] for t in ts]) * scale, 0)
    total, peak = torch.zeros(nb, dtype=torch.float64), torch.zeros(nb, dtype=torch.float64)
    for t, x in zip(ts, w):
        total[t // block] += x
        peak[t // block] = max(peak[t // block], x)
    return total, peak


def _block_oracle(qh, kh, valid, block, width, aggregate, scale):
    """Block scores ``[NB, NB]`` of one (proxy) head by loops: the last ``width`` unpadded queries of each
    query block; ``"sum"``: mean over those rows of the per-block mass, ``"max"``: max over rows and tokens."""
    s = qh.shape[0]
    nb = -(-s // block)
    out = torch.zeros(nb, nb, dtype=torch.float64)
    for i in range(nb):
        end = min(s, (i + 1) * block)
        rows = [p for p in range(max(i * block, end - width), end) if valid[p]]
        parts = [_row_scores(qh[p], kh, p, valid, block, nb, scale) for p in rows]
        if parts and aggregate == "sum":
            out[i] = sum(t for t, _ in parts) / len(parts)
        elif parts:
            out[i] = torch.stack([m for _, m in parts]).amax(0)
    return out


def _selection_oracle(q, k, valid, cfg: ProxyAttnConfig, scale):
    """The whole selection ``[B, Hq, NB, NB]`` by loops: mean-pooled group proxies rank blocks, each head's
    own last-``budget_window`` masses set its budget (sorted cumulative sum reaching ``gamma``), sink and
    local blocks first."""
    b, hq, s, _ = q.shape
    hkv, bs = k.shape[1], cfg.block_size
    g = cfg.groups or hkv
    per = hq // g
    kx = k.double().repeat_interleave(hq // hkv, 1)  # the keys each query head reads
    nb = -(-s // bs)
    chosen = torch.zeros(b, hq, nb, nb, dtype=torch.bool)
    for bi in range(b):
        v = valid[bi]
        first = next(t for t in range(s) if v[t]) // bs
        has_key = [any(v[j * bs : (j + 1) * bs]) for j in range(nb)]
        for gi in range(g):
            heads = range(gi * per, (gi + 1) * per)
            qp = torch.stack([q[bi, h].double() for h in heads]).mean(0)
            kp = torch.stack([kx[bi, h] for h in heads]).mean(0)
            proxy = _block_oracle(qp, kp, v, bs, cfg.window, cfg.aggregate, scale)
            for h in heads:
                mass = _block_oracle(q[bi, h].double(), kx[bi, h], v, bs, min(cfg.budget_window, bs), "sum", scale)
                for i in range(nb):
                    cands = [j for j in range(i + 1) if has_key[j]]
                    forced = [j for j in range(i + 1) if i - cfg.local_blocks < j or first <= j < first + cfg.sink_blocks]
                    others = sorted((j for j in cands if j not in forced), key=lambda j: -proxy[i, j].item())
                    if cfg.gamma >= 1:
                        budget = len(others)
                    else:  # the forced blocks' mass first, then the largest other masses until gamma
                        cum, budget = sum(mass[i, j].item() for j in forced), len(others)
                        rest = sorted((mass[i, j].item() for j in others), reverse=True)
                        for n, m in enumerate([0.0] + rest):
                            cum += m
                            if cum >= cfg.gamma:
                                budget = min(n, len(others))
                                break
                    for j in forced + others[:budget]:
                        chosen[bi, h, i, j] = True
    return chosen


def _inputs(seed, b=2, hq=4, hkv=2, s=45, d=16, pad=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=gen) for h in (hq, hkv, hkv))
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[-1, :pad] = False
    return q, k, v, valid


def test_window_rows_are_the_last_queries_of_each_block():
    pos, inside = window_rows(21, 8, 3)
    assert pos.tolist() == [[5, 6, 7], [13, 14, 15], [18, 19, 20]] and inside.all()
    pos, inside = window_rows(19, 8, 5)  # short last block 16..18: unused slots repeat its first position
    assert pos.tolist()[2] == [16, 16, 16, 17, 18] and inside[2].tolist() == [False, False, True, True, True]
    pos, inside = window_rows(19, 8, 8)
    assert pos[2].tolist() == [16, 16, 16, 16, 16, 16, 17, 18] and inside[2].sum() == 3


@pytest.mark.parametrize("aggregate", ["sum", "max"])
def test_block_scores_match_loops_with_gqa_and_padding(aggregate):
    q, k, _, valid = _inputs(1, pad=11)
    pos, inside = window_rows(45, 8, 5)
    q_rows = q[:, :, pos.flatten()].view(2, 4, 6, 5, 16)
    got = block_scores(q_rows, k, pos, inside & valid[:, pos], valid, 8, 0.3, aggregate)
    for bi in range(2):
        for h in range(4):
            want = _block_oracle(q[bi, h].double(), k[bi, h // 2].double(), valid[bi], 8, 5, aggregate, 0.3)
            assert (got[bi, h].double() - want).abs().max() < 1e-5
    assert got[1, :, 0].abs().sum() == 0  # a query block made only of padding scores nothing


def test_select_blocks_matches_loops():
    """Ranking by the group proxy; forced blocks always, plus as many others as the head's largest other
    masses need to bring the forced blocks' mass up to gamma."""
    gen = torch.Generator().manual_seed(2)
    nb = 7
    proxy = torch.rand(1, 2, nb, nb, generator=gen)
    mass = torch.rand(1, 4, nb, nb, generator=gen).tril()
    mass = mass / mass.sum(-1, keepdim=True)
    blocks_valid = torch.tensor([[False, True, True, True, True, True, True]])
    for gamma in (0.3, 0.7, 0.95, 1.0):
        got = select_blocks(proxy, mass, gamma, torch.tensor([1]), 1, 2, blocks_valid)
        for h in range(4):
            for i in range(nb):
                cands = [j for j in range(1, i + 1)]
                forced = [j for j in range(i + 1) if j > i - 2 or j == 1]
                others = sorted((j for j in cands if j not in forced), key=lambda j: -proxy[0, h // 2, i, j].item())
                covered = sum(mass[0, h, i, j].item() for j in forced)
                cum = covered + torch.tensor([mass[0, h, i, j].item() for j in others]).sort(descending=True).values.cumsum(0)
                if gamma >= 1:
                    budget = len(others)
                elif covered >= gamma:
                    budget = 0
                else:
                    budget = min(int((cum < gamma).sum()) + 1, len(others))
                want = set(forced) | set(others[:budget])
                assert set(torch.nonzero(got[0, h, i]).flatten().tolist()) == want
    assert not got[..., 2:, 0].any()  # the padding block 0 is no candidate; only local windows reaching it keep it


def test_forced_blocks_do_not_use_up_the_budget():
    """Regression: a retrieval head whose mass sits on one remote block (plus sink and local) keeps that
    block. The budget used to count the forced (sink + local) blocks, so with ``local_blocks`` larger
    than the head's budget the remote block was never added (passkey failed on SmolLM2)."""
    nb = 12
    proxy = torch.zeros(1, 1, nb, nb)
    proxy[..., 4] = 1.0  # the group ranks the needle block 4 first
    mass = torch.zeros(1, 1, nb, nb)
    mass[0, 0, :, 0] = 0.05  # sink
    mass[0, 0, :, 4] = 0.9  # needle
    mass[0, 0] += torch.eye(nb) * 0.05  # diagonal
    mass[0, 0, :4] = torch.eye(nb)[:4]  # early rows: only their diagonal
    got = select_blocks(proxy, mass, 0.98, torch.tensor([0]), 1, 4)
    assert got[0, 0, 11].nonzero().flatten().tolist() == [0, 4, 8, 9, 10, 11]
    assert got[0, 0, 8].nonzero().flatten().tolist() == [0, 4, 5, 6, 7, 8]
    assert got[0, 0, 3].nonzero().flatten().tolist() == [0, 1, 2, 3]  # mass covered by the forced blocks: no extra


@pytest.mark.parametrize(
    "cfg",
    [
        ProxyAttnConfig(block_size=8, window=3, gamma=0.8, local_blocks=1),
        ProxyAttnConfig(block_size=8, window=8, groups=1, aggregate="max", gamma=0.8, budget_window=2, local_blocks=2),
        ProxyAttnConfig(block_size=8, window=2, groups=4, gamma=0.5, sink_blocks=0, local_blocks=1),
    ],
)
def test_selection_matches_loop_oracle(cfg):
    q, k, _, valid = _inputs(3, s=45, pad=10)
    got = proxy_selection(cfg, q, k, valid, 0.25)
    want = _selection_oracle(q, k, valid, cfg, 0.25)
    assert torch.equal(got, want)
    assert not got.all()  # really sparse
    if (cfg.groups or 2) < 4:  # heads 0 and 1 share a proxy ranking but not their budgets
        assert (got[:, 0].sum(-1) != got[:, 1].sum(-1)).any()


def _naive(q, k, v, allowed, scale):
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1).double() for x in (k, v))
    s = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("pad", [0, 10])
def test_attention_is_exact_to_the_selection(pad):
    cfg = ProxyAttnConfig(block_size=8, window=4, gamma=0.5, local_blocks=1, dense_fallback=False)
    q, k, v, valid = _inputs(4, s=45, pad=pad)
    if not pad:
        valid = valid[:1]
        q, k, v = q[:1], k[:1], v[:1]
    chosen = _selection_oracle(q, k, valid, cfg, 0.25)
    causal = torch.ones(45, 45, dtype=torch.bool).tril()
    token = chosen.repeat_interleave(8, 2)[:, :, :45].repeat_interleave(8, 3)[..., :45]
    allowed = token & causal & valid[:, None, None, :]
    mask = None if not pad else (causal & valid[:, None, :])[:, None]
    got = proxy_attention(cfg, q, k, v, mask, 0.25)
    rows = valid[:, None, :, None].expand_as(got)
    assert (got.double() - _naive(q, k, v, allowed, 0.25))[rows].abs().max() < 1e-5
    dense = _naive(q, k, v, causal & valid[:, None, None, :], 0.25)
    assert (got.double() - dense)[rows].abs().max() > 1e-3  # the selection really drops blocks


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_full_budget_equals_eager_with_left_padding_and_generate(lm, kind):
    lm.assert_equals_eager(lm.make(kind), ProxyAttnConfig(block_size=8, window=4, gamma=1.0, dense_fallback=False))


def test_full_budget_on_sliding_window_layers_equals_eager():
    """Qwen2 with its second layer windowed (16 < 40 tokens): the window holds inside the selected blocks."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=16, max_window_layers=1,
    )).eval()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("sdpa")
        with apply_sparse_attention(model, ProxyAttnConfig(block_size=8, window=4, gamma=1.0, dense_fallback=False)):
            out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)


def test_sparse_prompt_then_dense_cached_decoding(lm):
    """A prefill method: the prompt is sparse (logits differ from stock), decoding steps over its cache are
    dense attention, so cached generation equals a loop that decodes every new token with stock SDPA on
    the cache the sparse prompt built; the densities of the sparse calls are recorded."""
    model = lm.make()
    ids = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(5))
    cfg = ProxyAttnConfig(block_size=8, window=4, gamma=0.5, local_blocks=1, dense_fallback=False)
    with torch.no_grad():
        stock = model(ids).logits
        with apply_sparse_attention(model, cfg) as handle:
            out = model(ids, use_cache=True)
            assert not torch.allclose(out.logits, stock, atol=1e-3)
            cache = copy.deepcopy(lm.cache_of(out))
            gen = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
            assert handle.sparse_calls >= 3 and 0 < handle.density < 1
        tokens, logits = ids, out.logits
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        for _ in range(6):  # stock SDPA decoding on the sparse prompt's cache
            nxt = logits[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, nxt], 1)
            step = model(nxt, use_cache=True, **{name: cache})
            logits, cache = step.logits, lm.cache_of(step)
    assert torch.equal(gen, tokens)


def test_bad_configs_and_groups(lm):
    for kwargs, field in (
        (dict(block_size=0), "block_size"), (dict(window=0), "window"), (dict(block_size=8, window=9), "window"),
        (dict(groups=0), "groups"), (dict(aggregate="mean"), "aggregate"), (dict(gamma=0.0), "gamma"),
        (dict(gamma=1.5), "gamma"), (dict(budget_window=0), "budget_window"), (dict(sink_blocks=-1), "sink_blocks"),
        (dict(local_blocks=0), "local_blocks"), (dict(layers=(-1,)), "layers"), (dict(dense_fallback=1), "dense_fallback"),
    ):
        with pytest.raises(ValueError, match=f"ProxyAttnConfig.{field}"):
            ProxyAttnConfig(**kwargs)
    model = lm.make()
    with apply_sparse_attention(model, ProxyAttnConfig(groups=3)), pytest.raises(ValueError, match="ProxyAttnConfig.groups=3"):
        model(torch.randint(0, 97, (1, 20)))  # 3 proxies for 4 query heads


def test_budget_window_is_capped_at_the_block_size():
    """The default ``budget_window=8`` works with smaller blocks: it uses the whole block."""
    q, k, _, valid = _inputs(4, s=30, pad=5)
    got = proxy_selection(ProxyAttnConfig(block_size=4, window=2, gamma=0.7, local_blocks=1), q, k, valid, 0.25)
    want = proxy_selection(ProxyAttnConfig(block_size=4, window=2, gamma=0.7, local_blocks=1, budget_window=4), q, k,
                           valid, 0.25)
    assert torch.equal(got, want)
