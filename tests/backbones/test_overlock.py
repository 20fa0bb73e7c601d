"""OverLoCK in timm: fidelity to an independent re-implementation of the official model (official key
layout), checkpoint loading (plain and re-parameterised), reparameterize(), aux head, features, counts."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import vzoo  # noqa: F401
from vzoo.overlock import ContMix, DynamicConvBlock, contmix_kernels

TINY = dict(depth=(1, 1, 1, 1), sub_depth=(2, 1), dims=(16, 32, 64, 64), kernels=(7, 7, 7, 5), sub_heads=(2, 2), mlp=2, sub_mlp=2, projection=64)


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (zero-init RPB, GRN and LayerScale included) and every BN statistic."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return module.eval()


def _load(model, state_dict):
    from vzoo.backbones.overlock import checkpoint_filter_fn

    model.load_state_dict(checkpoint_filter_fn(state_dict, model))
    return model


@pytest.mark.parametrize("size", [(96, 96), (160, 224), (200, 136)])  # small maps upsampled; regular; odd
def test_matches_official_model(official_overlock, size):
    torch.manual_seed(0)
    ref = _randomize(official_overlock.OverLoCK(**TINY))
    model = _load(timm.create_model("test_overlock", aux_head=True).eval(), {"state_dict": ref.state_dict()})
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        want_logits, want_aux = ref(x)
        want_feats, _ = ref.features(x)
        logits, aux = model.forward_with_aux(x)
        torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(aux, want_aux, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(x), want_logits, atol=1e-4, rtol=1e-4)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert len(feats) == 4
    for got, want in zip(feats, want_feats):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [(15, 21), (9, 20)])  # /16 maps of detection inputs; narrower than K = 13
def test_full_size_dynamic_conv_block_matches_official_with_gradients(official_overlock, size):
    """overlock_t's Focus-Net block at /16 (dim 256, context 128, K = 13, 8 groups)."""
    torch.manual_seed(1)
    ref = _randomize(official_overlock.DynamicConvBlock(256, 128, 13, 5, 4, 3, 1, False, False), seed=1)
    block = DynamicConvBlock(256, 128, 13, 5, num_heads=4, mlp_ratio=3, ls_init_value=1.0, res_scale=True).eval()
    block.load_state_dict(ref.state_dict())
    x, h, h_ref = (torch.randn(2, c, *size, requires_grad=True) for c in (256, 128, 128))
    want = ref(x, h, h_ref)
    grads_want = torch.autograd.grad(sum((t * t.detach().sin()).sum() for t in want), (x, h, h_ref))
    got = block(x, h, h_ref)
    grads = torch.autograd.grad(sum((t * t.detach().sin()).sum() for t in got), (x, h, h_ref))
    for a, b in zip(got + grads, want + grads_want):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


