"""Property test: random shapes, block sizes, GQA and layouts; torch backend vs the loop oracle."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vzoo.kernels as vk
from vzoo.kernels import BlockSparseLayout


@st.composite
def problems(draw):
    hkv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    sq, skv = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    bm, bn = draw(st.sampled_from([4, 8, 16])), draw(st.sampled_from([4, 8, 16]))
    hl = draw(st.sampled_from(sorted({1, hkv, hkv * group})))
    seed = draw(st.integers(0, 2**16))
    density = draw(st.floats(0.0, 1.0))
    causal = draw(st.booleans())
    return hkv, group, sq, skv, bm, bn, hl, seed, density, causal


@settings(max_examples=40, deadline=None)
@given(p=problems())
def test_torch_backend_matches_oracle_on_random_problems(oracle, p):
    hkv, group, sq, skv, bm, bn, hl, seed, density, causal = p
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hkv * group, sq, 8, generator=g)
    k, v = torch.randn(2, hkv, skv, 8, generator=g), torch.randn(2, hkv, skv, 8, generator=g)
    mask = torch.rand(2, hl, -(-sq // bm), -(-skv // bn), generator=g) < density
    layout = BlockSparseLayout.from_block_mask(mask, bm, bn, sq, skv)
    out, lse = vk.block_sparse_attention(q, k, v, layout, causal=causal, return_lse=True, backend="torch")
    allowed = oracle.mask(layout.kv_num_blocks, layout.kv_indices, bm, bn, sq, skv, causal)
    want, want_lse = oracle.attention(q, k, v, allowed)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    assert (out.double() - want).abs().max() < 1e-4
    fin = ~torch.isinf(want_lse)
    assert (lse[fin].double() - want_lse[fin]).abs().max() < 1e-4 if fin.any() else True
