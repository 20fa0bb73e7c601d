"""OverLoCK blocks: GRN and DilatedReparamBlock against plain formulas; reparameterize() keeps outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vzoo.overlock import GRN, DilatedReparamBlock


def test_grn_matches_convnextv2_formula():
    torch.manual_seed(0)
    grn = GRN(6)
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    x = torch.randn(2, 6, 5, 7)
    gx = x.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
    nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
    torch.testing.assert_close(grn(x), grn.gamma * (x * nx) + grn.beta + x)


def _randomize_bn(module):
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(m.num_features, generator=g))


@pytest.mark.parametrize("kernel_size", [5, 7, 13, 19])
def test_dilated_reparam_block_sum_and_reparameterize(kernel_size):
    torch.manual_seed(kernel_size)
    block = DilatedReparamBlock(8, kernel_size).eval()
    with torch.no_grad():
        _randomize_bn(block)
    x = torch.randn(2, 8, 23, 21)

    def bn(m, y):
        return (y - m.running_mean[:, None, None]) / (m.running_var[:, None, None] + m.eps).sqrt() * m.weight[:, None, None] + m.bias[:, None, None]

    with torch.no_grad():
        want = bn(block.origin_bn, F.conv2d(x, block.lk_origin.weight, padding=kernel_size // 2, groups=8))
        for k, r in zip(block.kernel_sizes, block.dilates):
            conv = getattr(block, f"dil_conv_k{k}_{r}")
            want = want + bn(getattr(block, f"dil_bn_k{k}_{r}"), F.conv2d(x, conv.weight, padding=r * (k - 1) // 2, dilation=r, groups=8))
        got = block(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        block.reparameterize()
        assert set(block.state_dict()) == {"lk_origin.weight", "lk_origin.bias"}  # the *_reparam checkpoint layout
        torch.testing.assert_close(block(x), want, atol=1e-4, rtol=1e-4)
    deployed = DilatedReparamBlock(8, kernel_size, deploy=True)
    deployed.load_state_dict(block.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), want, atol=1e-4, rtol=1e-4)


def test_bad_kernel_size():
    with pytest.raises(ValueError, match="kernel_size=6"):
        DilatedReparamBlock(4, 6)


def _functional_rep_conv_block(sd, x, kernel_size, res_scale):
    """RepConvBlock written out with functional ops from an official-layout state dict (eval mode)."""

    def bn(prefix, y):
        return F.batch_norm(y, sd[prefix + "running_mean"], sd[prefix + "running_var"], sd[prefix + "weight"], sd[prefix + "bias"], eps=1e-5)

    def dw(prefix, y, k, dilation=1):
        c = y.shape[1]
        pad = dilation * (k - 1) // 2
        return F.conv2d(y, sd[prefix + "weight"], sd.get(prefix + "bias"), padding=pad, dilation=dilation, groups=c)

    c = x.shape[1]
    x = x + dw("dwconv.", x, 3)
    y = F.layer_norm(x.permute(0, 2, 3, 1), (c,), sd["proj.0.weight"], sd["proj.0.bias"], eps=1e-6).permute(0, 3, 1, 2)
    lk = bn("proj.1.origin_bn.", dw("proj.1.lk_origin.", y, kernel_size))
    for k, r in zip(*{7: ((5, 3, 3, 3), (1, 1, 2, 3)), 13: ((5, 7, 7, 3, 3, 3), (1, 1, 2, 3, 4, 5))}[kernel_size]):
        lk = lk + bn(f"proj.1.dil_bn_k{k}_{r}.", dw(f"proj.1.dil_conv_k{k}_{r}.", y, k, r))
    y = bn("proj.2.", lk)
    s = F.conv2d(F.gelu(F.conv2d(y.mean((2, 3), keepdim=True), sd["proj.3.proj.1.weight"], sd["proj.3.proj.1.bias"])), sd["proj.3.proj.3.weight"], sd["proj.3.proj.3.bias"])
    y = y * torch.sigmoid(s)
    y = F.gelu(F.conv2d(y, sd["proj.4.weight"], sd["proj.4.bias"]))
    y = y + dw("proj.6.", y, 3)
    gx = y.pow(2).sum((2, 3), keepdim=True).sqrt()
    y = sd["proj.7.gamma"] * (y * gx / (gx.mean(1, keepdim=True) + 1e-6)) + sd["proj.7.beta"] + y
    y = F.conv2d(y, sd["proj.8.weight"], sd["proj.8.bias"])
    scale = lambda t: t * sd["ls.weight"].view(1, c, 1, 1) + sd["ls.bias"].view(1, c, 1, 1)  # noqa: E731
    return scale(x) + y if res_scale else x + scale(y)


@pytest.mark.parametrize("kernel_size,res_scale", [(7, False), (13, True)])
def test_rep_conv_block_matches_functional_form_and_reparameterizes(kernel_size, res_scale):
    from vzoo.overlock import RepConvBlock

    torch.manual_seed(3)
    block = RepConvBlock(16, kernel_size, mlp_ratio=2, ls_init_value=0.5, res_scale=res_scale).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
        _randomize_bn(block)
    x = torch.randn(2, 16, 15, 17)
    sd = block.state_dict()
    with torch.no_grad():
        want = _functional_rep_conv_block(sd, x, kernel_size, res_scale)
        torch.testing.assert_close(block(x), want, atol=1e-4, rtol=1e-4)
        block.proj[1].reparameterize()
        torch.testing.assert_close(block(x), want, atol=1e-4, rtol=1e-4)
