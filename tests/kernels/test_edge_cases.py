"""Kernel edge cases (issue 12 item 10): empty problems, garbage in keys and values a query cannot see,
gradient accuracy of the torch backend's strategies, flex availability and bad arguments.

The float64 oracle of ``conftest.py`` is the ground truth throughout."""

from __future__ import annotations


import pytest
import torch

import vzoo.kernels as vk
import vzoo.kernels.flex_backend as flex_backend
import vzoo.kernels.torch_backend as torch_backend
from vzoo.kernels import BlockSparseLayout

BACKENDS = ["reference", "torch", "triton"]


def _dev(backend, triton_device):
    return triton_device if backend == "triton" else "cpu"


def _err(got, want) -> float:
    """Largest absolute difference (NaN when ``got`` holds NaN where ``want`` does not)."""
    return float((got.detach().cpu().double() - want.double()).abs().max())


def _leaves(*xs, dev="cpu"):
    return [x.detach().clone().to(dev).requires_grad_() for x in xs]


# --------------------------------------------------------------------------------------------------
# Empty problems: zeros, lse = -inf, and outputs connected to the graph (zero gradients)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("routing", ["k0", "all_minus_one", "zero_counts"])
def test_token_routed_with_nothing_routed(triton_device, backend, causal, return_lse, routing):
    dev = _dev(backend, triton_device)
    q, k, v = _leaves(*(torch.randn(1, 2, 40, 8) for _ in range(3)), dev=dev)
    idx = torch.full((1, 2, 40, 0 if routing == "k0" else 2), -1, dtype=torch.int32, device=dev)
    cnt = None
    if routing == "zero_counts":
        idx, cnt = idx + 1, torch.zeros(1, 2, 40, dtype=torch.int32, device=dev)
    res = vk.token_routed_attention(q, k, v, idx, cnt, block_n=16, causal=causal, return_lse=return_lse, backend=backend)
    out, lse = res if return_lse else (res, None)
    assert torch.equal(out.cpu(), torch.zeros(1, 2, 40, 8))
    if lse is not None:
        assert bool(torch.isneginf(lse).all())
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.equal(g.cpu(), torch.zeros_like(g.cpu())) for g in grads)


