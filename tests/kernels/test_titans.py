"""Titans neural memory: every backend against a float64 token loop written here (autograd gradients of the
MLP loss), forward and gradients, fp32 and fp16; the delta rule, alpha = 1, memorisation, causality,
prefill + decode == one pass, backend selection by ``use_backend``, bad input; the soft clamp of the per-token
gradients (``max_grad_norm``): against the loop, the bound it puts on a token's update, zero gradients, and the
divergence it prevents."""

from __future__ import annotations

import pytest
import torch

import vzoo.kernels as vk
from vzoo.kernels import titans
from vzoo.kernels.titans import MemoryState, neural_memory, neural_memory_step

BACKENDS = ("reference", "torch", "recurrent")


def mlp(ws, x, residual):
    h = x
    for i, w in enumerate(ws):
        h = torch.einsum("boi,bi->bo", w, h)
        if i < len(ws) - 1:
            h = torch.nn.functional.gelu(h)
    return h + x if residual else h


def loop(q, k, v, lr, eta, alpha, ws, b, residual=False, clamp=None):
    """float64; token t reads the weights of its mini-batch's start; each gradient is taken there (and, with
    ``clamp = c``, rescaled to the norm ``c tanh(|g| / c)``, ``|g|`` the Frobenius norm of one row's matrix)."""
    q, k, v, lr, eta, alpha = (t.double() for t in (q, k, v, lr, eta, alpha))
    ws = [w.double() if w.requires_grad else w.double().requires_grad_() for w in ws]  # autograd.grad needs a graph
    start, mom = list(ws), [torch.zeros_like(w) for w in ws]
    ys = []
    for t in range(q.shape[1]):
        if t % b == 0:
            start = list(ws)
        ys.append(mlp(start, q[:, t], residual))
        loss = (mlp(start, k[:, t], residual) - v[:, t]).pow(2).sum()
        grads = torch.autograd.grad(loss, start, create_graph=True)
        for i, g in enumerate(grads):
            if clamp is not None:
                norm = g.pow(2).sum((1, 2)).sqrt()[:, None, None]
                g = g * (clamp * torch.tanh(norm / clamp) / norm)
            mom[i] = eta[:, t, None, None] * mom[i] - lr[:, t, None, None] * g
            ws[i] = (1 - alpha[:, t, None, None]) * ws[i] + mom[i]
    return torch.stack(ys, 1), ws, mom


