"""BlockSparseLayout constructors and conversions, checked against loops over the dense mask."""

from __future__ import annotations

import pytest
import torch

from vzoo.kernels import BlockSparseLayout


def rows_of(mask):
    """Python lists of selected block ids per row, read off a dense bool mask."""
    return [[j for j in range(mask.shape[-1]) if mask[b, h, i, j]]
            for b in range(mask.shape[0]) for h in range(mask.shape[1]) for i in range(mask.shape[2])]


def rows_of_layout(lay):
    num, idx = lay.kv_num_blocks, lay.kv_indices
    return [idx[b, h, i, : int(num[b, h, i])].tolist()
            for b in range(num.shape[0]) for h in range(num.shape[1]) for i in range(num.shape[2])]


def test_from_block_mask_round_trip():
    mask = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(1)) < 0.4
    mask[0, 0, 0] = False  # an empty row
    lay = BlockSparseLayout.from_block_mask(mask, 16, 32, 70, 200)
    assert lay.kv_num_blocks.dtype == lay.kv_indices.dtype == torch.int32
    assert rows_of_layout(lay) == rows_of(mask)
    assert lay.max_blocks == int(mask.sum(-1).max())
    assert torch.all(lay.kv_indices[0, 0, 0] == -1)
    assert torch.equal(lay.to_block_mask(), mask)
    assert lay.density() == pytest.approx(mask.float().mean().item())


def test_from_topk_sorts_dedups_and_honours_counts():
    idx = torch.tensor([[[[3, 1, 1, 0], [2, -1, 0, 3]]]])
    lay = BlockSparseLayout.from_topk(idx, 8, 8, 16, 32, counts=torch.tensor([[[3, 4]]]))
    assert rows_of_layout(lay) == [[1, 3], [0, 2, 3]]


def test_static_longgen_pattern():
    # 8 query blocks x 8 key blocks, causal, 1 sink block, 2 local blocks, every 3rd block strided
    lay = BlockSparseLayout.static(128, 128, 16, 16, sink_blocks=1, local_blocks=2, stride=3, causal=True)
    want = []
    for i in range(8):
        want.append([j for j in range(8) if j <= i and (j < 1 or i - j < 2 or (j + 1) % 3 == 0)])
    assert rows_of_layout(lay) == want
    # non-causal local window is symmetric; no sink / stride
    lay = BlockSparseLayout.static(64, 64, 16, 16, local_blocks=2)
    assert rows_of_layout(lay) == [[0, 1], [0, 1, 2], [1, 2, 3], [2, 3]]


def test_static_anchors_bottom_right_when_lengths_differ():
    # 2 query blocks of 16 over 6 key blocks of 16: query block i is anchored at key block 4 + i
    lay = BlockSparseLayout.static(32, 96, 16, 16, local_blocks=1, causal=True)
    assert rows_of_layout(lay) == [[4], [5]]


def test_transpose_lists_columns():
    mask = torch.rand(1, 2, 4, 6, generator=torch.Generator().manual_seed(3)) < 0.5
    lay = BlockSparseLayout.from_block_mask(mask, 16, 32, 64, 192)
    t = lay.transpose()
    assert (t.block_m, t.block_n, t.q_len, t.kv_len) == (32, 16, 192, 64)
    assert rows_of_layout(t) == rows_of(mask.transpose(-1, -2))


def test_to_flex_block_mask_selects_the_same_blocks():
    mask = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(5)) < 0.5
    lay = BlockSparseLayout.from_block_mask(mask, 32, 32, 128, 128)
    flex = lay.to_flex_block_mask()
    dense = flex.to_dense().bool()
    assert torch.equal(dense, mask)


def test_expand_heads():
    lay = BlockSparseLayout.static(64, 64, 16, 16, local_blocks=1)
    wide = lay.expand_heads(2, 3)
    assert wide.kv_indices.shape[:2] == (2, 3)
    assert all(torch.equal(wide.kv_indices[b, h], lay.kv_indices[0, 0]) for b in range(2) for h in range(3))
    with pytest.raises(ValueError, match="cannot broadcast"):
        wide.expand_heads(2, 4)


@pytest.mark.parametrize("sq, skv, bm, bn", [(37, 37, 8, 8), (20, 45, 8, 16), (1, 30, 4, 4), (64, 64, 16, 8)])
def test_causal_density_counts_the_causal_pairs_the_blocks_hold(sq, skv, bm, bn):
    torch.manual_seed(sq + skv)
    mask = torch.rand(2, 3, -(-sq // bm), -(-skv // bn)) < 0.5
    layout = BlockSparseLayout.from_block_mask(mask, bm, bn, sq, skv)
    held = causal = 0
    for b in range(2):
        for h in range(3):
            for i in range(sq):
                for j in range(i + skv - sq + 1):  # the causal pairs, one by one
                    causal += 1
                    held += bool(mask[b, h, i // bm, j // bn])
    assert layout.density(causal=True) == pytest.approx(held / causal, abs=1e-12)
    assert layout.density() == pytest.approx(mask.sum().item() / mask.numel(), abs=1e-12)
