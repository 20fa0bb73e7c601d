"""The LM method registry: filled by the method files, read by apply_sparse_attention, vzoo list and the
benchmarks; a method defined outside vzoo.lm works through it with no other change."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AttentionInterface

import vzoo.lm
import vzoo.lm.registry as lm_registry
import vzoo.registry
from vzoo.lm import apply_sparse_attention, lm_methods
from vzoo.lm.layers import dense_attention, select_layers
from vzoo.lm.registry import LMMethod, register_lm_method


def test_every_method_file_registered_itself_and_its_config_is_exported():
    names = {m.attn_implementation for m in lm_methods()}
    assert {"vzoo_moba", "vzoo_seer", "vzoo_longgen", "vzoo_blockrank"} <= names
    listed = {m.name for m in vzoo.registry.methods()}
    for m in lm_methods():
        assert getattr(vzoo.lm, m.config.__name__) is m.config and m.config.__name__ in vzoo.lm.__all__
        assert m.attn_implementation.removeprefix("vzoo_") in listed
        assert dataclasses.is_dataclass(m.config) and m.bench is not None
        assert m.bench(8192), f"{m.label} has no benchmark row"
        assert m.contract is not None and m.contract(), f"{m.label} has no contract configurations"
        assert all(type(c) is m.config for c in m.contract().values())


def test_unknown_config_and_duplicates_are_refused(lm):
    with pytest.raises(ValueError, match="config must be one of .*MoBAConfig"):
        apply_sparse_attention(lm.make(layers=1), object())
    moba = next(m for m in lm_methods() if m.attn_implementation == "vzoo_moba")
    with pytest.raises(ValueError, match="already registered"):
        register_lm_method(moba)
    with pytest.raises(ValueError, match="attn_implementation"):
        dataclasses.replace(moba, attn_implementation="moba2")
    with pytest.raises(ValueError, match="mask"):
        dataclasses.replace(moba, mask="dense")


@dataclasses.dataclass(frozen=True)
class HalfScaleConfig:
    """A toy method: dense attention at half the softmax scale, on the chosen layers."""

    layers: tuple[int, ...] | None = None

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        return select_layers("HalfScaleConfig.layers", self.layers, num_layers)


def test_a_method_registered_from_its_own_file_works_end_to_end(lm, monkeypatch):
    monkeypatch.setattr(lm_registry, "_LM", dict(lm_registry._LM))
    monkeypatch.setattr(vzoo.registry, "_METHODS", dict(vzoo.registry._METHODS))
    calls = []

    def half(config, query, key, value, attention_mask, scale, module=None, **_):
        calls.append(module.layer_idx)
        return dense_attention(query, key, value, attention_mask, scale / 2)

    register_lm_method(LMMethod(
        config=HalfScaleConfig, attn_implementation="vzoo_test_half", label="half", attention=half, paper="none",
        arxiv="0000.00000", ops=(), status="test", bench=lambda tokens: {"half": HalfScaleConfig()},
    ))
    model = lm.make(layers=2)
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        stock = model(ids).logits
        with apply_sparse_attention(model, HalfScaleConfig(layers=(1,))):
            assert "vzoo_test_half" in AttentionInterface._global_mapping
            out = model(ids).logits
        assert torch.equal(model(ids).logits, stock)  # removed
    assert calls == [1] and not torch.allclose(out, stock, atol=1e-4)
    for module in model.modules():  # what the method changed: layer 1's scale only
        if getattr(module, "layer_idx", None) == 1 and hasattr(module, "scaling"):
            module.scaling /= 2
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, out, atol=1e-5, rtol=1e-5)
    assert "test_half" in {m.name for m in vzoo.registry.methods()}  # vzoo list shows it


def test_an_attach_that_raises_leaves_the_model_untouched(lm, monkeypatch):
    monkeypatch.setattr(lm_registry, "_LM", dict(lm_registry._LM))
    monkeypatch.setattr(vzoo.registry, "_METHODS", dict(vzoo.registry._METHODS))

    def attach(model, module, config):  # layer 0 gets a hook, layer 1 refuses
        if module.layer_idx == 1:
            raise ValueError("HalfScaleConfig does not fit layer 1")
        return module.register_forward_pre_hook(lambda *a: None)

    register_lm_method(LMMethod(
        config=HalfScaleConfig, attn_implementation="vzoo_test_attach", label="attach", attention=None, paper="none",
        arxiv="0000.00000", ops=(), status="test", attach=attach,
    ))
    model = lm.make(layers=2)
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match="does not fit layer 1"):
        apply_sparse_attention(model, HalfScaleConfig())
    attn = [m for m in model.modules() if hasattr(m, "num_key_value_groups")]
    assert model.config._attn_implementation == before
    assert not any(hasattr(m, "vzoo_config") or hasattr(m, "vzoo_density") or m._forward_pre_hooks for m in attn)
