"""BCT blockwise quantisation (vzoo.lm.blockquant) against a loop-over-blocks re-implementation written
here: codes, scales and dequantised values bit for bit, the error bound, heavy-tailed data, the hooks on
a tiny Llama, the attention function, accounting and restoring the model."""

from __future__ import annotations

import math
import struct

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from vzoo.lm.blockquant import (
    BlockQuantAttentionConfig, BlockQuantConfig, blockquant, blockquant_attention, compression_ratio, dequantize,
    fake_quantize, model_compression, quantize_blockwise,
)

# ------------------------------------------------------------------------------ reference


def ref_scale(absmax: float, qmax: int, mode: str) -> float:
    """max|x| / qmax (in float32) rounded up to the next bfloat16 (absmax) or power of two (pow2)."""
    ratio = max(struct.unpack("<f", struct.pack("<f", absmax / qmax))[0], 2.0 ** -110)
    if mode == "pow2":
        k = -110
        while 2.0 ** k < ratio:
            k += 1
        return 2.0 ** k
    raw = struct.unpack("<I", struct.pack("<f", ratio))[0]
    hi = raw >> 16
    if raw & 0xFFFF:  # not a bfloat16 already: next one up
        hi += 1
    return struct.unpack("<f", struct.pack("<I", hi << 16))[0]


def ref_quantize(x: torch.Tensor, bits: int, block: int | None, mode: str = "absmax"):
    """2-D ``x``, blocks along the last axis, one row and one block at a time: (codes, per-element scales)."""
    qmax = 2 ** (bits - 1) - 1
    codes, scales = torch.zeros_like(x), torch.zeros_like(x)
    if block is None:
        s = ref_scale(float(x.abs().max()), qmax, mode)
        return torch.round(x / torch.tensor(s)).clamp(-qmax, qmax), torch.full_like(x, s)
    for r in range(x.shape[0]):
        for start in range(0, x.shape[1], block):
            part = x[r, start : start + block]
            s = ref_scale(float(part.abs().max()), qmax, mode)
            codes[r, start : start + block] = torch.round(part / torch.tensor(s, dtype=torch.float32)).clamp(-qmax, qmax)
            scales[r, start : start + block] = s
    return codes, scales


