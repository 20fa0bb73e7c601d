"""Trained routing: Landmark Attention and the Routing Transformer (issue 16), two parts:

(a) speed on the CPU in fp32, B1 H4 D64: Landmark's grouped-softmax training op (forward + backward)
    against its dense masked reference and causal SDPA; Routing attention's forward against causal SDPA
    and its dense masked reference; 4k-16k tokens;
(b) retrieval: a tiny Llama trained on multi-query associative recall with softmax attention, then each
    method fine-tuned from it; held-out accuracy over steps (table and PNG).

    python benchmarks/routing.py                      # both parts, bar verdicts
    python benchmarks/routing.py --only speed --tokens 8192 16384
    python benchmarks/routing.py --only retrieval --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from vzoo.atomic import write_json_atomic
from vzoo.bench_routing import check_routing_bar, format_speed, retrieval_rows, speed_rows


def _progress(label: str, step: int, acc: float, loss: float) -> None:
    print(f"{label}: step {step} accuracy {acc:.3f} loss {loss:.3f}", file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["speed", "retrieval"])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="retrieval: a smoke-test budget (does not converge)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the PNG and JSON results")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    speed, retrieval = [], []
    if a.only in (None, "speed"):
        speed = speed_rows(a.tokens, repeats=a.repeats)
        print(format_speed(speed), flush=True)
        results["speed"] = [asdict(r) | {"speedup": r.speedup} for r in speed]
    if a.only in (None, "retrieval"):
        from vzoo.mqar import format_table, plot_curves

        begin = time.perf_counter()
        retrieval = retrieval_rows(a.quick, _progress)
        title = (f"MQAR retrieval fine-tune{' (--quick)' if a.quick else ''}: load average {os.getloadavg()[0]:.1f}, "
                 f"total {time.perf_counter() - begin:.0f} s. The first row is the softmax model the others start from; "
                 f"fine-tuning: {retrieval[-1]['train']}.")
        print(format_table(retrieval, title), flush=True)
        plot_curves(retrieval, a.out / "routing_retrieval.png", "MQAR retrieval: fine-tuning from softmax")
        results["retrieval"] = retrieval
    results["bar"] = check_routing_bar(speed, retrieval)
    print("\n".join(results["bar"]), flush=True)
    write_json_atomic(results, a.out / ("results_routing.json" if a.only is None else f"results_routing_{a.only}.json"))


if __name__ == "__main__":
    main()
