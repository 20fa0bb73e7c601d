"""merge_attention_states: attention over disjoint key sets merges exactly into attention over the union."""

from __future__ import annotations

import pytest
import torch

import vzoo.kernels as vk
from vzoo.kernels import BlockSparseLayout


def test_merge_of_disjoint_layouts_equals_union():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 64, 16, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 2, 4, 4, generator=g) < 0.6
    part = torch.rand(2, 2, 4, 4, generator=g) < 0.5
    first = BlockSparseLayout.from_block_mask(mask & part, 16, 16, 64, 64)
    second = BlockSparseLayout.from_block_mask(mask & ~part, 16, 16, 64, 64)
    union = BlockSparseLayout.from_block_mask(mask, 16, 16, 64, 64)
    o1, l1 = vk.block_sparse_attention(q, k, v, first, causal=True, return_lse=True)
    o2, l2 = vk.block_sparse_attention(q, k, v, second, causal=True, return_lse=True)
    out, lse = vk.merge_attention_states([o1, o2], [l1, l2])
    want, want_lse = vk.block_sparse_attention(q, k, v, union, causal=True, return_lse=True, backend="reference")
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    fin = ~torch.isinf(want_lse)
    torch.testing.assert_close(lse[fin], want_lse[fin], atol=1e-5, rtol=1e-5)
    # gradients flow through both parts, including their lse, and match the union
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    for a, b in zip(grads, want_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_merge_by_hand_and_empty_rows():
    o1, o2 = torch.ones(1, 1, 2, 3), 3 * torch.ones(1, 1, 2, 3)
    l1 = torch.tensor([[[0.0, float("-inf")]]], requires_grad=True)
    l2 = torch.tensor([[[0.0, float("-inf")]]], requires_grad=True)
    out, lse = vk.merge_attention_states([o1, o2], [l1, l2])
    assert torch.allclose(out[0, 0, 0], torch.full((3,), 2.0))  # equal weights
    assert torch.all(out[0, 0, 1] == 0) and torch.isneginf(lse[0, 0, 1])
    assert lse[0, 0, 0].item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    (out.sum() + torch.where(torch.isinf(lse), 0, lse).sum()).backward()
    # d/dl1 of 3 outputs (e^l1 + 3 e^l2) / (e^l1 + e^l2) is 3 * w1 * (1 - 2) = -1.5, of lse w1 = 0.5
    assert l1.grad.tolist() == [[[-1.0, 0.0]]] and l2.grad.tolist() == [[[2.0, 0.0]]]


def test_merge_bad_inputs():
    o, l = torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2)
    with pytest.raises(ValueError, match="same positive number"):
        vk.merge_attention_states([o], [l, l])
    with pytest.raises(ValueError, match="lses\\[0\\] has shape"):
        vk.merge_attention_states([o], [l[..., :1]])
