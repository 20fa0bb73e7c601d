"""Lightning Attention (vzoo.kernels.lightning): every implementation against a float64 token loop written
here (forward, final state, gradients of q, k, v, initial_state), fp16, GQA, ragged blocks, state
chaining, decoding steps, causality, slopes by hand, the Triton kernels under the interpreter, backend
selection by ``use_backend``, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import vzoo.kernels as vk
from vzoo.kernels import lightning
from vzoo.kernels.lightning import (
    fla_decay,
    lightning_attention,
    lightning_attention_recurrent,
    lightning_attention_step,
    lightning_slopes,
    transnormer_decay,
)


def loop_reference(q, k, v, rates, h0, scale):
    """float64 ``S_t = lambda S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t`` one token and one head group at a time."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, t, d = q.shape
    g = h // k.shape[1]
    lam = torch.ones(h, dtype=torch.float64) if rates is None else torch.exp(-rates.double())
    state = torch.zeros(b, h, d, v.shape[-1], dtype=torch.float64) if h0 is None else h0.double()
    outs = []
    for i in range(t):
        rows = []
        for head in range(h):
            kv = torch.outer(k[:, head // g, i].flatten(), v[:, head // g, i].flatten()) if b == 1 else \
                torch.einsum("bd,be->bde", k[:, head // g, i], v[:, head // g, i])
            new = lam[head] * state[:, head] + kv.reshape(b, d, -1)
            rows.append(new)
        state = torch.stack(rows, 1)
        outs.append(scale * torch.einsum("bhd,bhde->bhe", q[:, :, i], state))
    return torch.stack(outs, 2), state


def make(b, h, hk, t, d, e, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, h, t, d, generator=g), torch.randn(b, hk, t, d, generator=g)
    v, h0 = torch.randn(b, hk, t, e, generator=g), torch.randn(b, h, d, e, generator=g)
    return [x.to(dtype) for x in (q, k, v)] + [h0]


RATES = {
    None: None,
    "slopes": lambda h: lightning_slopes(h),
    "strong": lambda h: torch.tensor([0.0, 0.3, 4.0, 30.0])[:h],  # 30: lambda^63 underflows, lambda^-63 would overflow
}


def run(impl, q, k, v, rates, h0, scale, chunk):
    if impl == "recurrent":
        return lightning_attention_recurrent(q, k, v, rates, h0, True, scale)
    backend, strategy = {"reference": ("reference", "chunk"), "torch": ("torch", "chunk"),
                         "left": ("torch", "left")}[impl]
    return lightning_attention(q, k, v, rates, h0, True, scale, chunk, strategy, backend)


def forward_and_grads(fn, inputs, w, w2):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out, final = fn(*inputs)
    loss = (out.double() * w).sum() + (final.double() * w2).sum()
    return [out, final, *torch.autograd.grad(loss, inputs)]


@pytest.mark.parametrize("impl", ["reference", "torch", "left", "recurrent"])
@pytest.mark.parametrize("decay", [None, "slopes", "strong"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 37, 8, 6, 8), (1, 2, 2, 64, 16, 16, 16), (1, 4, 1, 13, 4, 5, 64)],
                         ids=["gqa-ragged", "aligned", "mqa-short"])
def test_matches_loop_with_gradients(impl, decay, shape, assert_close):
    b, h, hk, t, d, e, chunk = shape
    q, k, v, h0 = make(b, h, hk, t, d, e)
    rates = None if decay is None else RATES[decay](h)
    g = torch.Generator().manual_seed(1)
    w, w2 = torch.randn(b, h, t, e, generator=g).double(), torch.randn(b, h, d, e, generator=g).double()
    got = forward_and_grads(lambda q, k, v, h0: run(impl, q, k, v, rates, h0, 0.5, chunk), (q, k, v, h0), w, w2)
    want = forward_and_grads(lambda q, k, v, h0: loop_reference(q, k, v, rates, h0, 0.5), (q, k, v, h0), w, w2)
    for name, a, c in zip(("out", "final", "dq", "dk", "dv", "dh0"), want, got):
        assert c.shape == a.shape, name
        assert_close(a, c, 1e-5)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32


@pytest.mark.parametrize("impl", ["torch", "left"])
@pytest.mark.parametrize("decay", [None, "slopes"])
def test_fp16(impl, decay, assert_close):
    q, k, v, h0 = make(1, 4, 2, 45, 16, 16, dtype=torch.float16)
    rates = None if decay is None else RATES[decay](4)
    g = torch.Generator().manual_seed(2)
    w, w2 = torch.randn(1, 4, 45, 16, generator=g).double(), torch.randn(1, 4, 16, 16, generator=g).double()
    got = forward_and_grads(lambda q, k, v, h0: run(impl, q, k, v, rates, h0, 0.25, 16), (q, k, v, h0), w, w2)
    want = forward_and_grads(lambda q, k, v, h0: loop_reference(q, k, v, rates, h0, 0.25), (q, k, v, h0), w, w2)
    assert got[0].dtype == torch.float16 and got[2].dtype == torch.float16 and got[1].dtype == torch.float32
    for a, c in zip(want, got):
        assert_close(a, c, 1e-2)


def test_no_initial_state_and_float_decay(assert_close):
    q, k, v, _ = make(2, 2, 2, 30, 8, 8)
    ref, ref_final = loop_reference(q, k, v, torch.full((2,), 0.2), None, 1.0)
    out, final = lightning_attention(q, k, v, 0.2, output_final_state=True, chunk_size=7)
    assert_close(ref, out, 1e-5)
    assert_close(ref_final, final, 1e-5)
    only = lightning_attention(q, k, v, 0.2, chunk_size=7)  # without output_final_state: just the tensor
    assert torch.equal(only, out)


@pytest.mark.parametrize("decay", [None, "slopes"])
def test_chaining_and_decoding(decay, assert_close):
    """Two halves with the carried state equal one run; prefill then one step per token (the decode path) too."""
    q, k, v, h0 = make(2, 4, 2, 40, 8, 8)
    rates = None if decay is None else RATES[decay](4)
    full, full_state = lightning_attention(q, k, v, rates, h0, True, chunk_size=16)
    a, state = lightning_attention(q[:, :, :23], k[:, :, :23], v[:, :, :23], rates, h0, True, chunk_size=16)
    b, state2 = lightning_attention(q[:, :, 23:], k[:, :, 23:], v[:, :, 23:], rates, state, True, chunk_size=16)
    assert_close(full, torch.cat([a, b], 2), 1e-6)
    assert_close(full_state, state2, 1e-6)
    steps = []
    for i in range(23, 40):
        o, state = lightning_attention_step(q[:, :, i], k[:, :, i], v[:, :, i], state, rates)
        steps.append(o)
    assert_close(full[:, :, 23:], torch.stack(steps, 2), 1e-6)
    assert_close(full_state, state, 1e-6)


@pytest.mark.parametrize("grad", [False, True])
def test_many_segments(monkeypatch, grad, assert_close):
    """The chunk path runs long sequences in segments that carry the state; here one block per segment."""
    from vzoo.kernels.lightning import chunk

    monkeypatch.setattr(chunk, "SEGMENT_ELEMENTS", 1)
    q, k, v, h0 = make(1, 2, 1, 29, 4, 4)
    rates = lightning_slopes(2)
    want, want_final = loop_reference(q, k, v, rates, h0, 1.0)
    with torch.set_grad_enabled(grad):
        q.requires_grad_(grad)
        out, final = lightning_attention(q, k, v, rates, h0, True, chunk_size=4)
    assert_close(want, out, 1e-5)
    assert_close(want_final, final, 1e-5)
    if grad:
        want_dq = torch.autograd.grad(loop_reference(q, k, v, rates, h0, 1.0)[0].sum(), q)[0]
        assert_close(want_dq, torch.autograd.grad(out.sum(), q)[0], 1e-5)


@pytest.mark.parametrize("impl", ["torch", "left", "reference"])
def test_causality(impl):
    q, k, v, _ = make(1, 2, 2, 33, 8, 8)
    rates = lightning_slopes(2)
    base = run(impl, q, k, v, rates, None, 1.0, 8)[0]
    for j in (0, 16, 32):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[:, :, j] += 3.0
        k2[:, :, j] -= 2.0
        v2[:, :, j] *= -4.0
        got = run(impl, q2, k2, v2, rates, None, 1.0, 8)[0]
        assert torch.equal(got[:, :, :j], base[:, :, :j])
        assert not torch.allclose(got[:, :, j], base[:, :, j])


def test_empty_sequence():
    q, k, v, h0 = make(1, 2, 2, 0, 4, 4)
    out, final = lightning_attention(q, k, v, 0.1, h0, True)
    assert out.shape == (1, 2, 0, 4) and torch.equal(final, h0)


def test_slopes_by_hand():
    assert torch.equal(lightning_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    six = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]  # slopes of 4, then every other of 8
    assert torch.allclose(lightning_slopes(6), torch.tensor(six), rtol=1e-7, atol=0)
    assert torch.allclose(lightning_slopes(1), torch.tensor([2.0 ** -8]))
    twelve = lightning_slopes(12)  # 8 of their own, then 4 of the 16-set: 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5
    assert torch.allclose(twelve[8:], torch.tensor([2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]))
    assert torch.allclose(fla_decay(4, 1, 4), torch.tensor([0.0, 1.5, 3.0, 4.5]))
    assert torch.allclose(fla_decay(8, 0, 2), torch.arange(8.0))
    assert torch.allclose(transnormer_decay(8, 0, 5), lightning_slopes(8) * (1 + 1e-5))
    assert torch.allclose(transnormer_decay(8, 4, 5), lightning_slopes(8) * 1e-5)
    assert torch.allclose(transnormer_decay(8, 1, 3), lightning_slopes(8) * (0.5 + 1e-5))
    with pytest.raises(ValueError, match="num_heads=0"):
        lightning_slopes(0)
    with pytest.raises(ValueError, match="layer_idx=4"):
        fla_decay(4, 4, 4)


@pytest.mark.parametrize("case", [
    dict(h=2, hk=2, t=32, d=16, e=16, decay=None, h0=False, chunk=16),
    dict(h=4, hk=2, t=23, d=8, e=20, decay="strong", h0=True, chunk=16),
    dict(h=2, hk=1, t=29, d=16, e=70, decay="slopes", h0=True, chunk=8),  # two value slices, ragged last block
], ids=["plain", "gqa-strong-state", "mqa-slices"])
def test_triton_interpreter(triton_device, case, assert_close):
    b = 1
    q, k, v, h0 = make(b, case["h"], case["hk"], case["t"], case["d"], case["e"])
    rates = None if case["decay"] is None else RATES[case["decay"]](case["h"])
    h0 = h0 if case["h0"] else None
    g = torch.Generator().manual_seed(3)
    w = torch.randn(b, case["h"], case["t"], case["e"], generator=g).double()
    w2 = torch.randn(b, case["h"], case["d"], case["e"], generator=g).double()
    inputs = [x.to(triton_device) for x in (q, k, v)] + ([h0.to(triton_device)] if h0 is not None else [])

    def tri(q, k, v, *h):
        r = None if rates is None else rates.to(triton_device)
        out, final = lightning_attention(q, k, v, r, h[0] if h else None, True, 0.5, case["chunk"], backend="triton")
        return out.cpu(), final.cpu()

    got = forward_and_grads(tri, inputs, w, w2)
    want = forward_and_grads(lambda q, k, v, *h: loop_reference(q, k, v, rates, h[0] if h else None, 0.5),
                             [q, k, v] + ([h0] if h0 is not None else []), w, w2)
    for a, c in zip(want, got):
        assert_close(a, c.cpu(), 1e-5)


def test_use_backend_routes_to_the_implementation(spy, assert_close):
    """``backend=None`` follows ``vzoo.kernels.use_backend``; an explicit backend wins; the block ends cleanly."""
    calls = spy(lightning, "lightning_naive", "lightning_chunk", "lightning_left")
    q, k, v, _ = make(1, 2, 2, 9, 4, 4)
    want = loop_reference(q, k, v, torch.full((2,), 0.2), None, 1.0)[0]
    with vk.use_backend("reference"):
        assert_close(want, vk.lightning_attention(q, k, v, 0.2, chunk_size=4), 1e-6)
        assert_close(want, vk.lightning_attention(q, k, v, 0.2, chunk_size=4, strategy="left"), 1e-6)
        assert_close(want, vk.lightning_attention(q, k, v, 0.2, chunk_size=4, backend="torch"), 1e-6)
    assert_close(want, vk.lightning_attention(q, k, v, 0.2, chunk_size=4, strategy="left"), 1e-6)
    assert calls == ["lightning_naive", "lightning_naive", "lightning_chunk", "lightning_left"]
    with vk.use_backend("flex"), pytest.raises(RuntimeError, match="backend 'flex' does not implement this op"):
        vk.lightning_attention(q, k, v, 0.2)
    with vk.use_backend("triton"), pytest.raises(RuntimeError, match="'triton' does not implement.*reference, torch"):
        vk.lightning_attention(q, k, v, 0.2, strategy="left")  # Lightning-1 tiling: PyTorch only


def test_bad_inputs():
    q, k, v, h0 = make(1, 4, 2, 8, 4, 4)
    cases = [
        (dict(q=q[0]), "q must be 4-D"),
        (dict(k=k[:, :1].expand(1, 3, 8, 4)), "multiple of the key/value heads"),
        (dict(v=v[:, :, :5]), "same length T"),
        (dict(k=k[..., :3]), "same non-zero head dim"),
        (dict(q=q.double()), "share a dtype"),
        (dict(q=q.int(), k=k.int(), v=v.int()), "dtype torch.int32"),
        (dict(decay=torch.ones(3)), r"floating tensor \(4,\)"),
        (dict(decay=-0.5), "decay=-0.5"),
        (dict(decay=torch.tensor([0.1, -1.0, 0.0, 0.0])), "finite and >= 0"),
        (dict(decay=float("nan")), "decay=nan"),
        (dict(initial_state=h0[:, :2]), r"initial_state must be a floating tensor \(1, 4, 4, 4\)"),
        (dict(chunk_size=0), "chunk_size=0"),
        (dict(scale=math.inf), "scale=inf"),
        (dict(strategy="right"), "strategy='right'"),
        (dict(backend="cuda"), "unknown backend 'cuda'"),
        (dict(backend="naive"), "unknown backend 'naive'; choose one of reference, torch"),  # fla's name: not vzoo's
        (dict(backend="triton", strategy="left"), "implements 'chunk' only"),
        (dict(output_final_state=1), "output_final_state=1"),
    ]
    for override, word in cases:
        kwargs = dict(q=q, k=k, v=v) | override
        with pytest.raises(ValueError, match=word):
            lightning_attention(**kwargs)
    with pytest.raises(RuntimeError, match="backend 'flex' does not implement this op"):
        lightning_attention(q, k, v, backend="flex")
    with pytest.raises(ValueError, match=r"q must be 3-D \[B, H, D\]"):
        lightning_attention_step(q, k, v)
    with pytest.raises(ValueError, match="initial_state must be"):
        lightning_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], torch.zeros(1, 4, 4, 5))
