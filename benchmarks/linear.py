"""Linear and recurrent attention (Lightning, RAT, Titans' memory, LLA), three parts:

(a) speed of each op against causal SDPA from 2k to 64k tokens, forward and forward+backward, with a
    log-log plot of the slopes, and decode cost per token at 1k and 32k of context (the op alone and a
    whole attention layer with its cache);
(b) quality: multi-query associative recall (Zoology's MQAR) trained from scratch on tiny two-layer
    models, softmax attention against each converted layer (accuracy table, training curves);
(c) with --hybrid: SmolLM2-135M converted to hybrids and briefly fine-tuned on pydoc_data.topics,
    perplexity against the original.

    python benchmarks/linear.py                          # (a) and (b)
    python benchmarks/linear.py --only speed --tokens 8192 32768
    python benchmarks/linear.py --only mqar --rows softmax rat   # rows whose label contains one of these
    python benchmarks/linear.py --only hybrid --hybrid-steps 200
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from vzoo.atomic import write_json_atomic
from vzoo.bench_linear import (
    check_linear_bar, decode_rows, format_decode, format_hybrid, format_speed, hybrid_finetune, layer_decode_rows,
    plot_speed, speed_rows,
)


def speed(a: argparse.Namespace, out: Path) -> dict:
    where = {"device": a.device, "dtype": getattr(torch, a.dtype)}
    rows = speed_rows(a.tokens, modes=("fwd",), repeats=a.repeats, **where)
    rows += speed_rows([t for t in a.tokens if t <= a.bwd_max], modes=("fwd+bwd",), repeats=a.repeats, **where)
    print(format_speed(rows), flush=True)
    plot_speed(rows, out / "linear_speed.png")
    if a.device != "cpu":  # the decode rows and the bar are CPU fp32
        return {"speed": [asdict(r) | {"speedup": r.speedup} for r in rows]}
    from vzoo.lm import LightningConfig, RATConfig

    decode = decode_rows()
    decode += layer_decode_rows({"sdpa": None, "lightning": LightningConfig(), "rat (chunk 16)": RATConfig()})
    print(format_decode(decode))
    verdicts = check_linear_bar(rows, decode)
    print("\n".join(verdicts), flush=True)
    return {"speed": [asdict(r) | {"speedup": r.speedup} for r in rows], "decode": [asdict(r) for r in decode],
            "bar": verdicts}


def mqar(a: argparse.Namespace, out: Path) -> dict:
    from vzoo.mqar import converters, format_table, mqar_rows, plot_curves

    rows = {label: fn for label, fn in converters().items()
            if a.rows is None or any(s.lower() in label.lower() for s in a.rows)}
    if not rows:
        raise SystemExit(f"--rows {a.rows} matches none of {list(converters())}")
    begin, results = time.perf_counter(), []
    for label, fn in rows.items():
        results += mqar_rows(a.quick, {label: fn}, _progress)
        write_json_atomic({"mqar": results}, out / "results_mqar_partial.json")  # survives an interruption
    title = (f"MQAR on one CPU thread{' (--quick)' if a.quick else ''}: load average {os.getloadavg()[0]:.1f}, "
             f"total {time.perf_counter() - begin:.0f} s.")
    print(format_table(results, title), flush=True)
    plot_curves(results, out / "mqar_curves.png", "MQAR held-out accuracy" + (" (--quick)" if a.quick else ""))
    return {"mqar": results}


def _progress(label: str, step: int, acc: float, loss: float) -> None:
    print(f"{label}: step {step} accuracy {acc:.3f} loss {loss:.3f}", file=sys.stderr, flush=True)


def hybrid(a: argparse.Namespace, out: Path) -> dict:
    from vzoo.lm import LightningConfig, RATConfig

    layers = 30  # SmolLM2-135M: 9 query heads over 3 key/value heads
    cases = {
        "lightning in 3 of 4 layers": (LightningConfig(layers=tuple(i for i in range(layers) if i % 4 != 3)), None),
        "rat + local attention (window 512)": (RATConfig(layers=tuple(range(1, layers, 2)), ngroups=3), 512),
    }
    rows = []
    for name, (cfg, window) in cases.items():
        if a.hybrid_rows and not any(s.lower() in name.lower() for s in a.hybrid_rows):
            continue
        rows.append(hybrid_finetune(name, cfg, local_window=window, steps=a.hybrid_steps))
        print(format_hybrid(rows[-1:]), flush=True)
        write_json_atomic({"hybrid": [asdict(r) for r in rows]}, out / "results_hybrid_partial.json")
    print(format_hybrid(rows), flush=True)
    return {"hybrid": [asdict(r) for r in rows]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--bwd-max", type=int, default=32768, help="longest prompt timed forward+backward")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--only", choices=["speed", "mqar", "hybrid"], help="run one part (default: speed and mqar)")
    p.add_argument("--quick", action="store_true", help="MQAR with the quick budget (far from converged)")
    p.add_argument("--rows", nargs="+", help="MQAR: only rows whose label contains one of these (any case)")
    p.add_argument("--hybrid-steps", type=int, default=150)
    p.add_argument("--hybrid-rows", nargs="+", help="hybrid: only cases whose name contains one of these")
    p.add_argument("--out", default="linear_results", help="folder for the PNGs and results.json")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    results: dict = {}
    if a.only in (None, "speed"):
        results |= speed(a, out)
    if a.only in (None, "mqar"):
        results |= mqar(a, out)
    if a.only == "hybrid":
        results |= hybrid(a, out)
    write_json_atomic(results, out / f"results_{a.only or 'all'}.json")
    print(f"results in {out}/")


if __name__ == "__main__":
    main()
