"""Block-diffusion attention in a transformers model: the block-causal and BD3 masks on the block-sparse path
equal eager attention with the same masks as 4-D float masks (built here by brute force), the training input
shares positions across halves, a block on top of the KV cache equals recomputation, and padding is hidden."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from vzoo.lm import BlockDiffusionConfig, apply_sparse_attention
from vzoo.lm.block_diffusion import bd3_forward


def _float_mask(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


def _block_causal(q_len: int, kv_len: int, block: int) -> torch.Tensor:
    return torch.tensor([[j // block <= (kv_len - q_len + i) // block for j in range(kv_len)] for i in range(q_len)])


def _bd3(t: int, block: int) -> torch.Tensor:
    def ok(q, k):
        bq, bk = (q % t) // block, (k % t) // block
        return (bq == bk) if q < t and k < t else (bk < bq) if q < t else (k >= t and bk <= bq)
    return torch.tensor([[ok(q, k) for k in range(2 * t)] for q in range(2 * t)])


def _eager(model):
    model.set_attn_implementation("eager")
    return model


def test_prompt_equals_eager_with_the_block_causal_mask(lm):
    model = lm.make(layers=2)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _eager(model)(ids, attention_mask=_float_mask(_block_causal(24, 24, 8))).logits
        model.set_attn_implementation("sdpa")
        with apply_sparse_attention(model, BlockDiffusionConfig(block=8)):
            out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    # inside a block the first token sees the last one (bidirectional), across blocks nothing later
    with torch.no_grad(), apply_sparse_attention(model, BlockDiffusionConfig(block=8)):
        changed = ids.clone()
        changed[:, 7] = (changed[:, 7] + 1) % 97
        diff = (model(changed).logits - out).abs().amax(-1)
    assert (diff[:, :8] > 0).all() and (diff[:, 8:] > 0).all()
    with torch.no_grad(), apply_sparse_attention(model, BlockDiffusionConfig(block=8)):
        changed = ids.clone()
        changed[:, 16] = (changed[:, 16] + 1) % 97
        diff = (model(changed).logits - out).abs().amax(-1)
    assert (diff[:, :16] == 0).all() and (diff[:, 16:] > 0).all()


@pytest.mark.parametrize("start", [8, 12])
def test_a_block_on_top_of_the_cache_equals_recomputation(lm, start):
    """The block-level cache: complete blocks in the cache, the rest recomputed, as the full forward."""
    model = lm.make(layers=2)
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), apply_sparse_attention(model, BlockDiffusionConfig(block=4)):
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        model(ids[:, :start], cache=cache, use_cache=True)
        rest = model(ids[:, start:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(rest, full[:, start:], atol=2e-5, rtol=2e-5)


def test_bd3_training_input_equals_eager_with_the_bd3_mask(lm):
    model = lm.make(layers=2).train()
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 96, (2, 16), generator=g)
    noisy = torch.where(torch.rand(2, 16, generator=g) < 0.5, torch.full_like(clean, 96), clean)
    with apply_sparse_attention(model, BlockDiffusionConfig(block=4)):
        out = bd3_forward(model, noisy, clean).logits
        out[:, :16].sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ids, pos = torch.cat([noisy, clean], 1), torch.arange(16).repeat(2)[None].expand(2, -1)
    ref = _eager(model)(ids, position_ids=pos, attention_mask=_float_mask(_bd3(16, 4))).logits
    ref[:, :16].sum().backward()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-4, rtol=1e-4)
    model.zero_grad()
    eager = bd3_forward(model, noisy, clean, block=4).logits  # the same mask as a 4-D float mask
    torch.testing.assert_close(eager, ref, atol=1e-5, rtol=1e-5)


def test_noisy_block_depends_on_earlier_clean_blocks_only(lm):
    model = lm.make(layers=2)
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 96, (1, 12), generator=g)
    noisy = clean.clone()
    noisy[:, 4:8] = 96
    with torch.no_grad(), apply_sparse_attention(model, BlockDiffusionConfig(block=4)):
        base = bd3_forward(model, noisy, clean).logits[:, :12]
        for pos, affected in ((5, range(4, 8)), (12 + 4, range(8, 12)), (12 + 1, range(4, 12))):
            ids = torch.cat([noisy, clean], 1)
            ids[0, pos] = (ids[0, pos] + 1) % 96
            out = bd3_forward(model, ids[:, :12], ids[:, 12:]).logits[:, :12]
            moved = set(torch.nonzero((out - base).abs().amax(-1)[0] > 0).flatten().tolist())
            assert moved == set(affected), (pos, moved)


def test_padding_is_hidden_and_bad_calls_refused(lm):
    model = lm.make(layers=2)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :4] = 0  # a whole block of left padding
    with torch.no_grad():
        allowed = _block_causal(16, 16, 4)[None].repeat(2, 1, 1) & mask.bool()[:, None, :]
        four_d = torch.zeros(2, 1, 16, 16).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        ref = _eager(model)(ids, attention_mask=four_d).logits
        model.set_attn_implementation("sdpa")
        with apply_sparse_attention(model, BlockDiffusionConfig(block=4)):
            out = model(ids, attention_mask=mask).logits
            with pytest.raises(ValueError, match="pass block="):
                model.set_attn_implementation("sdpa")
                bd3_forward(model, ids[:, :8], ids[:, 8:])
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="BlockDiffusionConfig.block"):
        BlockDiffusionConfig(block=0)


def test_a_chunk_starting_inside_a_block_uses_the_exact_dense_mask():
    from vzoo.lm.block_diffusion import block_diffusion_attention

    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 4, 9, 8, generator=g), torch.randn(1, 2, 20, 8, generator=g), torch.randn(1, 2, 20, 8, generator=g)
    out = block_diffusion_attention(BlockDiffusionConfig(block=4), q, k, v, None, 0.35)
    allowed = _block_causal(9, 20, 4)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    ref = torch.softmax((q @ kk.transpose(-1, -2) * 0.35).masked_fill(~allowed, float("-inf")), -1) @ vv
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_latent_spans_are_bidirectional_inside_and_causal_across(lm):
    """LaDiR's mask in a transformers model: a later token of the same span changes earlier outputs of the span,
    a token of a later span changes nothing before that span."""
    from vzoo.kernels.block_diffusion import additive_mask, block_spans_mask

    model = lm.make(layers=2)
    ids = torch.randint(0, 97, (1, 14), generator=torch.Generator().manual_seed(6))
    mask = additive_mask(block_spans_mask(14, [(3, 7), (9, 12)]))
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        for pos, moved_from in ((6, 3), (10, 9)):
            changed = ids.clone()
            changed[0, pos] = (changed[0, pos] + 1) % 97
            diff = (model(changed, attention_mask=mask).logits - base).abs().amax(-1)[0]
            assert (diff[:moved_from] == 0).all() and (diff[moved_from:] > 0).all(), (pos, diff)
