"""neighborhood_aggregate (NATTEN na2d_av semantics) against a per-pixel loop oracle."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import vzoo.kernels as vk

# triton runs on the GPU when there is one, else on the CPU under TRITON_INTERPRET=1 (tests/conftest.py)
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


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


@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_loop_oracle_with_gradients(triton_device, backend, case):
    b, g, h, w, d, k = case
    dev = triton_device if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(0)
    attn = torch.randn(b, g, h, w, k * k, generator=gen)
    value = torch.randn(b, g, h, w, d, generator=gen)
    upstream = torch.randn(b, g, h, w, d, generator=gen, dtype=torch.float64)
    results = []
    for fn, (a, v) in (
        (lambda a, v: vk.neighborhood_aggregate(a, v, k, backend=backend), (attn.to(dev), value.to(dev))),
        (lambda a, v: loop_aggregate(a, v, k), (attn.double(), value.double())),
    ):
        a, v = a.clone().requires_grad_(), v.clone().requires_grad_()
        out = fn(a, v)
        grads = torch.autograd.grad((out.double() * upstream.to(out.device)).sum(), (a, v))
        results.append(tuple(t.detach().cpu() for t in (out, *grads)))
    for name, got, want in zip(("out", "dattn", "dvalue"), *results):
        assert got.shape == want.shape, name
        assert (got.double() - want).abs().max() < 1e-4, name


@needs_triton
def test_triton_backward_is_deterministic(triton_device):
    """dvalue is gathered per value pixel in a fixed order (no atomics): two backwards agree bit for bit.
    W = 37 spans two column tiles of the kernels, so it is also checked against the oracle."""
    b, g, h, w, d, k = 1, 2, 5, 37, 4, 3
    gen = torch.Generator().manual_seed(2)
    attn = torch.randn(b, g, h, w, k * k, generator=gen).to(triton_device).requires_grad_()
    value = torch.randn(b, g, h, w, d, generator=gen).to(triton_device).requires_grad_()
    upstream = torch.randn(b, g, h, w, d, generator=gen).to(triton_device)
    runs = []
    for _ in range(2):
        out = vk.neighborhood_aggregate(attn, value, k, backend="triton")
        runs.append((out, *torch.autograd.grad(out, (attn, value), upstream)))
    for name, first, second in zip(("out", "dattn", "dvalue"), *runs):
        assert torch.equal(first, second), name
    a64, v64 = attn.detach().cpu().double().requires_grad_(), value.detach().cpu().double().requires_grad_()
    want = loop_aggregate(a64, v64, k)
    want = (want, *torch.autograd.grad(want, (a64, v64), upstream.cpu().double()))
    for name, got, ref in zip(("out", "dattn", "dvalue"), runs[0], want):
        assert (got.detach().cpu().double() - ref).abs().max() < 1e-4, name


@needs_triton
def test_triton_half_precision_with_gradients(triton_device):
    k = 5
    gen = torch.Generator().manual_seed(1)
    attn = torch.randn(1, 2, 9, 10, k * k, generator=gen).softmax(-1).half()
    value = torch.randn(1, 2, 9, 10, 8, generator=gen).half()
    upstream = torch.randn(1, 2, 9, 10, 8, generator=gen).half()
    a, v = attn.to(triton_device).requires_grad_(), value.to(triton_device).requires_grad_()
    out = vk.neighborhood_aggregate(a, v, k, backend="triton")
    dattn, dvalue = torch.autograd.grad(out, (a, v), upstream.to(triton_device))
    assert out.dtype == dattn.dtype == dvalue.dtype == torch.float16
    a64, v64 = attn.double().requires_grad_(), value.double().requires_grad_()
    want = loop_aggregate(a64, v64, k)
    want_grads = torch.autograd.grad(want, (a64, v64), upstream.double())
    tols = (5e-3, 2e-2, 5e-3)
    for name, got, ref, tol in zip(("out", "dattn", "dvalue"), (out, dattn, dvalue), (want, *want_grads), tols):
        assert (got.detach().cpu().double() - ref).abs().max() < tol, name


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


def test_rpb_index_matches_overlock_construction():
    """OverLoCK builds the same indices another way: per-axis offsets where the middle tap repeats over
    the interior, plus the tap grid, then the pixel order reversed (its ``apply_rpb``)."""
    for k, h, w in ((5, 7, 9), (7, 7, 12), (13, 14, 20)):
        grid = (torch.arange(k)[:, None] * (2 * k - 1) + torch.arange(k)).view(-1)
        reps_h, reps_w = torch.ones(k, dtype=torch.long), torch.ones(k, dtype=torch.long)
        reps_h[k // 2], reps_w[k // 2] = h - (k - 1), w - (k - 1)
        per_pixel = torch.arange(k).repeat_interleave(reps_h)[:, None] * (2 * k - 1) + torch.arange(k).repeat_interleave(reps_w)
        want = (per_pixel[..., None] + grid).reshape(-1, k * k).flip(0).reshape(h, w, k * k)
        assert torch.equal(vk.neighborhood_rpb_index(k, h, w), want)
