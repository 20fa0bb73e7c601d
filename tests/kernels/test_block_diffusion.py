"""Block-diffusion masks against brute-force rules, and their block-sparse layouts against the masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vzoo.kernels import block_sparse_attention
from vzoo.kernels.block_diffusion import (
    additive_mask, bd3_layout, bd3_mask, block_causal_layout, block_causal_mask, kernel_block,
)


def _bd3_brute(t: int, block: int) -> torch.Tensor:
    m = torch.zeros(2 * t, 2 * t, dtype=torch.bool)
    for q in range(2 * t):
        for k in range(2 * t):
            qn, kn = q < t, k < t
            bq, bk = (q % t) // block, (k % t) // block
            if qn and kn:
                m[q, k] = bq == bk
            elif qn:
                m[q, k] = bk < bq
            elif not kn:
                m[q, k] = bk <= bq
    return m


@pytest.mark.parametrize("t,block", [(12, 4), (10, 4), (8, 1), (6, 8)])
def test_bd3_mask_is_the_brute_force_rule(t, block):
    m = bd3_mask(t, block)
    assert torch.equal(m, _bd3_brute(t, block))
    for q in range(t):  # no noisy token sees its own clean block (nor a later one)
        own = [t + k for k in range(t) if k // block >= q // block]
        assert not m[q, own].any()
    assert not m[t:, :t].any()  # clean never sees noisy


@pytest.mark.parametrize("q_len,kv_len,block", [(10, 10, 4), (3, 11, 4), (1, 9, 3), (8, 8, 1)])
def test_block_causal_mask_is_the_brute_force_rule(q_len, kv_len, block):
    m = block_causal_mask(q_len, kv_len, block)
    for i in range(q_len):
        p = kv_len - q_len + i
        for j in range(kv_len):
            assert bool(m[i, j]) == (j // block <= p // block)


def test_additive_mask():
    m = torch.tensor([[True, False], [True, True]])
    a = additive_mask(m, torch.float16)
    assert a.shape == (1, 1, 2, 2) and a.dtype == torch.float16
    assert a[0, 0, 0, 1] == torch.finfo(torch.float16).min and (a[m[None, None]] == 0).all()
    with pytest.raises(ValueError, match="bool"):
        additive_mask(m.float())


def _token_mask(layout) -> torch.Tensor:
    blocks = layout.to_block_mask()[0, 0]
    return blocks.repeat_interleave(layout.block_m, 0).repeat_interleave(layout.block_n, 1)[: layout.q_len, : layout.kv_len]


@pytest.mark.parametrize("t,block,kernel", [(16, 8, 4), (16, 8, 8), (24, 12, None)])
def test_bd3_layout_is_exact(t, block, kernel):
    layout = bd3_layout(t, block, kernel)
    assert torch.equal(_token_mask(layout), bd3_mask(t, block))
    q, k, v = (torch.randn(1, 2, 2 * t, 8, dtype=torch.float64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bd3_mask(t, block))
    fast = block_sparse_attention(q.float(), k.float(), v.float(), layout)
    torch.testing.assert_close(fast.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_len,kv_len,block,kernel", [(16, 16, 8, 4), (8, 24, 8, 8), (5, 21, 4, 4), (12, 12, 6, None)])
def test_block_causal_layout_is_exact(q_len, kv_len, block, kernel):
    layout = block_causal_layout(q_len, kv_len, block, kernel)
    assert torch.equal(_token_mask(layout), block_causal_mask(q_len, kv_len, block))


def test_layout_errors_and_kernel_block():
    assert kernel_block(32) == 32 and kernel_block(96) == 96 and kernel_block(384) == 128 and kernel_block(7) == 7
    with pytest.raises(ValueError, match="multiple of block"):
        bd3_layout(10, 4)
    with pytest.raises(ValueError, match="boundary"):
        block_causal_layout(5, 11, 4, 4)
    with pytest.raises(ValueError, match="block"):
        bd3_mask(4, 0)


def _fwd_bwd(fn, q, k, v):
    """Output and gradients of ``fn(q, k, v)`` against a fixed upstream gradient."""
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype))
    return [out.detach().double()] + [t.grad.double() for t in x]


def _dense(q, k, v, mask):
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=mask)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("tq,tk,groups", [(24, 24, 1), (16, 40, 2), (5, 13, 1), (1, 17, 2)])
def test_block_causal_attention_equals_the_dense_mask_forward_and_backward(tq, tk, groups, fused, monkeypatch):
    from vzoo.kernels import block_diffusion

    if not fused:  # the block-sparse layout path, as on GPUs and in other dtypes
        monkeypatch.setattr(block_diffusion, "available", lambda *t: False)
    block = 4
    if (tk - tq) % block:
        tk += block - (tk - tq) % block
    g = torch.Generator().manual_seed(tq)
    q = torch.randn(1, 4, tq, 8, generator=g)
    k, v = torch.randn(1, 4 // groups, tk, 8, generator=g), torch.randn(1, 4 // groups, tk, 8, generator=g)
    got = _fwd_bwd(lambda *x: block_diffusion.block_causal_attention(*x, block), q, k, v)
    want = _fwd_bwd(lambda *x: _dense(*x, block_causal_mask(tq, tk, block)), q.double(), k.double(), v.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    keys = torch.ones(1, tk, dtype=torch.bool)
    keys[0, :2] = False  # padding hides keys (the layout path)
    with torch.no_grad():
        masked = block_diffusion.block_causal_attention(q, k, v, block, key_mask=keys)
    dense = block_causal_mask(tq, tk, block) & keys[0]
    ref_masked = _dense(q.double(), k.double(), v.double(), dense)
    rows = dense.any(-1)
    torch.testing.assert_close(masked.double()[:, :, rows], ref_masked[:, :, rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("t,block,groups", [(16, 4, 1), (12, 4, 2), (8, 8, 1), (24, 8, 3)])
def test_bd3_attention_equals_the_dense_mask_forward_and_backward(t, block, groups, fused, monkeypatch):
    from vzoo.kernels import block_diffusion

    if not fused:
        monkeypatch.setattr(block_diffusion, "available", lambda *t: False)
    g = torch.Generator().manual_seed(t)
    q = torch.randn(2, 6, 2 * t, 8, generator=g)
    k, v = (torch.randn(2, 6 // groups, 2 * t, 8, generator=g) for _ in range(2))
    got = _fwd_bwd(lambda *x: block_diffusion.bd3_attention(*x, block), q, k, v)
    want = _fwd_bwd(lambda *x: _dense(*x, bd3_mask(t, block)), q.double(), k.double(), v.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bd3_attention_checks_its_input():
    from vzoo.kernels.block_diffusion import bd3_attention

    x = torch.randn(1, 2, 20, 8)
    with pytest.raises(ValueError, match="multiple of block=4"):
        bd3_attention(x, x, x, 4)
    with pytest.raises(ValueError, match="same 2T keys"):
        bd3_attention(x[:, :, :16], x, x, 4)


def test_block_causal_attention_needs_a_block_start():
    from vzoo.kernels.block_diffusion import block_causal_attention

    with pytest.raises(ValueError, match="must start a block"):
        block_causal_attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8), 4)


def test_block_spans_mask_is_the_brute_force_rule():
    from vzoo.kernels.block_diffusion import block_spans_mask

    spans = [(2, 5), (7, 10)]
    m = block_spans_mask(12, spans)
    span = {p: i for i, (a, b) in enumerate(spans) for p in range(a, b)}
    for q in range(12):
        for k in range(12):
            assert bool(m[q, k]) == (k <= q or (q in span and span.get(k) == span[q])), (q, k)
    assert torch.equal(block_spans_mask(6, []), torch.ones(6, 6).tril().bool())
    for bad in ([(3, 3)], [(0, 7)], [(1, 4), (3, 5)]):
        with pytest.raises(ValueError, match="spans"):
            block_spans_mask(6, bad)
