"""Titans MAC / MAG / MAL blocks in a tiny Llama: the layer output against a float64 re-implementation written
here (token loops, autograd gradients for the memory, explicit softmax over the visible keys), causality,
cached decoding == recomputation, gradients to the new parameters, padding refused, config checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import vzoo.lm
from vzoo.lm.titans import TitansConfig

VARIANTS = ("mag", "mal", "mac")
SMALL = dict(window=6, segment=8, batch_size=4, persistent_tokens=3, max_lr=0.5)


def tiny(variant, layers=(1,), seed=0, **kwargs):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    return vzoo.lm.convert(model, TitansConfig(layers=layers, variant=variant, **{**SMALL, **kwargs}))


def ids(b=2, t=20, seed=1):
    return torch.randint(0, 64, (b, t), generator=torch.Generator().manual_seed(seed))


def lin(layer, x):
    out = x @ layer.weight.double().T
    return out if layer.bias is None else out + layer.bias.double()


class RefMemory:
    """The memory of one layer, a token at a time, float64, weights ``[B, H, out, in]``."""

    def __init__(self, mem, batch):
        self.m, self.h, self.d = mem, mem.heads, mem.head_dim
        self.cur = [w.detach().double().expand(batch, *w.shape).clone() for w in mem.weights]
        self.start, self.mom, self.t = list(self.cur), [torch.zeros_like(w) for w in self.cur], 0

    def mlp(self, ws, x):
        for i, w in enumerate(ws):
            x = torch.einsum("bhoi,bhi->bho", w, x)
            if i < len(ws) - 1:
                x = F.gelu(x)
        return x

    def heads(self, t):
        return t.view(t.shape[0], self.h, self.d)

    def read(self, x, ws):
        q = F.normalize(F.silu(self.heads(lin(self.m.to_q, x))), dim=-1)
        return lin(self.m.out, self.mlp(ws, q).flatten(1))

    def step(self, x):
        if self.t % self.m.batch_size == 0:
            self.start = self.cur
        y = self.read(x, self.start)
        k = F.normalize(F.silu(self.heads(lin(self.m.to_k, x))), dim=-1)
        v = F.silu(self.heads(lin(self.m.to_v, x)))
        lr, eta, alpha = (torch.sigmoid(lin(g, x))[..., None, None] for g in (self.m.to_lr, self.m.to_momentum, self.m.to_decay))
        with torch.enable_grad():
            ws = [w.detach().requires_grad_() for w in self.start]
            grads = torch.autograd.grad((self.mlp(ws, k) - v).pow(2).sum(), ws)
        c = self.m.max_grad_norm
        if c is not None:  # soft clamp of each (batch row, head)'s gradient matrix to norm c tanh(|g| / c)
            norms = [g.pow(2).sum((2, 3), keepdim=True).sqrt() for g in grads]
            grads = [g * (c * torch.tanh(n / c) / n) for g, n in zip(grads, norms)]
        self.mom = [eta * s - self.m.max_lr * lr * g for s, g in zip(self.mom, grads)]
        self.cur = [(1 - alpha) * w + s for w, s in zip(self.cur, self.mom)]
        self.t += 1
        return y


def ref_qkv(layer, x, cos, sin):
    b, t, _ = x.shape
    q = lin(layer.q_proj, x).view(b, t, layer.heads, -1).transpose(1, 2)
    k = lin(layer.k_proj, x).view(b, t, layer.kv_heads, -1).transpose(1, 2)
    v = lin(layer.v_proj, x).view(b, t, layer.kv_heads, -1).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
    return q, k, v


def ref_attend(layer, q, keys, values):
    """One query ``[B, Hq, D]`` over ``[B, Hkv, N, D]`` (persistent tokens prepended here), o_proj applied."""
    g = layer.heads // layer.kv_heads
    keys = torch.cat([layer.persistent_k.double().expand(q.shape[0], -1, -1, -1), keys], 2).repeat_interleave(g, 1)
    values = torch.cat([layer.persistent_v.double().expand(q.shape[0], -1, -1, -1), values], 2).repeat_interleave(g, 1)
    p = torch.softmax(torch.einsum("bhd,bhnd->bhn", q, keys) / q.shape[-1] ** 0.5, -1)
    return lin(layer.o_proj, torch.einsum("bhn,bhnd->bhd", p, values).flatten(1))


def ref_window(layer, x, cos, sin, window):
    q, k, v = ref_qkv(layer, x, cos, sin)
    return torch.stack([ref_attend(layer, q[:, :, t], k[:, :, max(0, t - window + 1) : t + 1], v[:, :, max(0, t - window + 1) : t + 1])
                        for t in range(x.shape[1])], 1)


def reference(layer, x, cos, sin, cfg):
    x = x.double()
    mem = RefMemory(layer.memory, x.shape[0])
    if cfg.variant == "mag":
        m = torch.stack([mem.step(x[:, t]) for t in range(x.shape[1])], 1)
        return ref_window(layer, x, cos, sin, cfg.window) * torch.sigmoid(m)
    if cfg.variant == "mal":
        m = torch.stack([mem.step(x[:, t]) for t in range(x.shape[1])], 1)
        return ref_window(layer, x + m, cos, sin, cfg.window)
    outs = []
    for s in range(0, x.shape[1], cfg.segment):
        seg = slice(s, s + cfg.segment)
        xs, c, si = x[:, seg], cos[:, seg], sin[:, seg]
        h = torch.stack([mem.read(xs[:, t], mem.cur) for t in range(xs.shape[1])], 1)
        q, kx, vx = ref_qkv(layer, xs, c, si)
        _, kh, vh = ref_qkv(layer, h, c, si)
        ys = [ref_attend(layer, q[:, :, t], torch.cat([kh[:, :, : t + 1], kx[:, :, : t + 1]], 2),
                         torch.cat([vh[:, :, : t + 1], vx[:, :, : t + 1]], 2)) for t in range(xs.shape[1])]
        outs += [y * torch.sigmoid(mem.step(y)) for y in ys]
    return torch.stack(outs, 1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_layer_matches_reference(variant, max_grad_norm):
    model = tiny(variant, max_grad_norm=max_grad_norm)
    layer = model.model.layers[1].self_attn
    seen = {}

    def hook(module, args, kwargs, output):
        seen.update(x=kwargs["hidden_states"], pe=kwargs["position_embeddings"], out=output[0])

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        logits = model(ids()).logits
    handle.remove()
    assert torch.isfinite(logits).all()
    want = reference(layer, seen["x"], *seen["pe"], layer.config)
    assert ((seen["out"].double() - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(variant):
    model = tiny(variant, layers=(0, 1))
    x = ids(t=20)
    with torch.no_grad():
        ref = model(x).logits
        for j in (3, 11):
            y = x.clone()
            y[:, j] = (y[:, j] + 1) % 64
            out = model(y).logits
            assert torch.allclose(out[:, :j], ref[:, :j], atol=1e-6)
            assert (out[:, j:] - ref[:, j:]).abs().amax() > 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_recomputation(variant):
    model = tiny(variant)
    x = ids(t=21)
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :11], use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        steps = [out.logits] + [model(x[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(11, 21)]
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        prompt = x[:, :13]
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
        seq = prompt
        for _ in range(8):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(gen, seq)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_memory(variant):
    model = tiny(variant).train()
    x = ids(t=16)
    F.cross_entropy(model(x).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    layer = model.model.layers[1].self_attn
    mem = layer.memory
    for name, p in [("to_lr", mem.to_lr.weight), ("to_momentum", mem.to_momentum.weight), ("to_decay", mem.to_decay.weight),
                    ("to_k", mem.to_k.weight), ("out", mem.out.weight), ("persistent_k", layer.persistent_k),
                    ("q_proj", layer.q_proj.weight)] + [(f"weights{i}", w) for i, w in enumerate(mem.weights)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_init_copies_attention_and_qwen2_biases():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).eval()
    old = model.model.layers[0].self_attn
    vzoo.lm.convert(model, TitansConfig(layers=(0,), variant="mag", **SMALL))
    new = model.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert torch.equal(getattr(new, name).weight, getattr(old, name).weight)
    assert torch.equal(new.k_proj.bias, old.k_proj.bias) and new.o_proj.bias is None
    with torch.no_grad():
        assert torch.isfinite(model(ids()).logits).all()


def test_padding_refused():
    model = tiny("mag")
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :4] = 0
    with pytest.raises(ValueError, match="padded"), torch.no_grad():
        model(ids(), attention_mask=mask)


@pytest.mark.parametrize("kwargs,word", [
    (dict(variant="mat"), "variant"), (dict(window=0), "window"), (dict(persistent_tokens=-1), "persistent_tokens"),
    (dict(memory_depth=0), "memory_depth"), (dict(max_lr=0.0), "max_lr"), (dict(activation="relu"), "activation"),
    (dict(variant="mac", segment=10, batch_size=4), "divide"), (dict(layers=[1]), "layers"),
    (dict(max_grad_norm=0), "max_grad_norm"), (dict(max_grad_norm=float("inf")), "max_grad_norm"),
])
def test_config_checks(kwargs, word):
    with pytest.raises(ValueError, match=word):
        TitansConfig(**kwargs)
