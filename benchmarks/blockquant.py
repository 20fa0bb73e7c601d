"""BCT blockwise quantisation (vzoo.lm.blockquant) on SmolLM2-135M-Instruct: perplexity of fp32 and of
8-bit / 4-bit blockwise and per-tensor quantisation on the first ``--tokens`` tokens of
``pydoc_data.topics`` (one forward pass, every target from position 1 scored), with the storage
compression of the weights (codes + scales; other parameters at 32 bits) against fp32.

    python benchmarks/blockquant.py                   # 2048 tokens, block 64
    python benchmarks/blockquant.py --block 32 --out bench-results/blockquant_b32.json

Bars (issue 18): 8-bit blockwise weights + activations within 1 % of fp32 perplexity; 4-bit at the
block size lower perplexity than 4-bit per-tensor (weights only, and weights + activations). Writes
a JSON file (atomically) and prints a markdown table and one PASS / FAIL line per bar item.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from vzoo.atomic import write_json_atomic
from vzoo.lm.blockquant import BlockQuantConfig, blockquant, model_compression
from vzoo.lm_quality import load_smollm2, perplexity, text_tokens

ALL = dict(attention=True, norms=True, act_fns=True)


def rows(block: int) -> dict[str, BlockQuantConfig | None]:
    """Table label -> configuration (``None``: fp32)."""
    return {
        "fp32": None,
        f"8-bit block {block}, W+A": BlockQuantConfig(8, block),
        f"8-bit block {block}, W+A+attn+norm+act": BlockQuantConfig(8, block, **ALL),
        f"8-bit block {block} pow2, W+A+attn+norm+act": BlockQuantConfig(8, block, "pow2", **ALL),
        "8-bit per-tensor, W+A": BlockQuantConfig(8, None),
        f"4-bit block {block}, W": BlockQuantConfig(4, block, activations=False),
        "4-bit per-tensor, W": BlockQuantConfig(4, None, activations=False),
        f"4-bit block {block}, W+A": BlockQuantConfig(4, block),
        "4-bit per-tensor, W+A": BlockQuantConfig(4, None),
    }


def measure(model, ids: torch.Tensor, config: BlockQuantConfig | None) -> dict:
    begin = time.perf_counter()
    if config is None:
        ppl = perplexity(model, ids, start=1)
        comp = {"ratio": 1.0, "weights_ratio": 1.0}
    else:
        with blockquant(model, config):
            ppl = perplexity(model, ids, start=1)
        comp = model_compression(model, config)
    parts = [] if config is None else [p for p in ("weights", "activations", "attention", "norms", "act_fns") if getattr(config, p)]
    return {
        "bits": None if config is None else config.bits, "block": None if config is None else config.block,
        "scale": None if config is None else config.scale, "parts": parts, "ppl": ppl,
        "model_ratio": comp["ratio"], "weights_ratio": comp["weights_ratio"], "seconds": time.perf_counter() - begin,
    }


def bars(results: dict[str, dict], block: int) -> list[dict]:
    fp32 = results["fp32"]["ppl"]
    eight = results[f"8-bit block {block}, W+A"]["ppl"]
    out = [{"item": f"8-bit block {block} W+A perplexity within 1% of fp32", "value": eight / fp32 - 1,
            "pass": abs(eight / fp32 - 1) <= 0.01}]
    for parts in ("W", "W+A"):
        b, t = results[f"4-bit block {block}, {parts}"]["ppl"], results[f"4-bit per-tensor, {parts}"]["ppl"]
        out.append({"item": f"4-bit block {block} {parts} perplexity below 4-bit per-tensor {parts}",
                    "value": [b, t], "pass": b < t})
    return out


def table(results: dict[str, dict]) -> str:
    fp32 = results["fp32"]["ppl"]
    lines = ["| configuration | ppl | ppl / fp32 | weights ratio | model ratio | s |", "|---|---:|---:|---:|---:|---:|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['ppl']:.4f} | {r['ppl'] / fp32:.4f} | {r['weights_ratio']:.3f}x | "
                     f"{r['model_ratio']:.3f}x | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--out", default="bench-results/blockquant.json")
    a = p.parse_args()
    model, tokenizer = load_smollm2()
    ids = text_tokens(tokenizer, a.tokens)
    results = {}
    for label, config in rows(a.block).items():
        results[label] = measure(model, ids, config)
        print(f"{label}: ppl {results[label]['ppl']:.4f} ({results[label]['seconds']:.1f} s)", flush=True)
    checks = bars(results, a.block)
    print()
    print(table(results))
    print()
    for c in checks:
        print(f"{'PASS' if c['pass'] else 'FAIL'}: {c['item']} ({c['value']})")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    write_json_atomic({
        "model": "SmolLM2-135M-Instruct (fp32, from the Q4_1 GGUF)", "text": "pydoc_data.topics", "tokens": a.tokens,
        "scored": "targets 1 .. tokens - 1", "block": a.block, "torch": torch.__version__, "machine": platform.machine(),
        "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "rows": results, "bars": checks,
    }, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
