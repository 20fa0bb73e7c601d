"""BiFormer fidelity: vzoo's block-sparse BRA and models against the independent gather-based
re-implementation of the official code (tests/backbones/official_biformer.py)."""

from __future__ import annotations

import math
import re

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import vzoo
from vzoo.backbones.biformer import checkpoint_filter_fn


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights and BatchNorm statistics far from their init, so every path shows in the output.
    Layers writing into a residual stream (pos_embed, attn output, second MLP Linear) are scaled so that
    activations stay bounded through 30 blocks, as in a trained network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                gain = 0.3 if re.search(r"attn\.(wo|proj)\.|mlp\.(3|fc2)\.|pos_embed", name) else 1.0
                p.copy_(gain * torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(1 + 0.2 * torch.rand(b.shape, generator=g))
    return model


def copy_bra(official, ours):
    ours.qkv.load_state_dict(official.qkv.qkv.state_dict())
    ours.proj.load_state_dict(official.wo.state_dict())
    ours.lepe.load_state_dict(official.lepe.state_dict())


@pytest.mark.parametrize("size", [(28, 28), (25, 31)], ids=["divisible", "auto_pad"])
def test_bra_forward_and_backward_match_gather_reference(official_biformer, size):
    torch.manual_seed(0)
    ref = randomize(official_biformer.GatherBRA(32, num_heads=2, n_win=7, topk=3))
    ours = vzoo.BiLevelRoutingAttention(32, num_heads=2, n_win=7, topk=3)
    copy_bra(ref, ours)
    x = torch.randn(2, *size, 32)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = ref(xr), ours(xo)
    assert got.shape == (2, *size, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(want)
    (want * w).sum().backward()
    (got * w).sum().backward()
    torch.testing.assert_close(xo.grad, xr.grad, atol=1e-5, rtol=1e-5)
    for (a, pa), (b, pb) in zip(
        [("qkv", ref.qkv.qkv), ("wo", ref.wo), ("lepe", ref.lepe)], [("qkv", ours.qkv), ("proj", ours.proj), ("lepe", ours.lepe)]
    ):
        torch.testing.assert_close(pb.weight.grad, pa.weight.grad, atol=1e-4, rtol=1e-4, msg=f"{a} weight grad")


def test_bra_with_every_region_routed_is_dense_attention():
    torch.manual_seed(1)
    bra = randomize(vzoo.BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=4))
    x = torch.randn(1, 6, 8, 16)
    q, k, v = bra.qkv(x).flatten(1, 2).split(16, -1)
    heads = lambda t: t.unflatten(-1, (2, 8)).transpose(1, 2)  # noqa: E731
    attn = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=16**-0.5).transpose(1, 2).reshape(1, 6, 8, 16)
    lepe = bra.lepe(bra.qkv(x)[..., 32:].permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(bra(x), bra.proj(attn + lepe), atol=1e-5, rtol=1e-5)


def test_official_checkpoint_loads_through_timm(official_biformer, tmp_path):
    """Official-layout weights -> timm.create_model(..., pretrained_cfg_overlay=dict(file=...)) -> same logits."""
    for name, size in (("test_biformer", (112, 112)), ("test_biformer", (97, 131)), ("biformer_tiny", (224, 224)), ("biformer_tiny", (230, 250))):
        torch.manual_seed(3)
        ref = randomize(official_biformer.official_model(name)).eval()
        path = tmp_path / f"{name}.pth"
        torch.save({"model": ref.state_dict()}, path)
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            want, got = ref(x), model(x)
        assert want.abs().max() > 1  # the random weights give logits that are not near zero
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=f"{name} at {size}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["biformer_small", "biformer_base"])
def test_large_official_checkpoints_give_same_logits(official_biformer, tmp_path, name):
    torch.manual_seed(4)
    ref = randomize(official_biformer.official_model(name)).eval()
    path = tmp_path / f"{name}.pth"
    torch.save({"model": ref.state_dict()}, path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    for size in ((224, 224), (231, 257)):  # the second pads every routing stage
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=0, msg=f"{name} at {size}")


def test_checkpoint_filter_fn_maps_names_and_rejects_unknown(official_biformer):
    ref = official_biformer.official_model("test_biformer")
    model = timm.create_model("test_biformer")
    mapped = checkpoint_filter_fn({"model": ref.state_dict()}, model)
    assert set(mapped) == set(model.state_dict())
    assert set(checkpoint_filter_fn(model.state_dict(), model)) == set(model.state_dict())
    with pytest.raises(ValueError, match="neither an official BiFormer"):
        checkpoint_filter_fn({"encoder.weight": torch.zeros(1)}, model)


def test_bad_inputs():
    bra = vzoo.BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=2)
    with pytest.raises(ValueError, match="NHWC"):
        bra(torch.randn(1, 16, 8, 8))
    with pytest.raises(ValueError, match="topk=5"):
        vzoo.BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=5)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        vzoo.BiLevelRoutingAttention(16, num_heads=3)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bra_on_other_backends_matches_gather_reference(official_biformer, backend):
    """The same module on the dense reference and on the Triton kernels (on the GPU, or interpreted on
    the CPU): strided head-split q/k/v views and 2x2-token regions."""
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(6)
    ref = randomize(official_biformer.GatherBRA(16, num_heads=2, n_win=4, topk=3))
    ours = vzoo.BiLevelRoutingAttention(16, num_heads=2, n_win=4, topk=3, backend=backend)
    copy_bra(ref, ours)
    ours.to(dev)
    x = torch.randn(1, 7, 8, 16)
    xr, xo = x.clone().requires_grad_(), x.clone().to(dev).requires_grad_()
    want, got = ref(xr), ours(xo)
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(want)
    (want * w).sum().backward()
    (got * w.to(dev)).sum().backward()
    torch.testing.assert_close(xo.grad.cpu(), xr.grad, atol=1e-5, rtol=1e-5)
