"""rat_attention / rat_step: every path against a float64 token loop written here, forward and gradients,
fp32 and half, ragged lengths, chunk_size >= T (pure gated RNN), causality, prefill state + steps, backend
selection by ``use_backend``, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import vzoo.kernels as vk
from vzoo.kernels import rat
from vzoo.kernels.rat import RATState, rat_attention, rat_rope, rat_step


def rotate(x: torch.Tensor, c: int, base: float | None) -> torch.Tensor:
    """RoPE of ``x [D]`` at position ``c``: pair ``(i, i + D/2)`` turns by ``c * base ** (-2i / D)``."""
    if base is None:
        return x
    half = x.shape[-1] // 2
    ang = torch.tensor([c * base ** (-2 * i / x.shape[-1]) for i in range(half)], dtype=torch.float64)
    x1, x2 = x[:half], x[half:]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()])


def oracle(q, k, v, gate, L, scale=None, base=None):
    """float64 RAT, one head and one token at a time: the running [v; k] state restarts at each chunk start;
    query t of chunk c takes a softmax over the rotated final key states of chunks < c and its own rotated
    key state. Differentiable in its inputs."""
    q, k, v, gate = (t.double() for t in (q, k, v, gate))
    b_, h_, t_, d = q.shape
    dv = v.shape[-1]
    g_v = gate[..., :dv]
    g_k = gate[..., dv:] if gate.shape[-1] == dv + d else gate
    scale = d ** -0.5 if scale is None else scale
    rows = []
    for b in range(b_):
        heads = []
        for h in range(h_):
            grp = h // (h_ // k.shape[1])
            finals_k, finals_v, outs = [], [], []
            for t in range(t_):
                c = t // L
                if t % L == 0:
                    hk, hv = torch.zeros(d, dtype=torch.float64), torch.zeros(dv, dtype=torch.float64)
                hk = g_k[b, h, t] * hk + (1 - g_k[b, h, t]) * k[b, grp, t]
                hv = g_v[b, h, t] * hv + (1 - g_v[b, h, t]) * v[b, h, t]
                keys = finals_k + [rotate(hk, c, base)]
                vals = finals_v + [hv]
                qr = rotate(q[b, h, t], c, base)
                w = torch.softmax(torch.stack([scale * (qr * kk).sum() for kk in keys]), 0)
                outs.append(sum(wi * vi for wi, vi in zip(w, vals)))
                if t % L == L - 1:
                    finals_k.append(rotate(hk, c, base))
                    finals_v.append(hv)
            heads.append(torch.stack(outs))
        rows.append(torch.stack(heads))
    return torch.stack(rows)


def inputs(b=2, h=4, g=2, t=37, d=8, dv=None, gate_width=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(b, h, t, d, generator=gen)
    k = torch.randn(b, g, t, d, generator=gen)
    v = torch.randn(b, h, t, dv, generator=gen)
    gate = torch.sigmoid(torch.randn(b, h, t, gate_width or dv, generator=gen) + 1.0)
    return [x.to(dtype) for x in (q, k, v, gate)]


def stepwise(q, k, v, gate, L, state=None, **kw):
    outs = []
    for i in range(q.shape[2]):
        one = (x[:, :, i : i + 1] for x in (q, k, v, gate))
        o, state = rat_step(*one, state, L, **kw)
        outs.append(o)
    return torch.cat(outs, 2), state


PATHS = {
    "torch": lambda q, k, v, gate, L, **kw: rat_attention(q, k, v, gate, L, backend="torch", **kw),
    "reference": lambda q, k, v, gate, L, **kw: rat_attention(q, k, v, gate, L, backend="reference", **kw),
    "step": lambda q, k, v, gate, L, **kw: stepwise(q, k, v, gate, L, **kw)[0],
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("L,t,base", [(4, 37, 10000.0), (5, 23, 10.0), (1, 9, 10000.0), (16, 40, None), (3, 3, 100.0)])
def test_forward_and_gradients_fp32(path, L, t, base):
    q, k, v, gate = inputs(t=t)
    w = torch.randn(2, 4, t, 8, generator=torch.Generator().manual_seed(1))

    def run(fn, *xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        out = fn(*xs)
        grads = torch.autograd.grad((out * w.to(out)).sum(), xs, allow_unused=True)  # q is unused when T <= L
        return [out.detach().double(), *(torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads))]

    got = run(lambda *xs: PATHS[path](*xs, L, rope=base), q, k, v, gate)
    want = run(lambda *xs: oracle(*xs, L, base=base), q.double(), k.double(), v.double(), gate.double())
    for name, a, b in zip(("out", "dq", "dk", "dv", "dgate"), got, want):
        assert (a.double() - b.double()).abs().max() < 2e-5, (name, (a - b).abs().max())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 2e-2)])
def test_half_precision(path, dtype, tol, assert_close):
    q, k, v, gate = inputs(t=29, d=16, dtype=dtype)
    out = PATHS[path](q, k, v, gate, 4, rope=10000.0)
    assert out.dtype == dtype
    want = oracle(q, k, v, gate, 4, base=10000.0)
    assert_close(want, out, tol)


@pytest.mark.parametrize("path", PATHS)
def test_separate_gates_and_value_width(path):
    """gate [.., Dv + D] holds the value then the key gates; Dv may differ from D; G = 1 and a custom scale."""
    q, k, v, gate = inputs(h=3, g=1, t=14, d=6, dv=4, gate_width=10)
    got = PATHS[path](q, k, v, gate, 4, rope=10000.0, scale=0.3)
    want = oracle(q, k, v, gate, 4, scale=0.3, base=10000.0)
    assert (got.double() - want).abs().max() < 1e-5


@pytest.mark.parametrize("path", PATHS)
def test_chunk_covering_everything_is_the_gated_rnn(path):
    """chunk_size >= T: no earlier chunk, one key, weight 1: the output is the value state, whatever q and k are."""
    q, k, v, gate = inputs(t=12)
    out = PATHS[path](q, k, v, gate, 12, rope=10000.0)
    state = torch.zeros(2, 4, 8, dtype=torch.float64)
    want = []
    for t in range(12):
        state = gate[:, :, t].double() * state + (1 - gate[:, :, t].double()) * v[:, :, t].double()
        want.append(state)
    assert (out.double() - torch.stack(want, 2)).abs().max() < 1e-6
    other = PATHS[path](torch.randn_like(q), torch.randn_like(k), v, gate, 64, rope=10000.0)
    assert (other - out).abs().max() < 1e-6


def test_rope_forms_agree():
    q, k, v, gate = inputs(t=21)
    tables = rat_rope(6, 8, base=500.0)
    by_tables = rat_attention(q, k, v, gate, 4, rope=tables)
    by_base = rat_attention(q, k, v, gate, 4, rope=500.0)

    def turn(x, pos):
        cos, sin = tables[0][pos], tables[1][pos]
        return x * cos + torch.cat([-x[..., 4:], x[..., :4]], -1) * sin

    by_callable = rat_attention(q, k, v, gate, 4, rope=turn)
    want = oracle(q, k, v, gate, 4, base=500.0)
    for got in (by_tables, by_base, by_callable):
        assert (got.double() - want).abs().max() < 1e-5
    assert (rat_attention(q, k, v, gate, 4) - by_base).abs().max() > 1e-3  # the rotation matters


@pytest.mark.parametrize("path", ["torch", "reference"])
@pytest.mark.parametrize("s", [0, 5, 8, 30])
def test_causal(path, s):
    q, k, v, gate = inputs(t=33)
    out = PATHS[path](q, k, v, gate, 4, rope=10000.0)
    bumped = [x.clone() for x in (q, k, v, gate)]
    for x in bumped[:3]:
        x[:, :, s:] += torch.randn_like(x[:, :, s:])
    bumped[3][:, :, s:] = torch.rand_like(bumped[3][:, :, s:])
    out2 = PATHS[path](*bumped, 4, rope=10000.0)
    if s:
        assert (out2[:, :, :s] - out[:, :, :s]).abs().max() < 1e-6
    assert (out2[:, :, s:] - out[:, :, s:]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("cut", [1, 6, 8, 13, 31])
def test_prefill_state_then_steps_and_second_prefill(backend, cut):
    L = 4
    q, k, v, gate = inputs(t=32, d=8)
    full = rat_attention(q, k, v, gate, L, rope=10000.0, backend="torch")
    want = oracle(q, k, v, gate, L, base=10000.0)
    assert (full.double() - want).abs().max() < 1e-5
    head, st = rat_attention(*(x[:, :, :cut] for x in (q, k, v, gate)), L, rope=10000.0, return_state=True,
                             backend=backend)
    assert st.length == cut and st.keys.shape[2] >= cut // L
    tail, st2 = stepwise(*(x[:, :, cut:] for x in (q, k, v, gate)), L, state=st, rope=10000.0)
    assert (torch.cat([head, tail], 2) - full).abs().max() < 1e-5
    assert st2.length == 32
    rest, st3 = rat_attention(*(x[:, :, cut:] for x in (q, k, v, gate)), L, rope=10000.0, state=st, return_state=True,
                              backend=backend)
    assert (torch.cat([head, rest], 2) - full).abs().max() < 1e-5
    n = 32 // L
    for a, b in ((st2.keys[:, :, :n], st3.keys[:, :, :n]), (st2.values[:, :, :n], st3.values[:, :, :n]),
                 (st2.key_run, st3.key_run), (st2.value_run, st3.value_run)):
        assert (a - b).abs().max() < 1e-5


def test_many_steps_grow_the_cache():
    """Chunk size 1 and 2 closes a chunk every token or two: the cache grows past its first capacity."""
    q, k, v, gate = inputs(b=1, h=2, g=1, t=40, d=4)
    for L in (1, 2):
        got, st = stepwise(q, k, v, gate, L, rope=10000.0)
        want = oracle(q, k, v, gate, L, base=10000.0)
        assert (got.double() - want).abs().max() < 1e-5
        assert st.length == 40 and st.keys.shape[2] >= 40 // L


def test_prefill_state_owns_compact_buffers():
    """The state a prefill returns holds only its rows (not views into the whole [T, Dv + D] scan, which would
    stay alive and make every decoding step read strided rows)."""
    q, v, gate = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8), torch.rand(1, 2, 64, 8)
    _, state = rat_attention(q, torch.randn(1, 1, 64, 8), v, gate, chunk_size=16, return_state=True)
    for t in state[:4]:
        assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_step_gradients_through_the_state():
    q, k, v, gate = inputs(b=1, h=2, g=1, t=11, d=4)
    xs = [x.clone().requires_grad_() for x in (q, k, v, gate)]
    out = stepwise(*xs, 3, rope=10000.0)[0]
    grads = torch.autograd.grad(out.pow(2).sum(), xs)
    ys = [x.double().clone().requires_grad_() for x in (q, k, v, gate)]
    want = torch.autograd.grad(oracle(*ys, 3, base=10000.0).pow(2).sum(), ys)
    for a, b in zip(grads, want):
        assert (a.double() - b).abs().max() < 1e-5


def test_empty_sequence():
    q, k, v, gate = inputs(t=0)
    out, st = rat_attention(q, k, v, gate, 4, return_state=True)
    assert out.shape == (2, 4, 0, 8) and st.length == 0


def test_use_backend_routes_to_the_implementation(spy):
    calls = spy(rat, "rat_naive", "rat_chunk")
    q, k, v, gate = inputs(t=8)
    with vk.use_backend("reference"):
        vk.rat_attention(q, k, v, gate, 4)
        vk.rat_attention(q, k, v, gate, 4, backend="torch")  # an explicit backend wins
    vk.rat_attention(q, k, v, gate, 4)
    assert calls == ["rat_naive", "rat_chunk", "rat_chunk"]
    with vk.use_backend("triton"), pytest.raises(RuntimeError, match="'triton' does not implement this op"):
        vk.rat_attention(q, k, v, gate, 4)


def test_bad_inputs():
    q, k, v, gate = inputs(t=8)
    cases = [
        (dict(q=q[0]), "q must be 4-D"),
        (dict(k=torch.randn(2, 3, 8, 8)), "k has shape"),
        (dict(v=torch.randn(2, 4, 7, 8)), "v has shape"),
        (dict(gate=torch.rand(2, 4, 8, 5)), "gate has shape"),
        (dict(k=k.double()), "share a dtype"),
        (dict(q=q.long()), "dtype"),
    ]
    for change, word in cases:
        args = dict(q=q, k=k, v=v, gate=gate) | change
        with pytest.raises(ValueError, match=word):
            rat_attention(args["q"], args["k"], args["v"], args["gate"], 4)
    with pytest.raises(ValueError, match="chunk_size"):
        rat_attention(q, k, v, gate, 0)
    with pytest.raises(RuntimeError, match=r"'triton' does not implement this op \(available: reference, torch\)"):
        rat_attention(q, k, v, gate, 4, backend="triton")
    with pytest.raises(ValueError, match="unknown backend 'naive'; choose one of reference, torch"):
        rat_attention(q, k, v, gate, 4, backend="naive")
    with pytest.raises(ValueError, match="scale"):
        rat_attention(q, k, v, gate, 4, scale=float("nan"))
    with pytest.raises(ValueError, match="rope cos has shape"):
        rat_attention(q, k, v, gate, 4, rope=rat_rope(1, 8))
    with pytest.raises(ValueError, match="rope base"):
        rat_attention(q, k, v, gate, 4, rope=-1.0)
    with pytest.raises(ValueError, match="T=1"):
        rat_step(q, k, v, gate, None, 4)
    _, st = rat_attention(q, k, v, gate, 4, return_state=True)
    with pytest.raises(ValueError, match="state.keys"):
        rat_step(*(x[:, :, :1] for x in (q, k, v, gate)), st._replace(length=40), 4)
    with pytest.raises(ValueError, match="state.key_run"):
        rat_attention(q, k, v, gate, 4, state=st._replace(key_run=st.key_run[:1]))
    with pytest.raises(ValueError, match="RATState"):
        rat_attention(q, k, v, gate, 4, state=tuple(st))
    assert isinstance(st, RATState) and math.isfinite(float(st.keys.sum()))
