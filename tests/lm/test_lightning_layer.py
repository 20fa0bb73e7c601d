"""LightningAttention module swap (vzoo.lm.lightning): a float64 re-implementation of the layer written here,
cached generate() == greedy recomputation, causality, exact left padding, gradients, save/load, bad configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import vzoo.lm as lm
from vzoo.lm.lightning import LightningAttention, LightningConfig


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # generate() must not stop early: it is compared token for token
    return model


def slopes_by_hand(h: int) -> list[float]:
    """ALiBi slopes for a power-of-two head count: 2^(-8/h), 2^(-16/h), ..."""
    return [2.0 ** (-8.0 * (i + 1) / h) for i in range(h)]


def layer_by_hand(layer: LightningAttention, x: torch.Tensor, rates: list[float] | None) -> torch.Tensor:
    """float64 TransNormerLLM token mixer, one token and one head at a time."""
    x = x.double()
    w = {n: getattr(layer, n).weight.double() for n in ("q_proj", "k_proj", "v_proj", "o_proj", "u_proj")}
    b, t, _ = x.shape
    h, hk, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = F.silu(x @ w["q_proj"].T).view(b, t, h, d)
    k = F.silu(x @ w["k_proj"].T).view(b, t, hk, d)
    v = (x @ w["v_proj"].T).view(b, t, hk, d)
    out = torch.zeros(b, t, h, d, dtype=torch.float64)
    for bi in range(b):
        for head in range(h):
            lam = 1.0 if rates is None else math.exp(-rates[head])
            state = torch.zeros(d, d, dtype=torch.float64)
            for i in range(t):
                state = lam * state + torch.outer(k[bi, i, head // (h // hk)], v[bi, i, head // (h // hk)])
                out[bi, i, head] = q[bi, i, head] @ state
    o = out.reshape(b, t, h * d)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + layer.eps)
    return (o * (x @ w["u_proj"].T)) @ w["o_proj"].T


@pytest.mark.parametrize("decay,backend", [("alibi", None), ("fla", None), ("none", None), ("alibi", "reference")])
def test_layer_matches_hand_math(decay, backend):
    model = tiny_llama()
    old = model.model.layers[0].self_attn
    lm.convert(model, LightningConfig(layers=(0, 1), decay=decay, chunk_size=4, backend=backend))
    layer = model.model.layers[0].self_attn
    assert isinstance(layer, LightningAttention)
    assert torch.equal(layer.q_proj.weight, old.q_proj.weight) and torch.equal(layer.o_proj.weight, old.o_proj.weight)
    x = torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(1))
    h, layers = 4, 2
    if decay == "alibi":  # TransNormerLLM: slopes * (1 - idx / (L - 1) + 1e-5); layer 0 of 2
        rates = [s * (1 + 1e-5) for s in slopes_by_hand(h)]
    elif decay == "fla":  # (8 / H)(1 - idx / L) h
        rates = [8 / h * (1 - 0 / layers) * i for i in range(h)]
    else:
        rates = None
    with torch.no_grad():
        got = layer(x)[0]
    torch.testing.assert_close(got.double(), layer_by_hand(layer, x, rates), atol=1e-5, rtol=1e-5)


def greedy_by_recomputation(model, ids, steps, mask=None):
    for _ in range(steps):
        logits = model(ids, attention_mask=mask, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


@pytest.mark.parametrize("decay", ["alibi", "fla"])
def test_cached_generate_equals_recomputation(decay):
    model = lm.convert(tiny_llama(), LightningConfig(layers=(1,), decay=decay, chunk_size=8))
    ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=0)
        ref = greedy_by_recomputation(model, ids, 10)
    assert torch.equal(gen, ref)


def test_left_padding_is_exact():
    model = lm.convert(tiny_llama(), LightningConfig(chunk_size=8))  # every layer converted
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 64, (2, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, 6:]).logits
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        gen_alone = model.generate(ids[1:, 6:], attention_mask=mask[1:, 6:], max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(batch[1, 6:], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(gen[1, 6:], gen_alone[0])


def test_causality():
    model = lm.convert(tiny_llama(), LightningConfig(layers=(0, 1)))
    ids = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(4))
    changed = ids.clone()
    changed[0, 15] = (ids[0, 15] + 1) % 64
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :15], b[:, :15], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 15], b[:, 15])


def test_gradients_reach_the_new_parameters():
    model = lm.convert(tiny_llama(), LightningConfig(layers=(1,), norm="rms", gate="sigmoid"))
    model.train()
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(5))
    model(ids, labels=ids).loss.backward()
    layer = model.model.layers[1].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "u_proj"):
        grad = getattr(layer, name).weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert layer.norm_weight.grad is not None and layer.norm_weight.grad.abs().sum() > 0


def test_save_and_load(tmp_path):
    model = lm.convert(tiny_llama(), LightningConfig(layers=(1,), decay="fla", gate="sigmoid"))
    model.save_pretrained(tmp_path)
    loaded = lm.load_converted(tmp_path)
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded.model.layers[1].self_attn.config == model.model.layers[1].self_attn.config


@pytest.mark.parametrize("kwargs,word", [
    (dict(decay="alibi2"), "decay='alibi2'"), (dict(chunk_size=0), "chunk_size=0"), (dict(norm="layer"), "norm='layer'"),
    (dict(gate="tanh"), "gate='tanh'"), (dict(activation="gelu"), "activation='gelu'"), (dict(scale=-1.0), "scale=-1.0"),
    (dict(layers=[1]), "layers=\\[1\\]"), (dict(backend="cuda"), "backend='cuda'"),
    (dict(backend="naive"), "backend='naive' must be None, 'torch', 'reference' or 'triton'"),
])
def test_bad_config(kwargs, word):
    with pytest.raises(ValueError, match=word):
        LightningConfig(**kwargs)