def _contmix_oracle(m: ContMix, x: torch.Tensor, official) -> torch.Tensor:
    """``models/contmix.py`` ContMixBlock in eval mode, written out (unfold aggregation, official RPB recipe)."""
    from einops import rearrange

    b, c, height, width = x.shape
    g = m.num_heads
    x = m.dwconv1(x)
    identity, x = x, m.norm1(x)
    gate, lepe = m.gate(x), m.lepe(x)
    q = rearrange(m.weight_query(x) * (c // g) ** -0.5, "b (g c) h w -> b g c (h w)", g=g)
    k = rearrange(m.weight_key(x), "b (g c) h w -> b g c (h w)", g=g)
    v = rearrange(m.weight_value(x), "b (m g c) h w -> m b g h w c", m=2, g=g)
    w = F.conv2d(rearrange(torch.einsum("bgcn,bgcl->bgnl", q, k), "b g n l -> b l g n"), m.weight_proj.weight, m.weight_proj.bias)
    w = rearrange(w, "b l g (h w) -> b g h w l", h=height, w=width)
    a1, a2 = w.split([m.smk_size**2, m.kernel_size**2], -1)
    a1 = (a1 + official.rpb_gather(m.rpb1, height, width, m.smk_size)).softmax(-1)
    a2 = (a2 + official.rpb_gather(m.rpb2, height, width, m.kernel_size)).softmax(-1)
    out = torch.cat([official.unfold_av(a1, v[0], m.smk_size), official.unfold_av(a2, v[1], m.kernel_size)], 1)
    out = m.fusion_proj(rearrange(out, "b g h w c -> b (g c) h w"))
    out = m.proj(gate * m.se_layer(out + lepe))
    out = identity + out
    out = m.dwconv2(out)
    return out + m.mlp(m.norm2(out))


def test_contmix_plugin_matches_official_semantics(official_overlock):
    torch.manual_seed(2)
    fresh = ContMix(32, kernel_size=7, smk_size=5, num_heads=2)
    std1, std2 = float(fresh.rpb1.detach().std()), float(fresh.rpb2.detach().std())
    assert 0.01 < std1 < 0.03 and 0.01 < std2 < 0.03  # trunc-normal(0.02) in contmix.py
    m = _randomize(fresh, seed=2)
    x = torch.randn(2, 32, 11, 13)
    with torch.no_grad():
        torch.testing.assert_close(m(x), _contmix_oracle(m, x, official_overlock), atol=1e-4, rtol=1e-4)
        small = torch.randn(1, 32, 4, 9)  # smaller than K: upsampled to 7 x 15, pooled back
        assert m(small).shape == small.shape and torch.isfinite(m(small)).all()


def test_contmix_kernels_errors():
    proj = torch.nn.Conv2d(49, 25 + 49, 1)
    q, k = torch.randn(1, 8, 9, 9), torch.randn(1, 8, 7, 7)
    small, large = contmix_kernels(q, k, proj, torch.zeros(2, 9, 9), torch.zeros(2, 13, 13))
    assert small.shape == (1, 2, 9, 9, 25) and large.shape == (1, 2, 9, 9, 49)
    torch.testing.assert_close(large.sum(-1), torch.ones(1, 2, 9, 9))
    with pytest.raises(ValueError, match="region tokens"):
        contmix_kernels(q, torch.randn(1, 8, 6, 6), proj, torch.zeros(2, 9, 9), torch.zeros(2, 13, 13))
    with pytest.raises(ValueError, match="taps"):
        contmix_kernels(q, k, proj, torch.zeros(2, 9, 9), torch.zeros(2, 11, 11))
    with pytest.raises(ValueError, match="divisible by 4 \\* num_heads"):
        ContMix(36, num_heads=2)


def test_reparameterize_keeps_outputs():
    torch.manual_seed(3)
    model = _randomize(timm.create_model("test_overlock"), seed=3)
    x = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        want = model(x)
        timm.utils.reparameterize_model(model, inplace=True)
        assert not any("origin_bn" in k or "dil_" in k for k in model.state_dict())
        torch.testing.assert_close(model(x), want, atol=1e-4, rtol=1e-4)


def test_reparam_checkpoint_loads_through_timm(official_overlock, tmp_path):
    """A ``*_reparam.pth``-layout file (deploy model, ``lk_origin.bias``) through ``pretrained=True``, with
    a new class count: the classifiers are dropped, everything else matches the official deploy model."""
    torch.manual_seed(4)
    ref = _randomize(official_overlock.OverLoCK(**TINY, deploy=True), seed=4)
    path = tmp_path / "test_overlock_in1k_224_reparam.pth"
    torch.save(ref.state_dict(), path)
    model = timm.create_model("test_overlock", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=10).eval()
    assert model.head[4].out_channels == 10 and model.aux_head is None  # the checkpoint's aux head is dropped
    with_aux = timm.create_model(
        "test_overlock", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=10, aux_head=True
    )
    assert with_aux.aux_head[2].out_channels == 10
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref.features(x)[0][-1], atol=1e-4, rtol=1e-4)


def test_bad_checkpoints(official_overlock):
    model = timm.create_model("test_overlock")
    with pytest.raises(ValueError, match="patch_embed1.0.weight"):
        _load(model, {"stem.0.weight": torch.zeros(1)})
    deployed = timm.create_model("test_overlock", deploy=True)
    with pytest.raises(ValueError, match="deploy=False"):
        _load(deployed, official_overlock.OverLoCK(**TINY).state_dict())


def test_aux_head_and_training_with_it():
    torch.manual_seed(5)
    model = timm.create_model("test_overlock", num_classes=7, aux_head=True).train()
    x, y = torch.randn(2, 3, 96, 96), torch.tensor([1, 3])
    logits, aux = model.forward_with_aux(x)
    assert logits.shape == aux.shape == (2, 7)
    loss = F.cross_entropy(logits, y) + vzoo.backbones.overlock.AUX_LOSS_RATIO * F.cross_entropy(aux, y)
    loss.backward()
    assert model.aux_head[2].weight.grad.abs().sum() > 0 and model.blocks4[0].dwconv.weight.grad.abs().sum() > 0
    assert model(x).shape == (2, 7)  # forward stays timm-style in training mode
    no_aux = timm.create_model("test_overlock")
    assert not any(k.startswith("aux_head") for k in no_aux.state_dict())
    with pytest.raises(RuntimeError, match="aux_head=False"):
        no_aux.forward_with_aux(x)


def test_detection_feature_channels_and_param_counts():
    feats = timm.create_model("overlock_t", features_only=True)
    assert feats.feature_info.channels() == [64, 128, 384, 640]
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    for name, millions in dict(overlock_xt=16.45, overlock_t=33.47, overlock_s=56.16, overlock_b=94.94).items():
        count = sum(p.numel() for p in timm.create_model(name, deploy=True).parameters())  # no aux head by default
        assert round(count / 1e6, 2) == millions, name
