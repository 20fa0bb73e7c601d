"""LongHeads in transformers: chunk keys, selection and remapped-position attention against loop oracles
that work from the pre-RoPE projections, a planted chunk, equality with eager when every chunk is
selected, cache-consistent sparse generation, bad configs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vzoo.lm import LongHeadsConfig, apply_sparse_attention
from vzoo.lm.longheads import LongHeadsContext, LongHeadsState, chunk_keys, longheads_attention, select_chunks

D = 16
INV_FREQ = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)


def _rope(x: torch.Tensor, p: float) -> torch.Tensor:
    """RoPE of one vector ``x [D]`` at position ``p``, pair by pair (dims i and i + D/2)."""
    out = x.clone().double()
    for i in range(D // 2):
        c, s = math.cos(p * INV_FREQ[i].item()), math.sin(p * INV_FREQ[i].item())
        a, b = x[i].item(), x[i + D // 2].item()
        out[i], out[i + D // 2] = a * c - b * s, b * c + a * s
    return out


def _rope_all(x: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """``x [B, H, S, D]`` rotated at positions ``slot + offset``."""
    out = torch.empty_like(x, dtype=torch.float64)
    for bi, hi, s in torch.cartesian_prod(*(torch.arange(n) for n in x.shape[:3])).tolist():
        out[bi, hi, s] = _rope(x[bi, hi, s], s + offset)
    return out.to(x.dtype)


def _oracle_chunk_key(qp, kp, v, scale, real=None):
    """One chunk, one head: pre-RoPE ``qp, kp, v [w, D]`` -> chunk key ``[D]`` over the ``real`` slots."""
    real = list(range(qp.shape[0])) if real is None else real
    ql = torch.stack([_rope(qp[i], i) for i in real])
    kl = torch.stack([_rope(kp[i], i) for i in real])
    summary = (torch.softmax(ql @ kl.T * scale, -1) @ v[real].double()).mean(0)
    return torch.softmax(kl @ summary / math.sqrt(D), 0) @ kl


def _oracle_keys(qp, kp, v, w, scale, valid=None):
    b, h, s, _ = qp.shape
    g = h // kp.shape[1]
    valid = torch.ones(b, s, dtype=torch.bool) if valid is None else valid

    def one(bi, hi, j):
        span = slice(j * w, (j + 1) * w)
        real = [i for i in range(w) if valid[bi, j * w + i]]
        return _oracle_chunk_key(qp[bi, hi, span], kp[bi, hi // g, span], v[bi, hi // g, span], scale, real)

    return torch.stack([torch.stack([torch.stack([one(bi, hi, j) for j in range(s // w)]) for hi in range(h)]) for bi in range(b)])


def _oracle_chosen(scores_row, c, k, first=0):
    """Chunks for one query in chunk ``c``: all when they fit, else sink, previous, own and the best others."""
    if c + 1 - first <= k:
        return list(range(first, c + 1))
    others = sorted(range(first + 1, c - 1), key=lambda j: -scores_row[j])[: k - 3]
    return sorted({first, c - 1, c, *others})


def _oracle_attention(qp, kp, v, w, k, scale):
    """Per head and query: select chunks, gather their keys up to the query, RoPE at contiguous positions."""
    b, h, s, _ = qp.shape
    g = h // kp.shape[1]
    keys = _oracle_keys(qp, kp, v, w, scale)
    out = torch.zeros(b, h, s, D, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for t in range(s):
                c = t // w
                scores = [(qp[bi, hi, t].double() @ keys[bi, hi, j]).item() for j in range(keys.shape[2])]
                slots = [x for ch in _oracle_chosen(scores, c, k) for x in range(ch * w, min((ch + 1) * w, t + 1))]
                kr = torch.stack([_rope(kp[bi, hi // g, x], i) for i, x in enumerate(slots)])
                weights = torch.softmax(kr @ _rope(qp[bi, hi, t], len(slots) - 1) * scale, 0)
                out[bi, hi, t] = weights @ v[bi, hi // g, slots].double()
    return out


def _module():
    return SimpleNamespace(vzoo_longheads=LongHeadsContext(SimpleNamespace(inv_freq=INV_FREQ.float())))


@pytest.mark.parametrize("offset", [0, 5])
def test_chunk_keys_match_loop_oracle(offset):
    torch.manual_seed(0)
    qp, kp, v = torch.randn(2, 4, 12, D), torch.randn(2, 2, 12, D), torch.randn(2, 2, 12, D)
    got = chunk_keys(_rope_all(qp, offset), _rope_all(kp, offset), v, 0, torch.full((2,), offset), INV_FREQ, 4, 0.25)
    torch.testing.assert_close(got.double(), _oracle_keys(qp, kp, v, 4, 0.25), atol=1e-5, rtol=1e-5)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :6] = False  # left padding: chunk 0 all padding (its key is never used), chunk 1 half
    got = chunk_keys(_rope_all(qp, offset), _rope_all(kp, offset), v, 0, torch.full((2,), offset), INV_FREQ, 4, 0.25, valid)
    want = _oracle_keys(qp, kp, v, 4, 0.25, valid | torch.arange(12).lt(4))  # chunk 0 of row 1 left out below
    torch.testing.assert_close(got.double()[:, :, 1:], want[:, :, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double()[0], want[0], atol=1e-5, rtol=1e-5)


def test_selection_matches_loop_oracle():
    torch.manual_seed(1)
    w, k, skv, sq = 4, 5, 41, 41
    scores = torch.randn(2, 3, sq, skv // w)
    first = torch.tensor([0, 2])
    got = select_chunks(scores, skv, w, k, first)
    for bi in range(2):
        for hi in range(3):
            for t in range(sq):
                want = [j for j in _oracle_chosen(scores[bi, hi, t].tolist(), t // w, k, first[bi].item()) if j < t // w - 1]
                row = [j for j in got[bi, hi, t].tolist() if j >= 0]
                assert row == want, (bi, hi, t)


def test_planted_chunk_is_selected():
    torch.manual_seed(2)
    w, s = 8, 64
    qp, kp, v = 0.3 * torch.randn(1, 1, s, D), 0.3 * torch.randn(1, 1, s, D), torch.randn(1, 1, s, D)
    u = torch.zeros(D)
    u[D // 2 - 1] = u[D - 1] = 3.0  # the slowest RoPE pair: nearly unrotated inside a chunk
    kp[0, 0, 24:32] = u + 0.05 * torch.randn(8, D)
    qp[0, 0, -1] = 5 * u
    keys = chunk_keys(_rope_all(qp), _rope_all(kp), v, 0, torch.zeros(1), INV_FREQ, w, 0.25)
    routed = select_chunks((qp.double() @ keys.double().transpose(-1, -2)).float(), s, w, 4, torch.zeros(1, dtype=torch.long))
    assert routed[0, 0, -1].tolist() == [0, 3]  # the sink and the planted chunk 3, not a random one


@pytest.mark.parametrize("s", [29, 28])  # the decode step opens / completes a chunk
def test_attention_with_position_remapping_matches_loop_oracle(s):
    torch.manual_seed(3)
    qp, kp, v = torch.randn(1, 4, s, D), torch.randn(1, 2, s, D), torch.randn(1, 2, s, D)
    q, k = _rope_all(qp), _rope_all(kp)
    config = LongHeadsConfig(chunk_size=4, atten_length=16)
    want = _oracle_attention(qp, kp, v, 4, 4, 0.25).float()
    out = longheads_attention(config, q, k, v, None, 0.25, _module())
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    moved = longheads_attention(  # positions shifted by 5 (as after left padding): the same attention
        config, _rope_all(qp, 5), _rope_all(kp, 5), v, None, 0.25, _module(), position_ids=torch.arange(5, s + 5)[None]
    )
    torch.testing.assert_close(moved, want, atol=1e-4, rtol=1e-4)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    assert not torch.allclose(out[:, :, 16:], dense[:, :, 16:], atol=1e-3)  # past atten_length it is not dense
    module = _module()
    module.vzoo_longheads.state = LongHeadsState()
    first = longheads_attention(config, q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], None, 0.25, module)
    last = longheads_attention(config, q[:, :, -1:], k, v, None, 0.25, module)  # decode from the stored state
    torch.testing.assert_close(torch.cat([first, last], 2), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_budget_covering_every_chunk_equals_eager(lm, kind):
    lm.assert_equals_eager(lm.make(kind), LongHeadsConfig(chunk_size=8, atten_length=48))


def test_sparse_generation_with_cache_equals_recomputation(lm):
    model = lm.make()
    ids = torch.randint(0, 97, (1, 45), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        stock = model(ids).logits
        with apply_sparse_attention(model, LongHeadsConfig(chunk_size=4, atten_length=12)) as handle:
            assert not torch.allclose(model(ids).logits, stock, atol=1e-3)  # really sparse
            cached = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True)
            recomputed = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
            assert 0.0 < handle.density < 0.6
    assert torch.equal(cached, recomputed)
    assert torch.equal(model(ids).logits, stock)  # removed


def test_cache_filled_before_apply_is_refused(lm):
    model = lm.make()
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        cache = lm.cache_of(model(ids[:, :10]))
        with apply_sparse_attention(model, LongHeadsConfig(chunk_size=4, atten_length=12)):
            with pytest.raises(ValueError, match="cache"):
                model(ids[:, 10:], cache=cache)


@pytest.mark.parametrize("kwargs, field", [
    (dict(chunk_size=0), "chunk_size"), (dict(chunk_size=2.0), "chunk_size"), (dict(atten_length=-4), "atten_length"),
    (dict(chunk_size=4, atten_length=10), "atten_length"), (dict(chunk_size=4, atten_length=8), "atten_length"),
    (dict(layers=(-1,)), "layers"), (dict(dense_fallback=1), "dense_fallback"),
])
def test_bad_config_raises(kwargs, field):
    with pytest.raises(ValueError, match=f"LongHeadsConfig.{field}"):
        LongHeadsConfig(**kwargs)


def test_layers_beyond_model_raise(lm):
    with pytest.raises(ValueError, match="layers"):
        apply_sparse_attention(lm.make(layers=2), LongHeadsConfig(layers=(5,)))
