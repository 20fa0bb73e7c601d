"""timm's own model contract (after timm/tests/test_models.py), applied to every model vzoo registers.

A new backbone family is covered by registering it; nothing here names a family.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models import model_entrypoint

import vzoo  # noqa: F401  (registers the models)

MODELS = sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.startswith("vzoo."))
# Full-size models run the cheap checks; the expensive ones (backward, features) use the test_* variants
# and the smallest real model of each family.
SMALL = [n for n in MODELS if n.startswith("test_") or n.endswith(("_tiny", "_xt"))]


def test_vzoo_registers_models():
    assert {"biformer_tiny", "biformer_small", "biformer_base", "test_biformer"} <= set(MODELS)
    assert {"overlock_xt", "overlock_t", "overlock_s", "overlock_b", "test_overlock"} <= set(MODELS)


def _input(model, batch=1, size=None):
    cfg = model.pretrained_cfg
    return torch.randn(batch, *(cfg["input_size"] if size is None else (cfg["input_size"][0], *size)))


@pytest.mark.parametrize("name", MODELS)
def test_forward_and_grad_checkpointing(name):
    model = timm.create_model(name).eval()
    x = _input(model)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, model.num_classes) and torch.isfinite(out).all()
    model.set_grad_checkpointing()
    with torch.no_grad():
        out2 = model(x)
    torch.testing.assert_close(out2, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SMALL)
def test_grad_checkpointing_gives_same_gradients(name):
    torch.manual_seed(0)
    model = timm.create_model(name).train()
    x = _input(model, batch=2)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in MODELS if n.startswith("test_")])
def test_torch_compile_matches_eager(name):
    """Inductor on CPU; about a minute of compilation per model on 2 cores."""
    model = timm.create_model(name).eval()
    x = _input(model, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SMALL)
def test_backward_reaches_every_parameter(name):
    model = timm.create_model(name, num_classes=42).train()
    out = model(_input(model, batch=2))
    assert out.shape[-1] == 42
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_default_cfg(name):
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    for field in ("input_size", "pool_size", "mean", "std", "crop_pct", "interpolation", "first_conv", "classifier", "license", "paper_ids"):
        assert field in cfg and cfg[field] is not None, field
    x = _input(model)
    with torch.no_grad():
        feat = model.forward_features(x)
        assert feat.shape == (1, model.num_features, *cfg["pool_size"])
        assert model.forward_head(feat, pre_logits=True).shape == (1, model.head_hidden_size)
        state = model.state_dict()
        classifiers = (cfg["classifier"],) if isinstance(cfg["classifier"], str) else cfg["classifier"]
        assert cfg["first_conv"] + ".weight" in state and classifiers[0] + ".weight" in state  # others: optional heads
        assert state[cfg["first_conv"] + ".weight"].shape[1] == cfg["input_size"][0]
        model.reset_classifier(0)
        assert model(x).shape == (1, model.head_hidden_size)
        # without pooling: the head's unpooled map (a conv head projects first, as in timm's MobileNets)
        model.reset_classifier(0, "")
        assert model(x).shape == (1, model.head_hidden_size, *feat.shape[2:])
        unpooled = timm.create_model(name, num_classes=0, global_pool="").eval()
        assert unpooled(x).shape == (1, model.head_hidden_size, *feat.shape[2:])


@pytest.mark.parametrize("size", [(96, 96), (250, 333), (800, 1216)])
@pytest.mark.parametrize("name", SMALL)
def test_features_only_any_size(name, size):
    model = timm.create_model(name, features_only=True).eval()
    info = model.feature_info
    assert len(info.channels()) >= 3 and info.reduction() == sorted(info.reduction())
    with torch.no_grad():
        feats = model(torch.randn(1, 3, *size))
    assert [f.shape[1] for f in feats] == info.channels()
    for f, red in zip(feats, info.reduction()):
        for dim, n in zip(f.shape[2:], size):
            assert dim <= math.ceil(n / red) + 1
    # out_indices picks levels
    two = timm.create_model(name, features_only=True, out_indices=(1, 3)).eval()
    assert two.feature_info.channels() == [info.channels()[1], info.channels()[3]]


@pytest.mark.parametrize("name", SMALL)
def test_forward_intermediates_match_forward_features(name):
    model = timm.create_model(name).eval()
    x = _input(model, batch=2)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(inter) == len(model.feature_info) and len(only) == 2
        for a, b in zip(only, inter[-2:]):
            torch.testing.assert_close(a, b)
        kept = model.prune_intermediate_layers(indices=(0, 1))
        assert list(kept) == [0, 1]
        pruned = model.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
    for a, b in zip(pruned, inter[:2]):
        torch.testing.assert_close(a, b)
