"""Prefill of a narrow Llama (4 layers, 4 heads of 64): vzoo methods against SDPA, same process:
latency, peak memory, KV-cache size after the prefill, attended density and the share of calls that
ran dense attention instead (selection above the device's break-even density, ``dense_fallback``).

    python benchmarks/lm.py --tokens 8192 16384                     # CPU, fp32
    python benchmarks/lm.py --device cuda --dtype bfloat16 --tokens 32768 65536 131072
"""

from __future__ import annotations

import argparse

import torch

from vzoo.bench_lm import format_lm, lm_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args()
    print(format_lm(lm_rows(a.tokens, a.repeats, a.device, getattr(torch, a.dtype))))


if __name__ == "__main__":
    main()
