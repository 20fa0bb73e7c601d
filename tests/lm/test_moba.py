"""MoBA in transformers: routing and attention against a loop oracle, equality with eager attention when
every block is selected (padding included), cache-consistent generation, removal."""

from __future__ import annotations

import math

import pytest
import torch

from vzoo.lm import MoBAConfig, apply_sparse_attention
from vzoo.lm.moba import KeyConv, moba_attention, moba_routing


def _oracle(q, k, v, block, topk, scale, sink=False):
    """Loops: per head and query position, candidate past blocks (ending before it) by mean-key score;
    with ``sink`` block 0 first whenever it is a candidate."""
    b, h, sq, _ = q.shape
    skv = k.shape[2]
    k, v = (x.repeat_interleave(h // x.shape[1], 1).double() for x in (k, v))
    out = torch.zeros(b, h, sq, q.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(sq):
                pos = skv - sq + i
                cands = [j for j in range(skv // block) if (j + 1) * block <= pos]
                scores = {j: (q[bi, hi, i].double() @ k[bi, hi, j * block : (j + 1) * block].mean(0)).item() for j in cands}
                ranked = sorted(cands, key=lambda j: (not (sink and j == 0), -scores[j]))
                chosen = set(ranked[: topk - 1]) | {pos // block}
                keys = [t for t in range(pos + 1) if t // block in chosen]
                w = torch.softmax((k[bi, hi, keys] @ q[bi, hi, i].double()) * scale, 0)
                out[bi, hi, i] = w @ v[bi, hi, keys]
    return out


@pytest.mark.parametrize("sq", [37, 1])  # prefill (ragged last block) and one decode step
def test_attention_matches_loop_oracle(sq):
    torch.manual_seed(1)
    q = torch.randn(1, 4, sq, 16)
    k, v = torch.randn(1, 2, 37, 16), torch.randn(1, 2, 37, 16)
    for topk in (1, 2, 3):
        for sink in (False, True):
            out = moba_attention(MoBAConfig(block_size=8, topk=topk, dense_fallback=False, sink=sink), q, k, v, None, 0.25)
            torch.testing.assert_close(out, _oracle(q, k, v, 8, topk, 0.25, sink).float(), atol=1e-5, rtol=1e-5)


def test_sink_keeps_the_first_block_the_official_rule_drops():
    torch.manual_seed(2)
    q, k = torch.randn(1, 1, 40, 8), torch.randn(1, 1, 40, 8)
    k[:, :, :8] = -q[:, :, -1:].sign() * 3  # block 0 scores lowest for the last query
    plain = moba_routing(q, k, 8, 2)[0, 0, -1].tolist()
    sunk = moba_routing(q, k, 8, 2, sink=True)[0, 0, -1].tolist()
    assert 0 not in plain and sunk == [4, 0]
    assert moba_routing(q, k, 8, 2, sink=True)[0, 0, :8, 1].tolist() == [-1] * 8  # block 0 is not past yet


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_every_block_selected_equals_eager_with_left_padding_and_generate(lm, kind):
    lm.assert_equals_eager(lm.make(kind), MoBAConfig(block_size=8, topk=64, dense_fallback=False))


def test_sparse_generation_with_cache_equals_recomputation(lm):
    model = lm.make()
    ids = torch.randint(0, 97, (1, 45))
    with torch.no_grad():
        stock = model(ids).logits
        with apply_sparse_attention(model, MoBAConfig(block_size=8, topk=2, dense_fallback=False)):
            assert not torch.allclose(model(ids).logits, stock, atol=1e-3)  # really sparse
            cached = model.generate(ids, max_new_tokens=16, do_sample=False, use_cache=True)
            recomputed = model.generate(ids, max_new_tokens=16, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)


def _register_oracle(layer: int, block: int, topk: int) -> str:
    """A transformers attention function: the loop oracle on ``layer``, SDPA elsewhere (no padding)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if module.layer_idx != layer:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        return _oracle(query, key, value, block, topk, scaling).float().transpose(1, 2), None

    AttentionInterface.register("test_moba_oracle", attention)
    return "test_moba_oracle"


def test_layers_remove_and_bad_configs(lm):
    model = lm.make()
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        stock = model(ids).logits
        model.set_attn_implementation(_register_oracle(layer=1, block=8, topk=2))  # the loop oracle on layer 1 only
        want = model(ids).logits
        model.set_attn_implementation("sdpa")
        with apply_sparse_attention(model, MoBAConfig(block_size=8, topk=2, layers=(1,), dense_fallback=False)) as handle:
            assert [hasattr(layer.self_attn, "vzoo_config") for layer in model.model.layers] == [False, True, False]
            torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(want, stock, atol=1e-3)  # layer 1 really is sparse
            with pytest.raises(RuntimeError, match="already"):
                apply_sparse_attention(model, MoBAConfig())
        handle.remove()
        assert torch.equal(model(ids).logits, stock) and model.config._attn_implementation == "sdpa"
    assert math.isfinite(stock.sum().item())
    for kwargs, field in ((dict(block_size=0), "block_size"), (dict(topk=0), "topk"), (dict(layers=(-1,)), "layers"),
                          (dict(key_conv=-1), "key_conv")):
        with pytest.raises(ValueError, match=f"MoBAConfig.{field}"):
            MoBAConfig(**kwargs)
    with pytest.raises(ValueError, match="MoBAConfig.layers"):
        apply_sparse_attention(model, MoBAConfig(layers=(3,)))
    with pytest.raises(ValueError, match="config must be"):
        apply_sparse_attention(model, {"block_size": 8})


def test_key_conv_is_causal_depthwise_and_starts_as_identity():
    torch.manual_seed(2)
    conv = KeyConv(heads=2, head_dim=3, width=4)
    k = torch.randn(1, 2, 9, 3)
    assert torch.equal(conv(k), k)  # identity at start
    with torch.no_grad():
        conv.weight.normal_()
    want = torch.zeros_like(k)
    for h in range(2):
        for c in range(3):
            taps = conv.weight[h * 3 + c, 0]
            for t in range(9):
                want[0, h, t, c] = sum(taps[i] * k[0, h, t - 3 + i, c] for i in range(4) if t - 3 + i >= 0)
    torch.testing.assert_close(conv(k), want, atol=1e-6, rtol=1e-6)


def test_flashmoba_key_conv_trains_generates_exactly_and_is_removed(lm):
    model = lm.make()
    ids = torch.randint(0, 97, (1, 45))
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model(ids).logits
        model.set_attn_implementation("sdpa")
    with apply_sparse_attention(model, MoBAConfig(block_size=8, topk=64, key_conv=3, dense_fallback=False)) as handle:
        names = [n for n, _ in model.named_parameters() if "vzoo_key_conv" in n]
        assert names == [f"model.layers.{i}.self_attn.vzoo_key_conv.weight" for i in range(3)]
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-5)  # identity at start
        model.train()
        model(ids, labels=ids).loss.backward()
        grad = model.model.layers[0].self_attn.vzoo_key_conv.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
        model.eval()
    assert not any("vzoo_key_conv" in n for n, _ in model.named_parameters()) and handle.model is None
    with torch.no_grad(), apply_sparse_attention(model, MoBAConfig(block_size=8, topk=2, key_conv=4, dense_fallback=False)):
        for layer in model.model.layers:
            layer.self_attn.vzoo_key_conv.weight.normal_(0, 0.5)
        cached = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True)
        recomputed = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)
