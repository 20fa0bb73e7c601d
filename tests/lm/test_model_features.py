"""The LM methods on models with sliding-window layers (Mistral, Qwen2 with ``use_sliding_window``,
Gemma 2 and Gemma 3 local layers) and with attention logit soft-capping (Gemma 2): with every block
selected they equal eager attention (window 16 < 64 tokens, so a dropped window shows), or they refuse
at ``apply_sparse_attention`` time naming the feature; never a silent mismatch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import (
    Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM,
    Qwen2Config, Qwen2ForCausalLM,
)

from vzoo.lm import BlockRankConfig, LongGenConfig, MoBAConfig, SeerAttentionConfig, apply_sparse_attention, lm_methods

WINDOW = 16
COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
MODELS = {
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=WINDOW)),
    # layer 0 full, layer 1 sliding
    "qwen2-sliding": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW,
                                                          max_window_layers=1)),
    "gemma2-no-softcap": lambda: Gemma2ForCausalLM(Gemma2Config(**COMMON, sliding_window=WINDOW, attn_logit_softcapping=None)),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**COMMON, sliding_window=WINDOW,
                                                         layer_types=["sliding_attention", "full_attention"])),
}
# every registered method's contract configurations (every key selected): each must reduce to the
# model's own attention, or refuse the model's sliding window at apply time
ALL_SELECTED = {name: (method, config) for method in lm_methods() if method.contract  # test_registry requires one
                for name, config in method.contract().items()}


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[kind]().eval()
    model.set_attn_implementation("eager")
    return model


@pytest.mark.parametrize("method", list(ALL_SELECTED))
@pytest.mark.parametrize("kind", list(MODELS))
def test_every_block_selected_equals_eager(kind, method):
    model = _model(kind)
    registered, config = ALL_SELECTED[method]
    # some attention layer really has the window (Mistral's read it from the config), so a dropped one shows
    attn = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    assert WINDOW in [m.sliding_window if hasattr(m, "sliding_window") else m.config.sliding_window for m in attn]
    ids = torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, :5] = 0  # one left-padded row
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        ref_gen = model.generate(ids[:1, :40], max_new_tokens=4, do_sample=False)
        if registered.window_error is not None and registered.window_error(config, WINDOW):
            with pytest.raises(ValueError, match=f"sliding-window attention .* not supported by {registered.label}"):
                apply_sparse_attention(model, config)
            return
        with apply_sparse_attention(model, config):
            out = model(ids, attention_mask=mask).logits
            single = model(ids[:1]).logits  # no padding: transformers may pass no mask
            gen = model.generate(ids[:1, :40], max_new_tokens=4, do_sample=False)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(single, ref[:1], atol=1e-4, rtol=1e-4)
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("config", [
    MoBAConfig(block_size=4, topk=2, dense_fallback=False),
    LongGenConfig(pattern="local_stride", sink=4, window=8, block_size=4, stride=3, full_layers=()),
], ids=["moba", "longgen-local-stride"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_sparse_cached_generation_past_the_window_equals_recomputation(kind, config):
    """Blocks at absolute positions: the sliding-window layers keep their whole cache, so generating
    past the window (16) with the cache gives what recomputing every step without it gives."""
    model = _model(kind)
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), apply_sparse_attention(model, config):
        cached = model.generate(ids, max_new_tokens=20, do_sample=False, use_cache=True)
        recomputed = model.generate(ids, max_new_tokens=20, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert not any(m._forward_pre_hooks for m in model.modules() if hasattr(m, "layer_idx"))  # removed


@pytest.mark.parametrize("method", list(ALL_SELECTED))
def test_gemma2_logit_softcapping_is_refused(method):  # also when a layer is left out: it would run SDPA
    model = Gemma2ForCausalLM(Gemma2Config(**COMMON, sliding_window=WINDOW)).eval()  # attn_logit_softcapping=50.0
    registered, config = ALL_SELECTED[method]
    if "layers" in {f.name for f in dataclasses.fields(config)}:
        config = dataclasses.replace(config, layers=(1,))
    with pytest.raises(ValueError, match=f"gemma2 attention logit soft-capping.*not supported by {registered.label}"):
        apply_sparse_attention(model, config)
    assert not any(hasattr(m, "vzoo_config") or hasattr(m, "attn_gate") for m in model.modules())  # nothing attached


def test_longgen_sink_window_narrower_than_the_models_window_is_refused():
    model = _model("mistral")
    with pytest.raises(ValueError, match="mistral sliding-window attention .*sliding_window=16.* by LongGen"):
        apply_sparse_attention(model, LongGenConfig(sink=4, window=8, block_size=8, full_layers=()))
    apply_sparse_attention(model, LongGenConfig(sink=0, window=8, block_size=8, full_layers=())).remove()  # no sink: fine


def test_blockrank_refuses_sliding_window_layers():
    with pytest.raises(ValueError, match="sliding-window attention .* not supported by BlockRank"):
        apply_sparse_attention(_model("mistral"), BlockRankConfig(block_length=8))


def test_sparse_moba_and_longgen_honour_the_window_against_oracles():
    """Really sparse (not every block): the model's window still bounds what each query sees."""
    from vzoo.lm.longgen import longgen_attention
    from vzoo.lm.moba import moba_attention

    torch.manual_seed(3)
    q, k, v = torch.randn(1, 4, 50, 8), torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    pos = torch.arange(50)
    rule = (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - 12)
    out = moba_attention(MoBAConfig(block_size=4, topk=2, dense_fallback=False), q, k, v, None, 0.3, sliding_window=12)
    # MoBA, loops: own block + the best complete past block reaching into the window
    for h in range(4):
        for i in range(50):
            cands = [j for j in range(50 // 4) if (j + 1) * 4 <= i and (j + 1) * 4 - 1 > i - 12]
            scores = {j: float(q[0, h, i] @ kk[0, h, j * 4:(j + 1) * 4].mean(0)) for j in cands}
            chosen = set(sorted(cands, key=lambda j: -scores[j])[:1]) | {i // 4}
            keys = [t for t in range(50) if rule[i, t] and t // 4 in chosen]
            want = torch.softmax(kk[0, h, keys] @ q[0, h, i] * 0.3, 0) @ vv[0, h, keys]
            torch.testing.assert_close(out[0, h, i], want, atol=1e-5, rtol=1e-5)
    got = longgen_attention(LongGenConfig(sink=3, window=20, block_size=4), q, k, v, None, 0.3, sliding_window=12)
    allowed = rule  # window 12 <= 20: the sink is always outside the model's window
    want = torch.softmax((q @ kk.transpose(-1, -2) * 0.3).masked_fill(~allowed, float("-inf")), -1) @ vv
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_seer_gate_sees_the_normalised_pre_rope_projections():
    """Gemma 3 normalises q and k per head before RoPE: the gate gets them after that norm."""
    model = _model("gemma3")
    apply_sparse_attention(model, SeerAttentionConfig(block_size=8))
    attn = model.model.layers[0].self_attn
    h = torch.randn(2, 24, 64)
    with torch.no_grad():
        attn.q_proj(h), attn.k_proj(h)  # the hooks fire as in the model's forward
        q, k = attn.attn_gate.pending
        want_q = attn.q_norm(attn.q_proj(h).view(2, 24, 4, 16).transpose(1, 2))  # Gemma 3's own order
        want_k = attn.k_norm(attn.k_proj(h).view(2, 24, 2, 16).transpose(1, 2))
    torch.testing.assert_close(q, want_q)
    torch.testing.assert_close(k, want_k)
    assert not torch.allclose(want_q, attn.q_proj(h).view(2, 24, 4, 16).transpose(1, 2))  # the norm matters


def test_seer_gate_training_on_sliding_window_layers_is_refused():
    model = _model("qwen2-sliding")  # layer 0 full, layer 1 sliding
    ids = torch.randint(0, 97, (1, 32))
    with apply_sparse_attention(model, SeerAttentionConfig(block_size=8)):
        model.train()
        with pytest.raises(ValueError, match="distillation on sliding-window layers .*layer 1"):
            model(ids)
    with apply_sparse_attention(model, SeerAttentionConfig(block_size=8, layers=(0,))):
        model(ids)  # the full layer alone trains
        assert model.model.layers[0].self_attn.attn_gate.loss is not None
    model.eval()


@pytest.mark.parametrize("causal", [True, False])
def test_token_routed_window_is_the_same_on_every_backend(causal):
    """``token_routed_attention(window=)``, which MoBA uses on sliding-window layers: each backend against a
    dense masked softmax written here (routing and window applied by hand)."""
    from vzoo.kernels import token_routed_attention

    torch.manual_seed(6)
    q, k, v = torch.randn(1, 2, 20, 8), torch.randn(1, 1, 28, 8), torch.randn(1, 1, 28, 8)
    ids = torch.randint(-1, 7, (1, 2, 20, 2))
    pos = torch.arange(20)[:, None] + 8
    j = torch.arange(28)[None]
    chosen = (j // 4 == ids[..., :1]) | (j // 4 == ids[..., 1:])  # [1, 2, 20, 28], -1 matches nothing
    allowed = chosen & (j > pos - 5) & ((j <= pos) if causal else True)
    s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~allowed, float("-inf"))
    want = torch.nan_to_num(torch.softmax(s, -1)) @ v
    for backend in ("reference", "torch", "triton", "flex"):
        out = token_routed_attention(q, k, v, ids, block_n=4, causal=causal, scale=0.3, window=5, backend=backend, tile=8)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5, msg=backend)
