"""An independent, plain re-implementation of the official OverLoCK (LMMMEng/OverLoCK ``models/overlock.py``
at 2c8ab3b) with the official module names, so its state_dict has the official checkpoint layout.

Written from shared/specs/overlock.md without NATTEN: the dynamic kernels are applied the way the
official no-NATTEN fallback (``models/contmix.py``) does it (unfold without padding, replicate-pad the
window grid, einsum), the relative-position bias is looked up with NATTEN's repeat/flip index recipe,
and the 49 -> taps projection is a 1x1 conv over the region axis, in the official order of operations.
Shares no code with vzoo. Used by the fidelity tests and as the baseline of benchmarks/backbones.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

BRANCHES = {
    17: ((5, 7, 9, 3, 3, 3), (1, 1, 2, 4, 5, 7)),
    15: ((5, 7, 7, 3, 3, 3), (1, 1, 2, 3, 5, 7)),
    13: ((5, 7, 7, 3, 3, 3), (1, 1, 2, 3, 4, 5)),
    7: ((5, 3, 3, 3), (1, 1, 2, 3)),
    5: ((3, 3), (1, 2)),
}


class LN2d(nn.LayerNorm):
    def __init__(self, dim):
        super().__init__(dim, eps=1e-6)

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GRN(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x):
        gx = torch.norm(x, p=2, dim=(-1, -2), keepdim=True)
        nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class LayerScale(nn.Module):
    def __init__(self, dim, init_value):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, 1, 1, 1) * init_value)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class ResDW(nn.Conv2d):
    def __init__(self, dim):
        super().__init__(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x):
        return x + super().forward(x)


class SE(nn.Module):
    def __init__(self, dim):
        super().__init__()
        inner = max(16, dim // 8)
        self.proj = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, inner, 1), nn.GELU(), nn.Conv2d(inner, dim, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.proj(x)


class DilatedReparam(nn.Module):
    """Un-merged branches, or (deploy) one conv with bias."""

    def __init__(self, dim, k, deploy=False):
        super().__init__()
        self.k, self.deploy = k, deploy
        self.lk_origin = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=deploy)
        if not deploy:
            self.origin_bn = nn.BatchNorm2d(dim)
            for kk, r in zip(*BRANCHES[k]):
                self.add_module(f"dil_conv_k{kk}_{r}", nn.Conv2d(dim, dim, kk, padding=r * (kk - 1) // 2, dilation=r, groups=dim, bias=False))
                self.add_module(f"dil_bn_k{kk}_{r}", nn.BatchNorm2d(dim))

    def forward(self, x):
        if self.deploy:
            return self.lk_origin(x)
        out = self.origin_bn(self.lk_origin(x))
        for kk, r in zip(*BRANCHES[self.k]):
            out = out + getattr(self, f"dil_bn_k{kk}_{r}")(getattr(self, f"dil_conv_k{kk}_{r}")(x))
        return out


class RepConvBlock(nn.Module):
    def __init__(self, dim, k, mlp_ratio, ls, deploy=False):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.dwconv = ResDW(dim)
        self.proj = nn.Sequential(
            LN2d(dim), DilatedReparam(dim, k, deploy), nn.BatchNorm2d(dim), SE(dim), nn.Conv2d(dim, hidden, 1), nn.GELU(),
            ResDW(hidden), GRN(hidden), nn.Conv2d(hidden, dim, 1),
        )
        self.ls = LayerScale(dim, ls) if ls is not None else nn.Identity()

    def forward(self, x):
        x = self.dwconv(x)
        return self.ls(x) + self.proj(x)  # res_scale=True


def rpb_gather(rpb, h, w, k):
    """NATTEN's recipe (as ``apply_rpb``): repeat the middle index to fill the interior, flip rows."""
    size = 2 * k - 1
    idx = torch.arange(k)
    taps = (idx[:, None] * size + idx).view(-1)
    rep_h = torch.ones(k, dtype=torch.long)
    rep_w = torch.ones(k, dtype=torch.long)
    rep_h[k // 2] = h - (k - 1)
    rep_w[k // 2] = w - (k - 1)
    base = idx.repeat_interleave(rep_h)[:, None] * size + idx.repeat_interleave(rep_w)
    index = torch.flip((base[..., None] + taps).reshape(-1, k * k), [0])
    return rpb.flatten(1)[:, index].reshape(1, rpb.shape[0], h, w, k * k)


def unfold_av(attn, value, k):
    """Border-clamped aggregation: unfold without padding, replicate-pad the window grid. attn [B,G,H,W,k*k],
    value [B,G,H,W,c] -> [B,G,H,W,c]."""
    b, g, h, w, c = value.shape
    pad = k // 2
    v = rearrange(value, "b g h w c -> b (g c) h w")
    v = F.unfold(v, kernel_size=k).reshape(b, g * c * k * k, h - 2 * pad, w - 2 * pad)
    v = F.pad(v, (pad, pad, pad, pad), mode="replicate")
    v = rearrange(v, "b (g c t) h w -> b g c h w t", g=g, t=k * k)
    return torch.einsum("bghwt,bgchwt->bghwc", attn, v)


class DynamicConvBlock(nn.Module):
    def __init__(self, dim, ctx_dim, k, smk, heads, mlp_ratio, ls, is_first, is_last, deploy=False):
        super().__init__()
        out_dim = dim + ctx_dim
        self.k, self.smk, self.g = k, smk, heads * 2
        self.scale = (dim // self.g) ** -0.5
        self.is_first, self.is_last = is_first, is_last
        if not is_first:
            self.x_scale = LayerScale(ctx_dim, 1)
            self.h_scale = LayerScale(ctx_dim, 1)
        self.dwconv1 = ResDW(out_dim)
        self.norm1 = LN2d(out_dim)
        self.fusion = nn.Sequential(
            nn.Conv2d(out_dim, out_dim, 3, padding=1, groups=out_dim), nn.BatchNorm2d(out_dim), nn.GELU(), nn.Conv2d(out_dim, dim, 1), GRN(dim)
        )
        self.weight_query = nn.Sequential(nn.Conv2d(dim, dim // 2, 1, bias=False), nn.BatchNorm2d(dim // 2))
        self.weight_key = nn.Sequential(nn.AdaptiveAvgPool2d(7), nn.Conv2d(ctx_dim, dim // 2, 1, bias=False), nn.BatchNorm2d(dim // 2))
        self.weight_proj = nn.Conv2d(49, k * k + smk * smk, 1)
        self.dyconv_proj = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim))
        self.lepe = nn.Sequential(DilatedReparam(dim, k, deploy), nn.BatchNorm2d(dim))
        self.se_layer = SE(dim)
        self.gate = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.SiLU())
        self.proj = nn.Sequential(nn.BatchNorm2d(dim), nn.Conv2d(dim, out_dim, 1))
        self.dwconv2 = ResDW(out_dim)
        self.norm2 = LN2d(out_dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Conv2d(out_dim, hidden, 1), nn.GELU(), ResDW(hidden), GRN(hidden), nn.Conv2d(hidden, out_dim, 1))
        self.ls1 = LayerScale(out_dim, ls)
        self.ls2 = LayerScale(out_dim, ls)
        self.rpb1 = nn.Parameter(torch.zeros(self.g, 2 * smk - 1, 2 * smk - 1))
        self.rpb2 = nn.Parameter(torch.zeros(self.g, 2 * k - 1, 2 * k - 1))

    def forward(self, x, h_x, h_r):
        in_size = x.shape[2:]
        _, C, H, W = x.shape
        C_h = h_x.shape[1]
        if not self.is_first:
            h_x = self.x_scale(h_x) + self.h_scale(h_r)
        x_f = self.dwconv1(torch.cat([x, h_x], 1))
        identity = x_f
        x_f = self.norm1(x_f)
        x = self.fusion(x_f)
        gate, lepe = self.gate(x), self.lepe(x)
        padded = min(H, W) < self.k
        if padded:
            size = (self.k, int(self.k / H * W)) if H < W else (int(self.k / W * H), self.k)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x_f = F.interpolate(x_f, size=size, mode="bilinear", align_corners=False)
            H, W = size
        query, key = torch.split(x_f, [C, C_h], 1)
        query = self.weight_query(query) * self.scale
        key = self.weight_key(key)
        query = rearrange(query, "b (g c) h w -> b g c (h w)", g=self.g)
        key = rearrange(key, "b (g c) h w -> b g c (h w)", g=self.g)
        weight = torch.einsum("bgcn,bgcl->bgnl", query, key)
        weight = self.weight_proj(rearrange(weight, "b g n l -> b l g n").contiguous())
        weight = rearrange(weight, "b l g (h w) -> b g h w l", h=H, w=W)
        a1, a2 = torch.split(weight, [self.smk**2, self.k**2], -1)
        a1 = torch.softmax(a1 + rpb_gather(self.rpb1, H, W, self.smk), -1)
        a2 = torch.softmax(a2 + rpb_gather(self.rpb2, H, W, self.k), -1)
        value = rearrange(x, "b (m g c) h w -> m b g h w c", m=2, g=self.g)
        x = torch.cat([unfold_av(a1, value[0], self.smk), unfold_av(a2, value[1], self.k)], 1)
        x = rearrange(x, "b g h w c -> b (g c) h w")
        if padded:
            x = F.adaptive_avg_pool2d(x, in_size)
        x = self.dyconv_proj(x)
        x = self.se_layer(x + lepe)
        x = self.proj(gate * x)
        x = self.ls1(identity) + x
        x = self.dwconv2(x)
        x = self.ls2(x) + self.mlp(self.norm2(x))
        if self.is_last:
            return x, None
        return torch.split(x, [C, C_h], 1)


def conv_bn(i, o):
    return [nn.Conv2d(i, o, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(o)]


class CTXDownsample(nn.Module):
    def __init__(self, dim, h_dim):
        super().__init__()
        self.x_proj = nn.Sequential(*conv_bn(dim, h_dim))
        self.h_proj = nn.Sequential(*conv_bn(h_dim // 4, h_dim // 4))


class OverLoCK(nn.Module):
    """Official macro structure; ``forward`` returns ``(logits, aux_logits)``; ``features`` the four
    maps the official detection model normalises."""

    def __init__(self, depth, sub_depth, dims, kernels, sub_heads, mlp=4, sub_mlp=3, projection=1024, num_classes=1000, deploy=False):
        super().__init__()
        c0, c1, c2, c3 = dims
        ctx = c3 // 4
        ls = [None, None, 1, 1]
        self.patch_embed1 = nn.Sequential(
            nn.Conv2d(3, c0 // 2, 3, 2, 1, bias=False), nn.BatchNorm2d(c0 // 2), nn.GELU(),
            nn.Conv2d(c0 // 2, c0 // 2, 3, 1, 1, bias=False), nn.BatchNorm2d(c0 // 2), nn.GELU(),
            nn.Conv2d(c0 // 2, c0, 3, 2, 1, bias=False), nn.BatchNorm2d(c0), nn.GELU(),
            nn.Conv2d(c0, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0),
        )
        self.patch_embed2 = nn.Sequential(*conv_bn(c0, c1))
        self.patch_embed3 = nn.Sequential(*conv_bn(c1, c2))
        self.patch_embed4 = nn.Sequential(*conv_bn(c2, c3))
        self.high_level_proj = nn.Conv2d(c3, ctx, 1)
        self.patch_embedx = CTXDownsample(c2, c3)
        for i in range(4):
            self.add_module(f"blocks{i + 1}", nn.ModuleList(RepConvBlock(dims[i], kernels[i], mlp, ls[i], deploy) for _ in range(depth[i])))
        self.sub_blocks3 = nn.ModuleList(
            DynamicConvBlock(c2, ctx, kernels[2], 5, sub_heads[0], sub_mlp, 1, j == 0, False, deploy) for j in range(sub_depth[0])
        )
        self.sub_blocks4 = nn.ModuleList(
            DynamicConvBlock(c3, ctx, kernels[3], 5, sub_heads[1], sub_mlp, 1, False, j == sub_depth[1] - 1, deploy) for j in range(sub_depth[1])
        )
        self.aux_head = nn.Sequential(nn.BatchNorm2d(c3), nn.AdaptiveAvgPool2d(1), nn.Conv2d(c3, num_classes, 1))
        self.head = nn.Sequential(
            nn.Conv2d(c3 + ctx, projection, 1, bias=False), nn.BatchNorm2d(projection), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(projection, num_classes, 1),
        )

    def features(self, x):
        outs = []
        x = self.patch_embed1(x)
        for blk in self.blocks1:
            x = blk(x)
        outs.append(x)
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x)
        outs.append(x)
        x = self.patch_embed3(x)
        for blk in self.blocks3:
            x = blk(x)
        ctx = self.patch_embed4(x)
        for blk in self.blocks4:
            ctx = blk(ctx)
        ctx_cls = ctx
        ctx_ori = self.high_level_proj(ctx)
        ctx_up = F.interpolate(ctx_ori, size=x.shape[2:], mode="bilinear", align_corners=False)
        for idx, blk in enumerate(self.sub_blocks3):
            if idx == 0:
                ctx = ctx_up
            x, ctx = blk(x, ctx, ctx_up)
        outs.append(torch.cat([x, ctx], 1))
        x = self.patch_embedx.x_proj(x)
        ctx = self.patch_embedx.h_proj(ctx)
        for blk in self.sub_blocks4:
            x, ctx = blk(x, ctx, ctx_ori)
        outs.append(x)
        return outs, ctx_cls

    def forward(self, x):
        outs, ctx = self.features(x)
        return self.head(outs[-1]).flatten(1), self.aux_head(ctx).flatten(1)
