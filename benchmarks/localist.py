"""Localist attention (arXiv 2510.17358 / 2511.03559): a tiny byte-level Llama trained on Python's
``pydoc_data.topics`` at several values of the locality dial (the group-sparsity penalty of
``vzoo.lm.localist`` over fixed-size key blocks, added to the LM loss). Reports, on held-out text, the attention
entropy in bits, the pointer fidelity (attention mass on the query's own key block: the "rule-designated" group
here), the largest single-group mass, the mass on the first key block (where an attention sink sits) and the
validation perplexity; same seed, data order and step count for every
dial. Table on stdout, ``bench-results/results_localist.json`` and ``bench-results/localist.png``.

    python benchmarks/localist.py                  # dials 0, 0.3, 0.6, 1.0
    python benchmarks/localist.py --steps 40       # smoke test
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vzoo.atomic import save_figure, write_json_atomic
from vzoo.lm.localist import (
    LocalistPenalty, attention_entropy_bits, block_groups, group_masses, group_sparsity_penalty, pointer_fidelity,
    target_mask,
)
from vzoo.lm_quality import reference_bytes


def make_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=512, attention_dropout=0.0)
    return LlamaForCausalLM(cfg)


def train_one(dial: float, train: torch.Tensor, val: torch.Tensor, a: argparse.Namespace) -> dict:
    model = make_model(a.seed).train()
    g = torch.Generator().manual_seed(a.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.1)
    begin = time.perf_counter()
    with LocalistPenalty(model, a.block, dial) as hook:
        for step in range(a.steps):
            starts = torch.randint(0, len(train) - a.length - 1, (a.batch,), generator=g).tolist()
            ids = torch.stack([train[s:s + a.length] for s in starts])
            lm = model(ids, labels=ids).loss
            penalty = hook.penalty()
            hook.maps.clear()
            loss = lm + dial * penalty
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 100 == 0 or step == a.steps - 1:
                print(f"dial {dial}: step {step} lm {lm.item():.3f} penalty {penalty.item():.3f}", flush=True)
        train_s = time.perf_counter() - begin
        model.eval()
        groups = block_groups(a.length, a.block)
        own = target_mask(groups, groups)  # each query's own key block
        nll, count, entropy, fidelity, top, first, penalty = 0.0, 0, [], [], [], [], []
        with torch.no_grad():
            for s in range(0, len(val) - a.length - 1, a.length)[: a.val_windows]:
                ids = val[s:s + a.length][None]
                nll += model(ids, labels=ids).loss.item() * (a.length - 1)
                count += a.length - 1
                for attn in hook.maps:
                    entropy.append(attention_entropy_bits(attn).mean())
                    fidelity.append(pointer_fidelity(attn, own).mean())
                    masses = group_masses(attn, groups)
                    top.append(masses.max(-1).values.mean())
                    first.append(masses[..., 0].mean())
                    penalty.append(group_sparsity_penalty(attn, groups))
                hook.maps.clear()
    mean = lambda xs: torch.stack(xs).mean().item()  # noqa: E731
    return {"dial": dial, "entropy_bits": mean(entropy), "pointer_fidelity": mean(fidelity),
            "top_group_mass": mean(top), "first_block_mass": mean(first),
            "penalty": mean(penalty), "val_ppl": math.exp(nll / count), "train_s": train_s}


def format_table(rows: list[dict], title: str) -> str:
    head = ("| dial | entropy (bits) | pointer fidelity | top-group mass | first-block mass | penalty | val ppl "
            "| train s |")
    lines = [title, "", head, "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dial']:g} | {r['entropy_bits']:.2f} | {r['pointer_fidelity']:.3f} | "
              f"{r['top_group_mass']:.3f} | {r['first_block_mass']:.3f} | {r['penalty']:.3f} | {r['val_ppl']:.2f} | "
              f"{r['train_s']:.0f} |"
              for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dials = [r["dial"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, label in zip(axes, ("entropy_bits", "pointer_fidelity", "val_ppl"),
                              ("attention entropy (bits)", "pointer fidelity (own block)", "validation perplexity")):
        ax.plot(dials, [r[key] for r in rows], "o-")
        ax.set_xlabel("locality dial")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dials", type=float, nargs="+", default=[0.0, 0.3, 0.6, 1.0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128, help="training / validation window in bytes")
    p.add_argument("--block", type=int, default=16, help="key group size (fixed-size key blocks)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    train, val = reference_bytes()
    begin = time.perf_counter()
    rows = [train_one(d, train, val, a) for d in a.dials]
    title = (f"Localist dial: byte-level Llama (2 layers, d 96, 4 heads) on pydoc_data.topics, {a.steps} steps x "
             f"{a.batch} x {a.length} bytes, key blocks of {a.block}; held-out {a.val_windows} windows. "
             f"Total {time.perf_counter() - begin:.0f} s, load average {os.getloadavg()[0]:.1f}, "
             f"torch threads {torch.get_num_threads()}.")
    table = format_table(rows, title)
    print(table, flush=True)
    plot(rows, a.out / "localist.png", "locality dial: entropy, pointer fidelity, perplexity")
    write_json_atomic({"rows": rows, "table": table, "args": {k: str(v) for k, v in vars(a).items()}},
                      a.out / "results_localist.json")


if __name__ == "__main__":
    main()