def ref_fake(x: torch.Tensor, bits: int, block: int | None, mode: str = "absmax") -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).float()
    codes, scales = ref_quantize(flat, bits, block, mode)
    return (codes * scales).reshape(x.shape).to(x.dtype)


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """Tied embeddings like SmolLM2: the fp32 model has a clear top-1 (random untied heads give top-2 gaps
    below the 8-bit error at ~2% of positions)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 97, (4, 48), generator=torch.Generator().manual_seed(1))

# ------------------------------------------------------------------------------ the quantiser


@pytest.mark.parametrize("bits,block,mode", [(4, 16, "absmax"), (8, 48, "pow2"), (3, None, "absmax"), (12, 7, "absmax")])
def test_codes_scales_and_dequantisation_match_the_loop_reference(bits, block, mode):
    torch.manual_seed(0)
    x = torch.randn(6, 100) * torch.logspace(-3, 2, 6)[:, None]  # rows of very different size; 100 % block != 0
    qt = quantize_blockwise(x, bits, block, scale=mode)
    codes, scales = ref_quantize(x, bits, block, mode)
    qmax = 2 ** (bits - 1) - 1
    assert qt.codes.dtype == (torch.int8 if bits <= 8 else torch.int16) and qt.scales.dtype == torch.bfloat16
    assert qt.scales.shape == ((6, math.ceil(100 / block)) if block else ())
    assert torch.equal(qt.codes.float(), codes) and int(qt.codes.abs().max()) <= qmax  # the symmetric signed range
    if mode == "absmax" and bits <= 8:  # the bfloat16 scale is within 2^-8 of max|x| / qmax: the range is used
        assert int(qt.codes.abs().max()) == qmax
    deq = dequantize(qt)
    assert torch.equal(deq.double(), codes.double() * scales.double())  # exactly codes * scale
    assert torch.equal(fake_quantize(x, bits, block, scale=mode), deq)
    err = (x.double() - deq.double()).abs()
    assert bool((err <= scales.double() * (0.5 + qmax * 2.0 ** -24)).all())  # scale / 2 (+ float32 quotient rounding)
    if mode == "pow2":
        assert bool((torch.log2(scales) == torch.log2(scales).round()).all())


def test_other_axis_batched_dims_and_fake_quantize_dtype():
    torch.manual_seed(1)
    x = torch.randn(3, 20, 5)
    qt = quantize_blockwise(x, 6, 8, axis=1)
    assert qt.scales.shape == (3, 3, 5) and qt.axis == 1
    want = ref_fake(x.transpose(1, 2).contiguous(), 6, 8).transpose(1, 2)
    assert torch.equal(dequantize(qt), want)
    half = fake_quantize(x.half(), 8, 4, axis=-2)
    assert half.dtype == torch.float16
    assert torch.equal(half, ref_fake(x.half().float().transpose(1, 2).contiguous(), 8, 4).transpose(1, 2).half())


def test_heavy_tailed_mse_strictly_falls_as_blocks_shrink_and_beats_per_tensor():
    g = torch.Generator().manual_seed(2)
    x = torch.distributions.StudentT(3.0).sample((64, 256))
    x.view(-1)[torch.randperm(x.numel(), generator=g)[:20]] *= 50.0  # injected outliers
    mse = {b: float(((fake_quantize(x, 4, b) - x) ** 2).mean()) for b in (None, 256, 128, 64, 32, 16, 8, 4)}
    sizes = [256, 128, 64, 32, 16, 8, 4]
    assert all(mse[a] > mse[b] for a, b in zip(sizes, sizes[1:])), mse
    assert all(mse[b] < mse[None] for b in sizes), mse


def test_bad_input_names_the_argument():
    x = torch.randn(4, 8)
    for kwargs, name in ((dict(bits=1), "bits"), (dict(bits=17), "bits"), (dict(bits=4.0), "bits"), (dict(block=0), "block"),
                         (dict(scale="log"), "scale"), (dict(axis=2), "axis")):
        args = dict(bits=4, block=4) | kwargs
        with pytest.raises(ValueError, match=name):
            quantize_blockwise(x, **args)
    with pytest.raises(ValueError, match="floating"):
        quantize_blockwise(torch.ones(4, dtype=torch.int32), 4, 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        fake_quantize(torch.tensor([1.0, float("inf")]), 4, 2)
    with pytest.raises(ValueError, match="numel"):
        compression_ratio(4, None)
    with pytest.raises(ValueError, match="no part"):
        BlockQuantConfig(weights=False, activations=False)
    with pytest.raises(ValueError, match="BlockQuantConfig.block"):
        BlockQuantConfig(block=-1)
    with pytest.raises(ValueError, match="BlockQuantAttentionConfig.scale"):
        BlockQuantAttentionConfig(scale="max")
    with pytest.raises(ValueError, match="norms=True but Sequential"):
        blockquant(torch.nn.Sequential(torch.nn.Linear(4, 4)), BlockQuantConfig(norms=True))


def test_accounting_reproduces_hand_computed_ratios():
    assert compression_ratio(4, 64) == 32 / 4.25 and compression_ratio(8, 32, 16) == 32 / 8.5
    assert compression_ratio(4, 128, 8) == 32 / 4.0625 and compression_ratio(4, None, 16, numel=1600) == 32 / 4.01
    model = tiny_llama()
    # tied embedding [97, 64]; per layer q [64, 64], k, v [32, 64], o [64, 64], gate, up [128, 64], down [64, 128];
    # norms: 2 per layer + the final one, 64 each
    rows_64 = 97 + 2 * (64 + 32 + 32 + 64 + 128 + 128)  # rows of 64 inputs
    rows_128 = 2 * 64
    quantized, other = 64 * rows_64 + 128 * rows_128, 5 * 64
    got = model_compression(model, BlockQuantConfig(bits=4, block=48))  # 64 = 48 + 16, 128 = 48 + 48 + 32
    scales = 2 * rows_64 + 3 * rows_128
    assert got["quantized_params"] == quantized and got["params"] == quantized + other and got["scales"] == scales
    assert got["stored_bits"] == 4 * quantized + 16 * scales + 32 * other
    assert got["ratio"] == 32 * (quantized + other) / got["stored_bits"]
    full = model_compression(model, BlockQuantConfig(bits=4, block=64, scale="pow2"))  # whole blocks: the formula
    assert math.isclose(full["weights_ratio"], compression_ratio(4, 64, 8), rel_tol=1e-12)
    per_tensor = model_compression(model, BlockQuantConfig(bits=8, block=None))
    assert per_tensor["scales"] == 1 + 2 * 7 and per_tensor["stored_bits"] == 8 * quantized + 16 * 15 + 32 * other
    assert model_compression(model, BlockQuantConfig(weights=False))["ratio"] == 1.0

# ------------------------------------------------------------------------------ the attention function


def ref_attention(q, k, v, visible, scale, bits, block):
    """Per head and query row: softmax over the visible keys, probabilities quantised in key blocks, @ V."""
    b, h, sq, d = q.shape
    groups = h // k.shape[1]
    out = torch.zeros(b, h, sq, d)
    for bi in range(b):
        for hi in range(h):
            kk, vv = k[bi, hi // groups], v[bi, hi // groups]
            for i in range(sq):
                keep = visible[bi, i]
                if not keep.any():
                    continue
                logits = (kk @ q[bi, hi, i]) * scale
                p = torch.zeros(k.shape[2])
                p[keep] = torch.softmax(logits[keep], 0)
                if bits is not None:
                    p = ref_fake(p[None], bits, block or k.shape[2])[0]
                out[bi, hi, i] = p @ vv
    return out


@pytest.mark.parametrize("bits,block", [(4, 8), (8, None), (None, 8)])
def test_attention_function_against_loops(bits, block):
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 2, 14, 8), torch.randn(2, 2, 14, 8)  # GQA, 4 cached keys
    config = BlockQuantAttentionConfig(bits=bits, block=block)
    pos = torch.arange(14)
    causal = pos[None] <= (torch.arange(10) + 4)[:, None]
    got = blockquant_attention(config, q, k, v, None, 0.4)
    torch.testing.assert_close(got, ref_attention(q, k, v, causal.expand(2, 10, 14), 0.4, bits, block), atol=1e-6, rtol=1e-5)
    padded = causal[None].repeat(2, 1, 1)
    padded[1, :, :6] = False  # left padding: rows 0, 1 of batch 1 see nothing
    got = blockquant_attention(config, q, k, v, padded[:, None], 0.4)
    torch.testing.assert_close(got, ref_attention(q, k, v, padded, 0.4, bits, block), atol=1e-6, rtol=1e-5)
    assert bool((got[1, :, :2] == 0).all())
    window = causal & (pos[None] > (torch.arange(10) + 4)[:, None] - 5)
    got = blockquant_attention(config, q, k, v, None, 0.4, sliding_window=5)
    torch.testing.assert_close(got, ref_attention(q, k, v, window.expand(2, 10, 14), 0.4, bits, block), atol=1e-6, rtol=1e-5)

# ------------------------------------------------------------------------------ the model


def _metrics(out, ref):
    return F.cosine_similarity(out.flatten(), ref.flatten(), 0).item(), (out.argmax(-1) == ref.argmax(-1)).float().mean().item()


def test_8_bit_bct_stays_close_2_bit_does_not_and_remove_restores_exactly():
    model = tiny_llama()
    weights = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    with torch.no_grad():
        ref = model(IDS).logits
        with blockquant(model, BlockQuantConfig(bits=8, block=16, attention=True, norms=True, act_fns=True)) as handle:
            assert model.config._attn_implementation == "vzoo_blockquant"
            with pytest.raises(RuntimeError, match="already has BCT"):
                blockquant(model, BlockQuantConfig())
            eight = model(IDS).logits
        with blockquant(model, BlockQuantConfig(bits=2, block=16, attention=True, norms=True, act_fns=True)):
            two = model(IDS).logits
        after = model(IDS).logits
    cos, top1 = _metrics(eight, ref)
    assert cos > 0.999 and top1 >= 0.99 and not torch.equal(eight, ref)
    cos, top1 = _metrics(two, ref)
    assert cos < 0.9 and top1 < 0.99  # the same bars fail when the quantisation is coarse
    assert torch.equal(after, ref) and model.config._attn_implementation == "sdpa"
    handle.remove()  # twice: nothing
    for n, p in model.named_parameters():  # the original tensors themselves, bit for bit
        assert p.data_ptr() == weights[n][0] and torch.equal(p, weights[n][1]), n
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("part", ["weights", "activations", "attention", "norms", "act_fns"])
def test_each_part_alone_changes_the_logits(part):  # by far more than float rounding (~1e-6): its hooks fire
    model = tiny_llama()
    parts = dict(weights=False, activations=False) | {part: True}
    with torch.no_grad():
        ref = model(IDS).logits
        with blockquant(model, BlockQuantConfig(bits=2, block=16, **parts)):
            out = model(IDS).logits
    assert (out - ref).abs().max() > 0.01


def test_hooks_quantise_exactly_what_the_modules_see():
    """Capture each module's raw input / output (a hook that runs before BCT's) and what it gets after
    BCT's hook; the latter is the loop reference of the former."""
    model = tiny_llama()
    layer = model.model.layers[1]
    seen = {}

    def pre(name):
        return lambda m, args: seen.__setitem__(name, args[0].detach().clone())

    def post(name):
        return lambda m, args, out: seen.__setitem__(name, out.detach().clone())

    raw = [layer.mlp.down_proj.register_forward_pre_hook(pre("down_raw")),
           layer.input_layernorm.register_forward_hook(post("norm_raw")),
           layer.mlp.act_fn.register_forward_hook(post("act_raw"))]
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad(), blockquant(model, BlockQuantConfig(bits=5, block=24, norms=True, act_fns=True)):
        late = [layer.mlp.down_proj.register_forward_pre_hook(pre("down_q")),
                layer.input_layernorm.register_forward_hook(post("norm_q")),
                layer.mlp.act_fn.register_forward_hook(post("act_q"))]
        model(IDS[:2])
        for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight"):
            assert torch.equal(dict(model.named_parameters())[name], ref_fake(original[name], 5, 24)), name
        assert torch.equal(model.model.layers[0].input_layernorm.weight, original["model.layers.0.input_layernorm.weight"])
    for h in raw + late:
        h.remove()
    for name in ("down", "norm", "act"):
        assert torch.equal(seen[f"{name}_q"], ref_fake(seen[f"{name}_raw"], 5, 24)), name
