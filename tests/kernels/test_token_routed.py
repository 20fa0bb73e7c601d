"""token_routed_attention (MoBA / VMoBA routing) against a per-token loop oracle."""

from __future__ import annotations

import pytest
import torch

import vzoo.kernels as vk


def routed_mask(block_idx, block_cnt, block_n, q_len, kv_len, causal):
    """bool [B, Hl, Sq, Skv], one token and one routed block at a time."""
    b, h, s, kmax = block_idx.shape
    allowed = torch.zeros(b, h, q_len, kv_len, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for i in range(q_len):
                n = kmax if block_cnt is None else int(block_cnt[bi, hi, i])
                for j in block_idx[bi, hi, i, :n].tolist():
                    if j >= 0:
                        allowed[bi, hi, i, j * block_n : (j + 1) * block_n] = True
                if causal:
                    allowed[bi, hi, i, max(0, i + kv_len - q_len + 1) :] = False
    return allowed


# (B, Hq, Hkv, Sq, Skv, D, block_n, K, routing heads, tile)
CASES = {
    "moba_like": (1, 2, 2, 70, 70, 16, 16, 3, 2, 16),
    "gqa_ragged": (2, 4, 2, 50, 90, 8, 32, 2, 2, 32),
    "per_query_head": (1, 4, 2, 33, 65, 16, 16, 2, 4, 8),
}


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("padded", [False, True])
def test_token_routed_matches_oracle(oracle, triton_device, backend, causal, case, padded):
    b, hq, hkv, sq, skv, d, bn, kk, hl, tile = case
    g = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(b, hq, sq, d, generator=g), torch.randn(b, hkv, skv, d, generator=g), torch.randn(b, hkv, skv, d, generator=g)
    nkb = -(-skv // bn)
    block_idx = torch.randint(-1, nkb, (b, hl, sq, kk), generator=g, dtype=torch.int32)
    block_cnt = torch.randint(0, kk + 1, (b, hl, sq), generator=g, dtype=torch.int32)
    allowed = routed_mask(block_idx, block_cnt, bn, sq, skv, causal)
    key_mask = None
    if padded:  # random holes plus a fully padded first block
        key_mask = torch.rand(b, skv, generator=g) > 0.3
        key_mask[:, :bn] = False
        allowed = allowed & key_mask[:, None, None, :]

    dev = triton_device if backend == "triton" else "cpu"

    def grads(fn, *xs):
        xs = [x.clone().requires_grad_() for x in xs]
        out, lse = fn(*xs)
        loss = (out.double() * torch.linspace(-1, 1, d, dtype=torch.float64, device=out.device)).sum()
        loss = loss + torch.where(torch.isinf(lse), 0.0, lse.double()).sum()
        return [t.detach().cpu() for t in (out, lse, *torch.autograd.grad(loss, xs))]

    want = grads(lambda q, k, v: oracle.attention(q, k, v, allowed), q.double(), k.double(), v.double())
    got = grads(
        lambda q, k, v: vk.token_routed_attention(
            q, k, v, block_idx.to(dev), block_cnt.to(dev), block_n=bn, causal=causal, return_lse=True, backend=backend,
            tile=tile, key_mask=None if key_mask is None else key_mask.to(dev),
        ),
        q.to(dev), k.to(dev), v.to(dev),
    )
    for name, w, x in zip(("out", "lse", "dq", "dk", "dv"), want, got):
        assert torch.equal(torch.isinf(x), torch.isinf(w)), name
        fin = ~torch.isinf(w)
        assert (x[fin].double() - w[fin]).abs().max() < 1e-4, name


def test_int_count_and_all_blocks_equal_dense():
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    idx = torch.arange(4, dtype=torch.int32).expand(1, 2, 64, 4)
    out = vk.token_routed_attention(q, k, v, idx, 4, block_n=16, causal=True, backend="torch")
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-5, rtol=1e-4)


def test_token_routed_bad_inputs():
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    idx = torch.zeros(1, 2, 32, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"block_idx entries must lie in \[0, 2\)"):
        vk.token_routed_attention(q, k, v, idx + 2, block_n=16)
    with pytest.raises(ValueError, match="integer tensor"):
        vk.token_routed_attention(q, k, v, idx.float(), block_n=16)
    with pytest.raises(ValueError, match="block_idx shape"):
        vk.token_routed_attention(q, k, v, idx[:, :, :10], block_n=16)
    with pytest.raises(ValueError, match="block_n"):
        vk.token_routed_attention(q, k, v, idx, block_n=0)
    with pytest.raises(ValueError, match="block_cnt shape"):
        vk.token_routed_attention(q, k, v, idx, torch.ones(1, 2, 31, dtype=torch.int32), block_n=16)


@pytest.mark.slow
def test_flex_backend_token_routed_forward(oracle):
    """FlexAttention (compiled, forward only on CPU) with the per-token mask as a mask_mod."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, 80, 16, generator=g), torch.randn(1, 2, 96, 16, generator=g), torch.randn(1, 2, 96, 16, generator=g)
    block_idx = torch.randint(-1, 6, (1, 2, 80, 3), generator=g, dtype=torch.int32)
    got = vk.token_routed_attention(q, k, v, block_idx, block_n=16, causal=True, backend="flex", tile=16)
    want, _ = oracle.attention(q, k, v, routed_mask(block_idx, None, 16, 80, 96, True))
    assert (got.double() - want).abs().max() < 1e-4
