"""timm's own model contract (after timm/tests/test_models.py), applied to every model vzoo registers:
forward, backward, default cfgs, features, intermediates, FX forward and backward, and TorchScript (models
built under timm's ``set_scriptable(True)``, scripted directly and after FX tracing).

A new backbone family is covered by registering it; nothing here names a family.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers import create_feature_extractor, get_graph_node_names, set_scriptable
from timm.models import get_pretrained_cfg, model_entrypoint

import vzoo  # noqa: F401  (registers the models)

MODELS = sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.startswith("vzoo."))
# Every model is built (the cfg's layer names); forwards run on the test_* variants and the smallest real
# model of each family (SMALL), backward passes and large inputs on the test_* variants (TINY), which have
# every mechanism of the real ones. timm's own tests/test_models.py covers the real models (README).
SMALL = [n for n in MODELS if n.startswith("test_") or n.endswith(("_tiny", "_xt"))]
TINY = [n for n in MODELS if n.startswith("test_")]


def test_vzoo_registers_models():
    assert {"biformer_tiny", "biformer_small", "biformer_base", "test_biformer"} <= set(MODELS)
    assert {"overlock_xt", "overlock_t", "overlock_s", "overlock_b", "test_overlock"} <= set(MODELS)


def _input(model, batch=1, size=None):
    cfg = model.pretrained_cfg
    return torch.randn(batch, *(cfg["input_size"] if size is None else (cfg["input_size"][0], *size)))


@pytest.mark.parametrize("name", SMALL)
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


@pytest.mark.parametrize("name", TINY)
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
@pytest.mark.parametrize("name", TINY)
def test_torch_compile_matches_eager(name):
    """Inductor on CPU; about a minute of compilation per model on 2 cores."""
    model = timm.create_model(name).eval()
    x = _input(model, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_backward_reaches_every_parameter(name):
    model = timm.create_model(name, num_classes=42).train()
    out = model(_input(model, batch=2))
    assert out.shape[-1] == 42
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def _names(entry: str | tuple[str, ...]) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry)


@pytest.mark.parametrize("name", MODELS)
def test_cfg_names_layers_of_the_model(name):
    """timm's test_model_default_cfgs name rules, for every pretrained tag of every model: each classifier
    and first conv its cfg names is a weight of the model as built by default."""
    model = timm.create_model(name)
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state = model.state_dict()
    for tag in timm.list_models(name, include_tags=True):
        cfg = get_pretrained_cfg(tag)
        for field in ("input_size", "pool_size", "mean", "std", "crop_pct", "interpolation", "license", "paper_ids"):
            assert getattr(cfg, field) is not None, f"{tag}: {field}"
        missing = [n for n in _names(cfg.classifier) + _names(cfg.first_conv) if n + ".weight" not in state]
        assert not missing, f"{tag}: the cfg names layers {missing} that {name} does not have"
        assert state[_names(cfg.first_conv)[0] + ".weight"].shape[1] == cfg.input_size[0]


@pytest.mark.parametrize("name", SMALL)
def test_default_cfg(name):
    """timm's test_model_default_cfgs: the shapes the cfg promises, with and without classifier and pooling."""
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    x = _input(model)
    with torch.no_grad():
        feat = model.forward_features(x)
        assert feat.shape == (1, model.num_features, *cfg["pool_size"])
        pre = model.forward_head(feat, pre_logits=True)
        assert pre.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        assert model(x).shape == pre.shape
        # without pooling: the head's unpooled map (a conv head projects first, as in timm's MobileNets)
        model.reset_classifier(0, "")
        assert model(x).shape == (1, model.head_hidden_size, *feat.shape[2:])
        unpooled = timm.create_model(name, num_classes=0, global_pool="").eval()
        assert unpooled(x).shape == (1, model.head_hidden_size, *feat.shape[2:])


@pytest.mark.parametrize(
    ("name", "size"), [(n, s) for n in SMALL for s in ((96, 96), (250, 333))] + [(n, (800, 1216)) for n in TINY]
)
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


# FX, as timm's test_model_forward_fx / test_model_backward_fx trace it: through timm's feature-extraction
# helpers, which treat the modules and functions registered with register_notrace_* as leaves.
def _fx_model(model: torch.nn.Module) -> torch.nn.Module:
    """The traced model, returning the last node of the eval graph (the logits)."""
    return create_feature_extractor(model, return_nodes=[get_graph_node_names(model)[1][-1]])


@pytest.mark.parametrize("name", TINY)
def test_fx_forward_traces_and_matches(name):
    model = timm.create_model(name).eval()
    x = _input(model, batch=2, size=(96, 128))
    with torch.no_grad():
        (out,) = _fx_model(model)(x).values()
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", TINY)
def test_fx_backward_gives_eager_gradients(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=42).train()
    x = _input(model, batch=2)
    model(x).square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    fx = _fx_model(model)
    fx.zero_grad()
    (out,) = fx(x).values()
    assert out.shape == (2, 42)
    out.square().mean().backward()
    got = dict(fx.named_parameters())
    assert len(got) == len(want) and all(got[n].grad is not None for n in want)
    for n, g in want.items():
        torch.testing.assert_close(got[n].grad, g, rtol=1e-4, atol=1e-6, msg=n)


def _perturbed(name: str, **kwargs) -> torch.nn.Module:
    """The model with every parameter moved off its init (zero-init RPB, GRN and LayerScale become live)."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("name", TINY)
def test_torchscript_matches_eager(name):
    """timm's test_model_forward_torchscript and test_model_forward_fx_torchscript, checked against the eager
    model: built under set_scriptable(True) the model has the same state-dict keys and, scripted directly and
    after FX tracing, gives the default (kernel-path) model's logits and gradients, and its features_only
    form the same features. At 96 x 128 BiFormer pads its regions and OverLoCK upsamples its /32 map."""
    eager = _perturbed(name).eval()
    with set_scriptable(True):
        model = timm.create_model(name).eval()
        features = timm.create_model(name, features_only=True).eval()
    assert list(model.state_dict()) == list(eager.state_dict())
    model.load_state_dict(eager.state_dict())
    x = _input(model, batch=2, size=(96, 128))
    scripted, fx_scripted = torch.jit.script(model), torch.jit.script(_fx_model(model))
    with torch.no_grad():
        want = eager(x)
        torch.testing.assert_close(scripted(x), want, rtol=0, atol=1e-5)
        (out,) = fx_scripted(x).values()
        torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    for m in (eager, scripted):  # training mode: batch statistics, gradients through the plain-torch path
        m.train()
        m.zero_grad()
        m(x).square().mean().backward()
    for (n, p), q in zip(eager.named_parameters(), scripted.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)

    eager_features = _perturbed(name, features_only=True).eval()
    features.load_state_dict(eager_features.state_dict())
    with torch.no_grad():
        for got, ref in zip(torch.jit.script(features)(x), eager_features(x), strict=True):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
