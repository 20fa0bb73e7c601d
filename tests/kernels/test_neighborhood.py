"""neighborhood_aggregate (NATTEN na2d_av semantics) against a per-pixel loop oracle."""

from __future__ import annotations

import pytest
import torch

import vzoo.kernels as vk


def loop_aggregate(attn, value, k):
    """float64, one pixel at a time: its k x k window, clamped inside the image (NATTEN), row-major taps."""
    b, g, h, w, d = value.shape
    nh = k // 2
    rows = []
    for i in range(h):
        si = min(max(i - nh, 0), h - k)
        cols = []
        for j in range(w):
            sj = min(max(j - nh, 0), w - k)
            window = value[:, :, si : si + k, sj : sj + k].reshape(b, g, k * k, d).double()
            cols.append((attn[:, :, i, j, :, None].double() * window).sum(2))
        rows.append(torch.stack(cols, 2))
    return torch.stack(rows, 2)


# (B, G, H, W, D, k): borders dominate the small maps; k = H is a single window per column
CASES = {"k3": (1, 2, 6, 7, 4, 3), "k5_odd": (2, 3, 7, 9, 3, 5), "k7": (1, 2, 9, 8, 4, 7), "k13_tight": (1, 1, 13, 15, 2, 13), "k17": (1, 1, 17, 18, 2, 17)}


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_loop_oracle_with_gradients(backend, case):
    b, g, h, w, d, k = case
    gen = torch.Generator().manual_seed(0)
    attn = torch.randn(b, g, h, w, k * k, generator=gen)
    value = torch.randn(b, g, h, w, d, generator=gen)
    upstream = torch.randn(b, g, h, w, d, generator=gen, dtype=torch.float64)
    results = []
    for fn, (a, v) in (
        (lambda a, v: vk.neighborhood_aggregate(a, v, k, backend=backend), (attn, value)),
        (lambda a, v: loop_aggregate(a, v, k), (attn.double(), value.double())),
    ):
        a, v = a.clone().requires_grad_(), v.clone().requires_grad_()
        out = fn(a, v)
        results.append((out, *torch.autograd.grad((out.double() * upstream).sum(), (a, v))))
    for name, got, want in zip(("out", "dattn", "dvalue"), *results):
        assert got.shape == want.shape, name
        assert (got.double() - want).abs().max() < 1e-4, name


def test_half_precision():
    gen = torch.Generator().manual_seed(1)
    attn = torch.randn(1, 2, 9, 10, 25, generator=gen).softmax(-1)
    value = torch.randn(1, 2, 9, 10, 8, generator=gen)
    want = loop_aggregate(attn, value, 5)
    got = vk.neighborhood_aggregate(attn.half(), value.half(), 5)
    assert got.dtype == torch.float16
    assert (got.double() - want).abs().max() < 5e-3


def test_rpb_index_is_border_aware():
    k, h, w = 5, 6, 8
    idx = vk.neighborhood_rpb_index(k, h, w)
    assert idx.shape == (h, w, k * k) and int(idx.min()) >= 0 and int(idx.max()) < (2 * k - 1) ** 2
    for i in range(h):
        si = min(max(i - k // 2, 0), h - k)
        for j in range(w):
            sj = min(max(j - k // 2, 0), w - k)
            want = [((si + a) - i + k - 1) * (2 * k - 1) + ((sj + c) - j + k - 1) for a in range(k) for c in range(k)]
            assert idx[i, j].tolist() == want
    # interior pixels all see the same relative offsets
    assert torch.equal(idx[2, 3], idx[3, 4])


def test_bad_inputs():
    attn, value = torch.randn(1, 2, 8, 8, 25), torch.randn(1, 2, 8, 8, 4)
    with pytest.raises(ValueError, match="odd"):
        vk.neighborhood_aggregate(attn, value, 4)
    with pytest.raises(ValueError, match="must be"):
        vk.neighborhood_aggregate(attn[..., :9], value, 5)
    with pytest.raises(ValueError, match="smaller than kernel_size=7"):
        vk.neighborhood_aggregate(torch.randn(1, 2, 5, 8, 49), torch.randn(1, 2, 5, 8, 4), 7)
    with pytest.raises(ValueError, match=r"\[B, G, H, W, D\]"):
        vk.neighborhood_aggregate(attn[0], value[0], 5)
    with pytest.raises(RuntimeError, match="does not implement"):
        vk.neighborhood_aggregate(attn, value, 5, backend="flex")
