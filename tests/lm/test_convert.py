"""vzoo.lm.convert: the module-swap registry, the recurrent cache layer inside transformers' Cache, hybrids with local
attention, save_pretrained -> load_converted. Uses the Titans MAG layer (small, fast) as the converted layer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import vzoo.lm
from vzoo.lm.convert import RecurrentState, layer_state, lm_layer, lm_layers, token_validity
from vzoo.lm.titans import TitansConfig
from vzoo.registry import methods

SMALL = dict(variant="mag", window=6, segment=8, batch_size=4, persistent_tokens=2, max_lr=0.5)


def tiny(layers=3, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def ids(b=2, t=18, seed=1):
    return torch.randint(1, 64, (b, t), generator=torch.Generator().manual_seed(seed))


def greedy_by_recomputation(model, prompt, new):
    out = prompt
    for _ in range(new):
        with torch.no_grad():
            nxt = model(out, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], 1)
    return out


def test_every_layer_converted_generates_with_the_cache():
    model = vzoo.lm.convert(tiny(), TitansConfig(layers=None, **SMALL))
    assert all(layer.self_attn.vzoo_layer == "titans" for layer in model.model.layers)
    prompt = ids()
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(cached, greedy_by_recomputation(model, prompt, 6))


def test_cache_holds_recurrent_states_and_counts_tokens():
    model = vzoo.lm.convert(tiny(), TitansConfig(layers=(0, 2), **SMALL))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids(t=11), cache=cache, use_cache=True)
        model(ids(t=1, seed=3), cache=cache, use_cache=True)
    assert isinstance(cache.layers[0], RecurrentState) and isinstance(cache.layers[2], RecurrentState)
    assert not isinstance(cache.layers[1], RecurrentState)
    assert [cache.get_seq_length(i) for i in range(3)] == [12, 12, 12]
    assert cache.get_mask_sizes(1, 0) == (13, 0)
    with pytest.raises(RuntimeError, match="recurrent state"):
        cache.layers[0].update(torch.zeros(1), torch.zeros(1))


def test_beam_search_reorders_the_recurrent_state():
    model = vzoo.lm.convert(tiny(), TitansConfig(layers=(1,), **SMALL))
    prompt = ids(b=1)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
        plain = model.generate(prompt, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, plain)


def test_layer_state_refuses_a_cache_that_already_holds_attention_tokens():
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 0)
    with pytest.raises(ValueError, match="already holds 3 attention tokens"):
        layer_state(cache, 0, 1)
    assert layer_state(None, 0, 1) is None
    state = layer_state(cache, 2, 5)  # a lazily grown DynamicCache gets the missing layers
    assert isinstance(state, RecurrentState) and state.seen == 0 and layer_state(cache, 2, 1).seen == 5


def test_token_validity_reads_the_diagonal():
    torch.manual_seed(0)
    b, t, past = 3, 5, 4
    keep = torch.rand(b, 1, t, past + t) > 0.3
    got = token_validity(keep, t)
    want = torch.tensor([[bool(keep[i, 0, j, past + j]) for j in range(t)] for i in range(b)])
    assert got is not None and torch.equal(got, want)
    additive = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(token_validity(additive, t), want)
    assert token_validity(torch.ones(b, 1, t, t, dtype=torch.bool), t) is None
    assert token_validity(None, t) is None
    with pytest.raises(ValueError, match=r"\[B, 1, 5, kv\]"):
        token_validity(keep[:, 0], t)


def test_save_pretrained_then_load_converted_round_trips(tmp_path):
    model = vzoo.lm.convert(tiny(), TitansConfig(layers=(0, 2), **SMALL))
    with torch.no_grad():  # make the new parameters differ from any initialisation
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["vzoo_conversion"]
    assert record[0]["method"] == "titans" and record[0]["config"]["layers"] == [0, 2]
    loaded = vzoo.lm.load_converted(tmp_path)
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert type(loaded.model.layers[0].self_attn) is type(model.model.layers[0].self_attn)


def test_load_converted_errors(tmp_path):
    plain = tiny()
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no vzoo_conversion"):
        vzoo.lm.load_converted(tmp_path / "plain")
    model = vzoo.lm.convert(tiny(), TitansConfig(layers=(1,), **SMALL))
    model.save_pretrained(tmp_path / "conv")
    (tmp_path / "conv" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        vzoo.lm.load_converted(tmp_path / "conv")


def test_local_window_hybrid_limits_the_softmax_layers():
    x = ids(b=1, t=24)
    base = tiny()
    wide = vzoo.lm.convert(tiny(), TitansConfig(layers=(1,), **SMALL), local_window=64)
    narrow = vzoo.lm.convert(tiny(), TitansConfig(layers=(1,), **SMALL))
    with torch.no_grad():
        ref = narrow(x).logits
        assert torch.allclose(wide(x).logits, ref, atol=1e-5)  # a window wider than the prompt changes nothing
        windowed = vzoo.lm.convert(tiny(), TitansConfig(layers=(1,), **SMALL), local_window=4)
        out = windowed(x).logits
    assert torch.allclose(out[:, :4], ref[:, :4], atol=1e-5)  # the first window's tokens see the same keys
    assert not torch.allclose(out[:, 8:], ref[:, 8:], atol=1e-3)
    assert not hasattr(base, "vzoo_conversion")
    prompt = x[:, :10]
    with torch.no_grad():
        cached = windowed.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(cached, greedy_by_recomputation(windowed, prompt, 5))


def test_convert_refuses_bad_input():
    model = vzoo.lm.convert(tiny(), TitansConfig(layers=(1,), **SMALL))
    with pytest.raises(ValueError, match="already converted"):
        vzoo.lm.convert(model, TitansConfig(layers=(1,), **SMALL))
    with pytest.raises(ValueError, match="layers=.*num_layers=3"):
        vzoo.lm.convert(tiny(), TitansConfig(layers=(5,), **SMALL))
    with pytest.raises(ValueError, match="config must be one of"):
        vzoo.lm.convert(tiny(), object())
    with pytest.raises(ValueError, match="local_window"):
        vzoo.lm.convert(tiny(), TitansConfig(layers=(1,), **SMALL), local_window=0)
    with pytest.raises(ValueError, match="model.layers"):
        vzoo.lm.convert(torch.nn.Linear(2, 2), TitansConfig(**SMALL))


def test_registry_lists_each_module_swap_once():
    names = [entry.name for entry in lm_layers()]
    assert len(names) == len(set(names)) and "titans" in names
    listed = {m.name: m for m in methods()}
    for entry in lm_layers():
        assert listed[entry.name].modality == "language" and "vzoo.lm.convert" in listed[entry.name].status
        assert lm_layer(entry.config()) is entry
        assert getattr(vzoo.lm, entry.config.__name__) is entry.config


def test_every_layer_keeps_qwen2_qkv_biases():
    """Qwen2's attention has q/k/v biases without an ``attention_bias`` config field: each layer builds and copies them."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    for entry in lm_layers():
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg).eval()
        with torch.no_grad():
            model.model.layers[0].self_attn.k_proj.bias.normal_()
        old_bias = model.model.layers[0].self_attn.k_proj.bias.clone()
        layer = vzoo.lm.convert(model, entry.config(layers=(0,))).model.layers[0].self_attn
        assert layer.k_proj.bias is not None, entry.name
        assert layer.o_proj.bias is None, entry.name
        if layer.k_proj.bias.shape == old_bias.shape:
            assert torch.equal(layer.k_proj.bias, old_bias), entry.name
