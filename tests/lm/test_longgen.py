"""LongGen in transformers: the patterns against loop-built masks, equality with eager attention when the
pattern covers everything, exact generation with an evicting cache, gradients, layer bookkeeping."""

from __future__ import annotations

import pytest
import torch

from vzoo.lm import LongGenConfig, apply_sparse_attention, longgen_attention


def loop_mask(pattern, n_q, n_kv, sink, window, block, stride):
    """bool [n_q, n_kv] from the paper's rules, one (query, key) pair at a time (queries end the keys)."""
    keep = torch.zeros(n_q, n_kv, dtype=torch.bool)
    for i in range(n_q):
        p = n_kv - n_q + i
        for j in range(p + 1):
            if pattern == "sink_window":
                keep[i, j] = j < sink or j > p - window
            else:
                qb, kb = p // block, j // block
                keep[i, j] = kb < sink // block or qb - kb < window // block or (stride > 0 and (kb + 1) % stride == 0)
    return keep


def masked_attention(q, k, v, keep, scale):
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1).double() for x in (k, v))
    s = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("n_q", [61, 1])  # prefill and one decode step
@pytest.mark.parametrize(
    "config",
    [LongGenConfig(sink=3, window=10, block_size=8), LongGenConfig(sink=0, window=17, block_size=4),
     LongGenConfig(pattern="local_stride", sink=8, window=16, block_size=8, stride=3),
     LongGenConfig(pattern="local_stride", sink=0, window=8, block_size=4, stride=0)],
)
def test_patterns_match_loop_masks(config, n_q):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, n_q, 16), torch.randn(2, 2, 61, 16), torch.randn(2, 2, 61, 16)
    keep = loop_mask(config.pattern, n_q, 61, config.sink, config.window, config.block_size, config.stride)
    want = masked_attention(q, k, v, keep, 0.25)
    got = longgen_attention(config, q, k, v, None, 0.25)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    padded = torch.ones(2, 1, n_q, 61, dtype=torch.bool)  # the dense padded path, with nothing padded
    torch.testing.assert_close(longgen_attention(config, q, k, v, padded, 0.25).double(), want, atol=1e-5, rtol=1e-5)


def test_default_full_layers_are_the_middle_third():
    for n in (3, 4, 6, 12, 32, 80):
        sparse = LongGenConfig().layer_ids(n)
        full = sorted(set(range(n)) - set(sparse))
        assert len(full) == max(1, round(n / 3))
        assert full == list(range(full[0], full[0] + len(full)))  # one contiguous run
        assert abs((full[0] + full[-1] + 1) / 2 - n / 2) <= 0.5  # centred
    assert LongGenConfig(full_layers=(0,)).layer_ids(3) == (1, 2)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("pattern", ["sink_window", "local_stride"])
def test_covering_pattern_equals_eager_with_left_padding_and_generate(lm, kind, pattern):
    config = LongGenConfig(pattern=pattern, sink=0, window=64, block_size=8, full_layers=(1,))
    lm.assert_equals_eager(lm.make(kind), config)


@pytest.mark.parametrize("padded", [False, True])
def test_evicting_cache_generates_exactly_and_stays_within_sink_plus_window(lm, padded):
    model = lm.make(layers=4)
    ids = torch.randint(0, 97, (2, 50))
    mask = torch.ones(2, 50, dtype=torch.long)
    if padded:
        mask[0, :5] = 0
    config = LongGenConfig(sink=4, window=12, block_size=8)  # layers 0, 2, 3 sparse; 1 full
    with torch.no_grad(), apply_sparse_attention(model, config):
        assert config.layer_ids(4) == (0, 2, 3)
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, use_cache=True)
        recomputed = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, use_cache=False)
        out = model(ids, attention_mask=mask, use_cache=True)
        cache = lm.cache_of(out)
        lengths = [layer.keys.shape[-2] for layer in cache.layers]
        assert cache.get_seq_length() == 50
        step = torch.randint(0, 97, (2, 1))
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        nxt = model(step, attention_mask=mask2, **{_cache_kwarg(out): cache}).logits
        full = model(torch.cat([ids, step], 1), attention_mask=mask2, use_cache=False).logits[:, -1:]
    assert torch.equal(cached, recomputed)
    assert lengths == [4 + 11, 50, 4 + 11, 4 + 11]  # sink + window - 1 kept; the next query makes the window
    torch.testing.assert_close(nxt, full, atol=1e-5, rtol=1e-5)


def _cache_kwarg(output) -> str:
    return "cache" if getattr(output, "cache", None) is not None else "past_key_values"


def test_gradients_match_eager_with_the_pattern_as_an_additive_mask(lm):
    model = lm.make()
    model.train()
    ids = torch.randint(0, 97, (1, 37))
    config = LongGenConfig(sink=2, window=9, block_size=4, full_layers=())
    keep = loop_mask("sink_window", 37, 37, 2, 9, 4, 0)
    additive = torch.zeros(1, 1, 37, 37).masked_fill(~keep, torch.finfo(torch.float32).min)

    def grads(**kwargs):
        model.zero_grad()
        model(ids, labels=ids, **kwargs).loss.backward()
        return [p.grad.clone() for p in model.model.layers[0].self_attn.parameters()]

    model.set_attn_implementation("eager")
    want = grads(attention_mask=additive)  # a 4D float mask is used as given (every layer sparse here)
    model.set_attn_implementation("sdpa")
    with apply_sparse_attention(model, config):
        got = grads()
    for g, w in zip(got, want):
        assert torch.isfinite(g).all() and g.abs().sum() > 0
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_remove_restores_and_bad_configs(lm):
    model = lm.make()
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        stock = model(ids).logits
        handle = apply_sparse_attention(model, LongGenConfig(sink=2, window=6, block_size=4))
        assert [hasattr(layer.self_attn, "vzoo_config") for layer in model.model.layers] == [True, False, True]
        assert not torch.allclose(model(ids).logits, stock, atol=1e-4)
        handle.remove()
        assert torch.equal(model(ids).logits, stock)
        assert not model.model.layers[0].self_attn._forward_pre_hooks  # the eviction hook is gone
    for kwargs, field in ((dict(pattern="dilated"), "pattern"), (dict(window=0), "window"), (dict(sink=-1), "sink"),
                          (dict(block_size=0), "block_size"), (dict(stride=2), "stride"), (dict(full_layers=(-1,)), "full_layers"),
                          (dict(pattern="local_stride", window=100), "window")):
        with pytest.raises(ValueError, match=f"LongGenConfig.{field}"):
            LongGenConfig(**kwargs)
    with pytest.raises(ValueError, match="LongGenConfig.full_layers"):
        apply_sparse_attention(model, LongGenConfig(full_layers=(5,)))
    dropping = lm.make()
    for layer in dropping.model.layers:
        layer.self_attn.attention_dropout = 0.1
    dropping.train()
    with apply_sparse_attention(dropping, LongGenConfig(sink=2, window=6, block_size=4)):
        with pytest.raises(ValueError, match="no attention dropout"):
            dropping(ids)
