"""Routing Transformer attention as a module swap in a tiny Llama: forward/backward, commitment-loss gradients, the
EMA k-means step against a hand computation, causality, cached generation == recomputation (prompts ending
mid-segment, token-by-token and chunked prefill through a DynamicCache), save/load, padding refused, config checks."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vzoo.lm
from vzoo.lm.routing import RoutingAttention, RoutingConfig, routing_aux_loss

VOCAB = 64
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
SMALL = dict(clusters=3, window=2, segment=4, local_window=3)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def ids(b=2, t=24, seed=1):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def converted(**kw) -> LlamaForCausalLM:
    return vzoo.lm.convert(tiny_llama(), RoutingConfig(**{"layers": (1,), **SMALL, **kw}))


def test_forward_backward_and_weight_copy():
    model = tiny_llama()
    attn = model.model.layers[1].self_attn
    vzoo.lm.convert(model, RoutingConfig(layers=(1,), **SMALL))
    layer = model.model.layers[1].self_attn
    assert isinstance(layer, RoutingAttention) and layer.routing_heads == 2
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert torch.equal(getattr(layer, name).weight, getattr(attn, name).weight)
    assert layer.centroids.shape == (2, 3, 16) and torch.allclose(layer.centroids.norm(dim=-1), torch.ones(2, 3))
    model.train()
    x = ids(t=19)
    (model(x, labels=x).loss + routing_aux_loss(model)).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_commitment_loss_reaches_routing_projections_only():
    model = converted(commitment=1.0)
    model.train()
    model(ids(t=13))
    layer = model.model.layers[1].self_attn
    loss = routing_aux_loss(model)
    assert loss.item() > 0
    loss.backward()
    d = 16
    q_grad = layer.q_proj.weight.grad
    assert q_grad[: 2 * d].abs().sum() > 0 and q_grad[2 * d :].abs().sum() == 0  # routing heads 0, 1 only
    assert layer.k_proj.weight.grad[:d].abs().sum() > 0  # kv head 0 serves routing heads 0, 1
    assert layer.k_proj.weight.grad[d:].abs().sum() == 0
    assert layer.v_proj.weight.grad is None or layer.v_proj.weight.grad.abs().sum() == 0
    model.eval()
    with torch.no_grad():
        model(ids(t=13))
    assert layer.aux_loss is None and routing_aux_loss(model).item() == 0


def test_ema_kmeans_step_by_hand():
    model = tiny_llama()
    cfg = RoutingConfig(ema_decay=0.5, commitment=0.3, **SMALL)
    layer = RoutingAttention(cfg, model.config, 0)
    layer.init_from_attention(model.model.layers[0].self_attn)
    layer.train()
    x = torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(3))
    pos = model.model.rotary_emb(x, torch.arange(11)[None].expand(2, -1))
    old = layer.centroids.clone()
    y, _ = layer(x, position_embeddings=pos)
    assert torch.equal(layer.centroids, old)  # the forward does not move the centroids
    # by hand: routing vectors = normalised pre-RoPE q of heads 0, 1 and k of kv head 0 (read by both)
    q = (x @ layer.q_proj.weight.T).view(2, 11, 4, 16)
    k = (x @ layer.k_proj.weight.T).view(2, 11, 2, 16)
    want, commit = torch.empty_like(old), 0.0
    for h in range(2):
        vecs = torch.cat([q[:, :, h].reshape(-1, 16), k[:, :, 0].reshape(-1, 16)])
        vecs = vecs / vecs.norm(dim=-1, keepdim=True)
        near = (vecs @ old[h].T).argmax(-1)
        commit += ((vecs - old[h][near]) ** 2).sum()
        for c in range(3):
            mine = vecs[near == c]
            step = mine.sum(0) / mine.sum(0).norm() if len(mine) else old[h, c]
            mixed = 0.5 * old[h, c] + 0.5 * step
            want[h, c] = mixed / mixed.norm()
            if len(mine):  # moved towards the batch mean of its members
                unit = mine.mean(0) / mine.mean(0).norm()
                assert want[h, c] @ unit > old[h, c] @ unit
    torch.testing.assert_close(layer.aux_loss, 0.3 * commit / (2 * 2 * 22 * 16), atol=1e-6, rtol=1e-5)
    y.sum().backward()
    assert not torch.equal(layer.centroids, old)
    torch.testing.assert_close(layer.centroids, want, atol=1e-6, rtol=1e-5)
    moved = layer.centroids.clone()
    layer.apply_kmeans_update()  # the step was consumed by the backward hook
    assert torch.equal(layer.centroids, moved)


def test_causality():
    model = converted(layers=None)
    x = ids(b=1, t=30)
    y = x.clone()
    y[0, 17] = (y[0, 17] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert (a[:, :17] - b[:, :17]).abs().max() < 1e-6
    assert (a[:, 17:] - b[:, 17:]).abs().max() > 1e-3


@pytest.mark.parametrize("kw,prompt", [
    (dict(layers=(1,)), 7), (dict(layers=(0, 1)), 4), (dict(layers=(0,), routing_heads=4), 5),
    (dict(layers=(1,), query_clusters=2, routing_heads=1), 1),
])
def test_cached_generate_equals_recomputation(kw, prompt):
    model = converted(**kw)
    for layer in model.model.layers:  # non-zero null slots, so the routed part matters
        if isinstance(layer.self_attn, RoutingAttention):
            torch.nn.init.normal_(layer.self_attn.null_k, std=0.5)
            torch.nn.init.normal_(layer.self_attn.null_v, std=0.5)
    x = ids(b=2, t=prompt, seed=3)
    with torch.no_grad():
        gen = model.generate(x, max_new_tokens=14, do_sample=False, min_new_tokens=14)
        seq = x
        for _ in range(14):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(gen, seq)


def test_step_by_step_and_chunked_prefill_equal_full_forward():
    from transformers import DynamicCache

    model = converted(layers=(0, 1))
    x = ids(b=2, t=31, seed=4)
    with torch.no_grad():
        full = model(x).logits
        cache = DynamicCache()
        steps = [model(x[:, :6], **{CACHE_ARG: cache}, use_cache=True).logits]
        steps += [model(x[:, i : i + 1], **{CACHE_ARG: cache}, use_cache=True).logits for i in range(6, 20)]
        steps.append(model(x[:, 20:], **{CACHE_ARG: cache}, use_cache=True).logits)  # a chunk from mid-segment
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    state = cache.layers[1]
    assert cache.get_seq_length() == 31
    assert state["routed_k"].shape == (2, 2, 3, 7 * 2, 16)  # 7 complete segments of 4, 2 keys per cluster
    assert state["pending_k"].shape[2] == 3 and state["local_k"].shape == (2, 2, 2, 16)


def test_save_load_round_trip(tmp_path):
    model = converted(layers=(0,), routing_heads=3, query_clusters=2)
    model.train()
    x = ids(t=12)
    (model(x, labels=x).loss + routing_aux_loss(model)).backward()  # centroids move
    model.eval()
    model.save_pretrained(tmp_path)
    torch.manual_seed(123)  # a fresh layer would draw other centroids
    loaded = vzoo.lm.load_converted(tmp_path)
    layer = loaded.model.layers[0].self_attn
    assert layer.config == model.model.layers[0].self_attn.config and layer.routing_heads == 3
    assert torch.equal(layer.centroids, model.model.layers[0].self_attn.centroids)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)


def test_reference_backend_agrees():
    x = ids(b=1, t=21, seed=7)
    outs = []
    for backend in ("torch", "reference"):
        model = converted(layers=None, backend=backend)
        with torch.no_grad():
            outs.append(model(x).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_padded_batch_is_refused():
    model = converted(layers=(0,))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="Routing attention does not support padded batches"):
        model(ids(t=10), attention_mask=mask)
    with torch.no_grad():
        model(ids(t=10), attention_mask=torch.ones(2, 10, dtype=torch.long))


@pytest.mark.parametrize("kwargs,word", [
    (dict(clusters=0), "clusters"), (dict(window=0), "window"), (dict(segment=True), "segment"),
    (dict(window=9, segment=8), "window=9 must be <= segment=8"), (dict(routing_heads=0), "routing_heads"),
    (dict(local_window=0), "local_window"), (dict(query_clusters=5, clusters=4), "query_clusters=5"),
    (dict(ema_decay=1.0), "ema_decay"), (dict(commitment=-1.0), "commitment"),
    (dict(commitment=float("nan")), "commitment"), (dict(backend="triton"), "backend"), (dict(layers=[0]), "layers"),
])
def test_config_validation(kwargs, word):
    with pytest.raises(ValueError, match=f"RoutingConfig.{word}"):
        RoutingConfig(**kwargs)


def test_routing_heads_must_fit_the_model():
    with pytest.raises(ValueError, match="routing_heads=5"):
        vzoo.lm.convert(tiny_llama(), RoutingConfig(routing_heads=5))
    assert vzoo.lm.RoutingConfig is RoutingConfig
