"""Deconstructing Attention (arXiv 2510.11602) at toy scale: tiny Llama LMs trained from scratch on the
bytes of Python's ``pydoc_data.topics``, one per attention variant (vzoo.lm.variants), on all layers and
as a hybrid that keeps standard attention in every other layer; same seed, data order and steps for all.
Reports validation perplexity per byte (table, PNG of the curves, JSON) under bench-results/.

    python benchmarks/deconstructed.py                 # defaults: 13 runs of 400 steps, ~3 min on 2 free cores
    python benchmarks/deconstructed.py --steps 60 --variants no_mixing sigmoid    # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from vzoo.atomic import save_figure, write_atomic, write_json_atomic
from vzoo.lm import AttentionVariantConfig, apply_sparse_attention
from vzoo.lm.variants import VARIANTS
from vzoo.lm_quality import reference_bytes


def tiny_llama(a: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(a.seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=a.hidden, intermediate_size=2 * a.hidden, num_hidden_layers=a.layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=a.ctx)
    return LlamaForCausalLM(cfg)


def runs(a: argparse.Namespace) -> dict[str, AttentionVariantConfig | None]:
    """Row label -> config (``None``: the unpatched model, standard attention everywhere)."""
    every_other = tuple(range(1, a.layers, 2))  # variant in odd layers, standard attention in even ones
    rows: dict[str, AttentionVariantConfig | None] = {"standard": None}
    for v in a.variants:
        rows[f"{v} all layers"] = AttentionVariantConfig(v, max_len=a.ctx)
        rows[f"{v} hybrid"] = AttentionVariantConfig(v, layers=every_other, max_len=a.ctx)
    return rows


@torch.no_grad()
def val_ppl(model: torch.nn.Module, val: torch.Tensor, ctx: int, windows: int) -> float:
    """Perplexity per byte over ``windows`` evenly spaced ``ctx``-byte windows of ``val``."""
    starts = torch.linspace(0, len(val) - ctx - 1, windows).long()
    ids = torch.stack([val[s : s + ctx] for s in starts.tolist()])
    model.eval()
    loss = model(ids, labels=ids).loss.item()
    model.train()
    return math.exp(loss)


def train_one(config, a: argparse.Namespace, train: torch.Tensor, val: torch.Tensor, bar: tqdm) -> dict:
    model = tiny_llama(a)
    if config is not None:
        apply_sparse_attention(model, config)  # before the optimizer: owned parameters train too
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warm = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps)))
    gen = torch.Generator().manual_seed(a.seed)  # the same batches for every run
    every = max(1, a.steps // a.points)
    curve, begin = [], time.perf_counter()
    model.train()
    for step in range(1, a.steps + 1):
        starts = torch.randint(0, len(train) - a.ctx - 1, (a.batch,), generator=gen)
        ids = torch.stack([train[s : s + a.ctx] for s in starts.tolist()])
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.update(1)
        if step % every == 0 or step == a.steps:
            curve.append((step, val_ppl(model, val, a.ctx, a.val_windows)))
            bar.set_postfix(ppl=f"{curve[-1][1]:.2f}")
    return {"val_ppl": curve[-1][1], "curve": curve, "train_s": time.perf_counter() - begin,
            "params": sum(p.numel() for p in model.parameters())}


def format_table(results: dict, title: str) -> str:
    base = results["standard"]["val_ppl"]
    lines = [title, "", "| run | layers with the variant | val ppl / byte | / standard | params | train s |",
             "|---|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['layers']} | {r['val_ppl']:.3f} | {r['val_ppl'] / base:.3f} | {r['params']} | "
                     f"{r['train_s']:.0f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    cmap = plt.get_cmap("tab10")
    for label, r in results.items():
        steps, ppl = zip(*r["curve"])
        kind = label.split(" ")[0]
        color = "black" if label == "standard" else cmap(list(VARIANTS).index(kind) % 10)
        ax.plot(steps, ppl, color=color, linestyle="--" if label.endswith("hybrid") else "-", label=label)
    ax.set(xlabel="training step", ylabel="validation perplexity per byte", yscale="log", title=title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "standard"],
                   choices=[v for v in VARIANTS if v != "standard"])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--points", type=int, default=8, help="validation points per curve")
    p.add_argument("--val-windows", type=int, default=64, help="validation windows of --ctx bytes")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    train, val = reference_bytes()
    plan = runs(a)
    results, begin = {}, time.perf_counter()
    with tqdm(total=a.steps * len(plan), desc="deconstructed attention") as bar:
        for label, config in plan.items():
            bar.set_description(label)
            results[label] = train_one(config, a, train, val, bar)
            results[label]["layers"] = ("none" if config is None else
                                        ",".join(map(str, config.layer_ids(a.layers))))
    title = (f"Deconstructed attention, tiny Llama ({a.layers} layers, hidden {a.hidden}, 4 heads / 2 kv) trained from "
             f"scratch on the bytes of pydoc_data.topics ({len(train)} train / {len(val)} validation bytes): "
             f"{a.steps} steps of {a.batch} x {a.ctx} bytes, seed {a.seed}; hybrid = the variant in every other layer, "
             f"standard attention in the rest. Total {time.perf_counter() - begin:.0f} s, load average "
             f"{os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}.")
    table = format_table(results, title)
    print(table, flush=True)
    write_atomic(a.out / "deconstructed.md", lambda tmp: tmp.write_text(table + "\n"))
    write_json_atomic({"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                       "results": json.loads(json.dumps(results))}, a.out / "results_deconstructed.json")
    plot(results, a.out / "deconstructed.png", "Deconstructed attention: validation perplexity per byte")


if __name__ == "__main__":
    main()
