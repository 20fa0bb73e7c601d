"""landmark_attention: both backends against a float64 per-query loop written here (forward and gradients), GQA,
Tq < Tk, incomplete last blocks, block=1, tokens < block + 1, several tiles and query chunks; one block == causal
SDPA; top-k retrieval (k >= blocks == exact, planted block, local blocks); landmark values get no weight;
causality; half inputs; bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vzoo.kernels as vk
from vzoo.kernels import landmark_attention
from vzoo.kernels.landmark import chunk, landmark_mask

BACKENDS = ("reference", "torch")


def oracle(q, k, v, block, top_k=None, local_blocks=0, scale=None, kept=None):
    """float64 Landmark Attention, one (batch, head, query) at a time. ``kept``: force this list of past blocks
    for every query instead of all of them (``top_k=None``) or the top-k retrieval. Differentiable."""
    q, k, v = q.double(), k.double(), v.double()
    b_, h_, tq, d = q.shape
    g_, tk = k.shape[1], k.shape[2]
    r, period = h_ // g_, block + 1
    scale = d ** -0.5 if scale is None else scale
    rows = []
    for b in range(b_):
        for h in range(h_):
            kh, vh = k[b, h // r], v[b, h // r]
            for j in range(tq):
                i = tk - tq + j
                c = i // period
                s = [scale * torch.dot(q[b, h, j], kh[p]) for p in range(tk)]
                blocks = list(range(c)) if kept is None else kept
                if kept is None and top_k is not None:
                    near = [gg for gg in blocks if gg >= c - local_blocks]
                    far = [gg for gg in blocks if gg < c - local_blocks]
                    far.sort(key=lambda gg: -s[gg * period + block].item())
                    blocks = sorted(near + far[:top_k])
                cur = [p for p in range(c * period, i + 1) if p % period != block]
                p1 = torch.softmax(torch.stack([s[gg * period + block] for gg in blocks] + [s[p] for p in cur]), 0)
                out = torch.zeros(v.shape[-1], dtype=torch.float64)
                for n, gg in enumerate(blocks):
                    keys = range(gg * period, gg * period + block)
                    p2 = torch.softmax(torch.stack([s[p] for p in keys]), 0)
                    for m, p in enumerate(keys):
                        out = out + p1[n] * p2[m] * vh[p]
                for n, p in enumerate(cur):
                    out = out + p1[len(blocks) + n] * vh[p]
                rows.append(out)
    return torch.stack(rows).reshape(b_, h_, tq, v.shape[-1])


def inputs(b, h, g, tq, tk, d, dv, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=gen, dtype=dtype)
    k = torch.randn(b, g, tk, d, generator=gen, dtype=dtype)
    v = torch.randn(b, g, tk, dv, generator=gen, dtype=dtype)
    return q, k, v


def grads(fn, q, k, v, w):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad((out * w).sum(), (q, k, v)))


CASES = [  # b, h, g, tq, tk, d, dv, block
    (1, 2, 2, 20, 20, 4, 3, 3),  # whole blocks, Tq == Tk
    (2, 4, 2, 5, 23, 4, 5, 4),  # GQA, KV cache in front, incomplete last block
    (1, 2, 1, 9, 9, 3, 2, 1),  # block=1: every other token a landmark
    (1, 2, 2, 3, 3, 4, 4, 5),  # fewer tokens than one group
    (1, 3, 1, 17, 26, 2, 3, 2),  # GQA 3:1, ragged
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_exact_matches_oracle(backend, case, monkeypatch):
    b, h, g, tq, tk, d, dv, block = case
    monkeypatch.setattr(chunk, "_TILE_ROWS", 1)  # one query group per tile and one key group per chunk
    monkeypatch.setattr(chunk, "_KEY_COLS", 1)
    q, k, v = inputs(b, h, g, tq, tk, d, dv)
    w = torch.randn(b, h, tq, dv, dtype=torch.float64)
    want = grads(lambda *t: oracle(*t, block), q, k, v, w)
    got = grads(lambda *t: landmark_attention(*t, block, backend=backend), q, k, v, w)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_exact_tiles_and_scale(monkeypatch):
    """Several groups per tile and per key chunk, a custom scale, a tile whose last group is incomplete."""
    q, k, v = inputs(1, 4, 2, 29, 31, 3, 3, seed=1)
    w = torch.randn(1, 4, 29, 3, dtype=torch.float64)
    want = grads(lambda *t: oracle(*t, 2, scale=0.7), q, k, v, w)
    for rows, cols in ((6, 7), (14, 3), (1000, 1000)):
        monkeypatch.setattr(chunk, "_TILE_ROWS", rows)
        monkeypatch.setattr(chunk, "_KEY_COLS", cols)
        got = grads(lambda *t: landmark_attention(*t, 2, scale=0.7), q, k, v, w)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k,local_blocks", [(1, 0), (2, 0), (1, 1), (2, 3), (1, 9)])
def test_topk_matches_oracle(backend, top_k, local_blocks, monkeypatch):
    monkeypatch.setattr(chunk, "_GATHER_ELEMS", 1)  # one query per chunk
    b, h, g, tq, tk, d, dv, block = 1, 4, 2, 7, 38, 3, 2, 3
    q, k, v = inputs(b, h, g, tq, tk, d, dv, seed=2)
    w = torch.randn(b, h, tq, dv, dtype=torch.float64)
    want = grads(lambda *t: oracle(*t, block, top_k=top_k, local_blocks=local_blocks), q, k, v, w)
    got = grads(lambda *t: landmark_attention(*t, block, top_k=top_k, local_blocks=local_blocks, backend=backend),
                q, k, v, w)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_all_blocks_equals_exact(backend):
    q, k, v = inputs(2, 2, 1, 11, 30, 4, 4, seed=3)
    exact = landmark_attention(q, k, v, 4, backend=backend)
    all_blocks = landmark_attention(q, k, v, 4, top_k=6, backend=backend)
    torch.testing.assert_close(all_blocks, exact, rtol=1e-12, atol=1e-12)
    fewer = landmark_attention(q, k, v, 4, top_k=2, backend=backend)
    assert (fewer - exact).abs().max() > 1e-3


def _planted(block=4, groups=9, d=8):
    """Decode query (Tq=1) over ``groups`` full blocks and one token of the current block; block 2's landmark
    key points along the query, the others against it."""
    period = block + 1
    tk = groups * period + 1
    q, k, v = inputs(1, 1, 1, 1, tk, d, 3, seed=4)
    q[0, 0, 0] = torch.nn.functional.normalize(q[0, 0, 0], dim=0) * 3
    for gg in range(groups):
        k[0, 0, gg * period + block] = -q[0, 0, 0] * (0.5 + 0.1 * gg)
    k[0, 0, 2 * period + block] = q[0, 0, 0]
    return q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_picks_planted_block(backend):
    q, k, v = _planted()
    got = landmark_attention(q, k, v, 4, top_k=1, backend=backend)
    torch.testing.assert_close(got, oracle(q, k, v, 4, kept=[2]), rtol=1e-12, atol=1e-12)
    assert (got - oracle(q, k, v, 4, kept=[3])).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_local_blocks_always_kept(backend):
    """The two most recent blocks have the lowest landmark scores yet are kept; top-1 of the rest is block 2."""
    q, k, v = _planted()
    got = landmark_attention(q, k, v, 4, top_k=1, local_blocks=2, backend=backend)
    torch.testing.assert_close(got, oracle(q, k, v, 4, kept=[2, 7, 8]), rtol=1e-12, atol=1e-12)
    # a planted block inside the local window is not counted against top_k: the next best far block is taken
    got = landmark_attention(q, k, v, 4, top_k=1, local_blocks=7, backend=backend)
    torch.testing.assert_close(got, oracle(q, k, v, 4, kept=[0, 2, 3, 4, 5, 6, 7, 8]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_block_is_causal_softmax(backend):
    q, k, v = inputs(1, 4, 2, 6, 6, 5, 3, seed=5)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(landmark_attention(q, k, v, 6, backend=backend), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(landmark_attention(q, k, v, 100, backend=backend), want, rtol=1e-12, atol=1e-12)
    tail = landmark_attention(q[:, :, 4:], k, v, 7, backend=backend)  # Tq < Tk, bottom-right aligned
    torch.testing.assert_close(tail, want[:, :, 4:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [None, 1])
def test_landmark_values_get_no_weight(backend, top_k):
    block, tk = 3, 22
    q, k, v = inputs(1, 2, 2, tk, tk, 4, 4, seed=6)
    v = v.requires_grad_()
    out = landmark_attention(q, k, v, block, top_k=top_k, backend=backend)
    is_lm = landmark_mask(tk, block)
    v2 = v.detach().clone()
    v2[:, :, is_lm] += 100.0
    torch.testing.assert_close(landmark_attention(q, k, v2, block, top_k=top_k, backend=backend), out.detach(),
                               rtol=1e-12, atol=1e-12)
    (dv,) = torch.autograd.grad(out.sum(), v)
    assert dv[:, :, is_lm].abs().max() == 0
    assert dv[:, :, ~is_lm].abs().min() > 0  # every regular value is read by some query
    # a landmark's key does matter (it gates its block)
    k2 = k.clone()
    k2[:, :, block] += 1.0
    assert (landmark_attention(q, k2, v.detach(), block, top_k=top_k, backend=backend) - out).abs().max() > 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [None, 1])
def test_causality(backend, top_k):
    block, tk = 2, 17
    q, k, v = inputs(1, 2, 1, tk, tk, 3, 3, seed=7)
    out = landmark_attention(q, k, v, block, top_k=top_k, backend=backend)
    for t in (4, 9, 15):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t:] = torch.randn_like(k2[:, :, t:])
        v2[:, :, t:] = torch.randn_like(v2[:, :, t:])
        out2 = landmark_attention(q, k2, v2, block, top_k=top_k, backend=backend)
        torch.testing.assert_close(out2[:, :, :t], out[:, :, :t], rtol=1e-12, atol=1e-12)
        assert (out2[:, :, t:] - out[:, :, t:]).abs().amax(-1).min() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("top_k", [None, 2])
def test_half_inputs(dtype, top_k):
    q, k, v = inputs(1, 2, 2, 12, 19, 8, 8, seed=8, dtype=torch.float32)
    w = torch.randn(1, 2, 12, 8, dtype=torch.float64)
    want = grads(lambda *t: oracle(*t, 3, top_k=top_k), q, k, v, w)
    got = grads(lambda *t: landmark_attention(*t, 3, top_k=top_k), q.to(dtype), k.to(dtype), v.to(dtype), w.to(dtype))
    for x, y in zip(got, want):
        assert x.dtype == dtype
        err = (x.double() - y).pow(2).mean().sqrt() / y.pow(2).mean().sqrt()
        assert err < (2e-2 if dtype == torch.bfloat16 else 3e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_stay_finite(backend):
    """Scores spanning hundreds (beyond fp32 exp range) in fp32 still match the float64 oracle."""
    q, k, v = inputs(1, 2, 1, 14, 14, 4, 3, seed=9)
    w = torch.randn(1, 2, 14, 3, dtype=torch.float64)
    want = grads(lambda *t: oracle(*t, 3, scale=60.0), q, k, v, w)
    got = grads(lambda *t: landmark_attention(*t, 3, scale=60.0, backend=backend), q.float(), k.float(), v.float(),
                w.float())
    for x, y in zip(got, want):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x.double(), y, rtol=1e-3, atol=1e-3 * y.abs().max().item())


def test_landmark_mask_and_empty_queries():
    assert landmark_mask(9, 2).tolist() == [False, False, True] * 3
    assert landmark_mask(0, 4).shape == (0,)
    q, k, v = inputs(1, 2, 1, 0, 5, 3, 4)
    assert landmark_attention(q, k, v, 2).shape == (1, 2, 0, 4)
    assert "landmark_attention" in vk.__all__


def test_backend_selection():
    q, k, v = inputs(1, 1, 1, 4, 4, 2, 2)
    with vk.use_backend("reference"):
        torch.testing.assert_close(landmark_attention(q, k, v, 2), oracle(q, k, v, 2))
    with pytest.raises(RuntimeError, match="does not implement"):
        landmark_attention(q, k, v, 2, backend="flex")


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(q=torch.zeros(1, 2, 4)), "q must be 4-D"),
        (dict(k=torch.zeros(1, 3, 8, 4)), "multiple of G"),
        (dict(k=torch.zeros(2, 1, 8, 4)), "expected \\[1, G"),
        (dict(k=torch.zeros(1, 1, 8, 5)), "expected \\[1, G"),
        (dict(v=torch.zeros(1, 1, 7, 4)), "v has shape"),
        (dict(q=torch.zeros(1, 2, 9, 4), k=torch.zeros(1, 1, 8, 4)), "more than the 8 keys"),
        (dict(v=torch.zeros(1, 1, 8, 4, dtype=torch.float64)), "share a dtype"),
        (dict(q=torch.zeros(1, 2, 4, 4, dtype=torch.int64)), "dtype torch.int64"),
        (dict(block=0), "block=0"),
        (dict(block=2.0), "block=2.0"),
        (dict(top_k=0), "top_k=0"),
        (dict(top_k=True), "top_k=True"),
        (dict(local_blocks=-1), "local_blocks=-1"),
        (dict(scale=float("nan")), "scale=nan"),
        (dict(k=[0.0]), "k must be a torch.Tensor"),
    ],
)
def test_bad_inputs(change, match):
    args = dict(q=torch.zeros(1, 2, 4, 4), k=torch.zeros(1, 1, 8, 4), v=torch.zeros(1, 1, 8, 4), block=3)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        landmark_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("block"), **args)


def test_device_mismatch():
    q, k, v = inputs(1, 1, 1, 2, 2, 2, 2)
    with pytest.raises(ValueError, match="one device"):
        landmark_attention(q, k.to("meta"), v, 1)
