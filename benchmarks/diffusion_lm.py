"""Block-diffusion language models (issue 17), same process throughout:

1. mask speed: the BD3 training mask and the block-causal prefill mask on vzoo's kernels against the same
   masks as dense 4-D masks through SDPA (CPU fp32, B1 H4 D64, blocks of 32);
2. decoding: a tiny Llama trained from scratch on digit-string reversal, converted to block diffusion, decoded
   autoregressively and with block decoding at thresholds 0.5-1.0: exact match, forwards per token, wall time,
   and a PNG of the trade-off (``vzoo.bench_diffusion_decode``);
3. ``--smollm2``: the same comparison on SmolLM2-135M-Instruct, fine-tuned and converted briefly on the task;
4. ``--ladir``: LaDiR trained end to end on a small synthetic reasoning task (``vzoo.bench_ladir``).

    python benchmarks/diffusion_lm.py                 # masks at 2k-8k and the tiny-model decoding comparison
    python benchmarks/diffusion_lm.py --skip-masks --smollm2 --ladir
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from vzoo.atomic import save_figure, write_json_atomic


def plot_decode(results: dict[str, list], path: Path) -> None:
    """Exact match against forwards per token, one line of thresholds per model, AR as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, rows), color in zip(results.items(), ("tab:blue", "tab:orange")):
        blocks = [r for r in rows if r.threshold is not None]
        ar = next(r for r in rows if r.threshold is None)
        ax.plot([r.forwards_per_token for r in blocks], [100 * r.exact_match for r in blocks], "o-", color=color,
                label=f"{name}: block decoding")
        for r in blocks:
            ax.annotate(f"{r.threshold:g}", (r.forwards_per_token, 100 * r.exact_match), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        ax.plot([ar.forwards_per_token], [100 * ar.exact_match], "*", ms=12, color=color, label=f"{name}: AR")
    ax.set_xlabel("model forwards per generated token")
    ax.set_ylabel("exact match (%)")
    ax.set_title("digit reversal: block-diffusion decoding vs AR (labels: threshold)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192], help="mask-speed lengths")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--block", type=int, default=32, help="mask-speed block size")
    p.add_argument("--skip-masks", action="store_true", help="skip the mask-speed part")
    p.add_argument("--examples", type=int, default=300, help="held-out prompts per decoder")
    p.add_argument("--pretrain-steps", type=int, default=600, help="AR steps before the AR / diffusion split")
    p.add_argument("--tune-steps", type=int, default=1200, help="steps of each branch after the split")
    p.add_argument("--smollm2", action="store_true", help="also run the SmolLM2-135M conversion (~10 min)")
    p.add_argument("--ladir", action="store_true", help="also train and evaluate LaDiR (~8 min)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for JSON and PNG results")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)

    if not a.skip_masks:
        from vzoo.bench_diffusion import check_diffusion_bar, format_masks, mask_rows

        rows = mask_rows(a.tokens, a.repeats, a.block)
        print(format_masks(rows), flush=True)
        bar = check_diffusion_bar(rows)
        print("\n".join(bar), flush=True)
        write_json_atomic({"masks": [asdict(r) | {"speedup": r.speedup} for r in rows], "bar": bar},
                          a.out / "results_diffusion_masks.json")

    from vzoo.bench_diffusion_decode import (
        ReversalTask, check_decode_bar, decode_rows, format_decode, smollm2_rows, train_models,
    )

    task = ReversalTask()
    print(f"\ndecoding: tiny Llama, digit reversal of {task.lengths[0]}-{task.lengths[1]} digits, block {task.block}, "
          f"{a.pretrain_steps} AR steps, then {a.tune_steps} more as AR (baseline) or converting to block diffusion, "
          f"{a.examples} held-out prompts", flush=True)
    ar, dlm = train_models(task, pretrain_steps=a.pretrain_steps, tune_steps=a.tune_steps)
    results = {"tiny model": decode_rows(ar, dlm, task, examples=a.examples)}
    print(format_decode(results["tiny model"]))
    bar = check_decode_bar(results["tiny model"])
    print("\n".join(bar), flush=True)
    if a.smollm2:
        results["SmolLM2-135M"] = smollm2_rows()
        print("\nSmolLM2-135M-Instruct, fine-tuned then converted on the same task (short run):")
        print(format_decode(results["SmolLM2-135M"]), flush=True)
    report = {name: [asdict(r) for r in rows] for name, rows in results.items()} | {"bar": bar}
    if a.ladir:
        from vzoo.bench_ladir import format_ladir, ladir_rows

        ladir = ladir_rows()
        print("\nLaDiR on a synthetic reasoning task:")
        print(format_ladir(ladir), flush=True)
        report["ladir"] = [asdict(r) for r in ladir]
    write_json_atomic(report, a.out / "results_diffusion_decode.json")
    plot_decode(results, a.out / "diffusion_decode.png")
    print(f"results in {a.out}/results_diffusion_decode.json and diffusion_decode.png")


if __name__ == "__main__":
    main()
