"""Video sparse-attention benchmark helpers: structured inputs, latency against dense SDPA, density,
fidelity (relative L2 error of the output, attention-mass recall). Used by ``vzoo bench`` and
``benchmarks/video.py``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vzoo.bench import median_ms
from vzoo.gilbert import gilbert_order
from vzoo.psa import PSAConfig, psa_attention, psa_levels, psa_offsets
from vzoo.vmoba import VMoBAConfig, vmoba_attention, vmoba_route

__all__ = ["VideoRow", "structured_qkv", "video_rows"]


@dataclass
class VideoRow:
    method: str
    ms: float
    speedup: float  # dense SDPA time / this time
    density: float
    rel_l2: float
    recall: float
    dense: bool = False  # the call ran the dense kernel: its selection was above the break-even density


def structured_qkv(grid: tuple[int, int, int], heads: int = 4, dim: int = 64, seed: int = 0, sharpness: float = 14.0):
    """``q, k, v [1, H, T*H*W, D]`` drawn from smooth fields over the grid, not white noise.

    q and k are random Fourier features of the token position (length scales of about 2 frames and 4
    pixels, different per head) plus 5 % noise, so the logit ``q_i . k_j / sqrt(D)`` is about
    ``sharpness * exp(-|dx|^2 / 2)`` in those units: attention decays with distance in (t, h, w) like the
    local attention of video DiTs. v is a smooth field as well."""
    gen = torch.Generator().manual_seed(seed)
    t, h, w = grid
    pos = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in grid), indexing="ij"), -1).view(-1, 3)
    scales = torch.tensor([2.0, 4.0, 4.0])

    def field(n: int) -> torch.Tensor:
        freq = torch.randn(heads, 3, n, generator=gen) / scales[:, None]
        phase = 2 * math.pi * torch.rand(heads, 1, n, generator=gen)
        return torch.cos(pos @ freq + phase) * math.sqrt(2 / n)  # [H, S, n]

    base = field(dim)
    amp = math.sqrt(sharpness) * dim**0.25
    q = amp * (base + 0.05 * torch.randn(base.shape, generator=gen))
    k = amp * (base + 0.05 * torch.randn(base.shape, generator=gen))
    v = field(dim) * math.sqrt(dim)
    return q[None].contiguous(), k[None].contiguous(), v[None].contiguous()


def _recall(q: torch.Tensor, k: torch.Tensor, key_mask_fn, chunk: int = 1024) -> float:
    """Mean over queries of the dense attention mass on the keys a method attends; ``key_mask_fn(rows)``
    gives the bool ``[B, H, len(rows), S]`` mask of those keys."""
    scale = q.shape[-1] ** -0.5
    total, n = 0.0, 0
    for start in range(0, q.shape[2], chunk):
        rows = torch.arange(start, min(start + chunk, q.shape[2]))
        probs = torch.softmax((q[:, :, rows] @ k.transpose(-1, -2)) * scale, -1)
        total += (probs * key_mask_fn(rows)).sum().item()
        n += probs.shape[0] * probs.shape[1] * probs.shape[2]
    return total / n


def _vmoba_key_mask(q, k, grid, layer, config):
    slots, block_n, _, _, mask = vmoba_route(q, k, grid, layer, config)  # queries in slot order
    valid = slots >= 0
    inv = torch.empty_like(slots).index_copy_(0, slots[valid], torch.nonzero(valid)[:, 0])[: q.shape[2]]  # slot of each token
    return lambda rows: mask[:, :, inv[rows]][..., inv // block_n]


def _psa_key_mask(q, k, grid, config, offsets):
    perm = gilbert_order(grid) if config.reorder else torch.arange(q.shape[2])
    levels = psa_levels(q[:, :, perm], k[:, :, perm], config, offsets=offsets)
    inv = torch.argsort(perm)
    qblock, kblock = inv // config.block_q, inv // config.block_k  # block of each original token
    return lambda rows: levels[:, :, qblock[rows]][..., kblock] > 0


def video_rows(grid: tuple[int, int, int] = (16, 32, 32), heads: int = 4, dim: int = 64, repeats: int = 3) -> list[VideoRow]:
    """Dense SDPA, VMoBA (top-k preset, each layer type) and PSA (balanced) on structured inputs, fp32."""
    device = torch.device("cpu")
    q, k, v = structured_qkv(grid, heads, dim)
    dense = F.scaled_dot_product_attention(q, k, v)
    sdpa_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, repeats)
    rows = [VideoRow("dense sdpa", sdpa_ms, 1.0, 1.0, 0.0, 1.0)]

    def row(name, run, key_mask_fn):
        out, density, ran_dense = run()
        ms = median_ms(run, device, repeats)
        err = ((out - dense).norm() / dense.norm()).item()
        rows.append(VideoRow(name, ms, sdpa_ms / ms, density, err, _recall(q, k, key_mask_fn), ran_dense))

    vmoba = VMoBAConfig()
    for layer, kind in enumerate(("1D", "2D", "3D")):
        row(f"vmoba {kind} top-{vmoba.topk[layer]}", lambda layer=layer: vmoba_attention(q, k, v, grid, layer, vmoba, return_density=True),
            _vmoba_key_mask(q, k, grid, layer, vmoba))
    psa = PSAConfig.preset("balanced")
    offsets = psa_offsets(1, (heads, heads), psa, device, torch.Generator().manual_seed(0))  # same selection in every run
    row("psa balanced", lambda: psa_attention(q, k, v, grid, psa, return_density=True, offsets=offsets),
        _psa_key_mask(q, k, grid, psa, offsets))
    return rows


def format_video(rows: list[VideoRow]) -> str:
    head = f"{'method':<22} {'ms':>8} {'x sdpa':>7} {'density':>8} {'rel L2':>7} {'recall':>7}"
    lines = [head, "-" * len(head)]
    lines += [f"{r.method:<22} {r.ms:>8.1f} {r.speedup:>7.2f} {r.density:>8.3f} {r.rel_l2:>7.3f} {r.recall:>7.3f}{' dense' * r.dense}" for r in rows]
    return "\n".join(lines + ["(dense: selection above the break-even density, so the dense kernel ran)"] * any(r.dense for r in rows))
