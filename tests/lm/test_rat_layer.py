"""RAT as a module swap in a tiny Llama: the layer against a float64 re-implementation of the reference layer,
weight copy, gate-bias init, causality, cached generation == recomputation (prompts ending inside a chunk),
chunked prefill through the cache, gradients, padding refused, config validation."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vzoo.lm
from vzoo.lm.rat import RATConfig, RATLayer

VOCAB = 64
# transformers 5 names the cache argument ``cache``, 4.x ``past_key_values``
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def ids(b=2, t=24, seed=1):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def rat_reference(layer: RATLayer, x: torch.Tensor) -> torch.Tensor:
    """float64, token by token: z, v, g, q, k from the layer's weights; the [v; k] state restarts every chunk;
    the query at chunk c attends (softmax) to the rotated final key states of chunks < c and its own; heads read
    group h // (H / G); output W_o(z * attn)."""
    w = {n: p.detach().double() for n, p in layer.named_parameters()}
    x = x.double()
    b, t, _ = x.shape
    h, d, grp, L = layer.num_heads, layer.head_dim, layer.config.ngroups, layer.config.chunk_size
    lin = lambda name: x @ w[f"{name}.weight"].T + (w[f"{name}.bias"] if f"{name}.bias" in w else 0)  # noqa: E731
    z = torch.sigmoid(lin("z_proj")).view(b, t, h, d)
    v = lin("v_proj").view(b, t, h, d)
    g = torch.sigmoid(lin("g_proj") + w["gate_bias"]).view(b, t, h, d)
    q = lin("q_proj").view(b, t, grp, d)
    k = lin("k_proj").view(b, t, grp, d)
    inv = torch.tensor([layer.config.rope_base ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)

    def rot(vec, c):
        ang = c * inv
        a, bb = vec[..., : d // 2], vec[..., d // 2 :]
        return torch.cat([a * ang.cos() - bb * ang.sin(), bb * ang.cos() + a * ang.sin()], -1)

    out = torch.zeros(b, t, h, d, dtype=torch.float64)
    for head in range(h):
        gi = head // (h // grp)
        finals = []
        for i in range(t):
            c = i // L
            if i % L == 0:
                sk = torch.zeros(b, d, dtype=torch.float64)
                sv = torch.zeros(b, d, dtype=torch.float64)
            sk = g[:, i, head] * sk + (1 - g[:, i, head]) * k[:, i, gi]
            sv = g[:, i, head] * sv + (1 - g[:, i, head]) * v[:, i, head]
            keys = torch.stack([f[0] for f in finals] + [rot(sk, c)], 1)  # [B, n, D]
            vals = torch.stack([f[1] for f in finals] + [sv], 1)
            p = torch.softmax((keys * rot(q[:, i, gi], c)[:, None]).sum(-1) / math.sqrt(d), -1)
            out[:, i, head] = (p[..., None] * vals).sum(1)
            if i % L == L - 1:
                finals.append((rot(sk, c), sv))
    return (z * out).reshape(b, t, h * d) @ w["o_proj.weight"].T


@pytest.mark.parametrize("chunk,t", [(4, 19), (5, 10), (32, 12)])
def test_layer_matches_reimplementation(chunk, t):
    model = tiny_llama()
    layer = RATLayer(RATConfig(chunk_size=chunk), model.config, 0)
    layer.init_from_attention(model.model.layers[0].self_attn)
    x = torch.randn(2, t, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, extra = layer(x)
    assert extra is None and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), rat_reference(layer, x), atol=1e-5, rtol=1e-5)


def test_init_from_attention_copies_matching_heads():
    model = tiny_llama()
    attn = model.model.layers[1].self_attn
    layer = RATLayer(RATConfig(ngroups=2), model.config, 1)
    layer.init_from_attention(attn)
    d = 16
    assert torch.equal(layer.o_proj.weight, attn.o_proj.weight)
    for head in range(4):  # value of query head h = the attention's kv head h // 2
        kv = head // 2
        assert torch.equal(layer.v_proj.weight[head * d : (head + 1) * d], attn.v_proj.weight[kv * d : (kv + 1) * d])
    for g in range(2):  # group g: the query of attention head 2g and the kv head it read (g)
        assert torch.equal(layer.q_proj.weight[g * d : (g + 1) * d], attn.q_proj.weight[2 * g * d : (2 * g + 1) * d])
        assert torch.equal(layer.k_proj.weight[g * d : (g + 1) * d], attn.k_proj.weight[g * d : (g + 1) * d])


@pytest.mark.parametrize("chunk", [2, 16, 64])
def test_gate_bias_init_range(chunk):
    model = vzoo.lm.convert(tiny_llama(), RATConfig(layers=(0,), chunk_size=chunk))
    bias = model.model.layers[0].self_attn.gate_bias.detach()
    assert bias.shape == (64,)
    assert bias.min() >= math.log(1.0) - 1e-6 and bias.max() <= math.log(max(chunk - 1, 1)) + 1e-6
    if chunk > 2:  # spread over the range, as log U(1, L - 1)
        assert bias.max() - bias.min() > 0.5 * math.log(chunk - 1)


def test_causality():
    model = vzoo.lm.convert(tiny_llama(), RATConfig(chunk_size=4))
    x = ids(b=1, t=30)
    y = x.clone()
    y[0, 17] = (y[0, 17] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert (a[:, :17] - b[:, :17]).abs().max() < 1e-5
    assert (a[:, 17:] - b[:, 17:]).abs().max() > 1e-3


@pytest.mark.parametrize("layers,chunk,prompt", [((1,), 4, 12), ((0,), 4, 10), ((1,), 5, 7), ((0,), 3, 1)])
def test_cached_generate_equals_recomputation(layers, chunk, prompt):
    model = vzoo.lm.convert(tiny_llama(), RATConfig(layers=layers, chunk_size=chunk))
    x = ids(b=2, t=prompt, seed=3)
    with torch.no_grad():
        gen = model.generate(x, max_new_tokens=10, do_sample=False, min_new_tokens=10)
        seq = x
        for _ in range(10):  # greedy by full recomputation, no cache
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(gen, seq)


@pytest.mark.parametrize("prompt", [5, 8])
def test_cached_decode_logits_equal_full_forward(prompt):
    """Token-by-token decoding through the cache (rat_step, the cache growing past its first capacity) gives
    the full forward's logits."""
    model = vzoo.lm.convert(tiny_llama(), RATConfig(layers=(1,), chunk_size=2))
    x = ids(b=2, t=prompt + 40, seed=4)
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :prompt], use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        steps = [out.logits] + [model(x[:, i : i + 1], **{CACHE_ARG: cache}, use_cache=True).logits
                                for i in range(prompt, x.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_through_the_cache():
    """Two forward calls with one cache (the second starts inside a chunk) == one call; the cache holds one
    key/value state per finished chunk."""
    model = vzoo.lm.convert(tiny_llama(), RATConfig(layers=(1,), chunk_size=4))
    x = ids(b=2, t=19, seed=5)
    with torch.no_grad():
        full = model(x).logits
        first = model(x[:, :6], use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        second = model(x[:, 6:], **{CACHE_ARG: cache}, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first.logits, second], 1), full, atol=1e-5, rtol=1e-5)
    state = cache.layers[1]
    assert cache.get_seq_length() == 19 and state.seen == 6
    assert state["keys"].shape[:2] == (2, 4) and state["keys"].shape[2] >= 4 and state["key_run"].shape == (2, 4, 16)


def test_gradients_reach_parameters():
    model = vzoo.lm.convert(tiny_llama(), RATConfig(layers=(0,), chunk_size=4))
    model.train()
    x = ids(b=2, t=18, seed=6)
    model(x, labels=x).loss.backward()
    layer = model.model.layers[0].self_attn
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_reference_backend_and_bf16():
    x = ids(b=1, t=21, seed=7)
    outs = []
    for backend in ("torch", "reference"):
        model = vzoo.lm.convert(tiny_llama(), RATConfig(chunk_size=4, backend=backend))
        with torch.no_grad():
            outs.append(model(x).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        low = model.to(torch.bfloat16)(x).logits.float()
    rel = (low - outs[1]).pow(2).mean().sqrt() / outs[1].pow(2).mean().sqrt()
    assert rel < 5e-2


def test_padded_batch_is_refused():
    model = vzoo.lm.convert(tiny_llama(), RATConfig(layers=(0,)))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="RAT does not support padded batches"):
        model(ids(t=10), attention_mask=mask)
    with torch.no_grad():  # an all-ones mask is no padding
        model(ids(t=10), attention_mask=torch.ones(2, 10, dtype=torch.long))


@pytest.mark.parametrize("kwargs,word", [
    (dict(chunk_size=0), "chunk_size"), (dict(ngroups=0), "ngroups"), (dict(rope_base=-1.0), "rope_base"),
    (dict(backend="triton"), "backend"), (dict(layers=[0]), "layers"), (dict(chunk_size=True), "chunk_size"),
    (dict(backend="naive"), "backend='naive' must be None, 'torch' or 'reference'"),
])
def test_config_validation(kwargs, word):
    with pytest.raises(ValueError, match=f"RATConfig.{word}"):
        RATConfig(**kwargs)


def test_ngroups_must_divide_heads():
    with pytest.raises(ValueError, match="ngroups=3"):
        vzoo.lm.convert(tiny_llama(), RATConfig(ngroups=3))
    assert vzoo.lm.RATConfig is RATConfig
