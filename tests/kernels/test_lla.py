"""Local Linear Attention: both backends and the decoding step against a per-query float64 loop of the
closed form (and against softmax attention and a least-squares fit in the two limits), gradients, GQA,
decode alignment, causality, padding, backend selection by ``use_backend``, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import vzoo.kernels as vk
from vzoo.kernels import lla
from vzoo.kernels.lla import local_linear_attention, local_linear_attention_step, lla_weights

T, D = 32, 4


def loop_lla(q, k, v, ridge, scale=None, causal=True, block=None, key_mask=None):
    """Float64 LLA, one query at a time (differentiable). Returns (out [B, H, Tq, Dv], S [B, H, Tq, Tk]).
    With ``block``, each diagonal sub-block of Sigma is solved on its own."""
    q, k, v = q.double(), k.double(), v.double()
    b_, h_, tq, d = q.shape
    tk = k.shape[2]
    g = h_ // k.shape[1]
    s = 1 / math.sqrt(d) if scale is None else scale
    block = d if block is None else block
    outs, weights = [], []
    for b in range(b_):
        for h in range(h_):
            kk, vv = k[b, h // g], v[b, h // g]
            for i in range(tq):
                js = [j for j in range(tk) if (not causal or j <= i + tk - tq) and (key_mask is None or key_mask[b, j])]
                row = torch.zeros(tk, dtype=torch.float64)
                if not js:
                    outs.append(torch.zeros(vv.shape[-1], dtype=torch.float64))
                    weights.append(row)
                    continue
                x = kk[js] - q[b, h, i]  # [n, D]
                logit = s * (kk[js] @ q[b, h, i])
                w = torch.exp(logit - logit.max().detach())
                omega = w.sum()
                mu = (w[:, None] * x).sum(0)
                rho = []
                for a in range(0, d, block):
                    xb = x[:, a:a + block]
                    sig = (w[:, None, None] * xb[:, :, None] * xb[:, None, :]).sum(0)
                    sig = sig + ridge * omega * torch.eye(block, dtype=torch.float64)
                    rho.append(torch.linalg.solve(sig, mu[a:a + block]))
                rho = torch.cat(rho)
                delta = omega - mu @ rho
                delta = delta + 1e-12 * (1.0 if delta >= 0 else -1.0)
                sij = w * (1 - x @ rho) / delta
                outs.append(sij @ vv[js])
                weights.append(row.index_put((torch.tensor(js),), sij))
    return torch.stack(outs).view(b_, h_, tq, -1), torch.stack(weights).view(b_, h_, tq, tk)


def softmax_attention(q, k, v):
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    tq, tk = q.shape[2], k.shape[2]
    s = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    keep = torch.tensor([[j <= i + tk - tq for j in range(tk)] for i in range(tq)])
    return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def qkv(b=1, h=2, hkv=2, tq=T, tk=T, d=D, dv=None, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, tq, d, generator=gen, dtype=dtype), torch.randn(b, hkv, tk, d, generator=gen, dtype=dtype),
            torch.randn(b, hkv, tk, dv or d, generator=gen, dtype=dtype))


BACKENDS = ["reference", "torch"]
EXACT = dict(cg_tol=1e-13, chunk_size=7)  # torch: tight CG, tiles that do not divide T


def run(backend, q, k, v, **kw):
    return local_linear_attention(q, k, v, backend=backend, **({**EXACT, **kw} if backend == "torch" else kw))


@pytest.mark.parametrize("ridge", [1e-6, 0.1, 10.0])
def test_weights_match_loop_and_rows_sum_to_one(ridge):
    q, k, _ = qkv()
    got = lla_weights(q, k, ridge=ridge)
    _, want = loop_lla(q, k, k, ridge)
    assert (got - want).abs().max() < 1e-6 * want.abs().max()
    first = D + 1 if ridge < 1e-3 else 0  # at tiny ridge the first rows are ill-conditioned (delta ~ eps)
    assert (got.sum(-1)[..., first:] - 1).abs().max() < 1e-8  # affine: rows sum to one
    assert (got.triu(1) == 0).all()  # causal
    assert (got < 0).any() or ridge > 1  # weights may be negative (not clamped)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ridge", [1e-3, 1.0, 10.0])
@pytest.mark.parametrize("block", [None, 2])
def test_matches_loop(backend, ridge, block):
    q, k, v = qkv(dv=3)
    want, _ = loop_lla(q, k, v, ridge, block=block)
    got = run(backend, q, k, v, ridge=ridge, block_size=block)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-8 * want.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_ridge_is_softmax_attention(backend):
    q, k, v = qkv()
    got = run(backend, q, k, v, ridge=1e8)
    assert (got - softmax_attention(q, k, v)).abs().max() < 1e-6
    assert (run(backend, q, k, v, ridge=1.0) - softmax_attention(q, k, v)).abs().max() > 1e-2  # the test can fail


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_on_locally_linear_data(backend):
    q, k, _ = qkv()
    gen = torch.Generator().manual_seed(1)
    a, c = torch.randn(3, D, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)
    v = k @ a.T + c  # v_j = A k_j + c
    got = run(backend, q, k, v, ridge=1e-9)
    want = q @ a.T + c
    assert (got[:, :, 2 * D:] - want[:, :, 2 * D:]).abs().max() < 1e-5
    assert (run(backend, q, k, v, ridge=1.0)[:, :, 2 * D:] - want[:, :, 2 * D:]).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_scale_is_ridge_regression_on_the_prefix(backend):
    q, k, v = qkv(dv=3)
    ridge = 0.3
    got = run(backend, q, k, v, ridge=ridge, scale=0.0)
    want = torch.zeros_like(got)
    for h in range(q.shape[1]):
        for i in range(T):
            x = k[0, h, : i + 1] - q[0, h, i]
            # min_b,W sum_j |v_j - b - W x_j|^2 + ridge (i+1) |W|^2 as one least-squares problem
            f64 = dict(dtype=torch.float64)
            penalty = math.sqrt(ridge * (i + 1)) * torch.eye(D, **f64)
            data = torch.cat([torch.ones(i + 1, 1, **f64), x], 1)
            design = torch.cat([data, torch.cat([torch.zeros(D, 1, **f64), penalty], 1)])
            target = torch.cat([v[0, h, : i + 1], torch.zeros(D, 3, dtype=torch.float64)])
            want[0, h, i] = torch.linalg.lstsq(design, target).solution[0]
    assert (got - want).abs().max() < 1e-8


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_low_precision_chunk(dtype, tol, assert_close):
    q, k, v = qkv(b=2, h=4, hkv=2, tk=48, tq=40, seed=3)
    want, _ = loop_lla(q, k, v, 10.0)
    got = local_linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), ridge=10.0, chunk_size=16)
    assert got.dtype == dtype
    assert_close(want, got, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_gradients(backend, causal):
    q, k, v = qkv(b=1, h=2, hkv=1, tq=12, tk=16, dv=3, seed=4)
    km = torch.ones(1, 16, dtype=torch.bool)
    km[0, 3] = False
    gw = torch.randn(1, 2, 12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def grads(fn):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad((fn(*ins) * gw).sum(), ins)

    want = grads(lambda q, k, v: loop_lla(q, k, v, 0.5, causal=causal, key_mask=km)[0])
    got = grads(lambda q, k, v: run(backend, q, k, v, ridge=0.5, causal=causal, key_mask=km))
    for name, a, b in zip("qkv", got, want):
        assert (a - b).abs().max() < 1e-6 * b.abs().max(), name


def test_gqa_and_decode_alignment():
    q, k, v = qkv(b=2, h=6, hkv=2, tq=5, tk=T, seed=6)
    want, _ = loop_lla(q, k, v, 2.0)
    for backend in BACKENDS:
        got = run(backend, q, k, v, ridge=2.0)
        assert (got - want).abs().max() < 1e-8, backend


def test_step_is_last_row():
    q, k, v = qkv(b=2, h=4, hkv=2, seed=7)
    full = local_linear_attention(q, k, v, ridge=1.0, cg_tol=1e-12)
    for t in (1, 9, T):
        step = local_linear_attention_step(q[:, :, t - 1], k[:, :, :t], v[:, :, :t], ridge=1.0, cg_tol=1e-12, chunk_size=4)
        assert step.shape == (2, 4, D)
        assert (step - full[:, :, t - 1]).abs().max() < 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_causality(backend):
    q, k, v = qkv(seed=8)
    base = run(backend, q, k, v, ridge=1.0)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 20:] += 3.0
    v2[:, :, 20:] -= 2.0
    out = run(backend, q, k2, v2, ridge=1.0)
    assert (out[:, :, :20] - base[:, :, :20]).abs().max() < 1e-12
    assert (out[:, :, 20:] - base[:, :, 20:]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_mask_is_exact_and_empty_rows_are_zero(backend):
    q, k, v = qkv(b=2, seed=9)
    km = torch.ones(2, T, dtype=torch.bool)
    km[1, :6] = False  # left padding
    want, _ = loop_lla(q, k, v, 10.0, key_mask=km)
    got = run(backend, q, k, v, ridge=10.0, key_mask=km)
    assert (got - want).abs().max() < 1e-8
    assert (got[1, :, :6] == 0).all()
    k2 = k.clone()
    k2[1, :, :6] = float("nan")  # a hidden key may hold anything
    assert torch.isfinite(run(backend, q, k2, v, ridge=10.0, key_mask=km)).all()


def test_fewer_cg_iterations_change_the_result():
    q, k, v = qkv(seed=10)
    exact = local_linear_attention(q, k, v, ridge=0.01, cg_tol=1e-13)
    rough = local_linear_attention(q, k, v, ridge=0.01, cg_max_iters=1)
    assert (exact - rough).abs().max() > 1e-3
    jacobi = local_linear_attention(q, k, v, ridge=0.01, cg_tol=1e-13, cg_max_iters=64, precondition=True)
    assert (jacobi - exact).abs().max() < 1e-8


def test_use_backend_routes_to_the_implementation(spy):
    calls = spy(lla, "lla_naive", "lla_chunk")
    q, k, v = qkv()
    with vk.use_backend("reference"):
        vk.local_linear_attention(q, k, v)
        vk.local_linear_attention(q, k, v, backend="torch")  # an explicit backend wins
    vk.local_linear_attention(q, k, v)
    assert calls == ["lla_naive", "lla_chunk", "lla_chunk"]
    with vk.use_backend("triton"), pytest.raises(RuntimeError, match="'triton' does not implement this op"):
        vk.local_linear_attention(q, k, v)


def test_bad_inputs():
    q, k, v = qkv()
    cases = [
        (dict(q=q[0]), "q must be 4-D"),
        (dict(k=k.float()), "share a dtype"),
        (dict(q=q.int()), "dtype torch.int32"),
        (dict(k=k[:, :, :4], v=v[:, :, :4]), "need Tq <= Tk"),
        (dict(q=torch.randn(1, 3, T, D, dtype=torch.float64)), "multiple of key/value heads"),
        (dict(v=v[:, :, :5]), "must agree"),
        (dict(ridge=-1.0), "ridge=-1.0"),
        (dict(scale=float("nan")), "scale=nan"),
        (dict(block_size=3), "block_size=3 must divide"),
        (dict(chunk_size=0), "chunk_size=0"),
        (dict(cg_max_iters=-1), "cg_max_iters=-1"),
        (dict(causal="yes"), "causal='yes'"),
        (dict(backend="flash"), "unknown backend 'flash'"),
        (dict(backend="naive"), "unknown backend 'naive'; choose one of reference, torch"),
        (dict(key_mask=torch.ones(1, 5, dtype=torch.bool)), "key_mask must be a bool tensor"),
    ]
    for kw, msg in cases:
        args = dict(q=q, k=k, v=v)
        args.update({n: kw.pop(n) for n in ("q", "k", "v") if n in kw})
        with pytest.raises(ValueError, match=msg):
            local_linear_attention(args["q"], args["k"], args["v"], **kw)
    with pytest.raises(RuntimeError, match=r"'triton' does not implement this op \(available: reference, torch\)"):
        local_linear_attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="3-D"):
        local_linear_attention_step(q, k, v)
    with pytest.raises(ValueError, match="cache is empty"):
        local_linear_attention_step(q[:, :, 0], k[:, :, :0], v[:, :, :0])