def test_token_routed_nothing_routed_at_512_causal_tokens():
    q, k, v = (torch.randn(1, 2, 512, 16) for _ in range(3))
    idx = torch.full((1, 2, 512, 2), -1, dtype=torch.int32)
    out = vk.token_routed_attention(q, k, v, idx, block_n=64, causal=True, backend="torch")
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sq,skv", [(32, 0), (0, 32)])
def test_empty_sequences_give_connected_zeros(triton_device, backend, sq, skv):
    dev = _dev(backend, triton_device)
    q, k, v = _leaves(torch.randn(1, 2, sq, 8), torch.randn(1, 2, skv, 8), torch.randn(1, 2, skv, 8), dev=dev)
    layout = BlockSparseLayout.from_block_mask(
        torch.ones(1, 1, -(-sq // 16), -(-skv // 16), dtype=torch.bool, device=dev), 16, 16, sq, skv
    )
    out, lse = vk.block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
    assert out.shape == (1, 2, sq, 8) and bool((out == 0).all()) and bool(torch.isneginf(lse).all())
    routed = vk.token_routed_attention(q, k, v, torch.full((1, 2, sq, 1), -1, device=dev), block_n=16, backend=backend)
    assert routed.shape == (1, 2, sq, 8) and bool((routed == 0).all())
    grads = torch.autograd.grad(out.sum() + routed.sum(), (q, k, v))
    assert [tuple(g.shape) for g in grads] == [(1, 2, sq, 8), (1, 2, skv, 8), (1, 2, skv, 8)]
    assert all(bool((g == 0).all()) for g in grads)


# --------------------------------------------------------------------------------------------------
# Garbage (NaN / Inf) in keys and values a query does not see
# --------------------------------------------------------------------------------------------------
def _strategies(backend):
    return ["gather", "dense"] if backend == "torch" else [None]


def _grads(out, lse, xs):
    w = torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64, device=out.device)
    loss = (out.double() * w).sum() + torch.where(torch.isinf(lse), 0.0, lse.double()).sum()
    return torch.autograd.grad(loss, xs)


def _garbage_problem(seed=0):
    """q, k, v and a layout whose key block 2 (keys 32..47) no query selects; query block 1 selects nothing."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(1, 4, 64, 8, generator=g), torch.randn(1, 2, 64, 8, generator=g), torch.randn(1, 2, 64, 8, generator=g)
    mask = torch.rand(1, 2, 4, 4, generator=g) < 0.7
    mask[..., 2] = False
    mask[:, :, 1] = False
    mask[:, :, 3, 3] = True
    return q, k, v, BlockSparseLayout.from_block_mask(mask, 16, 16, 64, 64)


def _poison(x, rows, value):
    x = x.clone()
    x[:, :, rows, ::2] = value
    return x


def _strategy(monkeypatch, strategy):
    if strategy is not None:
        monkeypatch.setattr(torch_backend, "_dense_is_faster", lambda *a: strategy == "dense")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hidden_by", ["unselected_block", "key_mask"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("return_lse", [False, True])
def test_hidden_garbage_never_reaches_outputs_or_gradients(oracle, triton_device, monkeypatch, backend, hidden_by, causal, return_lse):
    q, k, v, layout = _garbage_problem()
    rows = [34, 40] if hidden_by == "unselected_block" else [3, 20, 51]
    key_mask = torch.ones(1, 64, dtype=torch.bool)
    if hidden_by == "key_mask":
        key_mask[:, rows] = False
    allowed = oracle.layout_mask(layout, causal=causal) & key_mask[:, None, None, :]
    want_out, want_lse = oracle.attention(q.double(), k.double(), v.double(), allowed)
    kd, vd, qd = _leaves(k.double(), v.double(), q.double())
    want_grads = _grads(*oracle.attention(qd, kd, vd, allowed), (qd, kd, vd))
    dev = _dev(backend, triton_device)
    kg, vg = _poison(k, rows, float("nan")), _poison(v, rows, float("inf"))
    kg[:, :, rows[0], 1] = float("-inf")
    vg[:, :, rows[-1], 1] = float("nan")
    for strategy in _strategies(backend):
        _strategy(monkeypatch, strategy)
        for grad in (False, True):
            qq, kk, vv = _leaves(q, kg, vg, dev=dev)
            with torch.set_grad_enabled(grad):
                res = vk.block_sparse_attention(
                    qq, kk, vv, layout.to(dev), causal=causal, return_lse=True if grad else return_lse,
                    backend=backend, key_mask=key_mask.to(dev) if hidden_by == "key_mask" else None,
                )
            out, lse = res if isinstance(res, tuple) else (res, None)
            assert _err(out, want_out) < 1e-4, (strategy, grad)
            if lse is not None:
                fin = ~torch.isinf(want_lse)
                assert torch.equal(torch.isinf(lse.cpu()), ~fin)
                assert _err(lse.cpu()[fin], want_lse[fin]) < 1e-4
            if grad:
                got = _grads(out, lse, (qq, kk, vv))
                for name, w, x in zip("qkv", want_grads, got):
                    assert _err(x, w) < 1e-4, (strategy, name)
                    if name != "q":
                        assert bool((x[:, :, rows] == 0).all()), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["k", "v"])
def test_causally_hidden_garbage_reaches_only_rows_that_see_it(oracle, triton_device, monkeypatch, backend, which):
    """Query i sees key 40 iff i >= 40: earlier rows match the clean oracle, later ones are NaN (as SDPA)."""
    q, k, v, _ = _garbage_problem(1)
    layout = BlockSparseLayout.from_block_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), 16, 16, 64, 64)
    want, _ = oracle.attention(q, k, v, oracle.layout_mask(layout, causal=True))
    k, v = (_poison(k, [40], float("nan")), v) if which == "k" else (k, _poison(v, [40], float("nan")))
    dev = _dev(backend, triton_device)
    for strategy in _strategies(backend):
        _strategy(monkeypatch, strategy)
        out, lse = vk.block_sparse_attention(*(t.to(dev) for t in (q, k, v)), layout.to(dev), causal=True,
                                             return_lse=True, backend=backend)
        out, lse = out.cpu(), lse.cpu()
        assert _err(out[:, :, :40], want[:, :, :40]) < 1e-4, strategy
        assert bool(out[:, :, 40:].isnan().all(-1).all()) and bool(lse[:, :, 40:].isnan().all()), strategy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_token_routed_ignores_keys_a_token_did_not_choose(oracle, triton_device, backend, causal):
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 2, 48, 8, generator=g), torch.randn(1, 2, 48, 8, generator=g), torch.randn(1, 2, 48, 8, generator=g)
    idx = torch.randint(0, 2, (1, 2, 48, 2), generator=g, dtype=torch.int32)  # blocks 0 and 1 only
    allowed = torch.zeros(1, 2, 48, 48, dtype=torch.bool)
    for h in range(2):
        for i in range(48):
            for j in idx[0, h, i].tolist():
                allowed[0, h, i, j * 16 : (j + 1) * 16] = True
    if causal:
        allowed &= torch.ones(48, 48, dtype=torch.bool).tril()
    key_mask = torch.ones(1, 48, dtype=torch.bool)
    key_mask[:, [5, 20]] = False  # padding inside the chosen blocks
    want, want_lse = oracle.attention(q, k, v, allowed & key_mask[:, None, None, :])
    dev = _dev(backend, triton_device)
    kg, vg = _poison(k, [5, 20, 33, 47], float("nan")), _poison(v, [5, 20, 33, 47], float("nan"))
    out, lse = vk.token_routed_attention(*(t.to(dev) for t in (q, kg, vg)), idx.to(dev), block_n=16, causal=causal,
                                         return_lse=True, backend=backend, tile=16, key_mask=key_mask.to(dev))
    assert _err(out, want) < 1e-4
    fin = ~torch.isinf(want_lse)
    assert _err(lse.cpu()[fin], want_lse[fin]) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_sink_window_ignores_keys_outside_the_window(oracle, triton_device, backend):
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 2, 24, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g)
    want, _ = oracle.attention(q, k, v, oracle.window(24, 40, True, 6, 2)[None, None])
    kg, vg = _poison(k, [5, 39], float("nan")), _poison(v, [5, 39], float("nan"))  # key 39: only the last query sees it
    dev = _dev(backend, triton_device)
    out = vk.sink_window_attention(*(t.to(dev) for t in (q, kg, vg)), 6, 2, backend=backend, chunk=8, block=16).cpu()
    assert _err(out[:, :, :-1], want[:, :, :-1]) < 1e-4
    assert bool(out[:, :, -1].isnan().all())


# --------------------------------------------------------------------------------------------------
# Gradient accuracy: training never takes the dense-SDPA path (its CPU backward is inaccurate)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q_scale,tol", [(1.0, 1e-5), (1.6e4, 3e-7)])
def test_torch_backend_gradients_stay_exact_where_dense_would_be_faster(oracle, q_scale, tol):
    """BiFormer-like problem (4-token blocks, 16 of 49 selected) where the cost model prefers dense SDPA.
    At |logit| ~ 8e4 PyTorch's CPU SDPA backward gives dV 80x less accurate (2e-6) than the gathered path."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 196, 16, generator=g), torch.randn(1, 2, 196, 16, generator=g), torch.randn(1, 2, 196, 16, generator=g)
    q = q * q_scale
    ids = torch.rand(1, 2, 49, 49, generator=g).topk(16, -1).indices
    layout = BlockSparseLayout.from_topk(ids, 4, 4, 196, 196)
    assert torch_backend._dense_is_faster(q, k, layout)
    xs = _leaves(q.double(), k.double(), v.double())
    want = _grads(oracle.attention(*xs, oracle.layout_mask(layout))[0], torch.zeros(1, 2, 196), xs)
    ys = _leaves(q, k, v)
    got = _grads(vk.block_sparse_attention(*ys, layout, backend="torch"), torch.zeros(1, 2, 196), ys)
    names = "qkv" if q_scale == 1.0 else "v"  # near one-hot softmax: fp32 dq, dk carry the logits' rounding
    for name, w, x in zip("qkv", want, got):
        if name in names:
            assert oracle.rel_rms(w, x) < tol, name


# --------------------------------------------------------------------------------------------------
# Flex: backend_status and the call agree
# --------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager flex is the point here
def test_flex_runs_without_grad_mode_on_leaves_that_require_grad(oracle, monkeypatch):
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(flex_backend, "_compiled", lambda: flex_attention)  # eager: no 15 s compile
    q, k, v, _ = _garbage_problem()
    q, k, v = _leaves(q, k, v)
    layout = BlockSparseLayout.from_block_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), 16, 16, 64, 64)  # eager flex reads only mask_mod
    with torch.no_grad():
        assert vk.backend_status("cpu", needs_grad=torch.is_grad_enabled())["flex"] is None
        out = vk.block_sparse_attention(q, k, v, layout, causal=True, backend="flex")
    want, _ = oracle.attention(q.detach(), k.detach(), v.detach(), oracle.layout_mask(layout, causal=True))
    assert _err(out, want) < 1e-4
    with pytest.raises(RuntimeError, match="no backward pass on CPU"):
        vk.block_sparse_attention(q, k, v, layout, backend="flex")


