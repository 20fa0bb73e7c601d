"""Block-diffusion language models (issue 17). So far: the speed of the BD3 training mask and the block-causal
prefill mask on the block-sparse path against the same masks as dense 4-D masks through SDPA (CPU fp32,
B1 H4 D64, blocks of 32), same process.

    python benchmarks/diffusion_lm.py --tokens 4096 8192
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from vzoo.atomic import write_json_atomic
from vzoo.bench_diffusion import check_diffusion_bar, format_masks, mask_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the JSON results")
    a = p.parse_args()
    rows = mask_rows(a.tokens, a.repeats, a.block)
    print(format_masks(rows), flush=True)
    bar = check_diffusion_bar(rows)
    print("\n".join(bar))
    a.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"masks": [asdict(r) | {"speedup": r.speedup} for r in rows], "bar": bar},
                      a.out / "results_diffusion_masks.json")


if __name__ == "__main__":
    main()
