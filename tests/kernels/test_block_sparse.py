"""block_sparse_attention: every CPU backend against the independent oracle (forward, lse, gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vzoo.kernels as vk
from vzoo.kernels import BlockSparseLayout

# (B, Hq, Hkv, Sq, Skv, D, block_m, block_n, layout heads, density)
CASES = {
    "square": (1, 2, 2, 64, 64, 16, 16, 16, 2, 0.5),
    "ragged": (2, 2, 2, 100, 77, 16, 16, 32, 2, 0.5),
    "gqa_shared": (2, 4, 2, 96, 96, 16, 32, 16, 2, 0.4),
    "gqa_per_head": (1, 4, 2, 70, 90, 8, 16, 16, 4, 0.4),
    "one_layout_head": (2, 4, 1, 50, 130, 16, 32, 16, 1, 0.3),
    "sparse_empty_rows": (1, 2, 2, 80, 80, 16, 16, 16, 2, 0.1),
}


def make_problem(case, dtype=torch.float32, seed=0):
    b, hq, hkv, sq, skv, d, bm, bn, hl, p = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, skv, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, skv, d, generator=g).to(dtype)
    mask = torch.rand(b, hl, -(-sq // bm), -(-skv // bn), generator=g) < p
    return q, k, v, BlockSparseLayout.from_block_mask(mask, bm, bn, sq, skv)


def loss_of(out, lse):
    """A loss that weights every output element differently and also pulls on the lse."""
    w = torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64, device=out.device)
    return (out.double() * w).sum() + torch.where(torch.isinf(lse), 0.0, lse.double()).sum()


def run_with_grads(fn, q, k, v):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    grads = torch.autograd.grad(loss_of(out, lse), (q, k, v))
    return (out, lse, *grads)


def oracle_run(oracle, q, k, v, layout, causal, token_mask=None):
    allowed = oracle.mask(
        layout.kv_num_blocks, layout.kv_indices, layout.block_m, layout.block_n,
        layout.q_len, layout.kv_len, causal, token_mask,
    )
    return run_with_grads(lambda q, k, v: oracle.attention(q, k, v, allowed), q.double(), k.double(), v.double())


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_oracle_fp32(oracle, triton_device, backend, causal, case):
    q, k, v, layout = make_problem(case)
    dev = triton_device if backend == "triton" else "cpu"
    got = run_with_grads(
        lambda q, k, v: vk.block_sparse_attention(q, k, v, layout.to(dev), causal=causal, return_lse=True, backend=backend),
        q.to(dev), k.to(dev), v.to(dev),
    )
    got = [t.detach().cpu() for t in got]
    want = oracle_run(oracle, q, k, v, layout, causal)
    for name, w, g in zip(("out", "lse", "dq", "dk", "dv"), want, got):
        assert g.shape == w.shape, name
        assert torch.equal(torch.isinf(g), torch.isinf(w)), name
        fin = ~torch.isinf(w)
        assert torch.isfinite(g[fin]).all(), name
        assert (g[fin].double() - w[fin]).abs().max() < 1e-4, name


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case,window,sink", [("ragged", 20, 0), ("gqa_shared", 33, 5), ("sparse_empty_rows", 7, 16)])
def test_window_and_sink_match_oracle(oracle, triton_device, backend, causal, case, window, sink):
    q, k, v, layout = make_problem(CASES[case])
    dev = triton_device if backend == "triton" else "cpu"
    got = run_with_grads(
        lambda q, k, v: vk.block_sparse_attention(
            q, k, v, layout.to(dev), causal=causal, return_lse=True, backend=backend, window=window, sink=sink
        ),
        q.to(dev), k.to(dev), v.to(dev),
    )
    allowed = oracle.mask(layout.kv_num_blocks, layout.kv_indices, layout.block_m, layout.block_n,
                          layout.q_len, layout.kv_len, False)
    allowed = allowed & oracle.window(layout.q_len, layout.kv_len, causal, window, sink)
    want = run_with_grads(lambda q, k, v: oracle.attention(q, k, v, allowed), q.double(), k.double(), v.double())
    for name, w, g in zip(("out", "lse", "dq", "dk", "dv"), want, [t.detach().cpu() for t in got]):
        assert torch.equal(torch.isinf(g), torch.isinf(w)), name
        fin = ~torch.isinf(w)
        assert (g[fin].double() - w[fin]).abs().max() < 1e-4, name


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", ["ragged", "gqa_shared", "one_layout_head"])
def test_key_mask_matches_oracle(oracle, triton_device, monkeypatch, backend, causal, case):
    import vzoo.kernels.torch_backend as tb

    monkeypatch.setattr(tb, "_dense_is_faster", lambda *a: False)  # the gather path (the dense one has its own test)
    q, k, v, layout = make_problem(CASES[case])
    g = torch.Generator().manual_seed(5)
    keep = torch.rand(k.shape[0], k.shape[2], generator=g) > 0.4
    keep[:, :20] = False  # left padding: early causal rows see no key at all
    dev = triton_device if backend == "triton" else "cpu"
    got = run_with_grads(
        lambda q, k, v: vk.block_sparse_attention(
            q, k, v, layout.to(dev), causal=causal, return_lse=True, backend=backend, key_mask=keep.to(dev)
        ),
        q.to(dev), k.to(dev), v.to(dev),
    )
    allowed = oracle.mask(layout.kv_num_blocks, layout.kv_indices, layout.block_m, layout.block_n,
                          layout.q_len, layout.kv_len, causal) & keep[:, None, None, :]
    want = run_with_grads(lambda q, k, v: oracle.attention(q, k, v, allowed), q.double(), k.double(), v.double())
    for name, w, g in zip(("out", "lse", "dq", "dk", "dv"), want, [t.detach().cpu() for t in got]):
        assert torch.equal(torch.isinf(g), torch.isinf(w)), name
        fin = ~torch.isinf(w)
        assert torch.isfinite(g).all() or name == "lse", name
        assert (g[fin].double() - w[fin]).abs().max() < 1e-4, name
    gather = vk.block_sparse_attention(q, k, v, layout, causal=causal, key_mask=keep, backend="torch")
    monkeypatch.undo()
    monkeypatch.setattr(tb, "_dense_is_faster", lambda *a: True)
    torch.testing.assert_close(vk.block_sparse_attention(q, k, v, layout, causal=causal, key_mask=keep, backend="torch"), gather)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_backend_half_precision(oracle, dtype):
    q, k, v, layout = make_problem(CASES["gqa_shared"], dtype)
    got = run_with_grads(
        lambda q, k, v: vk.block_sparse_attention(q, k, v, layout, causal=True, return_lse=True, backend="torch"),
        q, k, v,
    )
    want = oracle_run(oracle, q, k, v, layout, True)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    tol = {torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    for name, w, g in zip(("out", "lse", "dq", "dk", "dv"), want, got):
        fin = ~torch.isinf(w)
        assert oracle.rel_rms(w[fin], g[fin]) < tol * (1 if name in ("out", "lse") else 2), name


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("causal", [False, True])
def test_all_blocks_selected_equals_sdpa(backend, causal):
    b, h, s, d, blk = 2, 3, 96, 32, 32
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    layout = BlockSparseLayout.from_block_mask(torch.ones(1, 1, 3, 3, dtype=torch.bool), blk, blk, s, s)
    got = vk.block_sparse_attention(q, k, v, layout, causal=causal, backend=backend)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_empty_rows_give_zeros_and_minus_inf(backend):
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    mask[0, 0, 1, 2] = True  # only query block 1 sees anything
    layout = BlockSparseLayout.from_block_mask(mask, 16, 16, 40, 40)
    out, lse = vk.block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
    assert torch.all(out[:, :, :16] == 0) and torch.all(out[:, :, 32:] == 0)
    assert torch.all(torch.isneginf(lse[:, :, :16])) and torch.all(torch.isneginf(lse[:, :, 32:]))
    assert torch.isfinite(lse[:, :, 16:32]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.all(q.grad[:, :, :16] == 0)


def test_causal_with_more_queries_than_keys_empties_early_rows():
    q = torch.randn(1, 1, 48, 16)
    k, v = torch.randn(1, 1, 32, 16), torch.randn(1, 1, 32, 16)
    layout = BlockSparseLayout.from_block_mask(torch.ones(1, 1, 3, 2, dtype=torch.bool), 16, 16, 48, 32)
    out, lse = vk.block_sparse_attention(q, k, v, layout, causal=True, return_lse=True, backend="torch")
    # bottom-right alignment: query i sees keys j <= i - 16, so the first 16 queries see nothing
    assert torch.all(torch.isneginf(lse[..., :16])) and torch.all(out[..., :16, :] == 0)
    want = F.scaled_dot_product_attention(q[..., 16:, :], k, v, is_causal=True)
    torch.testing.assert_close(out[..., 16:, :], want, atol=2e-5, rtol=1e-4)


def test_default_backend_and_use_backend():
    q, k, v, layout = make_problem(CASES["square"])
    ref = vk.block_sparse_attention(q, k, v, layout, backend="reference")
    torch.testing.assert_close(vk.block_sparse_attention(q, k, v, layout), ref, atol=1e-5, rtol=1e-5)
    q.requires_grad_()
    with vk.use_backend("flex"):  # the override is what backend=None resolves to ...
        with pytest.raises(RuntimeError, match="backend 'flex' cannot run"):
            vk.block_sparse_attention(q, k, v, layout)
        vk.block_sparse_attention(q, k, v, layout, backend="torch")  # ... an explicit backend wins
    vk.block_sparse_attention(q, k, v, layout)  # and it ends with the block
    with pytest.raises(ValueError, match="unknown backend"):
        with vk.use_backend("cuda-magic"):
            pass


def test_unavailable_backend_says_why():
    q, k, v, layout = make_problem(CASES["square"])
    q.requires_grad_()
    with pytest.raises(RuntimeError, match="no backward pass on CPU"):
        vk.block_sparse_attention(q, k, v, layout, backend="flex")
    with pytest.raises(RuntimeError, match="log-sum-exp"):
        vk.block_sparse_attention(q.detach(), k, v, layout, backend="flex", return_lse=True)


@pytest.mark.slow
def test_flex_backend_forward_matches_oracle(oracle):
    """Compiled FlexAttention (forward only on CPU) on GQA, ragged and causal; one compile per case."""
    for case, causal in ((CASES["gqa_shared"], True), (CASES["ragged"], False)):
        q, k, v, layout = make_problem(case)
        got = vk.block_sparse_attention(q, k, v, layout, causal=causal, backend="flex")
        want = oracle_run(oracle, q, k, v, layout, causal)[0]
        assert (got.double() - want).abs().max() < 1e-4
    q, k, v, layout = make_problem(CASES["ragged"])
    keep = torch.rand(2, 77, generator=torch.Generator().manual_seed(1)) > 0.3
    k_bad, v_bad = k.clone(), v.clone()  # NaN / Inf in padded keys must not leak (score_mod path)
    k_bad[:, :, ~keep[0]], v_bad[:, :, ~keep[0]] = float("nan"), float("inf")
    keep[1] = keep[0]
    got = vk.block_sparse_attention(q, k_bad, v_bad, layout, causal=False, backend="flex", key_mask=keep)
    allowed = oracle.mask(layout.kv_num_blocks, layout.kv_indices, 16, 32, 100, 77, False) & keep[:, None, None, :]
    assert (got.double() - oracle.attention(q.double(), k.double(), v.double(), allowed)[0]).abs().max() < 1e-4
    got = vk.block_sparse_attention(q, k, v, layout, causal=True, backend="flex", window=20, sink=4)
    allowed = oracle.mask(layout.kv_num_blocks, layout.kv_indices, 16, 32, 100, 77, False) & oracle.window(100, 77, True, 20, 4)
    assert (got.double() - oracle.attention(q.double(), k.double(), v.double(), allowed)[0]).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_raise_value_errors():
    q, k, v, layout = make_problem(CASES["square"])
    with pytest.raises(ValueError, match="4-D"):
        vk.block_sparse_attention(q[0], k, v, layout)
    with pytest.raises(ValueError, match="dtype"):
        vk.block_sparse_attention(q.double(), k.double(), v.double(), layout)
    with pytest.raises(ValueError, match="share a dtype"):
        vk.block_sparse_attention(q.half(), k, v, layout)
    with pytest.raises(ValueError, match="same shape"):
        vk.block_sparse_attention(q, k, v[:, :, :32], layout)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        vk.block_sparse_attention(torch.randn(1, 3, 64, 16), k, v, layout)
    with pytest.raises(ValueError, match="head dims differ"):
        vk.block_sparse_attention(torch.randn(1, 2, 64, 8), k, v, layout)
    with pytest.raises(ValueError, match="q_len=64, kv_len=64"):
        vk.block_sparse_attention(q[:, :, :48], k, v, layout)
    with pytest.raises(ValueError, match="layout batch"):
        vk.block_sparse_attention(q, k, v, layout.expand_heads(3, 2))
    with pytest.raises(ValueError, match="BlockSparseLayout"):
        vk.block_sparse_attention(q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="layout has 3 heads"):
        three = BlockSparseLayout.from_block_mask(torch.ones(1, 3, 4, 4, dtype=torch.bool), 16, 16, 64, 64)
        vk.block_sparse_attention(q, k, v, three)
    for kwargs, word in ((dict(window=0), "window=0"), (dict(window=8, sink=-1), "sink=-1"), (dict(sink=4), "only applies"),
                         (dict(key_mask=torch.ones(1, 63, dtype=torch.bool)), "key_mask must be a bool tensor"),
                         (dict(key_mask=torch.ones(1, 64)), "key_mask must be a bool tensor")):
        with pytest.raises(ValueError, match=word):
            vk.block_sparse_attention(q, k, v, layout, **kwargs)


def test_invalid_layouts_raise_value_errors():
    num = torch.tensor([[[1, 2]]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"key-block ids must lie in \[0, 2\)"):
        BlockSparseLayout(num, torch.tensor([[[[0, -1], [0, 5]]]], dtype=torch.int32), 16, 16, 32, 32)
    with pytest.raises(ValueError, match="ascending"):
        BlockSparseLayout(num, torch.tensor([[[[0, -1], [1, 0]]]], dtype=torch.int32), 16, 16, 32, 32)
    with pytest.raises(ValueError, match="past kv_num_blocks must be -1"):
        BlockSparseLayout(num, torch.tensor([[[[0, 1], [0, 1]]]], dtype=torch.int32), 16, 16, 32, 32)
    with pytest.raises(ValueError, match="int32"):
        BlockSparseLayout(num.long(), torch.zeros(1, 1, 2, 2, dtype=torch.int32), 16, 16, 32, 32)
    with pytest.raises(ValueError, match="needs 3"):
        BlockSparseLayout(num, torch.tensor([[[[0, -1], [0, 1]]]], dtype=torch.int32), 16, 16, 40, 32)
    with pytest.raises(ValueError, match="block_m"):
        BlockSparseLayout(num, torch.tensor([[[[0, -1], [0, 1]]]], dtype=torch.int32), 0, 16, 32, 32)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        BlockSparseLayout(num + 2, torch.tensor([[[[0, -1], [0, 1]]]], dtype=torch.int32), 16, 16, 32, 32)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        BlockSparseLayout.from_topk(torch.tensor([[[[0], [2]]]]), 16, 16, 32, 32)
    with pytest.raises(ValueError, match="need"):
        BlockSparseLayout.from_block_mask(torch.ones(1, 1, 2, 3, dtype=torch.bool), 16, 16, 32, 32)


@pytest.mark.parametrize("strategy", ["gather", "dense"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_torch_backend_strategies_match_oracle(oracle, monkeypatch, strategy, causal, case):
    """The torch backend's two CPU strategies (gathered blocks; dense SDPA with the token mask), forced.
    Dense SDPA serves inference only; with gradients the gathered path runs whatever the cost model says."""
    from vzoo.kernels import torch_backend

    calls = []
    monkeypatch.setattr(torch_backend, "_dense_is_faster", lambda *a: calls.append(1) or strategy == "dense")
    dense_masked = torch_backend._dense_masked
    monkeypatch.setattr(torch_backend, "_dense_masked", lambda *a: calls.append("dense") or dense_masked(*a))
    q, k, v, layout = make_problem(case)
    allowed = oracle.layout_mask(layout, None, causal)
    with torch.no_grad():
        got = vk.block_sparse_attention(q, k, v, layout, causal=causal, backend="torch")
    assert ("dense" in calls) == (strategy == "dense")
    want, _ = oracle.attention(q, k, v, allowed)
    assert (got.double() - want).abs().max() < 1e-4
    calls.clear()
    w = torch.linspace(-1, 1, q.shape[-1], dtype=torch.float64)
    results = []
    for fn, inputs in (
        (lambda q, k, v: vk.block_sparse_attention(q, k, v, layout, causal=causal, backend="torch"), (q, k, v)),
        (lambda q, k, v: oracle.attention(q, k, v, allowed)[0], (q.double(), k.double(), v.double())),
    ):
        xs = [t.clone().requires_grad_() for t in inputs]
        out = fn(*xs)
        results.append((out, *torch.autograd.grad((out.double() * w).sum(), xs)))
    assert "dense" not in calls
    for name, g, want in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.isfinite(g).all(), name
        assert (g.double() - want).abs().max() < 1e-4, name


def test_cost_model_picks_dense_only_for_tiny_dense_blocks():
    from vzoo.kernels.torch_backend import _dense_is_faster

    def layout(s, blk, k):
        nb = s // blk
        idx = torch.arange(k, dtype=torch.int32).expand(1, 1, nb, k).contiguous()
        return BlockSparseLayout(torch.full((1, 1, nb), k, dtype=torch.int32), idx, blk, blk, s, s)

    q = torch.empty(8, 8, 196, 32)
    assert _dense_is_faster(q, q, layout(196, 4, 16))  # BiFormer stage 3: 2x2 regions, 16 of 49
    q = torch.empty(1, 4, 8192, 64)
    assert not _dense_is_faster(q, q, layout(8192, 128, 6))  # 128-token blocks, 9 % density


@pytest.mark.parametrize("causal", [False, True])
def test_torch_backend_reads_strided_inputs(monkeypatch, causal):
    """q, k, v as head-split views of one fused projection (the layout modules produce) give the same
    result and gradients as contiguous copies."""
    from vzoo.kernels import torch_backend

    monkeypatch.setattr(torch_backend, "_dense_is_faster", lambda *a: False)
    g = torch.Generator().manual_seed(5)
    fused = torch.randn(2, 96, 3, 2, 16, generator=g, requires_grad=True)  # [B, S, 3, H, D]
    layout = BlockSparseLayout.from_block_mask(torch.rand(2, 1, 6, 6, generator=g) < 0.5, 16, 16, 96, 96)
    strided = fused.permute(2, 0, 3, 1, 4)
    assert not strided[1].is_contiguous()
    out_s = vk.block_sparse_attention(*strided, layout, causal=causal, backend="torch")
    (grad_s,) = torch.autograd.grad(out_s.square().sum(), fused)
    out_c = vk.block_sparse_attention(*(t.contiguous() for t in strided), layout, causal=causal, backend="torch")
    (grad_c,) = torch.autograd.grad(out_c.square().sum(), fused)
    torch.testing.assert_close(out_s, out_c, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad_s, grad_c, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("window", [0, 40])
def test_torch_backend_masks_only_partial_slots(window):
    """The token rules run key by key only on the slots they cut (values are checked against the oracle
    above): with aligned causal blocks of 16, the diagonal one per row list; with a window of 40 also
    every block from two before the diagonal down (cut or wholly hidden), never the one just before."""
    from vzoo.kernels import torch_backend

    nb, blk = 6, 16
    mask = torch.ones(nb, nb, dtype=torch.bool).tril().expand(1, 2, nb, nb).contiguous()
    layout = BlockSparseLayout.from_block_mask(mask, blk, blk, nb * blk, nb * blk)
    q = k = v = torch.randn(1, 2, nb * blk, 8)
    plan = torch_backend._plan(q, k, layout, None, True, 1.0, window, 0, None, v, inference=True)
    used = torch.ones(nb, nb, dtype=torch.bool).tril()  # slot j holds key block j; later slots are unused
    lists = plan.partial.view(2, nb, nb) & used  # [head, query block, slot]
    want = torch.eye(nb, dtype=torch.bool)
    if window:
        want = want | torch.ones(nb, nb, dtype=torch.bool).tril(-2)
    assert torch.equal(lists[0], want) and torch.equal(lists[1], want)
    # inference runs the fused flash kernel only when the rules cut nothing but each row list's last slot
    # (and units have enough rows: 16 here)
    assert not plan.flash
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_backend, "_FLASH_MIN_ROWS", 16)
        assert torch_backend._plan(q, k, layout, None, True, 1.0, window, 0, None, v, inference=True).flash == (window == 0)
    assert not torch_backend._plan(q, k, layout, None, True, 1.0, window, 0, None, v, inference=False).flash


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_torch_backend_inference_on_flash_chunks_matches_oracle(oracle, monkeypatch, causal, case):
    """Inference (no grad) runs the chunks whose rules cut only the last slot on the fused flash kernel:
    output and log-sum-exp against the oracle, with the gathered strategy forced."""
    from vzoo.kernels import torch_backend

    monkeypatch.setattr(torch_backend, "_dense_is_faster", lambda *a: False)
    monkeypatch.setattr(torch_backend, "_FLASH_MIN_ROWS", 1)  # the tiny cases' units take the flash path too
    flashed = []
    flash_chunk = torch_backend._flash_chunk
    monkeypatch.setattr(torch_backend, "_flash_chunk", lambda *a: flashed.append(1) or flash_chunk(*a))
    q, k, v, layout = make_problem(case)
    with torch.no_grad():
        out, lse = vk.block_sparse_attention(q, k, v, layout, causal=causal, return_lse=True, backend="torch")
    want_out, want_lse = oracle_run(oracle, q, k, v, layout, causal)[:2]
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    fin = ~torch.isinf(want_lse)
    assert (out.double() - want_out).abs().max() < 1e-4
    assert (lse[fin].double() - want_lse[fin]).abs().max() < 1e-4
    if not causal:
        assert flashed  # without the causal rule only a ragged key tail is cut, and it sits in the last slot
