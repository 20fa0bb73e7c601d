"""attention_block_max against the full softmax reduced block by block with loops (float64)."""

from __future__ import annotations

import pytest
import torch

import vzoo.kernels as vk


def loop_block_max(q, k, block, scale, causal, keep=None):
    b, hq, sq, _ = q.shape
    skv = k.shape[2]
    k = k.double().repeat_interleave(hq // k.shape[1], 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    if causal:
        for i in range(sq):
            s[:, :, i, i + skv - sq + 1 :] = float("-inf")
    if keep is not None:
        for bi in range(b):
            for j in range(skv):
                if not keep[bi, j]:
                    s[bi, :, :, j] = float("-inf")
    p = torch.softmax(s, -1).nan_to_num(0.0)  # a row that sees no key attends to nothing
    nq, nk = -(-sq // block), -(-skv // block)
    out = torch.zeros(b, hq, nq, nk, dtype=torch.float64)
    for i in range(nq):
        for j in range(nk):
            out[:, :, i, j] = p[:, :, i * block : (i + 1) * block, j * block : (j + 1) * block].amax((-1, -2))
    return out


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("sq,skv,causal", [(70, 70, True), (33, 90, True), (40, 52, False)])
def test_matches_loops(monkeypatch, backend, sq, skv, causal):
    import vzoo.kernels.block_max as bm

    monkeypatch.setattr(bm, "_CHUNK_ELEMS", 4 * 2 * 90 * 8)  # several chunks of query blocks
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, sq, 16, generator=g), torch.randn(2, 2, skv, 16, generator=g)
    got = vk.attention_block_max(q, k, 8, scale=0.3, causal=causal, backend=backend)
    want = loop_block_max(q, k, 8, 0.3, causal)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got.double() - want).abs().max() < 1e-6


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_key_mask_matches_loops(backend):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 50, 16, generator=g), torch.randn(2, 2, 50, 16, generator=g)
    keep = torch.rand(2, 50, generator=g) > 0.3
    keep[0, :12] = False  # left padding: the first rows of batch 0 see no key
    got = vk.attention_block_max(q, k, 8, scale=0.3, key_mask=keep, backend=backend)
    want = loop_block_max(q, k, 8, 0.3, True, keep)
    assert torch.isfinite(got).all() and (got.double() - want).abs().max() < 1e-6
    assert got[0, :, 0].abs().max() == 0  # query block 0 of batch 0 is all padding: it attends to nothing


def test_bad_inputs():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="block=0"):
        vk.attention_block_max(q, q, 0)
    with pytest.raises(ValueError, match="key_mask"):
        vk.attention_block_max(q, q, 4, key_mask=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="does not implement"):
        vk.attention_block_max(q, q, 4, backend="triton")
