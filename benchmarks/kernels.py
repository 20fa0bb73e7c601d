"""Block-sparse attention latency: dense SDPA vs compiled FlexAttention vs vzoo's default backend.

Prints a table, checks the kernel-layer bar, saves a PNG plot and the raw rows as JSON.

    python benchmarks/kernels.py                      # CPU sweep, fp32
    python benchmarks/kernels.py --device cuda --dtype bfloat16 --seq-lens 4096 16384 65536 131072
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vzoo.bench import check_bar, format_table, kernel_rows, rows_as_dicts, save_plot


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--blocks", type=int, nargs="+", default=[3, 6, 16], help="key blocks chosen per query block")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention")
    p.add_argument("--no-check", action="store_true", help="skip the error check against the reference backend")
    p.add_argument("--out", default="bench-results", help="folder for kernels.png and kernels.json")
    a = p.parse_args()
    rows = kernel_rows(
        a.seq_lens, a.blocks, batch=a.batch, heads=a.heads, head_dim=a.head_dim, block=a.block,
        dtype=getattr(torch, a.dtype), device=a.device, flex=not a.no_flex, repeats=a.repeats,
        check_error=not a.no_check,
    )
    print(f"B={a.batch} H={a.heads} D={a.head_dim} block={a.block} {a.dtype} on {a.device}; median of {a.repeats}")
    print(format_table(rows))
    print("\n".join(check_bar(rows)))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_plot(rows, str(out / "kernels.png"))
    (out / "kernels.json").write_text(json.dumps(rows_as_dicts(rows), indent=1))
    print(f"saved {out / 'kernels.png'} and {out / 'kernels.json'}")


if __name__ == "__main__":
    main()
