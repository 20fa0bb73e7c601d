"""Triton backend of block-sparse attention vs an independent dense reference written here.

Runs on CPU under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py``) at tiny shapes. The reference
builds the token mask with plain loops over the row lists and differentiates a masked fp64 softmax
with autograd; it shares no code with vzoo's kernels or reference backend.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from vzoo.kernels import block_sparse_attention  # noqa: E402
from vzoo.kernels import triton_backend  # noqa: E402
from vzoo.kernels.block_sparse import run_attention  # noqa: E402
from vzoo.kernels.layout import BlockSparseLayout  # noqa: E402

# The real kernels on a GPU; the CPU under TRITON_INTERPRET=1 (tests/conftest.py) otherwise.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------------
# Problem set-up
# --------------------------------------------------------------------------------------------------
def random_layout(b, hl, sq, skv, bm, bn, density, seed, empty_rows=()):
    """A random layout; ``empty_rows`` lists query blocks that select nothing (in every head)."""
    gen = torch.Generator().manual_seed(seed)
    nqb, nkb = math.ceil(sq / bm), math.ceil(skv / bn)
    mask = torch.rand(b, hl, nqb, nkb, generator=gen) < density
    for r in empty_rows:
        mask[:, :, r] = False
    return BlockSparseLayout.from_block_mask(mask, bm, bn, sq, skv).to(DEVICE)


def make_qkv(b, hq, hkv, sq, skv, d, dtype, seed, seq_major_q=False):
    gen = torch.Generator().manual_seed(seed)
    if seq_major_q:  # non-contiguous q: a [B, S, H, D] tensor viewed as [B, H, S, D]
        q = torch.randn(b, sq, hq, d, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    else:
        q = torch.randn(b, hq, sq, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(b, hkv, skv, d, generator=gen).to(DEVICE, dtype)
    v = torch.randn(b, hkv, skv, d, generator=gen).to(DEVICE, dtype)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


def grads_of(q, k, v, out, lse, seed):
    """Gradients of a random linear loss of ``out`` and of the finite entries of ``lse``."""
    gen = torch.Generator().manual_seed(seed)
    g_out = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    g_lse = torch.randn(lse.shape, generator=gen).to(lse.device, torch.float64)
    loss = (out.double() * g_out.double()).sum() + (torch.where(torch.isinf(lse), 0.0, lse.double()) * g_lse).sum()
    return torch.autograd.grad(loss, (q, k, v))


def compare(oracle, case: dict) -> None:
    """Run ``case`` through the triton backend and the reference; assert forward and gradients match."""
    dtype = case.get("dtype", torch.float32)
    b, hq, hkv, sq, skv, d = case["shape"]
    bm, bn = case["blocks"]
    causal = case.get("causal", False)
    hl = case.get("hl", hkv)
    scale = case.get("scale", d**-0.5)
    layout = random_layout(b, hl, sq, skv, bm, bn, case.get("density", 0.5), seed=1, empty_rows=case.get("empty", ()))
    token_mask = None
    if case.get("token_mask"):
        gen = torch.Generator().manual_seed(2)
        token_mask = (torch.rand(b, hl, sq, layout.max_blocks, generator=gen) < 0.6).to(DEVICE)
    q, k, v = make_qkv(b, hq, hkv, sq, skv, d, dtype, seed=3, seq_major_q=case.get("seq_major_q", False))

    out, lse = run_attention(
        q, k, v, layout, token_mask, causal=causal, scale=scale, return_lse=True, backend="triton"
    )
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    grads = grads_of(q, k, v, out, lse, seed=4)

    allowed = oracle.layout_mask(layout, token_mask, causal)
    ref_out, ref_lse = oracle.attention(q, k, v, allowed, scale)
    ref_grads = grads_of(q, k, v, ref_out, ref_lse, seed=4)
    out, lse = out.detach().cpu(), lse.detach().cpu()  # the oracle computes on the CPU
    grads, ref_grads = [g.cpu() for g in grads], [g.cpu() for g in ref_grads]

    dead = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), dead) and not torch.isnan(lse).any()
    assert torch.all(out[dead] == 0)
    for g in grads:
        assert torch.isfinite(g).all()
    if dtype == torch.float32:
        assert (out.double() - ref_out).abs().max() < 1e-4
        assert (lse[~dead].double() - ref_lse[~dead]).abs().max() < 1e-4
        for name, g, rg in zip("qkv", grads, ref_grads):
            assert (g.double() - rg).abs().max() < 1e-4, f"d{name}"
    else:
        tol_out, tol_grad = (5e-3, 1e-2) if dtype == torch.float16 else (2e-2, 3e-2)
        assert oracle.rel_rms(ref_out, out) < tol_out
        assert (lse[~dead].double() - ref_lse[~dead]).abs().max() < 1e-2
        for name, g, rg in zip("qkv", grads, ref_grads):
            assert oracle.rel_rms(rg, g) < tol_grad, f"d{name}"


# --------------------------------------------------------------------------------------------------
# Accuracy against the reference
# --------------------------------------------------------------------------------------------------
RAGGED = (2, 4, 2, 100, 77, 32)  # B, Hq, Hkv, Sq, Skv, D: GQA, lengths not multiples of the blocks


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("per_query_head", [False, True], ids=["hl=hkv", "hl=hq"])
def test_fp32_ragged_gqa(oracle, causal, per_query_head):
    compare(oracle, {"shape": RAGGED, "blocks": (32, 16), "causal": causal, "hl": 4 if per_query_head else 2})


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("per_query_head", [False, True], ids=["hl=hkv", "hl=hq"])
def test_fp32_token_mask(oracle, causal, per_query_head):
    hl = 4 if per_query_head else 2
    compare(oracle, {"shape": RAGGED, "blocks": (16, 32), "causal": causal, "token_mask": True, "hl": hl})


@pytest.mark.parametrize(
    "case",
    [
        {"causal": True},
        {"causal": False, "hl": 4, "seq_major_q": True},
        {"causal": True, "token_mask": True},
    ],
    ids=["causal", "hl=hq-noncontiguous-q", "token-mask"],
)
def test_fp16(oracle, case):
    compare(oracle, {"shape": RAGGED, "blocks": (32, 16), "dtype": torch.float16, **case})


def test_bf16_with_interpreter_upcast(oracle):
    compare(oracle, {"shape": (1, 2, 1, 70, 50, 32), "blocks": (16, 32), "dtype": torch.bfloat16, "causal": True})


@pytest.mark.parametrize(
    "case",
    [
        # Logical blocks larger than a 64-wide tile and not powers of two: several tiles per block.
        {"shape": (1, 2, 1, 150, 140, 16), "blocks": (128, 80), "causal": True},
        {"shape": (1, 2, 2, 60, 90, 64), "blocks": (20, 48), "scale": 0.3},
        # Head dims that are not powers of two are padded; D=128 runs unpadded.
        {"shape": (1, 2, 1, 40, 40, 40), "blocks": (16, 16), "causal": True},
        {"shape": (1, 1, 1, 48, 32, 128), "blocks": (16, 16), "density": 0.7},
        {"shape": (1, 1, 1, 40, 70, 200), "blocks": (64, 64), "causal": True, "density": 1.0},
    ],
    ids=["blocks-128x80", "blocks-20x48", "d40", "d128", "d200-32-wide-tiles"],
)
def test_block_and_head_sizes(oracle, case):
    compare(oracle, case)


def test_more_queries_than_keys_bottom_right_causal(oracle):
    # Bottom-right alignment: the first Sq - Skv = 56 queries see no key at all.
    compare(oracle, {"shape": (1, 2, 1, 96, 40, 16), "blocks": (16, 16), "causal": True, "density": 1.0})


def test_fewer_queries_than_keys_bottom_right_causal(oracle):
    compare(oracle, {"shape": (1, 2, 2, 40, 96, 16), "blocks": (16, 32), "causal": True, "density": 0.8})


@pytest.mark.parametrize("causal", [False, True])
def test_empty_rows_give_zeros_minus_inf_and_finite_grads(oracle, causal):
    # compare() asserts out == 0, lse == -inf and finite gradients on the empty rows.
    compare(oracle, {"shape": (2, 2, 1, 64, 64, 16), "blocks": (16, 16), "causal": causal, "empty": (0, 2)})


def test_all_empty_layout():
    q, k, v = make_qkv(1, 2, 1, 32, 32, 16, torch.float32, seed=0)
    layout = random_layout(1, 1, 32, 32, 16, 16, 0.0, seed=0)
    out, lse = run_attention(q, k, v, layout, None, causal=False, scale=0.25, return_lse=True, backend="triton")
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    for g in grads_of(q, k, v, out, lse, seed=0):
        assert torch.all(g == 0)


# --------------------------------------------------------------------------------------------------
# Identities, determinism, integration
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_all_blocks_selected_equals_sdpa(causal):
    b, hq, hkv, s, d = 1, 4, 2, 80, 32
    q, k, v = make_qkv(b, hq, hkv, s, s, d, torch.float32, seed=5)
    layout = random_layout(1, 1, s, s, 32, 16, 1.0, seed=0)
    out = block_sparse_attention(q, k, v, layout, causal=causal, backend="triton")
    grads = grads_of(q, k, v, out, torch.zeros(q.shape[:3], device=DEVICE), seed=6)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    ref_grads = grads_of(q, k, v, ref, torch.zeros(q.shape[:3], device=DEVICE), seed=6)
    assert (out - ref).abs().max() < 1e-4
    for g, rg in zip(grads, ref_grads):
        assert (g - rg).abs().max() < 1e-4


def test_gradient_through_lse_only(oracle):
    # d lse_i / d s_ij = p_ij: check the lse-only gradient against the reference.
    q, k, v = make_qkv(1, 2, 1, 50, 40, 16, torch.float32, seed=7)
    layout = random_layout(1, 1, 50, 40, 16, 16, 0.6, seed=8)
    _, lse = run_attention(q, k, v, layout, None, causal=True, scale=0.25, return_lse=True, backend="triton")
    finite = torch.where(torch.isinf(lse), 0.0, lse)
    grads = torch.autograd.grad(finite.sum(), (q, k))
    _, ref_lse = oracle.attention(q, k, v, oracle.layout_mask(layout, None, True), 0.25)
    ref_grads = torch.autograd.grad(torch.where(torch.isinf(ref_lse), 0.0, ref_lse).sum(), (q, k))
    for g, rg in zip(grads, ref_grads):
        assert (g.double().cpu() - rg.cpu()).abs().max() < 1e-4


def test_backward_is_deterministic():
    q, k, v = make_qkv(1, 4, 2, 64, 64, 16, torch.float16, seed=9)
    layout = random_layout(1, 2, 64, 64, 16, 16, 0.7, seed=10)
    token_mask = (torch.rand(1, 2, 64, layout.max_blocks, generator=torch.Generator().manual_seed(11)) < 0.7).to(DEVICE)

    def run():
        out, lse = run_attention(
            q, k, v, layout, token_mask, causal=True, scale=0.25, return_lse=True, backend="triton"
        )
        return (out, lse, *grads_of(q, k, v, out, lse, seed=12))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_matches_eager():
    q, k, v = make_qkv(1, 2, 1, 48, 48, 16, torch.float32, seed=13)
    layout = random_layout(1, 1, 48, 48, 16, 16, 0.6, seed=14)
    token_mask = (torch.rand(1, 1, 48, layout.max_blocks, generator=torch.Generator().manual_seed(15)) < 0.7).to(DEVICE)

    def fn(q, k, v, token_mask):
        out, lse = triton_backend.attend(q, k, v, layout, token_mask, causal=True, scale=0.25, need_lse=True)
        return (out * 2).sum() + torch.where(torch.isinf(lse), 0.0, lse).sum()

    eager = fn(q, k, v, token_mask)
    eager_grads = torch.autograd.grad(eager, (q, k, v))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, token_mask)
    compiled_grads = torch.autograd.grad(compiled, (q, k, v))
    assert torch.equal(eager, compiled)
    for a, b in zip(eager_grads, compiled_grads):
        assert torch.equal(a, b)


def test_need_lse_false_returns_none(oracle):
    q, k, v = make_qkv(1, 2, 2, 32, 32, 16, torch.float32, seed=16)
    layout = random_layout(1, 2, 32, 32, 16, 16, 0.6, seed=17)
    out, lse = triton_backend.attend(q, k, v, layout, None, causal=False, scale=0.25, need_lse=False)
    want, _ = oracle.attention(q, k, v, oracle.layout_mask(layout), 0.25)
    assert lse is None and (out.detach().cpu().double() - want).abs().max() < 1e-5


def test_ops_registered_once_across_reimport():
    module = importlib.reload(triton_backend)
    assert hasattr(torch.ops.vzoo, "block_sparse_fwd") and hasattr(torch.ops.vzoo, "block_sparse_bwd")
    q, k, v = make_qkv(1, 1, 1, 16, 16, 16, torch.float32, seed=18)
    layout = random_layout(1, 1, 16, 16, 16, 16, 1.0, seed=0)
    out, _ = module.attend(q, k, v, layout, None, causal=False, scale=0.25, need_lse=False)
    assert (out - F.scaled_dot_product_attention(q, k, v, scale=0.25)).abs().max() < 1e-5


def test_bad_inputs_raise_value_error():
    layout = random_layout(1, 1, 16, 16, 16, 16, 1.0, seed=0)
    q = torch.randn(1, 1, 16, 300, device=DEVICE)
    with pytest.raises(ValueError, match="D=300"):
        triton_backend.attend(q, q, q, layout, None, causal=False, scale=1.0, need_lse=False)
    q = torch.randn(1, 4, 16, 16, device=DEVICE)
    kv = torch.randn(1, 2, 16, 16, device=DEVICE)
    wrong_heads = random_layout(1, 3, 16, 16, 16, 16, 1.0, seed=0)
    with pytest.raises(ValueError, match="layout"):
        triton_backend.attend(q, kv, kv, wrong_heads, None, causal=False, scale=1.0, need_lse=False)
    with pytest.raises(ValueError, match="token_mask"):
        triton_backend.attend(
            q, kv, kv, random_layout(1, 2, 16, 16, 16, 16, 1.0, seed=0), torch.ones(1, 2, 16, 5, dtype=torch.bool, device=DEVICE),
            causal=False, scale=1.0, need_lse=False,
        )
