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