def inputs(bsz=2, t=11, d=6, hidden=(8,), dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    dv = dv or d
    q, k = torch.randn(2, bsz, t, d, generator=g).unbind(0)
    v = torch.randn(bsz, t, dv, generator=g)
    lr = 0.05 * torch.rand(bsz, t, generator=g)
    eta, alpha = torch.rand(bsz, t, generator=g), 0.2 * torch.rand(bsz, t, generator=g)
    dims = (d, *hidden, dv)
    ws = tuple(torch.randn(bsz, o, i, generator=g) / i**0.5 for i, o in zip(dims[:-1], dims[1:]))
    return [q, k, v, lr, eta, alpha], ws


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_rule(backend):
    """Linear memory, eta = alpha = 0, batch_size 1: W <- W - 2 theta (W k - v) k^T, token after token."""
    (q, k, v, lr, _, _), (w,) = inputs(t=5, hidden=())
    zero = torch.zeros_like(lr)
    y, state = neural_memory(q, k, v, lr, zero, zero, (w,), output_final_state=True, backend=backend)
    want = w.clone()
    for t in range(5):
        assert torch.allclose(y[:, t], torch.einsum("boi,bi->bo", want, q[:, t]), atol=1e-5)
        err = torch.einsum("boi,bi->bo", want, k[:, t]) - v[:, t]
        want = want - 2 * lr[:, t, None, None] * err[:, :, None] * k[:, t, None, :]
    assert (state.weights[0] - want).abs().max() < 1e-5
    assert state.offset == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b", [1, 4])
@pytest.mark.parametrize("hidden,residual", [((), False), ((8,), False), ((8,), True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("clamp", [None, 5.0])
def test_matches_loop_with_gradients(backend, b, hidden, residual, dtype, clamp, assert_close):
    """Also with ``clamp`` (per-token gradient norms here are ~1 to 80: mildly clamped on some, saturated on others)."""
    xs, ws = inputs(hidden=hidden, seed=b)
    weight = torch.randn(2, 11, 6, generator=torch.Generator().manual_seed(9))
    leaves = [t.to(dtype).requires_grad_() for t in (*xs, *ws)]
    y, state = neural_memory(*leaves[:6], tuple(leaves[6:]), batch_size=b, residual=residual, output_final_state=True,
                             max_grad_norm=clamp, backend=backend)
    assert y.dtype == dtype and all(w.dtype == torch.float32 for w in state.weights)
    loss = (y.float() * weight).sum() + sum((w * w).sum() for w in state.weights + state.momentum)
    got = torch.autograd.grad(loss, leaves)

    ref = [t.detach().double().requires_grad_() for t in (*xs, *ws)]
    y_ref, w_ref, m_ref = loop(*ref[:6], ref[6:], b, residual, clamp)
    loss_ref = (y_ref * weight.double()).sum() + sum((w * w).sum() for w in w_ref + m_ref)
    want = torch.autograd.grad(loss_ref, ref)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    assert_close(y_ref, y, tol)
    for out, ref in zip(state.weights + state.momentum, w_ref + m_ref):
        assert_close(ref, out, tol)
    for out, ref in zip(got, want):
        assert_close(ref, out, tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clamp_bounds_each_update(backend):
    """eta = alpha = 0, batch_size 1: token t moves each weight matrix by exactly u_t, and the clamp keeps
    ||u_t|| = theta_t c tanh(||g_t|| / c) < theta_t c even for gradients 1e4 times larger; unclamped they are not."""
    (q, k, v, lr, _, _), ws = inputs(t=6)
    v = 1e4 * v
    zero = torch.zeros_like(lr)
    clamp = 0.5
    prev = ws
    for t in range(6):
        _, state = neural_memory(q[:, : t + 1], k[:, : t + 1], v[:, : t + 1], lr[:, : t + 1], zero[:, : t + 1],
                                 zero[:, : t + 1], ws, max_grad_norm=clamp, output_final_state=True, backend=backend)
        _, free = neural_memory(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], lr[:, t : t + 1], zero[:, :1],
                                zero[:, :1], prev, output_final_state=True, backend=backend)
        for w, p, f in zip(state.weights, prev, free.weights):
            step = (w - p).flatten(1).norm(dim=1)
            assert (step <= lr[:, t] * clamp * (1 + 1e-5)).all() and (step >= lr[:, t] * clamp * 0.99).all()
            assert ((f - p).flatten(1).norm(dim=1) > 100 * lr[:, t] * clamp).all()
        prev = state.weights


@pytest.mark.parametrize("backend", BACKENDS)
def test_clamp_of_a_zero_gradient(backend):
    """A token the memory already stores exactly (gradient 0) changes nothing, and every gradient stays finite."""
    (q, k, _, lr, eta, alpha), (w,) = inputs(t=5, hidden=())
    leaves = [t.clone().requires_grad_() for t in (q, k, lr, eta, alpha, w)]
    q_, k_, lr_, eta_, alpha_, w_ = leaves
    v = torch.einsum("boi,bti->bto", w_, k_).detach()  # M(k) = v: zero surprise
    y, state = neural_memory(q_, k_, v, lr_, eta_, torch.zeros_like(alpha_), (w_,), max_grad_norm=1.0,
                             output_final_state=True, backend=backend)
    assert torch.allclose(state.weights[0], w, atol=1e-6)
    grads = torch.autograd.grad(y.sum() + state.weights[0].sum(), [q_, k_, lr_, w_])
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clamp_prevents_divergence(backend):
    """The MQAR failure in small: a 2-layer memory, theta 0.1, eta 0.9, 16-token mini-batches, values of norm ~17.
    The paper's rule overflows float32 within four mini-batches (each sums 16 gradients taken at one point, and
    the MLP's gradient grows like the cube of its weights); clamped, the weights move by at most
    sum_t sum_{s <= t} eta^(t-s) theta c."""
    g = torch.Generator().manual_seed(0)
    bsz, t, d = 2, 64, 8
    k = torch.nn.functional.normalize(torch.randn(bsz, t, d, generator=g), dim=-1)
    v = 6 * torch.randn(bsz, t, d, generator=g)
    lr, eta, alpha = torch.full((bsz, t), 0.1), torch.full((bsz, t), 0.9), torch.zeros(bsz, t)
    ws = tuple(torch.randn(bsz, o, i, generator=g) / i**0.5 for i, o in ((d, 2 * d), (2 * d, d)))
    y, free = neural_memory(k, k, v, lr, eta, alpha, ws, batch_size=16, output_final_state=True, backend=backend)
    assert not all(torch.isfinite(w).all() for w in free.weights) and y[:, 48:].abs().amax() > 1e20
    clamp = 1.0
    y, state = neural_memory(k, k, v, lr, eta, alpha, ws, batch_size=16, max_grad_norm=clamp, output_final_state=True,
                             backend=backend)
    assert torch.isfinite(y).all()
    bound = sum(sum(0.9 ** (j - s) * 0.1 * clamp for s in range(j + 1)) for j in range(t))
    for w, w0 in zip(state.weights, ws):
        assert ((w - w0).flatten(1).norm(dim=1) <= bound).all()


def test_alpha_one_forgets(assert_close):
    """alpha = 1 => M_t = S_t: the weights after a token are its momentum (random eta, batch_size 4)."""
    (q, k, v, lr, eta, _), ws = inputs(t=10)
    _, state = neural_memory(q, k, v, lr, eta, torch.ones_like(lr), ws, batch_size=4, output_final_state=True)
    for w, s in zip(state.weights, state.momentum):
        assert torch.equal(w, s)
    _, ref_w, ref_m = loop(q, k, v, lr, eta, torch.ones_like(lr), ws, 4)
    for out, ref in zip(state.weights, ref_w):
        assert_close(ref, out, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_memorises_one_pair(backend):
    """Writing one (k, v) again and again with a small theta drives ||M(k) - v|| down at every step."""
    (_, k, v, _, _, _), ws = inputs(bsz=1, t=1)
    t = 40
    k, v = k.expand(1, t, -1), v.expand(1, t, -1)
    lr, eta = torch.full((1, t), 0.02), torch.full((1, t), 0.3)
    y, _ = neural_memory(k, k, v, lr, eta, torch.zeros(1, t), ws, backend=backend)
    err = (y - v).norm(dim=-1)[0]
    assert (err[1:] < err[:-1]).all()
    assert err[-1] < 0.5 * err[0]


@pytest.mark.parametrize("b", [1, 4])
def test_causal(b):
    """Changing token j leaves every output before j's next mini-batch untouched and changes later ones."""
    xs, ws = inputs(t=12)
    y, _ = neural_memory(*xs, ws, batch_size=b)
    for j in (0, 5, 9):
        moved = [x.clone() for x in xs]
        for i, x in enumerate(moved[1:]):  # k, v and the gates of token j
            x[:, j] = x[:, j] + 0.5 if i < 2 else x[:, j] * 0.5
        y2, _ = neural_memory(*moved, ws, batch_size=b)
        first = (j // b + 1) * b
        assert torch.equal(y[:, :first], y2[:, :first])
        if first < 12:
            assert (y[:, first:] - y2[:, first:]).abs().amax() > 1e-4


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("split", [0, 1, 5, 7])
def test_prefill_then_steps(b, split):
    """A prefill of ``split`` tokens, then one token at a time (step and 1-token calls), equals one pass."""
    xs, ws = inputs(t=10)
    y, final = neural_memory(*xs, ws, batch_size=b, output_final_state=True)
    y0, state = neural_memory(*(x[:, :split] for x in xs), ws, batch_size=b, output_final_state=True)
    ys, other = [y0], state
    for t in range(split, 10):
        yt, state = neural_memory_step(*(x[:, t] for x in xs), state, b, "gelu", False)
        yo, other = neural_memory(*(x[:, t : t + 1] for x in xs), other, batch_size=b, output_final_state=True)
        assert torch.allclose(yo[:, 0], yt, atol=1e-5)
        ys.append(yt[:, None])
    assert torch.allclose(torch.cat(ys, 1), y, atol=1e-5)
    assert state.offset == final.offset == 10 % b
    for a, c in zip(state.weights + state.read + state.momentum, final.weights + final.read + final.momentum):
        assert torch.allclose(a, c, atol=1e-5)


def test_use_backend_routes_to_the_implementation(spy):
    """``backend=None`` follows ``vzoo.kernels.use_backend``; explicit ``"torch"`` / ``"recurrent"`` win."""
    calls = spy(titans, "neural_memory_naive", "neural_memory_chunk", "neural_memory_recurrent")
    xs, ws = inputs(t=4)
    with vk.use_backend("reference"):
        vk.neural_memory(*xs, ws)
        vk.neural_memory(*xs, ws, backend="torch")
        vk.neural_memory(*xs, ws, backend="recurrent")
    vk.neural_memory(*xs, ws)
    assert calls == ["neural_memory_naive", "neural_memory_chunk", "neural_memory_recurrent", "neural_memory_chunk"]
    with vk.use_backend("triton"), pytest.raises(RuntimeError, match="'triton' does not implement this op"):
        vk.neural_memory(*xs, ws)


def test_bad_inputs():
    xs, ws = inputs(t=4)
    q, k, v, lr, eta, alpha = xs
    for args, kwargs, word in (
        ((q[0], k, v, lr, eta, alpha, ws), {}, "q must be"),
        ((q, k, v[:, :3], lr, eta, alpha, ws), {}, "v "),
        ((q, k, v, lr[:, :3], eta, alpha, ws), {}, "lr must be"),
        ((q, k, v, lr, eta, alpha, ws), dict(batch_size=0), "batch_size"),
        ((q, k, v, lr, eta, alpha, ws), dict(activation="relu"), "activation"),
        ((q, k, v, lr, eta, alpha, ws), dict(max_grad_norm=0.0), "max_grad_norm"),
        ((q, k, v, lr, eta, alpha, ws), dict(max_grad_norm=float("nan")), "max_grad_norm"),
        ((q, k, v, lr, eta, alpha, ws), dict(backend="chunk"), "unknown backend 'chunk'; choose one of reference"),
        ((q, k, v, lr, eta, alpha, ws[:1]), {}, "gives 8 features"),
        ((q, k, v, lr, eta, alpha, (ws[0][:1], ws[1])), {}, r"weights\[0\]"),
        ((q, k, v, lr, eta, alpha, MemoryState(ws, ws, ws, 3)), dict(batch_size=2), "offset"),
    ):
        with pytest.raises(ValueError, match=word):
            neural_memory(*args, **kwargs)
    with pytest.raises(RuntimeError, match=r"'triton' does not implement this op \(available: reference, torch\)"):
        neural_memory(q, k, v, lr, eta, alpha, ws, backend="triton")
