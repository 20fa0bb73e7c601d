"""Property tests: random shapes, block sizes, GQA and layouts (and NaN / Inf in padded keys) against the
loop oracle."""

from __future__ import annotations

from unittest import mock

import torch
from hypothesis import example, given, settings
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


def _inputs(p: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BlockSparseLayout, torch.Generator]:
    """``q, k, v``, the random layout of problem ``p`` and the generator, to draw more from."""
    hkv, group, sq, skv, bm, bn, hl, seed, density, _ = p
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hkv * group, sq, 8, generator=g)
    k, v = torch.randn(2, hkv, skv, 8, generator=g), torch.randn(2, hkv, skv, 8, generator=g)
    mask = torch.rand(2, hl, -(-sq // bm), -(-skv // bn), generator=g) < density
    return q, k, v, BlockSparseLayout.from_block_mask(mask, bm, bn, sq, skv), g


@settings(max_examples=40, deadline=None)
@given(p=problems())
def test_torch_backend_matches_oracle_on_random_problems(oracle, p):
    q, k, v, layout, g = _inputs(p)
    *_, causal = p
    out, lse = vk.block_sparse_attention(q, k, v, layout, causal=causal, return_lse=True, backend="torch")
    allowed = oracle.mask(layout.kv_num_blocks, layout.kv_indices, layout.block_m, layout.block_n, q.shape[2], k.shape[2], causal)
    want, want_lse = oracle.attention(q, k, v, allowed)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    assert (out.double() - want).abs().max() < 1e-4
    fin = ~torch.isinf(want_lse)
    assert (lse[fin].double() - want_lse[fin]).abs().max() < 1e-4 if fin.any() else True


@settings(max_examples=25, deadline=None)
# (backend, dense): the dense strategy exists on the torch backend only
@given(p=problems(), run=st.sampled_from([("reference", False), ("torch", False), ("torch", True)]))
@example(p=(1, 1, 1, 1, 4, 4, 1, 1, 1.0, False), run=("torch", True))  # every key hidden: zeros, not NaN
def test_garbage_in_padded_keys_never_leaks(oracle, p, run):
    """NaN / Inf in the keys and values a key mask hides: the result equals the oracle on clean inputs,
    on the reference and on both torch strategies (gathered blocks; dense SDPA, forced)."""
    from vzoo.kernels import torch_backend

    backend, dense = run
    q, k, v, layout, g = _inputs(p)
    *_, causal = p
    key_mask = torch.rand(2, k.shape[2], generator=g) > 0.3
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf")])[torch.randint(0, 3, k.shape, generator=g)]
    hidden = ~key_mask[:, None, :, None]
    kg, vg = torch.where(hidden, garbage, k), torch.where(hidden, garbage.flip(-1), v)
    with torch.no_grad(), mock.patch.object(torch_backend, "_dense_is_faster", lambda *a: dense):
        out = vk.block_sparse_attention(q, kg, vg, layout, causal=causal, backend=backend, key_mask=key_mask)
    allowed = oracle.mask(layout.kv_num_blocks, layout.kv_indices, layout.block_m, layout.block_n, q.shape[2], k.shape[2], causal) & key_mask[:, None, None, :]
    want, _ = oracle.attention(q, k, v, allowed)
    assert float((out.double() - want).abs().max()) < 1e-4
