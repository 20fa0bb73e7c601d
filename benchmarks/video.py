"""VMoBA and PSA against dense SDPA on CPU: the attention op on structured inputs (latency, measured
density, relative L2 error, attention-mass recall) and a narrow Wan transformer forward.

    python benchmarks/video.py                  # grid 16x32x32 = 16384 tokens, 4 heads of 64, fp32
    python benchmarks/video.py --grid 16 48 48  # longer
    python benchmarks/video.py --break-even     # speed-up against SDPA as the selected density grows

Bar (CPU, 16x32x32, structured inputs): each method >= 3x faster than SDPA, rel. L2 <= 0.15, recall >= 0.85.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from vzoo.bench import median_ms
from vzoo.bench_video import format_video, structured_qkv, video_rows
from vzoo.pipelines import DenseConfig, PSAConfig, VMoBAConfig, apply_sparse_attention
from vzoo.psa import psa_attention, psa_offsets
from vzoo.vmoba import vmoba_attention, vmoba_permutation


def break_even_rows(grid, repeats: int) -> list[tuple[str, float, float]]:
    """(method, selected density, speed-up over SDPA) with the dense fallback off, for densities from
    sparse to full: PSA with all four level bounds at tau (no pooling cap), VMoBA 3D layers with top-k."""
    cpu = torch.device("cpu")
    q, k, v = structured_qkv(grid, 4, 64)

    def speedup(run) -> float:  # SDPA timed next to each point: a shared machine's load drifts
        return median_ms(lambda: F.scaled_dot_product_attention(q, k, v), cpu, repeats) / median_ms(run, cpu, repeats)

    rows = []
    for tau in (0.5, 0.8, 0.95, 0.99, 0.999, 1.0):
        cfg = PSAConfig(thresholds=(tau,) * 4, sim_cap=None)
        offsets = psa_offsets(1, (4, 4), cfg, cpu, torch.Generator().manual_seed(0))
        run = lambda cfg=cfg, offsets=offsets: psa_attention(q, k, v, grid, cfg, offsets=offsets, return_density=True, dense_fallback=False)
        rows.append(("psa", run()[1], speedup(run)))
    vmoba = VMoBAConfig()
    slots, block_n = vmoba_permutation(grid, vmoba.block(2, grid))
    nb = slots.numel() // block_n  # key blocks of the 3D layers (short last blocks included)
    for share in (0.125, 0.25, 0.375, 0.5, 0.75, 1.0):
        cfg = VMoBAConfig(topk=(1, 1, max(1, round(share * nb))))
        run = lambda cfg=cfg: vmoba_attention(q, k, v, grid, 2, cfg, return_density=True, dense_fallback=False)
        rows.append(("vmoba", run()[1], speedup(run)))
    return rows


def crossing(points: list[tuple[float, float]]) -> float | None:
    """Density where the speed-up falls through 1 (linear between the measured points), None if never."""
    points = sorted(points)
    for (d0, s0), (d1, s1) in zip(points, points[1:]):
        if s0 >= 1 > s1:
            return d0 + (s0 - 1) * (d1 - d0) / (s0 - s1)
    return None if points[-1][1] >= 1 else points[0][0]


def transformer_rows(grid, repeats: int) -> list[tuple[str, float, float | None]]:
    """Forward of a 2-layer Wan transformer (4 heads of 64) on one latent of ``grid``: dense, VMoBA, PSA."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16, text_dim=64,
        freq_dim=64, ffn_dim=512, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    ).eval()
    t, h, w = grid
    x = torch.randn(1, 16, t, 2 * h, 2 * w)
    args = dict(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 16, 64), return_dict=False)
    rows = []
    for name, config in (("dense", DenseConfig()), ("vmoba", VMoBAConfig(dense_warmup=0.0)), ("psa", PSAConfig(dense_warmup=0.0))):
        with torch.no_grad(), apply_sparse_attention(model, config) as handle:
            ms = median_ms(lambda: model(**args), torch.device("cpu"), repeats)
        rows.append((name, ms, handle.density))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", type=int, nargs=3, default=[16, 32, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench-results")
    p.add_argument("--break-even", action="store_true", help="measure the break-even densities only")
    a = p.parse_args()
    grid = tuple(a.grid)
    if a.break_even:
        rows = break_even_rows(grid, a.repeats)
        print(f"grid {grid}, 4 heads x 64, fp32, {torch.get_num_threads()} threads; dense fallback off")
        for method in ("psa", "vmoba"):
            pts = [(d, x) for m, d, x in rows if m == method]
            print(f"{method}: " + ", ".join(f"density {d:.3f} {x:.2f}x" for d, x in pts) + f"; break-even density {crossing(pts)}")
        return
    print(f"attention op: grid {grid} ({grid[0] * grid[1] * grid[2]} tokens), 4 heads x 64, fp32, {torch.get_num_threads()} threads")
    rows = video_rows(grid, repeats=a.repeats)
    print(format_video(rows))
    for r in rows[1:]:
        ok = r.speedup >= 3 and r.rel_l2 <= 0.15 and r.recall >= 0.85
        print(f"{'PASS' if ok else 'FAIL'} {r.method}: {r.speedup:.2f}x sdpa (bar 3), rel L2 {r.rel_l2:.3f} (bar 0.15), recall {r.recall:.3f} (bar 0.85)")
    print("\nWan transformer forward (2 layers, 4 heads x 64, ffn 512):")
    trans = transformer_rows(grid, a.repeats)
    dense_ms = trans[0][1]
    for name, ms, density in trans:
        print(f"  {name:<6} {ms:9.1f} ms  {dense_ms / ms:5.2f}x  density {'-' if density is None else f'{density:.3f}'}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(op=[asdict(r) for r in rows], transformer=[dict(method=n, ms=m, density=d) for n, m, d in trans])
    (out / "video.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
