"""flash_pieces_attention: pieces and folds against a dense mask written out from their rules, forward and
backward (float64 SDPA as the oracle)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vzoo.kernels.flash_pieces import Fold, Piece, available, flash_pieces_attention

pytestmark = pytest.mark.skipif(not available(torch.zeros(1)), reason="this PyTorch has no CPU flash kernel")


def _mask(sq: int, skv: int, pieces, folds, block: int) -> torch.Tensor:
    """The visible (query, key) pairs the module docstring's rules name, one pair at a time."""
    m = torch.zeros(sq, skv, dtype=torch.bool)
    for p in pieces:
        for i in range(p.q0, p.q1):
            for j in range(p.k0, p.k1):
                m[i, j] |= not p.causal or j - p.k0 <= i - p.q0
    for f in folds:
        for b in range(f.n):
            for r in range(f.rows):
                for k0, size, later in f.slots:
                    for c in range(size):
                        if not later or c > r:
                            assert not m[f.q0 + b * block + r, k0 + b * block + c], "overlapping key sets"
                            m[f.q0 + b * block + r, k0 + b * block + c] = True
    return m


PLANS = [
    # two overlapping pieces (merged by log-sum-exp) and a fold of later keys
    (20, 28, (Piece(0, 20, 8, 28, True), Piece(0, 20, 0, 8, False)), (Fold(0, 5, 4, ((8, 4, True),)),), 4),
    # a fold alone gives the first rows their only keys; a two-slot fold over a shifted causal piece
    (24, 24, (Piece(4, 12, 12, 20, True), Piece(12, 24, 12, 24, True)),
     (Fold(0, 1, 4, ((0, 4, False),)), Fold(4, 2, 4, ((12, 4, True), (4, 4, False))), Fold(12, 3, 4, ((12, 4, True),))), 4),
    # a partial last block
    (7, 7, (Piece(0, 7, 0, 7, True),), (Fold(0, 1, 4, ((0, 4, True),)), Fold(4, 1, 3, ((4, 3, True),))), 4),
]


@pytest.mark.parametrize("sq,skv,pieces,folds,block", PLANS)
def test_pieces_and_folds_equal_the_dense_mask_forward_and_backward(sq, skv, pieces, folds, block):
    mask = _mask(sq, skv, pieces, folds, block)
    assert mask.any(-1).all()
    g = torch.Generator().manual_seed(sq)
    q, k, v = (torch.randn(2, 3, s, 8, generator=g) for s in (sq, skv, skv))
    grad = torch.randn(2, 3, sq, 8, generator=g)
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash_pieces_attention(*x, pieces, folds, block, 0.3)
    out.backward(grad)
    y = [t.double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*y, attn_mask=mask, scale=0.3)
    ref.backward(grad.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(x, y):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-5)


def test_available_only_for_cpu_float32():
    assert not available(torch.zeros(1, dtype=torch.float64))
    assert not available(torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16))


@pytest.mark.parametrize("t,segment,groups", [(24, 8, 1), (27, 8, 3), (5, 8, 1), (16, 16, 3)])
def test_segment_causal_attention_equals_the_dense_mask(t, segment, groups):
    from vzoo.kernels.flash_pieces import segment_causal_attention

    i = torch.arange(t)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] // segment == i[:, None] // segment)
    g = torch.Generator().manual_seed(t)
    q = torch.randn(2, 6, t, 8, generator=g)
    k, v = (torch.randn(2, 6 // groups, t, 8, generator=g) for _ in range(2))
    kk, vv = (x.double().repeat_interleave(groups, 1) for x in (k, v))
    want = F.scaled_dot_product_attention(q.double(), kk, vv, attn_mask=mask, scale=0.4)
    want_lse = torch.logsumexp((q.double() @ kk.transpose(-1, -2) * 0.4).masked_fill(~mask, float("-inf")), -1)
    with torch.no_grad():  # the fused path
        out, lse = segment_causal_attention(q, k, v, segment, 0.4)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    keys = torch.ones(2, t, dtype=torch.bool)  # a key mask that hides nothing takes the layout path
    out2, lse2 = segment_causal_attention(q, k, v, segment, 0.4, key_mask=keys)
    torch.testing.assert_close(out2.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse2.double(), want_lse, atol=1e-5, rtol=1e-5)