# --------------------------------------------------------------------------------------------------
# Bad arguments: a ValueError naming the argument
# --------------------------------------------------------------------------------------------------
def _bad_cases():
    q, k, v = (torch.randn(1, 2, 32, 8) for _ in range(3))
    lay = BlockSparseLayout.from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), 16, 16, 32, 32)
    idx = torch.zeros(1, 2, 32, 1, dtype=torch.int32)
    topk = torch.zeros(1, 1, 2, 1, dtype=torch.int64)
    nan_q = q.clone()
    nan_q[0, 1, 3, 2] = float("nan")
    inf_q = q.clone()
    inf_q[0, 0, 0, 0] = float("inf")
    bs, tr, bmax = vk.block_sparse_attention, vk.token_routed_attention, vk.attention_block_max
    return {
        "head_dim_0": (r"head dim|D=0", lambda: bs(q[..., :0], k[..., :0], v[..., :0], lay)),
        "from_topk_block_m_0": ("block_m", lambda: BlockSparseLayout.from_topk(topk, 0, 16, 32, 32)),
        "from_block_mask_block_n_0": ("block_n", lambda: BlockSparseLayout.from_block_mask(lay.to_block_mask(), 16, 0, 32, 32)),
        "from_topk_bool_size": ("block_m", lambda: BlockSparseLayout.from_topk(topk, True, 16, 32, 32)),
        "from_block_mask_bool_len": ("q_len", lambda: BlockSparseLayout.from_block_mask(lay.to_block_mask()[..., :1, :], 16, 16, True, 32)),
        "block_max_causal_more_queries": ("Sq", lambda: bmax(torch.randn(1, 2, 40, 8), k, 16)),
        "block_max_no_keys": ("Skv", lambda: bmax(q, k[:, :, :0], 16)),
        "block_max_no_queries": ("Sq", lambda: bmax(q[:, :, :0], k, 16)),
        "meta_layout": ("meta", lambda: lay.to("meta")),
        "routed_bool_idx": ("block_idx", lambda: tr(q, k, v, idx.bool(), block_n=16)),
        "routed_uint8_idx": ("block_idx", lambda: tr(q, k, v, idx.to(torch.uint8), block_n=16)),
        "topk_bool_idx": ("indices", lambda: BlockSparseLayout.from_topk(topk.bool(), 16, 16, 32, 32)),
        "topk_uint8_idx": ("indices", lambda: BlockSparseLayout.from_topk(topk.to(torch.uint8), 16, 16, 32, 32)),
        "topk_minus_two": ("indices", lambda: BlockSparseLayout.from_topk(topk - 2, 16, 16, 32, 32)),
        "topk_float_counts": ("counts", lambda: BlockSparseLayout.from_topk(topk, 16, 16, 32, 32, counts=torch.full((1, 1, 2), 1.5))),
        "routed_float_counts": ("block_cnt", lambda: tr(q, k, v, idx, torch.full((1, 2, 32), 1.5), block_n=16)),
        "routed_float_count": ("block_cnt", lambda: tr(q, k, v, idx, 1.5, block_n=16)),
        "routed_bool_count": ("block_cnt", lambda: tr(q, k, v, idx, True, block_n=16)),
        "routed_bool_block_n": ("block_n", lambda: tr(q, k, v, idx, block_n=True)),
        "routed_bool_tile": ("tile", lambda: tr(q, k, v, idx, block_n=16, tile=True)),
        "causal_string": ("causal", lambda: bs(q, k, v, lay, causal="no")),
        "routed_causal_string": ("causal", lambda: tr(q, k, v, idx, block_n=16, causal="no")),
        "block_max_causal_string": ("causal", lambda: bmax(q, k, 16, causal="no")),
        "return_lse_string": ("return_lse", lambda: bs(q, k, v, lay, return_lse="no")),
        "routed_return_lse_int": ("return_lse", lambda: tr(q, k, v, idx, block_n=16, return_lse=1)),
        "static_bool_size": ("block_m", lambda: BlockSparseLayout.static(32, 32, True, 16)),
        "scale_nan": ("scale", lambda: bs(q, k, v, lay, scale=float("nan"))),
        "scale_inf": ("scale", lambda: tr(q, k, v, idx, block_n=16, scale=float("inf"))),
        "window_scale_nan": ("scale", lambda: vk.sink_window_attention(q, k, v, 4, scale=float("nan"))),
        "block_max_scale_nan": ("scale", lambda: bmax(q, k, 16, scale=float("nan"))),
        "nan_query": ("q", lambda: bs(nan_q, k, v, lay)),
        "inf_query_routed": ("q", lambda: tr(inf_q, k, v, idx, block_n=16)),
        "nan_query_window": ("q", lambda: vk.sink_window_attention(nan_q, k, v, 4)),
        "nan_query_block_max": ("q", lambda: bmax(nan_q, k, 16)),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_arguments_raise_value_error_naming_them(case):
    match, call = case
    with pytest.raises(ValueError, match=match):
        call()
