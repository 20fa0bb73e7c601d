"""An independent, plain re-implementation of the official BiFormer (gather-based BRA, legacy op),
with the official module names, so its state_dict has the official checkpoint layout.

Written from the algorithm in shared/specs/biformer.md (rayleizhu/BiFormer at 1697bbb,
``ops/bra_legacy.py``, ``models/biformer.py``, ``models/_common.py``): routed key/value regions are
gathered into a top-k-fold copy, exactly the memory-hungry path vzoo replaces. Used by the fidelity
tests and as the baseline of benchmarks/backbones.py (loaded by file path; tests/ is no package).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class QKVLinear(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)


class GatherBRA(nn.Module):
    def __init__(self, dim: int, num_heads: int, n_win: int, topk: int):
        super().__init__()
        self.dim, self.heads, self.n_win, self.topk = dim, num_heads, n_win, topk
        self.scale = dim**-0.5
        self.qkv = QKVLinear(dim)
        self.wo = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)

    def forward(self, x):  # NHWC
        n, h0, w0, c = x.shape
        s = self.n_win
        x = F.pad(x, (0, 0, 0, (s - w0 % s) % s, 0, (s - h0 % s) % s))
        _, hh, ww, _ = x.shape
        rh, rw = hh // s, ww // s
        # windows: [n, s*s, rh, rw, c], window index = row * s + col
        win = x.reshape(n, s, rh, s, rw, c).transpose(2, 3).reshape(n, s * s, rh, rw, c)
        t = self.qkv.qkv(win)
        q, kv = t[..., :c], t[..., c:]
        q_win = q.mean(dim=(2, 3)).detach()
        k_win = kv[..., :c].mean(dim=(2, 3)).detach()
        v_map = kv[..., c:].reshape(n, s, s, rh, rw, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, hh, ww)
        lepe = self.lepe(v_map).permute(0, 2, 3, 1)
        r_idx = torch.topk((q_win * self.scale) @ k_win.transpose(1, 2), self.topk, dim=-1).indices  # [n, p, k]
        p, r = s * s, rh * rw
        kv_pix = kv.reshape(n, 1, p, r, 2 * c).expand(n, p, p, r, 2 * c)
        kv_sel = torch.gather(kv_pix, 2, r_idx[:, :, :, None, None].expand(n, p, self.topk, r, 2 * c))
        d = c // self.heads
        k_sel = kv_sel[..., :c].reshape(n * p, self.topk * r, self.heads, d).permute(0, 2, 3, 1)
        v_sel = kv_sel[..., c:].reshape(n * p, self.topk * r, self.heads, d).transpose(1, 2)
        q_pix = q.reshape(n * p, r, self.heads, d).transpose(1, 2)
        attn = torch.softmax((q_pix * self.scale) @ k_sel, dim=-1)
        out = (attn @ v_sel).transpose(1, 2).reshape(n, s, s, rh, rw, c).transpose(2, 3).reshape(n, hh, ww, c)
        out = self.wo(out + lepe)
        return out[:, :h0, :w0]


class AttentionLePE(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8):
        super().__init__()
        self.heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)

    def forward(self, x):  # NHWC
        n, h, w, c = x.shape
        t = self.qkv(x.reshape(n, h * w, c)).reshape(n, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((t[0] @ t[1].transpose(-1, -2)) * self.scale, dim=-1)
        out = (attn @ t[2]).transpose(1, 2).reshape(n, h * w, c)
        lepe = self.lepe(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        return self.proj(out + lepe).reshape(n, h, w, c)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, n_win: int, topk: int, mlp_ratio: int = 3):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = GatherBRA(dim, heads, n_win, topk) if topk > 0 else AttentionLePE(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.Identity(), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):  # NCHW
        x = (x + self.pos_embed(x)).permute(0, 2, 3, 1)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x.permute(0, 3, 1, 2)


class OfficialBiFormer(nn.Module):
    def __init__(self, depth, embed_dim, heads, topks=(1, 4, 16, -2), n_win=7, mlp_ratio=3, num_classes=1000):
        super().__init__()
        c0 = embed_dim[0]
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, c0 // 2, 3, 2, 1), nn.BatchNorm2d(c0 // 2), nn.GELU(),
                           nn.Conv2d(c0 // 2, c0, 3, 2, 1), nn.BatchNorm2d(c0))]
            + [nn.Sequential(nn.Conv2d(embed_dim[i], embed_dim[i + 1], 3, 2, 1), nn.BatchNorm2d(embed_dim[i + 1])) for i in range(3)]
        )
        self.stages = nn.ModuleList(
            nn.Sequential(*[Block(embed_dim[i], heads[i], n_win, topks[i], mlp_ratio) for _ in range(depth[i])]) for i in range(4)
        )
        self.norm = nn.BatchNorm2d(embed_dim[-1])
        self.head = nn.Linear(embed_dim[-1], num_classes)

    def forward(self, x):
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x).flatten(2).mean(-1))


CONFIGS = {
    "biformer_tiny": dict(depth=(2, 2, 8, 2), embed_dim=(64, 128, 256, 512), heads=(2, 4, 8, 8)),
    "biformer_small": dict(depth=(4, 4, 18, 4), embed_dim=(64, 128, 256, 512), heads=(2, 4, 8, 8)),
    "biformer_base": dict(depth=(4, 4, 18, 4), embed_dim=(96, 192, 384, 768), heads=(3, 6, 12, 8)),
    "test_biformer": dict(depth=(1, 1, 2, 1), embed_dim=(16, 32, 64, 64), heads=(1, 2, 2, 2), topks=(1, 4, 8, -2), mlp_ratio=2),
}


def official_model(name: str, **kwargs) -> OfficialBiFormer:
    return OfficialBiFormer(**CONFIGS[name], **kwargs)
