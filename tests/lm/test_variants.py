"""Deconstructing-Attention variants (vzoo.lm.variants): each against a per-token loop written here from
the layer's own weights, the properties that define them (no mixing, input-independent weights, weights
that depend only on the token ids), hybrids, causality, cached generation and training of owned parameters."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vzoo.lm.variants as variants
from vzoo.lm import AttentionVariantConfig, apply_sparse_attention
from vzoo.lm.variants import VARIANTS

H, HKV, D = 4, 2, 8
WEIGHTS = variants.variant_weights


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=H,
                      num_key_value_heads=HKV, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).double().eval()


def _ids(seed: int, n: int = 10) -> torch.Tensor:
    return torch.randint(0, 50, (1, n), generator=torch.Generator().manual_seed(seed))


def _capture(model, layer: int) -> dict:
    """Input (the normed hidden state) and output of ``layer``'s attention on the next forward pass."""
    seen = {}

    def hook(mod, args, kwargs, out):
        seen["h"], seen["out"] = kwargs["hidden_states"], out[0]
    model.model.layers[layer].self_attn.register_forward_hook(hook, with_kwargs=True)
    return seen


def _rope(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """One head vector ``x [D]`` rotated to position ``pos`` (pairs (t, t + D/2))."""
    out = x.clone()
    for t in range(D // 2):
        a = pos * theta ** (-2 * t / D)
        out[t] = x[t] * math.cos(a) - x[t + D // 2] * math.sin(a)
        out[t + D // 2] = x[t + D // 2] * math.cos(a) + x[t] * math.sin(a)
    return out


def _reference(model, layer: int, h: torch.Tensor, ids: torch.Tensor, variant: str) -> torch.Tensor:
    """The attention output ``[S, hidden]`` of ``variant`` on layer ``layer`` for its input ``h [S, hidden]``,
    token by token."""
    attn, block = model.model.layers[layer].self_attn, model.model.layers[layer]
    theta = model.config.rope_parameters["rope_theta"]
    s = h.shape[0]
    source = h  # another Q/K source goes through the layer's own input norm, as the hidden state did
    if variant == "embedding_qk":
        source = block.input_layernorm(model.model.embed_tokens(ids)[0])
    elif variant == "random_qk":
        source = block.input_layernorm(attn.vzoo_random_vectors[:s])
    q = (source @ attn.q_proj.weight.T).view(s, H, D)
    k = (source @ attn.k_proj.weight.T).view(s, HKV, D)
    v = (h @ attn.v_proj.weight.T).view(s, HKV, D)
    out = torch.zeros(s, H, D, dtype=h.dtype)
    for head in range(H):
        g = head // (H // HKV)
        for i in range(s):
            if variant == "no_mixing":
                out[i, head] = v[i, g]
                continue
            qi = _rope(q[i, head], i, theta)
            keys = [_rope(k[j, g], j, theta) for j in range(i + 1)]
            dots = torch.stack([qi @ kj for kj in keys])
            if variant == "static_mixing":
                w = torch.softmax(attn.vzoo_static_logits[head, i, : i + 1], 0)
            elif variant == "elu_kernel":
                f = torch.stack([(torch.nn.functional.elu(qi) + 1) @ (torch.nn.functional.elu(kj) + 1) for kj in keys])
                w = f / f.sum()
            elif variant == "sigmoid":
                w = torch.sigmoid(dots / math.sqrt(D) - math.log(i + 1))
            else:  # standard, random_qk, embedding_qk: softmax of scaled dot products
                w = torch.softmax(dots / math.sqrt(D), 0)
            out[i, head] = sum(w[j] * v[j, g] for j in range(i + 1))
    return out.reshape(s, H * D) @ attn.o_proj.weight.T


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_matches_the_token_loop(variant):
    model = _model()
    ids = _ids(1)
    apply_sparse_attention(model, AttentionVariantConfig(variant, layers=(1,), max_len=32))
    attn = model.model.layers[1].self_attn
    if variant == "static_mixing":
        with torch.no_grad():
            attn.vzoo_static_logits.normal_()  # zeros would be plain causal averaging
    seen = _capture(model, 1)
    with torch.no_grad():
        model(ids)
        want = _reference(model, 1, seen["h"][0], ids, variant)
    torch.testing.assert_close(seen["out"][0], want, atol=1e-10, rtol=1e-10)


def test_no_mixing_output_at_a_position_ignores_every_other_token():
    model = _model()
    ids = _ids(2)
    other = ids.clone()
    other[0, 4] = (ids[0, 4] + 1) % 50
    with torch.no_grad(), apply_sparse_attention(model, AttentionVariantConfig("no_mixing")):
        a, b = model(ids).logits[0], model(other).logits[0]
    keep = torch.arange(10) != 4
    assert torch.equal(a[keep], b[keep])  # every layer position-wise: only token 4's logits move
    assert not torch.allclose(a[4], b[4])


def _weights(model, monkeypatch, config, *inputs) -> list[torch.Tensor]:
    """The mixing weights of the patched layers for each forward pass ``model(x)``; ``static_mixing``
    logits drawn at random first (zeros would be plain causal averaging)."""
    got = []

    def spy(*args, **kwargs):
        got.append(WEIGHTS(*args, **kwargs))
        return got[-1]
    monkeypatch.setattr(variants, "variant_weights", spy)
    with torch.no_grad(), apply_sparse_attention(model, config):
        for m in model.modules():
            if hasattr(m, "vzoo_static_logits"):
                m.vzoo_static_logits.normal_()
        for x in inputs:
            model(x)
    return got


@pytest.mark.parametrize("variant", ["random_qk", "static_mixing"])
def test_sequence_independent_weights_are_the_same_for_different_inputs(variant, monkeypatch):
    model = _model()
    config = AttentionVariantConfig(variant, max_len=32)
    w = _weights(model, monkeypatch, config, _ids(3), _ids(4))
    assert len(w) == 4  # two layers, two inputs
    assert torch.equal(w[0], w[2]) and torch.equal(w[1], w[3])
    assert not torch.allclose(w[0], w[1])  # each layer its own pattern
    assert torch.allclose(w[0].sum(-1), torch.ones(1, dtype=w[0].dtype).expand_as(w[0].sum(-1)))
    base = _weights(_model(), monkeypatch, AttentionVariantConfig("elu_kernel"), _ids(3), _ids(4))
    assert not torch.allclose(base[0], base[2])  # the check can fail: Q·K weights do depend on the input


def test_embedding_qk_weights_depend_only_on_the_token_ids(monkeypatch):
    model = _model()
    ids = _ids(5)
    config = AttentionVariantConfig("embedding_qk", layers=(1,))
    clean = _weights(model, monkeypatch, config, ids)
    handle = model.model.layers[0].register_forward_hook(lambda mod, args, out: out + torch.randn_like(out))
    noisy = _weights(model, monkeypatch, config, ids)  # layer 1 sees another hidden state, the same ids
    other = _weights(model, monkeypatch, config, _ids(6))
    handle.remove()
    assert torch.equal(clean[0], noisy[0])
    assert not torch.allclose(clean[0], other[0])
    seen = _capture(model, 1)
    with torch.no_grad(), apply_sparse_attention(model, config):
        model(ids)
        out = seen["out"]
        model.model.layers[0].register_forward_hook(lambda mod, args, o: o + 1.0)
        model(ids)
    assert not torch.allclose(out, seen["out"])  # the values still come from the hidden state


def test_hybrid_standard_layers_are_the_unpatched_model():
    model = _model()
    ids = _ids(7)
    with torch.no_grad():
        stock_out = model(ids, output_hidden_states=True)
        stock = stock_out.hidden_states
        with apply_sparse_attention(model, AttentionVariantConfig("no_mixing", layers=(1,))):
            late = model(ids, output_hidden_states=True).hidden_states
        seen = _capture(model, 1)
        with apply_sparse_attention(model, AttentionVariantConfig("sigmoid", layers=(0,))):
            early = model(ids, output_hidden_states=True).hidden_states
            want = _reference(model, 1, seen["h"][0], ids, "standard")  # layer 1 kept the model's attention
    assert torch.equal(late[1], stock[1]) and not torch.allclose(late[2], stock[2])
    assert not torch.allclose(early[1], stock[1])
    torch.testing.assert_close(seen["out"][0], want, atol=1e-10, rtol=1e-10)
    with torch.no_grad(), apply_sparse_attention(model, AttentionVariantConfig("sigmoid", layers=())):
        assert torch.equal(model(ids).logits, stock_out.logits)  # () changes nothing


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_and_cached_generation_equals_recomputation(variant):
    model = _model()
    ids, later = _ids(8), _ids(9)
    changed = torch.cat([ids[:, :6], later[:, 6:]], 1)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad(), apply_sparse_attention(model, AttentionVariantConfig(variant, max_len=32)):
        a, b = model(ids).logits, model(changed).logits
        cached = model.generate(torch.cat([ids, later]), attention_mask=mask, max_new_tokens=5, do_sample=False)
        again = model.generate(torch.cat([ids, later]), attention_mask=mask, max_new_tokens=5, do_sample=False,
                               use_cache=False)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=0, rtol=0)  # the future does not leak
    assert not torch.allclose(a[:, 6:], b[:, 6:])
    assert torch.equal(cached, again)


def test_owned_parameters_train_with_the_model_and_leave_with_remove():
    model = _model()
    handle = apply_sparse_attention(model, AttentionVariantConfig("static_mixing", layers=(0,), max_len=16))
    names = [n for n, _ in model.named_parameters() if "vzoo_static_logits" in n]
    assert names == ["model.layers.0.self_attn.vzoo_static_logits"]
    model.train()
    model(_ids(10), labels=_ids(10)).loss.backward()
    assert model.model.layers[0].self_attn.vzoo_static_logits.grad.abs().sum() > 0
    handle.remove()
    assert not any("vzoo" in n for n, _ in model.named_parameters())
    assert not hasattr(model.model.layers[0].self_attn, "vzoo_variant")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="variant='softmax'"):
        AttentionVariantConfig("softmax")
    with pytest.raises(ValueError, match="max_len=0"):
        AttentionVariantConfig("random_qk", max_len=0)
    with pytest.raises(ValueError, match="layers"):
        AttentionVariantConfig("no_mixing", layers=[0])
    model = _model()
    with pytest.raises(ValueError, match="indices >= num_layers=2"):
        apply_sparse_attention(model, AttentionVariantConfig("no_mixing", layers=(2,)))
    with torch.no_grad(), apply_sparse_attention(model, AttentionVariantConfig("random_qk", max_len=8)):
        with pytest.raises(ValueError, match="position 9 is beyond AttentionVariantConfig.max_len=8"):
            model(_ids(11))
    with torch.no_grad(), apply_sparse_attention(model, AttentionVariantConfig("embedding_qk")):
        with pytest.raises(ValueError, match="embedding_qk needs the input embeddings"):
            model(inputs_embeds=torch.randn(1, 5, 32, dtype=torch.float64))
